"""The reference solver (``ot_token_weights(..., solver="pot")``): POT's ``sinkhorn_unbalanced`` once per pair, on the
valid tokens only, in float64 on the CPU. Slow; what the batched solver is tested against. POT is imported here only.
"""

import math
import warnings
from dataclasses import dataclass

import torch

from .costs import pair_cost, zero_state_costs


@dataclass
class PairPlan:
    """The reference solution of one pair.

    Attributes
    ----------
    plan : torch.Tensor or None, shape (n, m), float64
        The plan; None when the pair's costs are not finite (the caller falls back to uniform weights).
    cost_spread : float
        The Δ of the scaled costs (see :func:`otpo_trl.ot.costs.cost_spread`); 0 without a plan.
    n_iter : int
        Iterations POT ran.
    """

    plan: torch.Tensor | None
    cost_spread: float = 0.0
    n_iter: int = 0


def pot_pair_plan(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    reg: float,
    reg_m: float,
    cost: str,
    cost_scale: str,
    max_iter: int,
    tol: float,
) -> PairPlan:
    """``ot.unbalanced.sinkhorn_unbalanced(1_n, 1_m, M, reg, reg_m, reg_type="entropy")`` for one pair's valid states,
    with the costs of :func:`otpo_trl.ot.costs.pair_cost` scaled as ``cost_scale`` says.

    Parameters
    ----------
    x : torch.Tensor, shape (n, H), float64, on the CPU
        The chosen completion's valid states; n >= 1.
    y : torch.Tensor, shape (m, H), float64, on the CPU
        The rejected completion's valid states; m >= 1.
    reg, reg_m, cost, cost_scale, max_iter, tol
        As in :func:`otpo_trl.ot.ot_token_weights`.
    """
    import numpy as np
    import ot

    M = pair_cost(x, y, cost)
    top = M.max()
    if cost_scale == "official":
        top = max(top, *(zero_state_costs(z[None], cost).max() for z in (x, y)))
    M = M.numpy()
    if not (np.isfinite(M).all() and math.isfinite(top)):
        return PairPlan(plan=None)
    if cost_scale == "minmax":
        span = M.max() - M.min()
        M = (M - M.min()) / span if span > 0 else np.zeros_like(M)
    elif cost_scale != "none":
        M = M / max(float(top), 1.0)
    spread = float(max((M.max(0) - M.min(0)).max(), (M.max(1) - M.min(1)).max()))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="If reg_type = entropy")
        P, log = ot.unbalanced.sinkhorn_unbalanced(
            np.ones(len(x)),
            np.ones(len(y)),
            M,
            reg,
            reg_m,
            reg_type="entropy",
            numItermax=max_iter,
            stopThr=tol,
            log=True,
        )
    return PairPlan(plan=torch.from_numpy(np.asarray(P, dtype=np.float64)), cost_spread=spread, n_iter=len(log["err"]))
