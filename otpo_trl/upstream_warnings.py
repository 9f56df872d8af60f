"""Upstream warnings that tell an otpo-trl user nothing they can act on, filtered by their exact message.

`import otpo_trl` calls [`filter_upstream_warnings`] once, so the Python API, `otpo-trl <command>` and `scripts/*.py`
print the same. Each filter names the versions that print the message (transformers 5.25, TRL 1.16, peft 0.21, torch
2.13, DeepSpeed 0.19) and when it can go; any other message of the same category is still shown.
"""

import logging
import warnings


# transformers 5.x deprecates `gradient_checkpointing*` for `activation_checkpointing*`. TRL 1.16's configs default
# `gradient_checkpointing=True`, so every DPOConfig warns on creation; TRL 1.16 (`disable_gradient_checkpointing`,
# around every reference forward) and peft 0.21 call the old methods, so training and loading an adapter warn at
# every step. Can go once TRL and peft use the `activation_checkpointing` names.
CHECKPOINTING_DEPRECATIONS = (
    r"`(gradient_checkpointing|gradient_checkpointing_kwargs|is_gradient_checkpointing|gradient_checkpointing_enable"
    r"|gradient_checkpointing_disable)` is deprecated and will be removed in v6"
)
# torch 2.13 warns at every DataLoader made while `pin_memory` is on (transformers' default) and no accelerator is
# found: once for training, once per evaluation. Pinning does nothing there, and says so. Can go when torch says it
# once, or transformers defaults `dataloader_pin_memory` to the accelerator's presence.
PIN_MEMORY_WITHOUT_ACCELERATOR = r"'pin_memory' argument is set as true but no accelerator is found"
# DeepSpeed 0.19 logs this at its first accelerator lookup on a machine without a GPU, which transformers makes
# whenever DeepSpeed is installed, DeepSpeed run or not. Can go when DeepSpeed says it at debug level.
DEEPSPEED_CPU_NOTICE = "Setting accelerator to CPU"


class _DropMessage(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def filter_upstream_warnings() -> None:
    """Ignore the messages above, those only: the checkpointing FutureWarnings, torch's `pin_memory` UserWarning, and
    DeepSpeed's "Setting accelerator to CPU" (a filter on its logger "DeepSpeed", set before DeepSpeed is imported).
    Calling it again adds nothing."""
    warnings.filterwarnings("ignore", message=CHECKPOINTING_DEPRECATIONS, category=FutureWarning)
    warnings.filterwarnings("ignore", message=PIN_MEMORY_WITHOUT_ACCELERATOR, category=UserWarning)
    deepspeed_logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropMessage) for f in deepspeed_logger.filters):
        deepspeed_logger.addFilter(_DropMessage(DEEPSPEED_CPU_NOTICE))
