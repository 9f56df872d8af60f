"""OTPO for TRL: optimal-transport token weighting as a swap-in for `DPOTrainer`."""

__version__ = "0.1.0"

from .ot_weights import ot_token_weights
from .otpo_config import OTPOConfig
from .otpo_trainer import OTPOTrainer


__all__ = ["OTPOConfig", "OTPOTrainer", "__version__", "ot_token_weights"]
