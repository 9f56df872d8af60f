from dataclasses import dataclass, field, fields
from typing import Any

from trl import DPOConfig

from .ot import COST_SCALES as OT_COST_SCALES
from .ot import COSTS as OT_COSTS
from .ot import NORMALIZATIONS as OT_NORMALIZATIONS
from .ot import SETTINGS as OT_SETTINGS
from .ot import SOLVERS as OT_SOLVERS
from .ot import WEIGHTINGS as OT_WEIGHTINGS
from .ot import checked_setting, positive_number


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


# The OT settings (and DPO's beta) checked by `checked_value`: by OTPOConfig at construction and on assignment, and by
# the analysis tools on their `--ot_*` options, before any model loads. The rules are the OT package's own
# (`otpo_trl.ot.checked_setting`, which `ot_token_weights` applies too).
CHECKED_FIELDS = (*(f"ot_{name}" for name in OT_SETTINGS), "beta")


def checked_value(name: str, value, label: str | None = None):
    """`value` of the OTPOConfig field `name` (one of `CHECKED_FIELDS`) as stored, a plain Python number for the
    numbers; a `ValueError` naming `label` (default: the field, in backticks) when it is not valid."""
    label = label or f"`{name}`"
    if name == "beta":
        return positive_number(value, label)
    return checked_setting(name.removeprefix("ot_"), value, label)


