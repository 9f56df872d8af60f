"""Training in the precision users run: DPOConfig's default bf16 (accelerate's autocast, here on the CPU), a model
loaded in bf16, fp16, activation checkpointing; and the precomputed reference's per-token layout.

Most trainer tests in tests/test_trainer.py and tests/test_oracle.py run under the default bf16 too; the ones that
force fp32 say why.
"""

import math

import pytest
import torch
from transformers import AutoTokenizer
from trl import DPOConfig, DPOTrainer

from otpo_trl import OTPOConfig, OTPOTrainer, ot_token_weights

from .testing_utils import config, conversational_pairs, losses, train_pair


class RecordingOTPOTrainer(OTPOTrainer):
    """Records what the token weighting receives and returns (the documented override point)."""

    def compute_token_weights(self, chosen_hidden, rejected_hidden, chosen_mask, rejected_mask):
        weights = super().compute_token_weights(chosen_hidden, rejected_hidden, chosen_mask, rejected_mask)
        self.seen = (chosen_hidden, rejected_hidden, chosen_mask, rejected_mask, weights)
        self.autocast = torch.is_autocast_enabled(chosen_hidden.device.type)
        return weights


def test_default_config_trains_in_bf16(tiny_model_dir, tmp_path):
    """The configuration of a new user: OTPOConfig's defaults (bf16 on), on the CPU. It used to crash at step 1."""
    args = OTPOConfig(
        output_dir=str(tmp_path / "out"), use_cpu=True, max_steps=1, per_device_train_batch_size=2, logging_steps=1
    )
    assert args.bf16 is True and args.ot_reg == 1.0
    trainer = OTPOTrainer(model=tiny_model_dir, args=args, train_dataset=conversational_pairs(4))
    trainer.train()
    logs = trainer.state.log_history[0]
    assert logs["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert logs["ot/weight_entropy"] < 1.0 and logs["ot/fallbacks"] == 0


@pytest.mark.parametrize("how", ["training_step", "outer_autocast"])
def test_weights_under_autocast_equal_fp32_weights_of_the_same_states(tiny_model_dir, tmp_path, how):
    """Under mixed precision the cost matmuls and Sinkhorn products would run in bf16 (and crashed: a bf16 cost matrix
    refined in fp32). The OT weights are computed in fp32 with autocast off: they equal the weights of the same states
    computed outside any autocast. Two paths: a real bf16 training step (accelerate's autocast), and a loss computed
    inside an outer bf16 autocast, as TRL's own reference pass does (`with self.accelerator.autocast()`)."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    args = config(OTPOConfig, tmp_path, max_steps=1, ot_reg=0.1)
    trainer = RecordingOTPOTrainer(
        model=tiny_model_dir, args=args, train_dataset=conversational_pairs(), processing_class=tok
    )
    if how == "training_step":
        trainer.train()
    else:
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            trainer.compute_loss(trainer.model, batch)
        assert trainer.autocast  # the weights were asked for inside the bf16 autocast
    chosen_hidden, rejected_hidden, chosen_mask, rejected_mask, weights = trainer.seen
    assert weights.dtype == torch.float32
    hidden = (h.float() for h in (chosen_hidden, rejected_hidden))
    expected = torch.cat(ot_token_weights(*hidden, chosen_mask, rejected_mask, reg=0.1))
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=1e-6)
    mask = torch.cat([chosen_mask, rejected_mask])
    assert (weights[mask] - 1).abs().max() > 0.2  # not uniform: the comparison says something


def test_ot_token_weights_ignore_the_callers_autocast():
    """The pure function: the same weights inside a bf16 (or fp16) autocast as outside, for fp32 and bf16 inputs."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 12, 32, generator=gen) + 3.0  # a shared offset, as LLM states have
    hidden[2:, 0] = hidden[:2, 0]  # the first state is shared by chosen and rejected: the exact-recompute branch
    mask = torch.ones(2, 12, dtype=torch.bool)
    for h in (hidden, hidden.bfloat16()):
        expected = ot_token_weights(h[:2].float(), h[2:].float(), mask, mask, reg=0.1)
        for dtype in (torch.bfloat16, torch.float16):
            with torch.autocast("cpu", dtype=dtype):
                got = ot_token_weights(h[:2], h[2:], mask, mask, reg=0.1)
            for g, e in zip(got, expected):
                assert g.dtype == torch.float32
                torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "extra",
    [
        {"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": False}},
        {"model_init_kwargs": {"dtype": "bfloat16"}},  # a model loaded in bf16, as the recipes' `dtype: bfloat16`
    ],
    ids=["activation_checkpointing", "model_in_bf16"],
)
def test_bf16_variants_are_weighted_like_dpo(tiny_model_dir, tmp_path, extra):
    dpo, otpo = train_pair(tiny_model_dir, tmp_path, max_steps=2, **extra)
    assert all(math.isfinite(x) for x in losses(otpo))
    assert losses(otpo) == pytest.approx(losses(dpo), rel=1e-3)


@pytest.mark.parametrize(
    "extra",
    [
        {"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": False}},
        {"model_init_kwargs": {"dtype": "bfloat16"}},
    ],
    ids=["activation_checkpointing", "model_in_bf16"],
)
def test_bf16_variants_train_with_real_weights(tiny_model_dir, tmp_path, extra):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    args = config(OTPOConfig, tmp_path, max_steps=2, ot_reg=0.1, **extra)
    trainer = OTPOTrainer(model=tiny_model_dir, args=args, train_dataset=conversational_pairs(), processing_class=tok)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert all(math.isfinite(x) for x in losses(trainer))
    assert trainer.state.log_history[0]["ot/weight_entropy"] < 0.999
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)


