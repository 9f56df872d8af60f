"""OTPOTrainer against TRL's DPOTrainer, on a tiny Llama built from a config (CPU, offline)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import Dataset, IterableDataset
from peft import LoraConfig, PromptTuningConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from trl import DPOConfig

from otpo_trl import OTPOConfig, OTPOTrainer, callbacks, ot_token_weights
from otpo_trl.callbacks import console_logs
from otpo_trl.otpo_config import LOSS_TYPES

from .testing_utils import config, conversational_pairs, losses, make_tiny_tokenizer, train_pair


def standard_pairs(n=8):
    ds = conversational_pairs(n)
    return Dataset.from_list(
        [
            {
                "prompt": r["prompt"][0]["content"],
                "chosen": r["chosen"][0]["content"],
                "rejected": r["rejected"][0]["content"],
            }
            for r in ds
        ]
    )


@pytest.mark.parametrize("dataset_fn", [conversational_pairs, standard_pairs])
def test_near_uniform_weights_reproduce_dpo(tiny_model_dir, tmp_path, dataset_fn):
    dpo, otpo = train_pair(tiny_model_dir, tmp_path, dataset=dataset_fn())
    assert len(losses(dpo)) == 3
    assert losses(otpo) == pytest.approx(losses(dpo), rel=1e-4)
    # the optimisation really moved: the trajectory is not flat
    assert losses(dpo)[0] != pytest.approx(losses(dpo)[-1], rel=1e-3)
    logs = otpo.state.log_history[0]
    for key in ("ot/plan_mass", "ot/weight_max", "ot/weight_entropy", "ot/solver_iters", "ot/fallbacks"):
        assert key in logs
    assert logs["ot/weight_entropy"] == pytest.approx(1.0, abs=1e-4)  # uniform weights


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_is_weighted_like_dpo(tiny_model_dir, tmp_path, loss_type):
    extra = {"label_smoothing": 1e-3} if loss_type == "exo_pair" else {}
    dpo, otpo = train_pair(tiny_model_dir, tmp_path, loss_type=[loss_type], max_steps=2, **extra)
    assert all(math.isfinite(x) for x in losses(otpo))
    assert losses(otpo) == pytest.approx(losses(dpo), rel=1e-4)


@pytest.mark.parametrize(
    "extra",
    [
        {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},  # MPO mixture
        {"use_weighting": True},  # WPO
        {"ld_alpha": 0.5},  # LD-DPO
        {"f_divergence_type": "js_divergence"},
        {"padding_free": True},  # TRL 1.16 warns and falls back to padding; OTPO must follow it
    ],
    ids=["mixture", "wpo", "ld", "f_divergence", "padding_free"],
)
def test_dpo_variants_are_weighted_like_dpo(tiny_model_dir, tmp_path, extra):
    dpo, otpo = train_pair(tiny_model_dir, tmp_path, max_steps=2, **extra)
    assert losses(otpo) == pytest.approx(losses(dpo), rel=1e-4)


def test_step_one_loss_is_ln2_and_rewards_zero(tiny_model_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    args = config(OTPOConfig, tmp_path, max_steps=1)  # default OT settings: non-uniform weights
    trainer = OTPOTrainer(model=tiny_model_dir, args=args, train_dataset=conversational_pairs(), processing_class=tok)
    trainer.train()
    logs = trainer.state.log_history[0]
    assert logs["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert logs["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert logs["rewards/rejected"] == pytest.approx(0.0, abs=1e-6)
    assert logs["ot/weight_entropy"] < 1.0  # the weights are not uniform


def test_concatenated_forward_keeps_the_state_that_predicts_each_token(tiny_model_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    args = config(OTPOConfig, tmp_path, bf16=False)  # fp32: compared with a plain forward at fp32 tolerance
    trainer = OTPOTrainer(model=tiny_model_dir, args=args, train_dataset=conversational_pairs(), processing_class=tok)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    out = trainer.concatenated_forward(trainer.model, batch)  # with gradients on, as in training
    with torch.no_grad():
        full = trainer.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        )
    # hidden state at t predicts token t+1: log_softmax(lm_head(h_t))[token_{t+1}] is the per-token log-prob
    torch.testing.assert_close(out["hidden_states"], full.hidden_states[-1][:, :-1])
    logps = full.logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = out["completion_mask"]
    torch.testing.assert_close(out["per_token_logps"][mask], logps[mask], rtol=1e-5, atol=1e-5)
    # the states and weights are constants of the loss; the log-probs are not (so gradients were on)
    assert out["per_token_logps"].requires_grad
    assert not out["hidden_states"].requires_grad and not out["weights"].requires_grad
    chosen_w, rejected_w = ot_token_weights(*out["hidden_states"].chunk(2), *mask.chunk(2))
    torch.testing.assert_close(out["weights"], torch.cat([chosen_w, rejected_w]))


def test_full_finetuning_changes_every_parameter(tiny_model_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    args = config(OTPOConfig, tmp_path)
    trainer = OTPOTrainer(model=tiny_model_dir, args=args, train_dataset=conversational_pairs(), processing_class=tok)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    for name, param in trainer.model.named_parameters():
        if name in before:
            assert not torch.equal(param, before[name]), f"{name} did not change"


def test_lora_freezes_base_and_trains_adapter(tiny_model_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    args = config(OTPOConfig, tmp_path)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = OTPOTrainer(
        model=tiny_model_dir,
        args=args,
        train_dataset=conversational_pairs(),
        processing_class=tok,
        peft_config=peft_config,
    )
    assert trainer.ref_model is None  # the disabled adapter is the reference
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    for name, param in trainer.model.named_parameters():
        if "lora_B" in name:  # lora_A only moves once lora_B is non-zero; B must move from step 1
            assert not torch.equal(param, before[name]), f"{name} did not change"
        elif "lora" not in name:
            assert torch.equal(param, before[name]), f"base parameter {name} changed"


def test_lora_near_uniform_reproduces_dpo(tiny_model_dir, tmp_path):
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    dpo, otpo = train_pair(tiny_model_dir, tmp_path, dpo_kwargs={"peft_config": peft_config})
    assert losses(otpo) == pytest.approx(losses(dpo), rel=1e-4)


def test_prompt_tuning_adapter(tiny_model_dir, tmp_path):
    """Prompt learning prepends virtual tokens; the hidden states must still line up with the completion tokens."""
    peft_config = PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    dpo, otpo = train_pair(tiny_model_dir, tmp_path, dpo_kwargs={"peft_config": peft_config}, max_steps=2)
    assert losses(otpo) == pytest.approx(losses(dpo), rel=1e-4)


def test_precompute_ref_log_probs_matches_live_reference(tiny_model_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    runs = []
    for precompute in (False, True):
        args = config(OTPOConfig, tmp_path / str(precompute), precompute_ref_log_probs=precompute)
        trainer = OTPOTrainer(
            model=tiny_model_dir, args=args, train_dataset=conversational_pairs(), processing_class=tok
        )
        trainer.train()
        runs.append(losses(trainer))
    assert runs[1] == pytest.approx(runs[0], rel=1e-4)


def test_precompute_needs_max_length(tiny_model_dir, tmp_path):
    args = config(OTPOConfig, tmp_path, precompute_ref_log_probs=True, max_length=None)
    with pytest.raises(ValueError, match="max_length"):
        OTPOTrainer(model=tiny_model_dir, args=args, train_dataset=conversational_pairs())


def test_sync_ref_model(tiny_model_dir, tmp_path):
    dpo, otpo = train_pair(
        tiny_model_dir, tmp_path, sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5
    )
    assert losses(otpo) == pytest.approx(losses(dpo), rel=1e-4)


def test_iterable_dataset(tiny_model_dir, tmp_path):
    rows = conversational_pairs().to_list()
    dataset = IterableDataset.from_generator(lambda: iter(rows))
    dpo, otpo = train_pair(tiny_model_dir, tmp_path, dataset=dataset, max_steps=2)
    assert losses(otpo) == pytest.approx(losses(dpo), rel=1e-4)


def test_evaluate_and_compute_metrics(tiny_model_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    seen = {}

    def compute_metrics(eval_pred):
        seen["shape"] = eval_pred.predictions.shape
        return {"n": float(eval_pred.predictions.shape[0])}

    args = config(OTPOConfig, tmp_path, eval_strategy="no")
    trainer = OTPOTrainer(
        model=tiny_model_dir,
        args=args,
        train_dataset=conversational_pairs(),
        eval_dataset=conversational_pairs(4),
        processing_class=tok,
        compute_metrics=compute_metrics,
    )
    with pytest.warns(FutureWarning, match="return_outputs"):
        metrics = trainer.evaluate()
    # Not exactly ln 2 under bf16: before any training step, transformers' evaluation loop leaves the policy unprepared
    # (fp32) while the reference was prepared with autocast at init; DPOTrainer gives the same 0.69313.
    assert metrics["eval_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert metrics["eval_n"] == 8.0  # 4 pairs, chosen and rejected rows
    assert "eval_ot/plan_mass" in metrics and "eval_rewards/accuracies" in metrics
    assert len(seen["shape"]) == 3  # (rows, seq, vocab) logits


def test_evaluate_several_sets_logs_ot_metrics_under_each_sets_prefix(tiny_model_dir, tmp_path):
    """`evaluate({"a": ..., "b": ...})` (and an `eval_dataset` dict) names each set's metrics `eval_a_*`, `eval_b_*`,
    as transformers names its loss; the `ot/*` values of each set are those of that set evaluated alone."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs = conversational_pairs(4)
    sets = {"a": pairs.select([0, 1]), "b": pairs.select([2, 3])}
    args = config(OTPOConfig, tmp_path, bf16=False, prediction_loss_only=True, ot_reg=0.1)
    trainer = OTPOTrainer(
        model=tiny_model_dir, args=args, train_dataset=pairs, eval_dataset=sets, processing_class=tok
    )
    alone = {name: trainer.evaluate(dataset) for name, dataset in sets.items()}
    assert alone["a"]["eval_ot/plan_mass"] != pytest.approx(alone["b"]["eval_ot/plan_mass"], rel=1e-3)
    for metrics in (trainer.evaluate(sets), trainer.evaluate()):  # passed in, or the trainer's eval_dataset
        for name in sets:
            for key in ("ot/plan_mass", "ot/weight_max", "ot/weight_entropy", "ot/solver_iters", "ot/fallbacks"):
                assert metrics[f"eval_{name}_{key}"] == pytest.approx(alone[name][f"eval_{key}"], rel=1e-6), key
            assert f"eval_{name}_loss" in metrics
        assert not [key for key in metrics if key.startswith("eval_ot/")]
    logged = trainer.state.log_history[-1]
    assert "eval_b_ot/plan_mass" in logged and "eval_a_ot/plan_mass" not in logged  # one log entry per set
    assert "test_ot/plan_mass" in trainer.evaluate(sets["a"], metric_key_prefix="test")


