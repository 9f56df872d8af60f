"""The OT math of OTPO, pure torch (POT only for the reference solver): token weights from two completions' hidden
states by entropic unbalanced optimal transport.

- `costs`: the cost matrix between two completions' states and its per-pair scalings.
- `sinkhorn`: the batched unbalanced Sinkhorn solvers (multiplicative and stabilised) and their named result.
- `weights`: `ot_token_weights` (cost, scale, solve, marginals, normalise), the "w/o OT" `uniform_token_weights`,
  SamPO's `sampo_token_weights`, and `checked_setting`, the one check of their settings.
- `pot_reference`: POT once per pair, the reference (`solver="pot"`).
- `stats`: `token_weight_stats`, how far from uniform a completion's weights are.

This package imports neither the trainer nor the config: they build on it.
"""

from .costs import COST_SCALES, COSTS, cost_matrix, cost_spread, scale_costs, zero_state_costs
from .sinkhorn import (
    SinkhornResult,
    sinkhorn_knopp_unbalanced,
    sinkhorn_stabilized_unbalanced,
    sinkhorn_unbalanced,
)
from .stats import TokenWeightStats, token_weight_stats
from .weights import (
    NORMALIZATIONS,
    SETTINGS,
    SOLVERS,
    WEIGHTINGS,
    OTInfo,
    checked_setting,
    ot_token_weights,
    positive_number,
    sampo_token_weights,
    uniform_token_weights,
)


__all__ = [
    "COSTS",
    "COST_SCALES",
    "NORMALIZATIONS",
    "SETTINGS",
    "SOLVERS",
    "WEIGHTINGS",
    "OTInfo",
    "SinkhornResult",
    "TokenWeightStats",
    "checked_setting",
    "cost_matrix",
    "cost_spread",
    "ot_token_weights",
    "positive_number",
    "sampo_token_weights",
    "scale_costs",
    "sinkhorn_knopp_unbalanced",
    "sinkhorn_stabilized_unbalanced",
    "sinkhorn_unbalanced",
    "token_weight_stats",
    "uniform_token_weights",
    "zero_state_costs",
]
