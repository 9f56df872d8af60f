"""OTPOTrainer against an independent oracle, at a step where the policy differs from the reference and the OT
weights are far from uniform (ot_reg=0.1).

The oracle is a plain transformers forward (full logits, `output_hidden_states=True`): the policy's last-layer states
that predict each token, per-token log-probs of policy and reference, weights from `ot_token_weights`, and the loss
written out by hand. Nothing of the trainer's seam (hooks, fused LM head, precompute) is used by it.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from otpo_trl import OTPOConfig, OTPOTrainer, ot_token_weights

from .testing_utils import config, conversational_pairs, perturbed


BETA = 0.5
OT = {"ot_reg": 0.1}  # small entropic regularisation: weights far from uniform


def plain_forward(model, batch):
    """(2B, T-1) per-token log-probs of tokens 1..T-1 and (2B, T-1, H) the last-layer states predicting them."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        output_hidden_states=True,
        use_cache=False,
    )
    targets = batch["input_ids"][:, 1:]
    logps = out.logits[:, :-1].float().log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    return logps, out.hidden_states[-1][:, :-1]


def wpo_weights(model, batch):
    """(B,) TRL 1.16's WPO weight of each pair (`use_weighting`, Eq. 2 of the WPO paper), by hand from full logits:
    exp(mean over the completion of log p(y_t) - log sum_v p(v)^2), chosen times rejected, from the policy's
    unweighted log-probs, no gradient."""
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        log_probs = out.logits[:, :-1].float().log_softmax(-1)
        token = log_probs.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
        log_sum_sq = (2 * log_probs).logsumexp(-1)
        mask = batch["completion_mask"][:, 1:]
        weights = (((token - log_sum_sq) * mask).sum(1) / mask.sum(1).clamp_min(1)).exp()
    chosen, rejected = weights.chunk(2)
    return chosen * rejected


def oracle(policy_logps, ref_logps, hidden, batch, args, loss_type, wpo=None, cost_scale=None):
    """The loss and TRL's reward/log-prob metrics of one batch, by hand, with OT weights from the policy states
    (detached: the weights are constants of the loss). `wpo`: the (B,) WPO weights of the pairs; `cost_scale`
    overrides `args.ot_cost_scale`. `loss_tensor` keeps the graph, for gradients."""
    mask = batch["completion_mask"][:, 1:].bool()
    chosen_w, rejected_w = ot_token_weights(
        *hidden.detach().float().chunk(2),
        *mask.chunk(2),
        reg=args.ot_reg,
        reg_m=args.ot_reg_m,
        cost=args.ot_cost,
        cost_scale=cost_scale or args.ot_cost_scale,
        normalization=args.ot_normalization,
        weighting=args.ot_weighting,
    )
    weights = torch.cat([chosen_w, rejected_w]) * mask
    logps = (policy_logps * weights).sum(1)
    logratios = logps - (ref_logps * weights).sum(1)
    chosen, rejected = logratios.chunk(2)
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(BETA * (chosen - rejected))
    elif loss_type == "ipo":  # TRL averages the log-ratios over each completion's tokens
        n_chosen, n_rejected = mask.sum(1).chunk(2)
        loss = (chosen / n_chosen - rejected / n_rejected - 1 / (2 * BETA)) ** 2
    elif loss_type == "apo_zero":
        loss = 1 - torch.sigmoid(BETA * chosen) + torch.sigmoid(BETA * rejected)
    if wpo is not None:
        loss = loss * wpo
    return {
        "loss": loss.mean().item(),
        "loss_tensor": loss.mean(),
        "rewards/chosen": BETA * chosen.mean().item(),
        "rewards/rejected": BETA * rejected.mean().item(),
        "logps/chosen": logps.chunk(2)[0].mean().item(),
        "logps/rejected": logps.chunk(2)[1].mean().item(),
        "weights": weights[mask],
    }


def last_metrics(trainer):
    """TRL's metric lists of the mode the last `compute_loss` ran in."""
    return trainer._metrics["train" if trainer.model.training else "eval"]


def first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def assert_far_from_uniform(weights):
    # Weights sum to the shorter length per side; with ot_reg=0.1 some are far from 1.
    assert (weights - 1).abs().max() > 0.2, weights


