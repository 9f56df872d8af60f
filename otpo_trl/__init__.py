"""OTPO for TRL: optimal-transport token weighting as a swap-in for `DPOTrainer`.

- `ot_weights`: the math, pure: token weights from two sets of hidden states by unbalanced entropic OT.
- `otpo_config`: `OTPOConfig` (`DPOConfig` + the `ot_*` fields, checked) and `ot_kwargs`, its mapping to the solver.
- `otpo_trainer`: `OTPOTrainer`, the one seam with TRL 1.16 (hooks on its fused forwards).
- `forward`: the fused forward and the last-layer hidden states; `tokenization`: pairs and prompts tokenised as
  `DPOTrainer` does. Both sit below the trainer and the evaluation code.
- `data`: preference data sets (Hub or local files), checked and filtered; `loading`: the Hub-id-or-path rule, the
  tokenizer setup, models for analysis; `analysis`: scoring and generation with a trained model.
- `cli`: the command lines of `scripts/*.py` (thin wrappers), the run directory included.
"""

__version__ = "0.1.0"

from .ot_weights import ot_token_weights
from .otpo_config import OTPOConfig
from .otpo_trainer import OTPOTrainer


__all__ = ["OTPOConfig", "OTPOTrainer", "__version__", "ot_token_weights"]