def test_dpo_config_is_refused_with_a_clear_message(tiny_model_dir, tmp_path):
    args = config(DPOConfig, tmp_path)
    with pytest.raises(TypeError, match="OTPOConfig"):
        OTPOTrainer(model=tiny_model_dir, args=args, train_dataset=conversational_pairs())


def test_model_card_cites_otpo(tiny_model_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    args = config(OTPOConfig, tmp_path, max_steps=1)
    trainer = OTPOTrainer(model=tiny_model_dir, args=args, train_dataset=conversational_pairs(), processing_class=tok)
    trainer.create_model_card(model_name="tiny-otpo")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "2505.18720" in card and "OTPO" in card


BAD_VALUES = [
    ("ot_reg", 0.0),
    ("ot_reg_m", -1.0),
    ("ot_cost", "manhattan"),
    ("ot_cost_scale", "global"),
    ("ot_normalization", "sum"),
    ("ot_weighting", "tfidf"),
    ("ot_solver", "gpu"),
    ("ot_max_iter", 0),
    ("ot_tol", 0.0),
    ("beta", 0.0),
]


@pytest.mark.parametrize(("field", "value"), [*BAD_VALUES, ("loss_type", ["sigmoid", "typo"])])
def test_bad_config_value_names_the_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        OTPOConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, **{field: value})