def test_fp16_on_a_cpu_has_no_autocast(tiny_model_dir, tmp_path):
    """Why `test_fp16_autocast` needs a GPU: on a CPU, accelerate gives `fp16=True` no autocast at all, so a run is
    fp32's. (If a later accelerate turns it on, this fails: then let `test_fp16_autocast` run on the CPU too.)"""
    args = config(OTPOConfig, tmp_path, bf16=False, fp16=True)
    trainer = OTPOTrainer(model=tiny_model_dir, args=args, train_dataset=conversational_pairs(2))
    if trainer.accelerator.device.type != "cpu":
        pytest.skip("the trainer is not on the CPU")
    assert trainer.accelerator.mixed_precision == "fp16" and not trainer.accelerator.native_amp


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="fp16 mixed precision needs a GPU: on a CPU, fp16=True gives no autocast (test_fp16_on_a_cpu_has_no_autocast)",
)
def test_fp16_autocast(tiny_model_dir, tmp_path):
    """fp16 mixed precision on a GPU: the layers really run in fp16 (a projection's output is fp16), the OT weights
    in fp32, and OTPO with uniform weights follows DPO; with real weights the step is finite."""
    fp16 = {"bf16": False, "fp16": True, "use_cpu": False}
    dpo, otpo = train_pair(tiny_model_dir, tmp_path, max_steps=2, **fp16)
    assert all(math.isfinite(x) for x in losses(otpo))
    assert losses(otpo) == pytest.approx(losses(dpo), rel=1e-3)

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    args = config(OTPOConfig, tmp_path / "real", max_steps=1, ot_reg=0.1, **fp16)
    trainer = RecordingOTPOTrainer(
        model=tiny_model_dir, args=args, train_dataset=conversational_pairs(), processing_class=tok
    )
    dtypes = []
    trainer.model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    trainer.train()
    assert trainer.accelerator.native_amp and dtypes and set(dtypes) == {torch.float16}
    assert trainer.seen[-1].dtype == torch.float32  # the weights
    assert all(math.isfinite(x) for x in losses(trainer)) and trainer.state.log_history[0]["ot/weight_entropy"] < 0.999


def test_precompute_with_pad_to_multiple_of_above_max_length(tiny_model_dir, tmp_path):
    """Padded batches are longer than `max_length` here: the stored per-token width follows the padding."""
    dpo, otpo = train_pair(
        tiny_model_dir, tmp_path, max_steps=2, precompute_ref_log_probs=True, max_length=40, pad_to_multiple_of=64
    )
    assert otpo.train_dataset["ref_chosen_logps"][0].__len__() == 64
    assert losses(otpo) == pytest.approx(losses(dpo), rel=1e-3)


@pytest.mark.parametrize("change", [{"truncation_mode": "keep_end"}, {"max_length": 80}, {"pad_to_multiple_of": 128}])
def test_precomputed_reference_cache_key_follows_the_per_token_layout(tiny_model_dir, tmp_path, change):
    """TRL 1.16 caches precomputed reference log-probs in a file named by (the tokenised data set's fingerprint,
    `_precompute_model_hash`). OTPO stores them per token, so everything that moves a token's position or the stored
    width must change that key; the same model and layout must keep it (the cache is reusable)."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    def cache_key(tag, **overrides):
        args = config(OTPOConfig, tmp_path / tag, precompute_ref_log_probs=True, **overrides)
        trainer = OTPOTrainer(
            model=tiny_model_dir, args=args, train_dataset=conversational_pairs(4), processing_class=tok
        )
        return trainer._precompute_model_hash

    first = cache_key("first")
    assert cache_key("again") == first
    assert cache_key("changed", **change) != first


def test_model_tags_keep_dpo(tiny_model_dir, tmp_path):
    """OTPO is a DPO variant: tools that look for DPO models on the Hub still find it."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    args = config(OTPOConfig, tmp_path, max_steps=1)
    trainer = OTPOTrainer(model=tiny_model_dir, args=args, train_dataset=conversational_pairs(), processing_class=tok)
    assert {"trl", "dpo", "otpo"} <= set(trainer.model.model_tags)
    trainer.create_model_card(model_name="tiny-otpo")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "- dpo" in card and "- otpo" in card


def test_dpo_trainer_takes_the_same_precision_settings(tiny_model_dir, tmp_path):
    """The baseline the swap-in is measured against: DPOTrainer under the same default bf16 trains."""
    args = config(DPOConfig, tmp_path, max_steps=1)
    assert args.bf16 is True
    trainer = DPOTrainer(model=tiny_model_dir, args=args, train_dataset=conversational_pairs())
    trainer.train()
    assert losses(trainer)[0] == pytest.approx(math.log(2), abs=1e-3)


def test_bf16_without_a_gpu_says_what_to_set(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: bf16 is valid here")
    with pytest.raises(ValueError, match=r"set `bf16=False` .* to train in fp32.*only `use_cpu=True`"):
        OTPOConfig(output_dir=str(tmp_path))


def test_no_args_on_a_cpu_trains_in_fp32(tiny_model_dir, tmp_path, monkeypatch):
    """`OTPOTrainer(model, args=None)` (TRL's quick start) picks fp32 where bf16 would fail, instead of erroring."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the default keeps bf16")
    monkeypatch.chdir(tmp_path)  # the default output_dir is relative
    trainer = OTPOTrainer(model=tiny_model_dir, train_dataset=conversational_pairs(4))
    assert trainer.args.bf16 is False
    assert trainer.args.output_dir.endswith("-OTPO")
