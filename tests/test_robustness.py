"""Degenerate pairs, non-finite OT inputs, bad token weights, and interruption: nothing gives a NaN loss, nothing
trained is lost."""

import math
import re

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer
from trl import DPOConfig, DPOTrainer

from otpo_trl import OTPOConfig, OTPOTrainer

from .testing_utils import StopAfter, config, conversational_pairs, losses


@pytest.fixture
def trainer(tiny_model_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    args = config(OTPOConfig, tmp_path)
    trainer = OTPOTrainer(model=tiny_model_dir, args=args, train_dataset=conversational_pairs(), processing_class=tok)
    trainer.model.train()  # metrics go to the "train" bucket, as during training
    return trainer


def loss_of(trainer, examples):
    batch = trainer._prepare_inputs(trainer.data_collator(examples))
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    return loss, trainer._metrics["train"]


@pytest.mark.parametrize(
    ("chosen_ids", "rejected_ids"),
    [([], [7, 8, 9]), ([7, 8, 9], []), ([], []), ([11], [12]), ([11], [12, 13, 14, 15])],
    ids=["empty_chosen", "empty_rejected", "both_empty", "single_tokens", "single_vs_many"],
)
def test_degenerate_pairs_give_finite_losses(trainer, chosen_ids, rejected_ids):
    examples = [
        {"prompt_ids": [3, 4, 5], "chosen_ids": chosen_ids, "rejected_ids": rejected_ids},
        {"prompt_ids": [3, 4], "chosen_ids": [20, 21, 22], "rejected_ids": [23, 24]},
    ]
    loss, metrics = loss_of(trainer, examples)
    assert math.isfinite(loss.item())
    assert metrics["ot/fallbacks"][-1] == 0


def test_completion_truncated_away_by_max_length(trainer):
    # The prompt fills max_length - 1 tokens: a single completion token survives truncation on each side.
    prompt = list(range(3, 3 + trainer.args.max_length - 1))
    examples = [{"prompt_ids": prompt, "chosen_ids": [30, 31, 32], "rejected_ids": [33, 34]}] * 2
    loss, _ = loss_of(trainer, examples)
    assert math.isfinite(loss.item())


def test_identical_chosen_and_rejected_give_symmetric_weights_and_ln2(trainer):
    examples = [{"prompt_ids": [3, 4, 5], "chosen_ids": [20, 21, 22, 23], "rejected_ids": [20, 21, 22, 23]}] * 2
    batch = trainer._prepare_inputs(trainer.data_collator(examples))
    with torch.no_grad():
        weights = trainer.concatenated_forward(trainer.model, batch)["weights"]
        loss = trainer.compute_loss(trainer.model, batch)
    chosen, rejected = weights.chunk(2)
    torch.testing.assert_close(chosen, rejected)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)


def test_non_finite_hidden_states_fall_back_to_uniform_weights(trainer, caplog):
    hidden = torch.randn(4, 6, 16)
    mask = torch.ones(4, 6, dtype=torch.bool)
    hidden[0, 2] = float("nan")  # pair 0 (chosen row 0) is broken, pair 1 is fine
    weights = trainer.compute_token_weights(*hidden.chunk(2), *mask.chunk(2))
    assert torch.isfinite(weights).all()
    torch.testing.assert_close(weights[0], torch.ones(6))  # uniform, summing to min(6, 6)
    torch.testing.assert_close(weights[2], torch.ones(6))
    assert trainer._metrics["train"]["ot/fallbacks"][-1] == 1
    assert not torch.allclose(weights[1], torch.ones(6))


class BadWeightsTrainer(OTPOTrainer):
    """OTPO's weights, spoilt from the second step on (global_step 1) by `spoil(weights, mask)`."""

    spoil = None

    def compute_token_weights(self, chosen_hidden, rejected_hidden, chosen_mask, rejected_mask):
        weights = super().compute_token_weights(chosen_hidden, rejected_hidden, chosen_mask, rejected_mask)
        if self.state.global_step < 1:
            return weights
        return type(self).spoil(weights, torch.cat([chosen_mask, rejected_mask]))


