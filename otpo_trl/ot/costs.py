r"""Ground costs between two completions' hidden states, and their per-pair scalings.

For chosen states :math:`x_i` and rejected states :math:`y_j`, the cost is :math:`c(x_i, y_j) + 10^{-6}` with

.. math::
    c(x, y) = \|x - y\|_2 \;(\text{"euclidean"}), \quad \|x - y\|_2^2 \;(\text{"sqeuclidean"}), \quad
    1 - \frac{\langle x, y \rangle}{\|x\|_2 \|y\|_2} \;(\text{"cosine"}),

scaled per pair by :func:`cost_scaling`. The solver's costs are made tile by tile from the states by
:class:`otpo_trl.ot.geometry.PointCloud`; :func:`pair_cost` writes one pair's from the definition, for references.
"""

import math

import torch


COSTS = ("euclidean", "sqeuclidean", "cosine")
COST_SCALES = ("official", "pair", "none", "minmax")
COST_EPS = 1e-6  # added to every cost, as in the official code


def unit_vectors(x: torch.Tensor) -> torch.Tensor:
    """``x`` (..., H) divided by its norm along the last dimension (a zero vector stays 0)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def zero_state_costs(x: torch.Tensor, cost: str) -> torch.Tensor:
    r"""(B, n) cost between each state and a zero vector, :math:`c(x_i, 0) + 10^{-6}`: what the official code's zeroed
    masked positions cost against the valid states.

    :math:`c(x, 0)` is :math:`\|x\|_2`, :math:`\|x\|_2^2`, or 1 for the cosine cost: the cosine of a zero vector is
    taken as 0, as ``torch.nn.functional.cosine_similarity`` does by clamping the norms.

    Parameters
    ----------
    x : torch.Tensor, shape (B, n, H)
    cost : {"euclidean", "sqeuclidean", "cosine"}
    """
    if cost == "cosine":
        return x.new_full(x.shape[:2], 1 + COST_EPS)
    sq = torch.linalg.vector_norm(x, dim=-1).square()
    return (sq if cost == "sqeuclidean" else sq.sqrt()) + COST_EPS


def pair_cost(x: torch.Tensor, y: torch.Tensor, cost: str) -> torch.Tensor:
    """(n, m) cost of one pair, :math:`c(x_i, y_j) + 10^{-6}`, written from the definition without the matrix-product
    formula (``torch.cdist`` computing each difference): slower, exact, for references. ``x`` (n, H), ``y`` (m, H)."""
    if cost == "cosine":
        return (1 - unit_vectors(x) @ unit_vectors(y).T).clamp_min(0) + COST_EPS
    d = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")
    return (d if cost == "euclidean" else d.square()) + COST_EPS


def cost_scaling(
    top: torch.Tensor, low: torch.Tensor, zero_cost: torch.Tensor, cost_scale: str
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""(B,) ``offset`` and ``divisor`` of each pair: the solver's costs are :math:`M_{ij} = (c_{ij} - \text{offset})
    / \text{divisor}`, with :math:`c_{ij} = c(x_i, y_j) + 10^{-6}` on the pair's valid entries.

    - "official" (the official code's): offset 0, divisor

      .. math::
          D = \max\Big(1,\; \max\big(\max_{ij} c_{ij},\; \max_i c(x_i, 0) + 10^{-6},\; \max_j c(0, y_j) + 10^{-6}
          \big)\Big).

      The official code zeroes the states at masked positions (the prompt at least) and divides the cost over the
      whole padded sequences by its maximum when that exceeds 1: the zero states bring in :func:`zero_state_costs`.
    - "pair": offset 0, :math:`D = \max(1, \max_{ij} c_{ij})`, the valid entries only.
    - "none": offset 0, :math:`D = 1`.
    - "minmax": offset :math:`\min_{kl} c_{kl}`, :math:`D = \max_{kl} c_{kl} - \min_{kl} c_{kl}`, so that
      :math:`M \in [0, 1]`; a pair whose costs are all equal gets :math:`D = \infty`, i.e. :math:`M = 0` and
      uniform weights.

    The spread of the scaled costs, the :math:`\Delta` of the bound
    :math:`\max_i w_i / \min_i w_i \le \exp(\Delta / (\varepsilon + \tau))` on the weights (see
    :func:`otpo_trl.ot.ot_token_weights`), is that of the raw costs divided by :math:`D`:

    .. math::
        \Delta = \max\Big(\max_j \big(\max_i M_{ij} - \min_i M_{ij}\big),\;
            \max_i \big(\max_j M_{ij} - \min_j M_{ij}\big)\Big).

    Parameters
    ----------
    top, low : torch.Tensor, shape (B,)
        :math:`\max_{ij} c_{ij}` and :math:`\min_{ij} c_{ij}` over each pair's valid entries.
    zero_cost : torch.Tensor, shape (B,)
        The largest :func:`zero_state_costs` of the pair's valid states ("official" only).
    cost_scale : {"official", "pair", "none", "minmax"}
    """
    zero = torch.zeros_like(top)
    if cost_scale == "minmax":
        span = top - low
        ok = span.isfinite() & (span > 0)
        return torch.where(ok, low, 0), torch.where(ok, span, math.inf)
    if cost_scale == "none":
        return zero, torch.ones_like(top)
    divisor = torch.maximum(top, zero_cost) if cost_scale == "official" else top
    return zero, torch.where(divisor.isfinite(), divisor.clamp_min(1), 1)
