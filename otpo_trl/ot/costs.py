r"""Ground costs between two completions' hidden states, and their per-pair scalings.

All functions act on a batch of pairs laid out compactly: the valid states of pair ``b`` are ``x[b, :n_b]`` and
``y[b, :m_b]``, and ``pair_mask[b, i, j]`` is True on the valid entries :math:`i < n_b, j < m_b`. Off the valid
entries the returned matrices hold 0.
"""

import math

import torch


COSTS = ("euclidean", "sqeuclidean", "cosine")
COST_SCALES = ("official", "pair", "none", "minmax")
COST_EPS = 1e-6  # added to every cost, as in the official code
_REFINE = 0.1  # recompute ||x - y||^2 directly where the matmul formula cancels more than ~1 digit
_CHUNK = 2**24  # elements per block of that direct recomputation (64 MiB in fp32)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _sq_dists(x: torch.Tensor, y: torch.Tensor, pair_mask: torch.Tensor) -> torch.Tensor:
    """(B, n, m) squared distances, exact where the fast |x|^2 + |y|^2 - 2<x, y> formula loses precision."""
    # Distances are translation invariant: moving the origin to a token of the pair removes the large common offset
    # of hidden states, which would otherwise dominate the cancellation error of the matmul formula.
    origin = x[:, :1]
    x, y = x - origin, y - origin
    sx, sy = torch.linalg.vector_norm(x, dim=-1).square(), torch.linalg.vector_norm(y, dim=-1).square()
    scale = sx[:, :, None] + sy[:, None, :]
    d2 = torch.baddbmm(scale, x, y.mT, alpha=-2).clamp_min_(0)
    bad = (d2 <= _REFINE * scale) & pair_mask
    if bad.any():  # near-duplicates (e.g. a shared prefix): identical tokens must cost exactly 0
        for chunk in bad.nonzero().split(max(1, _CHUNK // max(1, x.shape[-1]))):
            b, i, j = chunk.unbind(1)
            d2[b, i, j] = (x[b, i] - y[b, j]).square().sum(-1)
    return d2


def cost_matrix(x: torch.Tensor, y: torch.Tensor, pair_mask: torch.Tensor, cost: str) -> torch.Tensor:
    r"""The cost of every pair of valid states, :math:`M_{bij} = c(x_{bi}, y_{bj}) + 10^{-6}`.

    .. math::
        c(x, y) = \|x - y\|_2 \;(\text{"euclidean"}), \quad \|x - y\|_2^2 \;(\text{"sqeuclidean"}), \quad
        1 - \frac{\langle x, y \rangle}{\|x\|_2 \|y\|_2} \;(\text{"cosine"})

    Squared distances come from one batched matrix product, :math:`\|x\|^2 + \|y\|^2 - 2 \langle x, y \rangle`,
    after moving the origin to the pair's first chosen state (distances do not depend on it, and hidden states share a
    large offset that would otherwise dominate the rounding); the entries where that formula cancels more than about
    one digit (near-duplicate states, such as a shared prefix) are recomputed directly, so that identical states cost
    exactly :math:`10^{-6}`.

    Parameters
    ----------
    x : torch.Tensor, shape (B, n, H)
        Chosen states, compact: the valid ones first. Float32 or float64; not modified.
    y : torch.Tensor, shape (B, m, H)
        Rejected states, compact, same dtype.
    pair_mask : torch.Tensor, shape (B, n, m), bool
        The valid entries.
    cost : {"euclidean", "sqeuclidean", "cosine"}

    Returns
    -------
    M : torch.Tensor, shape (B, n, m)
        The costs, 0 off ``pair_mask``. Non-finite states give non-finite costs in their pair only.
    """
    sq_norms = None
    if cost == "cosine":
        x, y = _unit(x), _unit(y)
        sq_norms = (x * x).sum(-1)[:, :, None] + (y * y).sum(-1)[:, None, :]
    d2 = _sq_dists(x, y, pair_mask)
    if cost == "sqeuclidean":
        M = d2 + COST_EPS
    elif cost == "euclidean":
        M = d2.sqrt() + COST_EPS
    else:  # 1 - cos = 1 - <x, y> = 1 - (|x|^2 + |y|^2 - |x - y|^2) / 2 for unit x, y
        M = (1 - 0.5 * (sq_norms - d2)).clamp_min(0) + COST_EPS
    return torch.where(pair_mask, M, 0)


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
        return (1 - _unit(x) @ _unit(y).T).clamp_min(0) + COST_EPS
    d = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")
    return (d if cost == "euclidean" else d.square()) + COST_EPS


def cost_divisor(
    M: torch.Tensor, pair_mask: torch.Tensor, zero_costs: tuple[torch.Tensor, ...], cost_scale: str
) -> torch.Tensor:
    r"""(B,) what each pair's costs are divided by under ``cost_scale``:

    .. math::
        D = \max\Big(1,\; \max\big(\max_{ij} M_{ij},\; \max_i c(x_i, 0),\; \max_j c(0, y_j)\big)\Big)

    for "official" (the official code's: it zeroes the states at masked positions, the prompt at least, and divides
    the cost over the whole padded sequences by its maximum when that exceeds 1), :math:`\max(1, \max_{ij} M_{ij})`
    for "pair" (the valid entries only), 1 for "none".

    Parameters
    ----------
    M : torch.Tensor, shape (B, n, m)
        Costs, from :func:`cost_matrix`.
    pair_mask : torch.Tensor, shape (B, n, m), bool
    zero_costs : tuple of torch.Tensor, shapes (B, n) and (B, m)
        For "official": :func:`zero_state_costs` of the chosen and the rejected states, 0 at invalid tokens.
    cost_scale : {"official", "pair", "none"}
    """
    if cost_scale == "none":
        return M.new_ones(M.shape[0])
    top = torch.where(pair_mask, M, 0).flatten(1).amax(1)
    if cost_scale == "official":
        for z in zero_costs:
            top = torch.maximum(top, z.amax(1))
    return top.clamp_min(1)


def minmax_costs(M: torch.Tensor, pair_mask: torch.Tensor) -> torch.Tensor:
    r"""(B, n, m) costs rescaled per pair to [0, 1] over the valid entries,

    .. math::
        M'_{ij} = \frac{M_{ij} - \min_{kl} M_{kl}}{\max_{kl} M_{kl} - \min_{kl} M_{kl}}.

    A pair whose costs are all equal (or that has no valid entry) gets 0 everywhere, i.e. uniform weights."""
    lo = torch.where(pair_mask, M, math.inf).flatten(1).amin(1)
    hi = torch.where(pair_mask, M, -math.inf).flatten(1).amax(1)
    span = hi - lo
    ok = span.isfinite() & (span > 0)
    lo, span = torch.where(ok, lo, 0), torch.where(ok, span, 1)
    return torch.where(pair_mask & ok[:, None, None], (M - lo[:, None, None]) / span[:, None, None], 0)


def scale_costs(
    M: torch.Tensor, pair_mask: torch.Tensor, cost_scale: str, zero_costs: tuple[torch.Tensor, ...] = ()
) -> torch.Tensor:
    """(B, n, m) the costs the solver uses: :func:`minmax_costs` for "minmax", else ``M`` divided by
    :func:`cost_divisor`; 0 off ``pair_mask``.

    Parameters
    ----------
    M : torch.Tensor, shape (B, n, m)
    pair_mask : torch.Tensor, shape (B, n, m), bool
    cost_scale : {"official", "pair", "none", "minmax"}
    zero_costs : tuple of torch.Tensor, shapes (B, n) and (B, m)
        See :func:`cost_divisor` ("official" only).
    """
    if cost_scale == "minmax":
        return minmax_costs(M, pair_mask)
    return torch.where(pair_mask, M / cost_divisor(M, pair_mask, zero_costs, cost_scale)[:, None, None], 0)


def cost_spread(M: torch.Tensor, pair_mask: torch.Tensor) -> torch.Tensor:
    r"""(B,) the largest spread of one column (over the chosen tokens) or one row (over the rejected tokens) of the
    scaled costs,

    .. math::
        \Delta = \max\Big(\max_j \big(\max_i M_{ij} - \min_i M_{ij}\big),\; \max_i \big(\max_j M_{ij} - \min_j M_{ij}\big)\Big),

    the :math:`\Delta` of the bound :math:`\max_i w_i / \min_i w_i \le \exp(\Delta / (\varepsilon + \tau))` on the
    weights (see :func:`otpo_trl.ot.ot_token_weights`). 0 for a pair with no valid entry."""
    hi, lo = torch.where(pair_mask, M, -math.inf), torch.where(pair_mask, M, math.inf)
    spreads = [(hi.amax(d) - lo.amin(d)).nan_to_num(0, 0, 0).clamp_min(0).amax(1) for d in (1, 2)]
    return torch.maximum(*spreads)
