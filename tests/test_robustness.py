"""Degenerate pairs, non-finite OT inputs, and interruption: nothing gives a NaN loss, nothing trained is lost."""

import math

import pytest
import torch
from transformers import AutoTokenizer, TrainerCallback

from otpo_trl import OTPOConfig, OTPOTrainer

from .testing_utils import config, conversational_pairs, losses


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


class StopAfter(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True


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