def _check_loss_type(loss_type) -> None:
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    unknown = [t for t in loss_types if t not in LOSS_TYPES]
    if unknown:
        raise ValueError(f"`loss_type` {unknown} not supported; choose from {list(LOSS_TYPES)}.")


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
            written in the paper) or `"cosine"` (a paper ablation).
        ot_cost_scale (`str`, *optional*, defaults to `"official"`):
            What a pair's cost matrix is divided by when that exceeds 1: `"official"` → its maximum over the official
            code's padded matrix, whose zeroed prompt and padding states bring in each state's cost to the origin
            (its norm for `"euclidean"`); the paper's ε were tuned under it. `"pair"` → the maximum over the valid
            tokens only (ignores the norms); `"none"` → no division (ε then sets the scale of raw costs). `"minmax"`
            rescales each pair's valid costs to [0, 1], so that ε bounds the weights' spread the same way for every
            model (max/min weight within a completion ≤ exp(1 / (ε + τ))); see docs of `ot_token_weights`.
        ot_normalization (`str`, *optional*, defaults to `"min"`):
            Target sum of each side's weights: `"min"` → min(|y_w|, |y_l|) (the paper), `"mean"`, `"max"`, `"length"`
            (each side's own length) or `"none"` (raw plan marginals; collapses in the paper's ablation).
        ot_weighting (`str`, *optional*, defaults to `"ot"`):
            `"ot"`: the transport plan's marginals. `"uniform"`: 1 per token before the same normalisation, the
            paper's "w/o OT" ablation. `"sampo"`: SamPO's down-sampling, 1 on min(|y_w|, |y_l|) tokens of each side
            drawn at random, afresh every step, before the same normalisation (see `sampo_token_weights`). Neither
            solves an OT problem.
        ot_solver (`str`, *optional*, defaults to `"batched"`):
            `"batched"` solves the pairs of a batch together on the hidden states' device, one n × m matrix per
            pair, in groups within `ot_memory_budget`, and a pair that alone exceeds it with the online solver;
            `"online"` solves every pair with the online solver, which never holds an n × m matrix (it recomputes
            the costs from the hidden states at every pass: slower); `"pot"` calls
            `ot.unbalanced.sinkhorn_unbalanced` once per pair on the CPU (the reference; slow).
        ot_max_iter (`int`, *optional*, defaults to `1000`):
            Maximum number of Sinkhorn iterations.
        ot_tol (`float`, *optional*, defaults to `1e-6`):
            Stopping threshold on the relative change of the scaling vectors (POT's `stopThr`).
        ot_memory_budget (`str` or `float`, *optional*, defaults to `"auto"`):
            Extra memory the OT step may use, in GiB: the batch's pairs are solved in groups within it, and a pair
            that alone exceeds it by the online solver; the weights do not depend on it. `"auto"`: a quarter of the
            GPU's free memory, or 2 GiB on a CPU. See the long-completions section of docs/how_it_works.md.
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
            "'cosine' (ablation).",
            "choices": list(OT_COSTS),
        },
    )
    ot_cost_scale: str = field(
        default="official",
        metadata={
            "help": "What a pair's cost matrix is divided by when that exceeds 1: 'official' (its maximum over the "
            "official code's padded matrix, whose zeroed prompt/padding states add the states' costs to the origin; "
            "the paper's ot_reg values were tuned under it), 'pair' (the maximum over the valid tokens only), "
            "'none' (no division) or 'minmax' (each pair's costs rescaled to [0, 1]: ot_reg means the same for "
            "every model).",
            "choices": list(OT_COST_SCALES),
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
    ot_weighting: str = field(
        default="ot",
        metadata={
            "help": "'ot': the transport plan's marginals weight the tokens; 'uniform': 1 per token before the same "
            "normalisation (the paper's 'w/o OT' ablation); 'sampo': 1 on min(|y_w|, |y_l|) tokens of each side drawn "
            "at random every step (SamPO), before the same normalisation.",
            "choices": list(OT_WEIGHTINGS),
        },
    )
    ot_solver: str = field(
        default="batched",
        metadata={
            "help": "'batched': the pairs together on the hidden states' device, one n x m matrix per pair, in groups "
            "within ot_memory_budget (a pair that alone exceeds it: online); 'online': no n x m matrix, the costs "
            "recomputed from the states at every pass (slower); 'pot': POT's sinkhorn_unbalanced once per pair on the "
            "CPU (reference, slow).",
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
    ot_memory_budget: str = field(
        default="auto",
        metadata={
            "help": "Extra memory the OT step may use, in GiB, or 'auto' (a quarter of the GPU's free memory, 2 GiB on "
            "a CPU): pairs are solved in groups within it, a pair that alone exceeds it by the online solver. The "
            "weights do not depend on it."
        },
    )

    def __post_init__(self):
        # Numbers from YAML, Python or NumPy (np.float32(0.5) is a number; True, "0.5" and inf are not): checked, then
        # stored as plain Python numbers so that they reach the solver, the logs and JSON as such.
        for name in CHECKED_FIELDS:
            object.__setattr__(self, name, checked_value(name, getattr(self, name)))
        _check_loss_type(self.loss_type)
        try:
            super().__post_init__()
        except ValueError as err:
            if "use_cpu" not in str(err) or not self.bf16:
                raise
            # transformers' message names `use_cpu` only, and following it alone keeps bf16 autocast on the CPU.
            raise ValueError(
                "bf16 is on (DPOConfig's default, for GPUs) but there is no GPU that supports it. On the CPU, set "
                "`bf16=False` (`--bf16 false`, `bf16: false` in a recipe) to train in fp32, which runs well on any CPU "
                "(with `use_cpu=True` as well for several processes, or to leave a GPU unused), or only "
                "`use_cpu=True` (`--use_cpu true`) to keep bf16 autocast on the CPU (fast with AVX512-BF16 or AMX, "
                "much slower than fp32 without them)."
            ) from err
        object.__setattr__(self, "_otpo_checked", True)

    def __setattr__(self, name, value):
        # `args.ot_reg = -1` after construction is refused here, as in the constructor, not at the first OT solve.
        if self.__dict__.get("_otpo_checked"):
            if name in CHECKED_FIELDS:
                value = checked_value(name, value)
            elif name == "loss_type":
                _check_loss_type(value)
                value = [value] if isinstance(value, str) else value  # as DPOConfig stores it
        super().__setattr__(name, value)


OT_FIELDS = tuple(f.name for f in fields(OTPOConfig) if f.name.startswith("ot_"))


def ot_kwargs(args: Any) -> dict[str, Any]:
    """The keyword arguments of [`ot_token_weights`] from an object with the `ot_*` attributes of [`OTPOConfig`] (a
    config, parsed command-line arguments): the field `ot_<name>` is the argument `<name>`. The one place where the
    settings meet the solver: the trainer, the analysis tools and the report script use it."""
    return {name.removeprefix("ot_"): getattr(args, name) for name in OT_FIELDS}
