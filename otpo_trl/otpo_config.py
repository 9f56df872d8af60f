from dataclasses import dataclass, field

from trl import DPOConfig

from .ot_weights import COSTS as OT_COSTS
from .ot_weights import NORMALIZATIONS as OT_NORMALIZATIONS
from .ot_weights import SOLVERS as OT_SOLVERS


# Every `loss_type` of TRL 1.16's DPOTrainer; all act on (OT-weighted) summed log-probs, so all can be weighted.
LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)


@dataclass
class OTPOConfig(DPOConfig):
    r"""
    Configuration class for the [`OTPOTrainer`].

    OTPO ([Li et al., 2025](https://huggingface.co/papers/2505.18720)) weights every completion token in the DPO loss
    by the mass an unbalanced optimal-transport plan between the chosen and the rejected completion's last-layer hidden
    states gives it. All [`~trl.DPOConfig`] parameters keep their meaning; the ones below are added.

    Parameters:
        > Parameters that control the optimal-transport token weights

        ot_reg (`float`, *optional*, defaults to `1.0`):
            Entropic regularisation ε of the unbalanced OT problem. The paper uses `1.0` (and `0.1` for 3B models).
            Larger values spread the plan towards uniform weights.
        ot_reg_m (`float`, *optional*, defaults to `0.2`):
            KL penalty τ on the deviation of the plan's marginals from the all-ones marginals.
        ot_cost (`str`, *optional*, defaults to `"euclidean"`):
            Ground cost between two tokens' hidden states: `"euclidean"` (the official code), `"sqeuclidean"` (as
            written in the paper) or `"cosine"` (a paper ablation). A pair's cost is divided by its maximum when that
            exceeds 1.
        ot_normalization (`str`, *optional*, defaults to `"min"`):
            Target sum of each side's weights: `"min"` → min(|y_w|, |y_l|) (the paper), `"mean"`, `"max"`, `"length"`
            (each side's own length) or `"none"` (raw plan marginals; collapses in the paper's ablation).
        ot_solver (`str`, *optional*, defaults to `"batched"`):
            `"batched"` solves all pairs of a batch at once on the hidden states' device; `"pot"` calls
            `ot.unbalanced.sinkhorn_unbalanced` once per pair on the CPU (the reference; slow).
        ot_max_iter (`int`, *optional*, defaults to `1000`):
            Maximum number of Sinkhorn iterations.
        ot_tol (`float`, *optional*, defaults to `1e-6`):
            Stopping threshold on the relative change of the scaling vectors (POT's `stopThr`).
    """

    ot_reg: float = field(
        default=1.0,
        metadata={
            "help": "Entropic regularisation of the unbalanced OT problem. The paper uses 1.0 (0.1 for 3B models); "
            "larger values spread the plan towards uniform weights."
        },
    )
    ot_reg_m: float = field(
        default=0.2,
        metadata={"help": "KL penalty on the deviation of the plan's marginals from the all-ones marginals."},
    )
    ot_cost: str = field(
        default="euclidean",
        metadata={
            "help": "Ground cost between hidden states: 'euclidean' (official code), 'sqeuclidean' (paper) or "
            "'cosine' (ablation). A pair's cost is divided by its maximum when that exceeds 1.",
            "choices": list(OT_COSTS),
        },
    )
    ot_normalization: str = field(
        default="min",
        metadata={
            "help": "Target sum of each side's token weights: 'min' (min of the two lengths, the paper), 'mean', "
            "'max', 'length' (each side's own length) or 'none' (raw plan marginals).",
            "choices": list(OT_NORMALIZATIONS),
        },
    )
    ot_solver: str = field(
        default="batched",
        metadata={
            "help": "'batched': all pairs at once on the hidden states' device; 'pot': POT's sinkhorn_unbalanced "
            "once per pair on the CPU (reference, slow).",
            "choices": list(OT_SOLVERS),
        },
    )
    ot_max_iter: int = field(
        default=1000,
        metadata={"help": "Maximum number of Sinkhorn iterations."},
    )
    ot_tol: float = field(
        default=1e-6,
        metadata={"help": "Stopping threshold on the relative change of the Sinkhorn scaling vectors."},
    )

    def __post_init__(self):
        checks = {
            "ot_reg": self.ot_reg > 0,
            "ot_reg_m": self.ot_reg_m > 0,
            "ot_max_iter": isinstance(self.ot_max_iter, int) and self.ot_max_iter >= 1,
            "ot_tol": self.ot_tol > 0,
            "beta": self.beta > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"`{name}` must be > 0, got {getattr(self, name)!r}.")
        for name, choices in (
            ("ot_cost", OT_COSTS),
            ("ot_normalization", OT_NORMALIZATIONS),
            ("ot_solver", OT_SOLVERS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"`{name}` must be one of {list(choices)}, got {getattr(self, name)!r}.")
        loss_types = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        unknown = [t for t in loss_types if t not in LOSS_TYPES]
        if unknown:
            raise ValueError(f"`loss_type` {unknown} not supported; choose from {list(LOSS_TYPES)}.")
        super().__post_init__()