def make_trainer(tiny_model_dir, tmp_path, model=None, ref_model=None, peft_config=None, **overrides):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    # fp32 (bf16=False): the exact comparisons; the bf16 autocast path is tested below with its own tolerance.
    kwargs = dict(beta=BETA, bf16=False, per_device_train_batch_size=4, max_steps=1, **OT)
    args = config(OTPOConfig, tmp_path, **{**kwargs, **overrides})
    return OTPOTrainer(
        model=model if model is not None else tiny_model_dir,
        ref_model=ref_model,
        args=args,
        train_dataset=conversational_pairs(4),
        processing_class=tok,
        peft_config=peft_config,
    )


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "apo_zero"])
def test_loss_matches_oracle_with_explicit_reference(tiny_model_dir, tmp_path, loss_type):
    policy = perturbed(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = make_trainer(tiny_model_dir, tmp_path, policy, reference, loss_type=[loss_type])
    batch = first_batch(trainer)
    with torch.no_grad():
        policy_logps, hidden = plain_forward(policy, batch)
        ref_logps, _ = plain_forward(reference, batch)
        expected = oracle(policy_logps, ref_logps, hidden, batch, trainer.args, loss_type)
        loss = trainer.compute_loss(trainer.model, batch).item()
    assert_far_from_uniform(expected["weights"])
    assert loss == pytest.approx(expected["loss"], rel=1e-5, abs=1e-6)
    metrics = last_metrics(trainer)
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert metrics[key][-1] == pytest.approx(expected[key], rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("existing_adapter", [False, True], ids=["new_adapter", "existing_adapter"])
def test_loss_matches_oracle_with_lora(tiny_model_dir, tmp_path, existing_adapter):
    """LoRA. A new adapter (`peft_config`): the reference is the policy with its adapter disabled. An existing adapter
    (a `PeftModel` passed in): TRL keeps its initial copy under the name "ref", and that is the reference."""
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    if existing_adapter:
        trainer = make_trainer(
            tiny_model_dir, tmp_path, get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora)
        )
        assert "ref" in trainer.model.peft_config
    else:
        trainer = make_trainer(tiny_model_dir, tmp_path, peft_config=lora)
    model = trainer.model
    assert trainer.ref_model is None
    with torch.no_grad():  # lora_B starts at zero: give the trained adapter an effect, so policy != reference
        for name, p in model.named_parameters():
            if "lora_B.default" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    batch = first_batch(trainer)
    with torch.no_grad():
        policy_logps, hidden = plain_forward(model, batch)
        if existing_adapter:
            model.set_adapter("ref")
            ref_logps, _ = plain_forward(model, batch)
            model.set_adapter("default")
        else:
            with model.disable_adapter():
                ref_logps, _ = plain_forward(model, batch)
        expected = oracle(policy_logps, ref_logps, hidden, batch, trainer.args, "sigmoid")
        loss = trainer.compute_loss(trainer.model, batch).item()
    assert_far_from_uniform(expected["weights"])
    assert loss == pytest.approx(expected["loss"], rel=1e-5, abs=1e-6)
    assert last_metrics(trainer)["rewards/rejected"][-1] == pytest.approx(
        expected["rewards/rejected"], rel=1e-4, abs=1e-5
    )


def test_loss_matches_oracle_with_precomputed_reference(tiny_model_dir, tmp_path):
    """The reference log-probs are precomputed per token at init (policy == reference then); the policy then moves."""
    trainer = make_trainer(tiny_model_dir, tmp_path, precompute_ref_log_probs=True)
    perturbed(trainer.model)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    batch = first_batch(trainer)
    assert batch["ref_chosen_logps"].dim() == 2  # per token
    with torch.no_grad():
        policy_logps, hidden = plain_forward(trainer.model, batch)
        ref_logps, _ = plain_forward(reference, batch)
        expected = oracle(policy_logps, ref_logps, hidden, batch, trainer.args, "sigmoid")
        loss = trainer.compute_loss(trainer.model, dict(batch)).item()
    assert_far_from_uniform(expected["weights"])
    assert loss == pytest.approx(expected["loss"], rel=1e-5, abs=1e-6)
    assert last_metrics(trainer)["rewards/chosen"][-1] == pytest.approx(expected["rewards/chosen"], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("precompute", [False, True], ids=["live_reference", "precomputed_reference"])
def test_bf16_training_step_matches_oracle(tiny_model_dir, tmp_path, precompute):
    """One real training step under DPOConfig's default bf16 (accelerate's autocast on the CPU): the logged loss and
    rewards equal the oracle run under the same autocast, within bf16's accuracy, and not the unweighted values."""
    policy = perturbed(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = make_trainer(
        tiny_model_dir, tmp_path, policy, reference, bf16=True, learning_rate=0.0, precompute_ref_log_probs=precompute
    )
    # The batch is the whole data set (4 pairs), so its order does not change the logged means.
    batch = first_batch(trainer)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        policy_logps, hidden = plain_forward(policy, batch)
        ref_logps, _ = plain_forward(reference, batch)
    expected = oracle(policy_logps, ref_logps, hidden, batch, trainer.args, "sigmoid")
    mask = batch["completion_mask"][:, 1:].bool()
    uniform = ((policy_logps - ref_logps) * mask).sum(1).chunk(2)
    trainer.train()
    logs = trainer.state.log_history[0]
    assert_far_from_uniform(expected["weights"])
    for key in ("rewards/chosen", "rewards/rejected"):
        assert logs[key] == pytest.approx(expected[key], rel=0.02, abs=2e-3), key
    assert logs["rewards/chosen"] != pytest.approx(BETA * uniform[0].mean().item(), rel=0.1, abs=1e-2)
    assert logs["loss"] == pytest.approx(expected["loss"], abs=2e-3)
    assert math.isfinite(logs["loss"])


def test_wpo_loss_matches_oracle(tiny_model_dir, tmp_path):
    """WPO (`use_weighting=True`) at weights far from uniform: TRL weights each pair by the policy's probability of
    it, read from `log_probs - log_sum_sq_probs`; OTPO weights `log_probs`, so it must shift `log_sum_sq_probs` for WPO
    to see the unweighted probabilities. (Without that shift this loss was 25.6 instead of 0.55, and no test saw it.)"""
    policy = perturbed(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = make_trainer(tiny_model_dir, tmp_path, policy, reference, use_weighting=True)
    batch = first_batch(trainer)
    wpo = wpo_weights(policy, batch)
    with torch.no_grad():
        policy_logps, hidden = plain_forward(policy, batch)
        ref_logps, _ = plain_forward(reference, batch)
        expected = oracle(policy_logps, ref_logps, hidden, batch, trainer.args, "sigmoid", wpo=wpo)
        without_wpo = oracle(policy_logps, ref_logps, hidden, batch, trainer.args, "sigmoid")
        loss = trainer.compute_loss(trainer.model, batch).item()
    assert_far_from_uniform(expected["weights"])
    assert (wpo - 1).abs().max() > 0.1, wpo  # WPO's pair weights matter here too
    assert expected["loss"] != pytest.approx(without_wpo["loss"], rel=0.05)
    assert loss == pytest.approx(expected["loss"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("use_weighting", [False, True], ids=["dpo", "wpo"])
def test_gradients_match_oracle(tiny_model_dir, tmp_path, use_weighting):
    """The trainer's backward is the hand-written loss's backward with the OT (and WPO) weights as constants: every
    parameter's gradient. Weights left attached to the graph, or a gradient through the reference, would change it."""
    policy = perturbed(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = make_trainer(tiny_model_dir, tmp_path, policy, reference, use_weighting=use_weighting)
    batch = first_batch(trainer)
    params = {name: p for name, p in policy.named_parameters() if p.requires_grad}

    policy.zero_grad()
    trainer.compute_loss(trainer.model, batch).backward()
    got = {name: p.grad.clone() for name, p in params.items()}

    policy.zero_grad()
    policy_logps, hidden = plain_forward(policy, batch)
    with torch.no_grad():
        ref_logps, _ = plain_forward(reference, batch)
    wpo = wpo_weights(policy, batch) if use_weighting else None
    expected = oracle(policy_logps, ref_logps, hidden, batch, trainer.args, "sigmoid", wpo=wpo)
    expected["loss_tensor"].backward()
    assert_far_from_uniform(expected["weights"])
    assert all(p.grad is None for p in reference.parameters())
    for name, p in params.items():
        assert p.grad.abs().max() > 0 or "embed" in name, f"{name}: no gradient, the comparison says nothing"
        atol = 1e-5 * p.grad.abs().max().item()  # fp32 sums in another order: relative to the tensor's scale
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


def with_shared_offset(model, size=10.0, seed=3):
    """`model` whose last-layer states (after its final norm) all carry one large vector, as LLM states share a large
    mean: the states' norms, which the official cost scale divides by, then dwarf their distances to each other."""
    offset = size * torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    model.model.norm.register_forward_hook(lambda module, args, output: output + offset)
    return model


def test_official_and_pair_cost_scales_reach_the_trainer(tiny_model_dir, tmp_path):
    """With a large shared offset in the states, `ot_cost_scale` "official" (divide by the maximum over the official
    code's padded matrix, which holds the states' norms) and "pair" (the maximum over the pair's valid tokens) give
    very different weights and losses; the trainer gives each its own. (On SmolLM2 the two nearly coincide, so a
    trainer reading one for the other was seen only as a 0.8 % loss difference in one test.)"""
    policy = with_shared_offset(perturbed(AutoModelForCausalLM.from_pretrained(tiny_model_dir)))
    reference = with_shared_offset(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    trainer = make_trainer(tiny_model_dir, tmp_path, policy, reference)
    batch = first_batch(trainer)
    with torch.no_grad():
        policy_logps, hidden = plain_forward(policy, batch)
        ref_logps, _ = plain_forward(reference, batch)
        expected = {
            scale: oracle(policy_logps, ref_logps, hidden, batch, trainer.args, "sigmoid", cost_scale=scale)
            for scale in ("official", "pair")
        }
        assert (expected["official"]["weights"] - expected["pair"]["weights"]).abs().max() > 0.5
        assert expected["official"]["loss"] != pytest.approx(expected["pair"]["loss"], rel=0.1)
        for scale in ("official", "pair"):
            trainer.args.ot_cost_scale = scale
            loss = trainer.compute_loss(trainer.model, batch).item()
            assert loss == pytest.approx(expected[scale]["loss"], rel=1e-5, abs=1e-6), scale
            assert last_metrics(trainer)["rewards/chosen"][-1] == pytest.approx(
                expected[scale]["rewards/chosen"], rel=1e-4, abs=1e-5
            ), scale