@pytest.mark.parametrize(("field", "value"), [*BAD_VALUES, ("loss_type", ["sigmoid", "typo"])])
def test_bad_value_assigned_after_construction_is_refused(tiny_model_dir, tmp_path, field, value):
    """`args.ot_reg = -1` on a built config (or a trainer's `args`) is refused at once with the constructor's message,
    not accepted to fail at the first OT solve; a good value is stored as the constructor stores it."""
    args = config(OTPOConfig, tmp_path, bf16=False)
    before = getattr(args, field)
    with pytest.raises(ValueError, match=f"`{field}` (must be|.* not supported)"):
        setattr(args, field, value)
    assert getattr(args, field) == before
    args.ot_reg, args.ot_max_iter, args.loss_type = np.float32(0.25), np.int64(7), "ipo"
    assert (type(args.ot_reg), type(args.ot_max_iter), args.ot_reg, args.loss_type) == (float, int, 0.25, ["ipo"])
    if field == "ot_reg":  # on the trainer's own args as well
        trainer = OTPOTrainer(model=tiny_model_dir, args=args, train_dataset=conversational_pairs(2))
        with pytest.raises(ValueError, match="`ot_reg` must be a finite number > 0, got -1"):
            trainer.args.ot_reg = -1
        assert trainer.args.ot_reg == 0.25


