"""The OT math of OTPO, pure torch (POT only for the reference solver): token weights from two completions' hidden
states by entropic unbalanced optimal transport.

- `costs`: the costs between two completions' states and their per-pair scalings.
- `geometry`: how costs and kernel products are made: `PointCloud` (cost tiles from the states), `DenseKernel` (one
  stored matrix per pair), `TiledKernel` (none: tiles recomputed at every pass).
- `sinkhorn`: the batched unbalanced Sinkhorn solvers (multiplicative and stabilised), which only ask a kernel for
  products, and their named result.
- `solve`: a batch solved within a memory budget: dense groups, and the online solver for a pair that alone exceeds
  it.
- `weights`: `ot_token_weights` (cost, scale, solve, marginals, normalise), the "w/o OT" `uniform_token_weights`,
  SamPO's `sampo_token_weights`.
- `settings`: their settings' names and `checked_setting`, the one check of them (the config uses it too).
- `pot_reference`: POT once per pair, the reference (`solver="pot"`).
- `stats`: `token_weight_stats`, how far from uniform a completion's weights are.

This package imports neither the trainer nor the config: they build on it.
"""

from .costs import COST_SCALES, COSTS, cost_scaling, pair_cost, zero_state_costs
from .geometry import DenseKernel, PointCloud, TiledKernel
from .settings import NORMALIZATIONS, SETTINGS, SOLVERS, WEIGHTINGS, checked_setting, positive_number
from .sinkhorn import (
    SinkhornResult,
    sinkhorn_knopp_unbalanced,
    sinkhorn_stabilized_unbalanced,
    sinkhorn_unbalanced,
)
from .stats import TokenWeightStats, token_weight_stats
from .weights import OTInfo, ot_token_weights, sampo_token_weights, uniform_token_weights


__all__ = [
    "COSTS",
    "COST_SCALES",
    "NORMALIZATIONS",
    "SETTINGS",
    "SOLVERS",
    "WEIGHTINGS",
    "DenseKernel",
    "OTInfo",
    "PointCloud",
    "SinkhornResult",
    "TiledKernel",
    "TokenWeightStats",
    "checked_setting",
    "cost_scaling",
    "ot_token_weights",
    "positive_number",
    "sampo_token_weights",
    "pair_cost",
    "sinkhorn_knopp_unbalanced",
    "sinkhorn_stabilized_unbalanced",
    "sinkhorn_unbalanced",
    "token_weight_stats",
    "uniform_token_weights",
    "zero_state_costs",
]
