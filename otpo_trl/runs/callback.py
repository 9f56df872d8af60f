"""The run directory's part in training: a `TrainerCallback` that starts the run when training starts, lists each
checkpoint as the run's before it is written, has each checkpoint carry the run record, and continues a resumed
learning-rate schedule under the new number of steps. The rules are stated in docs/training.md ("The run
directory")."""

import logging
from pathlib import Path

from torch.optim.lr_scheduler import LambdaLR
from transformers import TrainerCallback

from .start import RunPlan, RunRecorder, start_run


logger = logging.getLogger(__name__)


def continue_schedule(lr_scheduler, optimizer, learning_rate: float) -> tuple[list[float], list[float]] | None:
    """Set the learning rate of a resumed run to its schedule's value at the resumed step.

    HF Trainer (transformers 5.25) restores the optimizer's learning rates and the scheduler's step count from the
    checkpoint, while the scheduler's lambdas are built for this run's `max_steps`: the first step after the resume
    runs at the rate the checkpoint's schedule had reached (0 at the end of a finished run's linear or cosine decay),
    and so does its logged `learning_rate`. This sets each group's rate, and the scheduler's last rate (torch 2.13's
    `_last_lr`, which `get_last_lr()` returns), to `learning_rate` x the schedule's factor at the resumed step; when
    `max_steps`, the warm-up and `learning_rate` are unchanged that is the restored rate already.

    Returns:
        `(old, new)` rates when they changed; None when they did not, or for a schedule that is not a `LambdaLR`
        (`reduce_lr_on_plateau` follows the metric, not the step).
    """
    lr_scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's AcceleratedScheduler wraps it
    if not isinstance(lr_scheduler, LambdaLR):
        return None
    old = [group["lr"] for group in optimizer.param_groups]
    if len(set(lr_scheduler.base_lrs)) == 1:  # HF Trainer's groups all start at `learning_rate`
        lr_scheduler.base_lrs = [learning_rate] * len(lr_scheduler.base_lrs)
        for group in optimizer.param_groups:
            group["initial_lr"] = learning_rate
    new = [
        base * factor(lr_scheduler.last_epoch) for base, factor in zip(lr_scheduler.base_lrs, lr_scheduler.lr_lambdas)
    ]
    if all(abs(a - b) <= 1e-12 * max(abs(b), 1.0) for a, b in zip(old, new)):
        return None
    for group, rate in zip(optimizer.param_groups, new):
        group["lr"] = rate
    lr_scheduler._last_lr = list(new)
    return old, new


class RunDirectoryCallback(TrainerCallback):
    """Applies a [`RunPlan`] of `output_dir` while HF Trainer trains (the record and the lists on the main process).

    - `on_train_begin`, after the model, the reference and any checkpoint have loaded: [`start_run`] (clears what
      `--overwrite_output_dir` replaces, writes the run record), and [`continue_schedule`] for a resume.
    - `on_step_end`, when a checkpoint is due: list it among the run's outputs before it is written.
    - `on_save`: the checkpoint carries the run record.

    It must run after `DefaultFlowCallback` (which decides the saves) and before the logging integrations (which
    create their folders in `output_dir` at `on_train_begin`): insert it at [`insert_into`]'s place.
    """

    def __init__(self, plan: RunPlan, output_dir: str | Path):
        self.plan = plan
        self.output_dir = Path(output_dir)
        self.recorder: RunRecorder | None = None

    def insert_into(self, trainer) -> None:
        """Put this callback right after the trainer's `DefaultFlowCallback` (the first of its callbacks)."""
        callbacks = trainer.callback_handler.callbacks
        flow = next((i for i, c in enumerate(callbacks) if type(c).__name__ == "DefaultFlowCallback"), -1)
        callbacks.insert(flow + 1, self)

    def on_train_begin(self, args, state, control, lr_scheduler=None, optimizer=None, **kwargs):
        if args.should_save:
            self.recorder = start_run(self.plan, self.output_dir)
        if self.plan.checkpoint is not None and optimizer is not None:
            changed = continue_schedule(lr_scheduler, optimizer, args.learning_rate)
            if changed is not None:
                logger.info(
                    f"Resumed at step {state.global_step} of {state.max_steps}: the learning rate follows this run's "
                    f"schedule, {changed[1][0]:.3g} (the checkpoint's schedule was at {changed[0][0]:.3g})."
                )

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save and self.recorder is not None:
            self.recorder.will_write(f"checkpoint-{state.global_step}")

    def on_save(self, args, state, control, **kwargs):
        if self.recorder is not None:
            self.recorder.saved_checkpoint(self.output_dir / f"checkpoint-{state.global_step}", state.global_step)
