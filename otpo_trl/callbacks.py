"""What OTPO changes in transformers' callbacks: a console line without the OT alarms while they are quiet, and a
TensorBoard histogram of the token weights. `OTPOTrainer` installs both ([`install_otpo_callbacks`]); the logged
metrics themselves are listed in docs/otpo_trainer.md."""

from typing import Any

import torch
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import CallbackHandler, PrinterCallback, ProgressCallback
from transformers.utils import logging

from .model_card import CheckpointCardCallback


logger = logging.get_logger(__name__)


def console_logs(logs: dict[str, Any], max_iter: int) -> dict[str, Any]:
    """The logs as the console shows them: `ot/fallbacks` only when a pair fell back, `ot/solver_iters` only when the
    solver stopped at `ot_max_iter` (it did not converge). Every key still reaches the loggers and `log_history`."""
    quiet = {}
    for key, value in logs.items():
        if key.endswith("ot/fallbacks") and value == 0:
            continue
        if key.endswith("ot/solver_iters") and value < max_iter:
            continue
        quiet[key] = value
    return quiet


class _ConsoleLogs:
    """Prints [`console_logs`] of the logs (the training arguments are OTPOConfig's: `ot_max_iter`), and explains
    `ot/fallbacks` the first time it is not 0."""

    warned_fallback = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if not self.warned_fallback and any(k.endswith("ot/fallbacks") and v > 0 for k, v in logs.items()):
            self.warned_fallback = True
            logger.warning(
                "Non-finite hidden states or OT costs in a preference pair: that pair fell back to uniform token "
                "weights. The count is logged as `ot/fallbacks`. (Shown once.)"
            )
        return super().on_log(args, state, control, logs=console_logs(logs, args.ot_max_iter), **kwargs)


class OTPOProgressCallback(_ConsoleLogs, ProgressCallback):
    """transformers' `ProgressCallback`, printing [`console_logs`]."""


class OTPOPrinterCallback(_ConsoleLogs, PrinterCallback):
    """transformers' `PrinterCallback` (with `disable_tqdm`), printing [`console_logs`]."""


_CONSOLE_CALLBACKS = {ProgressCallback: OTPOProgressCallback, PrinterCallback: OTPOPrinterCallback}


class OTWeightHistogramCallback(TrainerCallback):
    """Writes a histogram of the token weights of the last training batch (its completion tokens) to TensorBoard at
    every logging step, as `ot/token_weights`, beside the `ot/*` scalars.

    Args:
        tensorboard: the trainer's `TensorBoardCallback`, whose writer it uses.
    """

    def __init__(self, tensorboard: TensorBoardCallback):
        self.tensorboard = tensorboard
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def keep(self, weights: torch.Tensor, mask: torch.Tensor) -> None:
        """Keep a training batch's (2B, T-1) weights and bool mask; they leave the device only when logged."""
        self._last = (weights.detach(), mask)

    def on_log(self, args, state, control, logs=None, **kwargs):
        writer = self.tensorboard.tb_writer
        if self._last is None or writer is None or "loss" not in (logs or {}):  # training logs only
            return
        weights, mask = self._last
        writer.add_histogram("ot/token_weights", weights[mask].float().cpu(), state.global_step)


def install_otpo_callbacks(handler: CallbackHandler) -> OTWeightHistogramCallback | None:
    """Swap transformers' console callback for its OTPO version, leave checkpoints without a card, and add a weight
    histogram beside a TensorBoard callback if there is one (returned, for the trainer to feed with `keep`).

    The console then shows DPOTrainer's per-step line plus three `ot/*` values. Targets transformers 5's
    callbacks, which print every logged key."""
    for callback in list(handler.callbacks):
        if type(callback) in _CONSOLE_CALLBACKS:
            handler.remove_callback(callback)
            handler.add_callback(_CONSOLE_CALLBACKS[type(callback)]())
    handler.add_callback(CheckpointCardCallback())  # checkpoints carry no card (`otpo_trl.model_card`)
    tensorboard = next((c for c in handler.callbacks if isinstance(c, TensorBoardCallback)), None)
    if tensorboard is None:
        return None
    histogram = OTWeightHistogramCallback(tensorboard)
    handler.add_callback(histogram)
    return histogram


__all__ = [
    "OTPOPrinterCallback",
    "OTPOProgressCallback",
    "OTWeightHistogramCallback",
    "console_logs",
    "install_otpo_callbacks",
]