def at_a_completion_token(value):
    def spoil(weights, mask):
        weights = weights.clone()
        row, pos = mask.nonzero()[-1].tolist()  # the last completion token of the last rejected completion
        weights[row, pos] = value
        return weights

    return spoil


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (at_a_completion_token(float("nan")), r"1 NaN among the \d+ completion tokens \(the first: the rejected"),
        (at_a_completion_token(float("inf")), r"1 infinite among"),
        (at_a_completion_token(-0.5), r"1 negative among .*weight -0.5\).*allow_negative_token_weights = True"),
        (lambda weights, mask: weights[: len(weights) // 2], r"shape \(2, \d+\) where the masks' shape is \(4, \d+\)"),
        (lambda weights, mask: weights.chunk(2), r"type tuple where the masks' shape is \(4, \d+\)"),
    ],
    ids=["nan", "inf", "negative", "wrong_shape", "not_a_tensor"],
)
def test_bad_token_weights_stop_training_naming_the_method_and_step(tiny_model_dir, tmp_path, spoil, message):
    """Weights that are not finite, negative (without the opt-in) or of the wrong shape stop training at the step
    they appear, naming the method, the step and what is wrong, before any parameter moves on them (NaN weights used
    to turn every parameter into NaN while the logged loss read 0.0)."""
    cls = type("Spoilt", (BadWeightsTrainer,), {"spoil": staticmethod(spoil)})
    trainer = cls(model=tiny_model_dir, args=config(OTPOConfig, tmp_path), train_dataset=conversational_pairs())
    with pytest.raises(
        ValueError, match=r"^BadWeightsTrainer\.compute_token_weights returned token weights with "
    ) as error:
        trainer.train()
    assert "(global_step 1, training)" in str(error.value)
    assert re.search(message, str(error.value)), str(error.value)
    assert trainer.state.global_step == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_masked_positions_of_the_weights_are_not_read(tiny_model_dir, tmp_path):
    """Garbage (NaN, inf, negative) outside the completion tokens neither stops training nor reaches the loss."""

    def garbage_outside(weights, mask):
        junk = torch.tensor([float("nan"), float("inf"), -3.0]).repeat(mask.numel())[: mask.numel()].view(mask.shape)
        return torch.where(mask, weights, junk.to(weights))

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    runs = []
    for cls in (OTPOTrainer, type("Garbage", (BadWeightsTrainer,), {"spoil": staticmethod(garbage_outside)})):
        args = config(OTPOConfig, tmp_path / cls.__name__, max_steps=3)
        trainer = cls(model=tiny_model_dir, args=args, train_dataset=conversational_pairs(), processing_class=tok)
        trainer.train()
        runs.append(losses(trainer))
    assert all(math.isfinite(x) for x in runs[1])
    assert runs[1] == pytest.approx(runs[0], rel=1e-6)


class NegatedTrainer(OTPOTrainer):
    """Weight -1 on every token: the preference of each pair reversed, on purpose."""

    allow_negative_token_weights = True

    def compute_token_weights(self, chosen_hidden, rejected_hidden, chosen_mask, rejected_mask):
        return -torch.cat([chosen_mask, rejected_mask]).float()


def test_negative_weights_train_when_the_trainer_says_it_means_them(tiny_model_dir, tmp_path):
    """With `allow_negative_token_weights = True`, weight -1 everywhere trains, and is DPO on the swapped pairs: both
    log-ratios change sign, so the margin does."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs = conversational_pairs()
    swapped = Dataset.from_dict({"prompt": pairs["prompt"], "chosen": pairs["rejected"], "rejected": pairs["chosen"]})
    runs = []
    for cls, cfg_cls, data in ((NegatedTrainer, OTPOConfig, pairs), (DPOTrainer, DPOConfig, swapped)):
        args = config(cfg_cls, tmp_path / cls.__name__, max_steps=3)
        trainer = cls(model=tiny_model_dir, args=args, train_dataset=data, processing_class=tok)
        trainer.train()
        runs.append(losses(trainer))
    assert runs[0] == pytest.approx(runs[1], rel=1e-4)
    assert runs[0][0] != pytest.approx(runs[0][-1], rel=1e-3)  # it trained


def test_resume_after_interruption_continues_the_same_run(tiny_model_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, lr_scheduler_type="cosine", warmup_steps=1)

    def make(out, callbacks=None):
        args = config(OTPOConfig, out, **common)
        return OTPOTrainer(
            model=tiny_model_dir,
            args=args,
            train_dataset=conversational_pairs(),
            processing_class=tok,
            callbacks=callbacks,
        )

    full = make(tmp_path / "full")
    full.train()
    interrupted = make(tmp_path / "cut", callbacks=[StopAfter(2)])
    interrupted.train()
    assert interrupted.state.global_step == 2
    checkpoint = tmp_path / "cut" / "out" / "checkpoint-2"
    for name in ("optimizer.pt", "scheduler.pt", "trainer_state.json"):
        assert (checkpoint / name).exists()
    assert list(checkpoint.glob("rng_state*.pth"))

    resumed = make(tmp_path / "cut")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    assert losses(resumed)[-2:] == pytest.approx(losses(full)[-2:], rel=1e-5)
