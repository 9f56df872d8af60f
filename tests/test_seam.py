"""The seam with TRL, as users meet it: several trainers sharing a reference model (a sweep), a policy reused by
sequential trainers, `generate` after training, a custom token weighting through `compute_token_weights`, and a random
one (SamPO): one draw per batch for policy and reference, afresh every step, reproducible."""

import inspect
import math

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

from otpo_trl import OTPOConfig, OTPOTrainer

from .testing_utils import StopAfter, config, conversational_pairs, losses, perturbed


def batch_loss(trainer):
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch).item()


def make(tiny_model_dir, tmp_path, name, ref_model, policy=None, cls=OTPOTrainer, **overrides):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg_cls = OTPOConfig if cls is OTPOTrainer else DPOConfig
    policy = policy if policy is not None else perturbed(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    # fp32: these compare losses of trainers with each other to 1e-6; bf16 is covered in test_precision / test_oracle.
    args = config(cfg_cls, tmp_path / name, per_device_train_batch_size=4, bf16=False, **overrides)
    return cls(
        model=policy, ref_model=ref_model, args=args, train_dataset=conversational_pairs(4), processing_class=tok
    )


def test_trainers_sharing_a_reference_model_each_get_their_own_loss(tiny_model_dir, tmp_path):
    """A sweep over ot_reg with one reference model in memory (and a DPO baseline beside it) gives every trainer the
    loss it gets alone. (Each trainer used to patch the shared reference again, and all but the last lost it.)"""
    shared = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    regs = (1.0, 0.1, 0.03)
    sweep = [make(tiny_model_dir, tmp_path, f"sweep{r}", shared, ot_reg=r) for r in regs]
    dpo = make(tiny_model_dir, tmp_path, "dpo", shared, cls=DPOTrainer)
    alone = [
        make(tiny_model_dir, tmp_path, f"alone{r}", AutoModelForCausalLM.from_pretrained(tiny_model_dir), ot_reg=r)
        for r in regs
    ]
    dpo_alone = make(
        tiny_model_dir, tmp_path, "dpo_alone", AutoModelForCausalLM.from_pretrained(tiny_model_dir), cls=DPOTrainer
    )
    expected = [batch_loss(t) for t in alone]
    assert len(set(expected)) == len(regs)  # the settings matter: a mix-up would show
    assert [batch_loss(t) for t in sweep] == pytest.approx(expected, rel=1e-6)
    assert batch_loss(dpo) == pytest.approx(batch_loss(dpo_alone), rel=1e-6)


def test_a_policy_reused_by_sequential_trainers(tiny_model_dir, tmp_path):
    """Train with one trainer, then hand the same model object to a second one with other settings: the second
    trainer's loss is the one a fresh trainer gets on a copy of those weights, and the first's hooks stay silent."""
    policy = perturbed(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    first = make(tiny_model_dir, tmp_path, "first", AutoModelForCausalLM.from_pretrained(tiny_model_dir), policy)
    first.train()
    second = make(
        tiny_model_dir, tmp_path, "second", AutoModelForCausalLM.from_pretrained(tiny_model_dir), policy, ot_reg=0.1
    )
    copy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    copy.load_state_dict(policy.state_dict())
    fresh = make(
        tiny_model_dir, tmp_path, "fresh", AutoModelForCausalLM.from_pretrained(tiny_model_dir), copy, ot_reg=0.1
    )
    assert batch_loss(second) == pytest.approx(batch_loss(fresh), rel=1e-6)


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_generate_after_training(tiny_model_dir, tmp_path, use_lora):
    """The models' `forward` is not replaced by OTPO (hooks only), so `generate`, which validates its kwargs against
    `forward`'s signature, works on the trained model."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = config(OTPOConfig, tmp_path, max_steps=2)
    trainer = OTPOTrainer(
        model=tiny_model_dir,
        args=args,
        train_dataset=conversational_pairs(),
        processing_class=tok,
        peft_config=lora if use_lora else None,
    )
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert "input_ids" in inspect.signature(model.forward).parameters
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hello?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 4 or out[0, -1].item() == tok.eos_token_id


class SharedPrefixTrainer(OTPOTrainer):
    """README's example: weight 1 for the tokens within the shorter completion's length, 0 past it."""

    def compute_token_weights(self, chosen_hidden, rejected_hidden, chosen_mask, rejected_mask):
        shorter = torch.minimum(chosen_mask.sum(1), rejected_mask.sum(1))[:, None]
        weights = [(mask.cumsum(1) <= shorter).float() for mask in (chosen_mask, rejected_mask)]
        return torch.cat(weights)


def test_custom_token_weighting_trains(tiny_model_dir, tmp_path):
    """A subclass overriding `compute_token_weights` trains, and its weights reach policy and reference alike: tokens
    past the shorter completion dropped is LD-DPO with ld_alpha=0, which TRL computes on its own."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    runs = []
    for cls, cfg_cls, extra in ((SharedPrefixTrainer, OTPOConfig, {}), (DPOTrainer, DPOConfig, {"ld_alpha": 0.0})):
        args = config(cfg_cls, tmp_path / cls.__name__, max_steps=3, **extra)
        trainer = cls(model=tiny_model_dir, args=args, train_dataset=conversational_pairs(), processing_class=tok)
        trainer.train()
        runs.append(losses(trainer))
    assert runs[0] == pytest.approx(runs[1], rel=1e-4)
    assert runs[0][0] != pytest.approx(runs[0][-1], rel=1e-3)  # it trained


def test_a_trainer_is_freed_with_its_hooks(tiny_model_dir, tmp_path):
    """Hooks on a model that outlives its trainer (a sweep's shared reference) hold the trainer weakly and go with it."""
    import gc
    import weakref

    shared = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = make(tiny_model_dir, tmp_path, "gone", shared)
    assert len(shared._forward_hooks) == 1 and not shared._forward_pre_hooks
    alive = weakref.ref(trainer)
    del trainer
    gc.collect()
    assert alive() is None
    assert not shared._forward_hooks and not shared._forward_pre_hooks
    dpo = make(tiny_model_dir, tmp_path, "after", shared, cls=DPOTrainer)
    assert batch_loss(dpo) > 0  # the model still works


# ------------------------------------------------------------------ SamPO (`ot_weighting: sampo`): a random weighting


class RecordingTrainer(OTPOTrainer):
    """Keeps (training?, global_step, weights) of every batch."""

    def compute_token_weights(self, chosen_hidden, rejected_hidden, chosen_mask, rejected_mask):
        weights = super().compute_token_weights(chosen_hidden, rejected_hidden, chosen_mask, rejected_mask)
        self.seen.append((self.model.training, self.state.global_step, weights.clone()))
        return weights


def sampo(tiny_model_dir, out, dataset, **overrides):
    args = config(OTPOConfig, out, ot_weighting="sampo", **overrides)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    trainer = RecordingTrainer(model=tiny_model_dir, args=args, train_dataset=dataset, processing_class=tok)
    trainer.seen = []
    return trainer


def one_pair(n=8):
    """The first pair of `conversational_pairs`, n times: every batch holds the same tokens."""
    return conversational_pairs(1).select([0] * n)


def test_sampo_policy_and_reference_sum_over_the_same_sampled_tokens(tiny_model_dir, tmp_path):
    """At step 1 the policy is the reference, so the loss is ln 2 and the rewards 0 exactly when the policy's and the
    reference's log-probs are summed over the same sampled tokens (a second draw for the reference breaks it)."""
    trainer = sampo(tiny_model_dir, tmp_path, conversational_pairs(), max_steps=1)
    trainer.train()
    logs = trainer.state.log_history[0]
    assert logs["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert logs["rewards/chosen"] == 0.0 and logs["rewards/rejected"] == 0.0
    (_, _, weights), batch = trainer.seen[0], trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    mask = batch["completion_mask"][:, 1:].bool()
    chosen, rejected = mask.chunk(2)
    assert (chosen.sum(1) != rejected.sum(1)).all()  # the longer side of each pair is down-sampled
    kept = (weights > 0) & mask
    assert torch.equal(kept[: len(chosen)].sum(1), kept[len(chosen) :].sum(1))  # min(n, m) tokens on each side
    assert (kept.sum(1) < mask.sum(1)).any() and set(weights[mask].tolist()) == {0.0, 1.0}


def test_sampo_draws_afresh_every_step_and_alike_for_a_seed_and_on_resume(tiny_model_dir, tmp_path):
    """Every batch the same pair: each step draws other tokens; a run cut at step 2 and resumed draws what the
    uninterrupted run drew (same losses too), and another seed draws otherwise."""
    steps = dict(max_steps=4, save_strategy="steps", save_steps=2)
    full = sampo(tiny_model_dir, tmp_path / "full", one_pair(), **steps)
    full.train()
    drawn = [weights for _, _, weights in full.seen]
    assert not torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[1], drawn[2])

    cut = sampo(tiny_model_dir, tmp_path / "cut", one_pair(), **steps)
    cut.add_callback(StopAfter(2))
    cut.train()
    resumed = sampo(tiny_model_dir, tmp_path / "cut", one_pair(), **steps)
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "out" / "checkpoint-2"))
    assert [step for _, step, _ in resumed.seen] == [2, 3]
    for (_, _, again), first in zip(cut.seen + resumed.seen, drawn):
        torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert losses(resumed)[-2:] == pytest.approx(losses(full)[-2:], rel=1e-6)

    other = sampo(tiny_model_dir, tmp_path / "other", one_pair(), max_steps=1, seed=7)
    other.train()
    assert not torch.equal(other.seen[0][2], drawn[0])


def test_sampo_evaluation_draws_alike_each_time(tiny_model_dir, tmp_path):
    """`evaluate()` twice gives the same numbers: each evaluation draws the same samples, batch by batch (and
    different ones for different batches of the same tokens)."""
    trainer = sampo(tiny_model_dir, tmp_path, one_pair(), max_steps=2)
    trainer.eval_dataset = trainer.train_dataset
    trainer.train()  # policy != reference from here on: the numbers depend on the sample

    def evaluated():  # the metrics, without the timings
        return {k: v for k, v in trainer.evaluate().items() if "runtime" not in k and "_per_second" not in k}

    first, second = evaluated(), evaluated()
    assert first["eval_loss"] != pytest.approx(math.log(2), abs=1e-3) and "eval_rewards/margins" in first
    assert first == second
    evaluated = [weights for training, _, weights in trainer.seen if not training]
    half = len(evaluated) // 2
    assert half == 4 and not torch.equal(evaluated[0], evaluated[1])
    assert all(torch.equal(a, b) for a, b in zip(evaluated[:half], evaluated[half:]))
