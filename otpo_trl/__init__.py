"""OTPO for TRL: optimal-transport token weighting as a swap-in for `DPOTrainer`.

- `ot`: the math, pure: token weights from two sets of hidden states by unbalanced entropic OT (costs, solvers,
  weights, statistics).
- `otpo_config`: `OTPOConfig` (`DPOConfig` + the `ot_*` fields, checked) and `ot_kwargs`, its mapping to the solver.
- `otpo_trainer`: `OTPOTrainer`, the one seam with TRL 1.16 (hooks on its fused forwards).
- `forward`: the fused forward and the last-layer hidden states; `tokenization`: pairs and prompts tokenised as
  `DPOTrainer` does. Both sit below the trainer and the evaluation code.
- `local_paths`: the Hub-id-or-path rule and the quickstart's paths, pure; `data`: preference data sets (Hub or local
  files), checked and filtered; `loading`: models and tokenizers, the tokenizer setup, models for analysis; `inspection`: one pair's per-token log-probs, OT weights and implicit rewards;
  `evaluation`: scoring and generation with a trained model; `plotting`: the pictures (matplotlib).
- `model_card`: the card a run saves; `upstream_warnings`: the upstream warnings that say nothing a user can act on,
  filtered on import.
- `cli`: the command lines of `scripts/*.py` (thin wrappers), the run directory included.

`import otpo_trl` itself imports neither torch nor TRL: `OTPOConfig`, `OTPOTrainer` and `ot_token_weights` are loaded
on first use (PEP 562), so that `otpo-trl --help` answers at once. `from otpo_trl import OTPOTrainer` works as usual.
"""

import importlib
from typing import TYPE_CHECKING

from .upstream_warnings import filter_upstream_warnings


__version__ = "0.1.0"

filter_upstream_warnings()  # for the Python API and every command alike

# The public names, each with the module that defines it; a module is imported when one of its names is first used.
_LAZY = {"OTPOConfig": "otpo_config", "OTPOTrainer": "otpo_trainer", "ot_token_weights": "ot"}

if TYPE_CHECKING:  # for type checkers and IDEs; at run time, `__getattr__` below
    from .ot import ot_token_weights
    from .otpo_config import OTPOConfig
    from .otpo_trainer import OTPOTrainer


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later uses find it without coming here
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = ["OTPOConfig", "OTPOTrainer", "__version__", "ot_token_weights"]