def test_ot_metrics_and_weight_histogram_reach_tensorboard(tiny_model_dir, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    logging_dir = tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(logging_dir))  # transformers 5.x: no `logging_dir` argument
    args = config(OTPOConfig, tmp_path, max_steps=2, report_to=["tensorboard"])
    OTPOTrainer(model=tiny_model_dir, args=args, train_dataset=conversational_pairs(), processing_class=tok).train()
    events = EventAccumulator(str(logging_dir), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for key in ("ot/plan_mass", "ot/weight_max", "ot/weight_entropy", "ot/solver_iters", "ot/fallbacks"):
        assert [e.step for e in events.Scalars(f"train/{key}")] == [1, 2]
    histograms = events.Histograms("ot/token_weights")
    assert [h.step for h in histograms] == [1, 2]
    assert histograms[0].histogram_value.min >= 0 and histograms[0].histogram_value.num > 0
    assert "ot/token_weights" in tags["histograms"]


def test_moe_router_aux_loss_is_kept(tmp_path):
    """A Mixture-of-Experts policy with `output_router_logits`: TRL adds the router's load-balancing loss; OTPO keeps
    it (near-uniform weights reproduce DPO's loss, aux term included)."""
    from transformers import MixtralConfig

    tokenizer = make_tiny_tokenizer()
    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        output_router_logits=True,
        router_aux_loss_coef=0.5,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    model_dir = tmp_path / "tiny-mixtral"
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    dpo, otpo = train_pair(str(model_dir), tmp_path, max_steps=2)
    assert dpo.aux_loss_enabled and otpo.aux_loss_enabled
    assert losses(otpo) == pytest.approx(losses(dpo), rel=1e-4)
    # the router loss is really in it: step 1 (policy == reference) is above DPO's ln 2 by the aux term
    assert losses(dpo)[0] > math.log(2) + 1e-3


@pytest.mark.parametrize("disable_tqdm", [False, True])
def test_console_shows_the_ot_alarms_only_when_they_ring(tiny_model_dir, tmp_path, disable_tqdm, capsys, monkeypatch):
    """The per-step console line leaves out `ot/fallbacks` while it is 0 and `ot/solver_iters` while the solver
    converged, and explains a fallback once; TensorBoard and `log_history` get every key (the callbacks see the logs
    unchanged)."""
    warned = []
    monkeypatch.setattr(callbacks.logger, "warning", warned.append)
    trainer = OTPOTrainer(
        model=tiny_model_dir,
        args=config(OTPOConfig, tmp_path, disable_tqdm=disable_tqdm, ot_max_iter=50),
        train_dataset=conversational_pairs(),
    )
    printers = [c for c in trainer.callback_handler.callbacks if isinstance(c, (ProgressCallback, PrinterCallback))]
    assert len(printers) == 1 and type(printers[0]).__name__.startswith("OTPO")
    printer = printers[0]
    if not disable_tqdm:
        printer.training_bar = SimpleNamespace(write=print)
    state = SimpleNamespace(is_world_process_zero=True, is_local_process_zero=True)
    calm = {"loss": 0.5, "ot/weight_max": 1.1, "ot/fallbacks": 0.0, "ot/solver_iters": 10.0}
    ringing = {"loss": 0.5, "ot/weight_max": 1.1, "ot/fallbacks": 2.0, "ot/solver_iters": 50.0}
    for logs in (calm, ringing, ringing):
        printer.on_log(trainer.args, state, None, logs=dict(logs))
    calm_line, ringing_line, _ = capsys.readouterr().out.strip().splitlines()
    assert len(warned) == 1 and "fell back to uniform token weights" in warned[0]
    assert "ot/weight_max" in calm_line and "ot/fallbacks" not in calm_line and "ot/solver_iters" not in calm_line
    assert "'ot/fallbacks'" in ringing_line and "'ot/solver_iters'" in ringing_line
    assert console_logs({"eval_ot/fallbacks": 0.0, "eval_ot/solver_iters": 3.0, "eval_loss": 1.0}, 50) == {
        "eval_loss": 1.0
    }
