"""Token weights for OTPO from an entropic unbalanced optimal-transport plan between two completions.

See :func:`ot_token_weights`. Pure torch; POT is imported only by the reference solver (``solver="pot"``).
"""

import math
import warnings
from dataclasses import dataclass

import torch


COSTS = ("euclidean", "sqeuclidean", "cosine")
COST_SCALES = ("official", "pair", "none", "minmax")
NORMALIZATIONS = ("min", "mean", "max", "length", "none")
SOLVERS = ("batched", "pot")
WEIGHTINGS = ("ot", "uniform")
_COST_EPS = 1e-6  # added to every cost, as in the official code
_REFINE = 0.1  # recompute ||x - y||^2 directly where the matmul formula cancels more than ~1 digit
_CHUNK = 2**24  # elements per block of that direct recomputation (64 MiB in fp32)
_CHECK_EVERY = 10  # iterations between convergence checks (each is a host-device sync)
# Multiplicative updates are used while max(M) / reg stays below this, so that exp(-M / reg) cannot underflow.
_EXP_LIMIT = {torch.float32: 50.0, torch.float64: 300.0}
_TAU = 1e5  # the stabilised solver absorbs its scalings into the kernel once one leaves [1 / tau, tau] (POT's tau)


@dataclass
class OTInfo:
    """Diagnostics of :func:`ot_token_weights`; see its ``Returns``."""

    plan: torch.Tensor | None
    plan_mass: torch.Tensor
    n_iter: int
    fallback: torch.Tensor
    cost_spread: torch.Tensor | None = None


def _finalize_cost(d2, sq_norms, cost):
    """Cost from squared distances; ``sq_norms`` = |x|^2 + |y|^2 of the unit-normalised vectors (cosine only)."""
    if cost == "sqeuclidean":
        return d2 + _COST_EPS
    if cost == "euclidean":
        return d2.sqrt() + _COST_EPS
    return (1 - 0.5 * (sq_norms - d2)).clamp_min(0) + _COST_EPS  # 1 - cos = 1 - <x, y> for unit x, y


def _zero_state_cost(x, cost):
    """(B, n) cost between each state and a zero vector: what the official code's zeroed masked positions cost.

    The cosine of a zero vector is taken as 0 (``torch.nn.functional.cosine_similarity`` clamps the norms), so its
    cosine cost is 1 whatever the other state."""
    if cost == "cosine":
        return x.new_full(x.shape[:2], 1 + _COST_EPS)
    sq = torch.linalg.vector_norm(x, dim=-1).square()
    return (sq if cost == "sqeuclidean" else sq.sqrt()) + _COST_EPS


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _sq_dists(x, y, pmask):
    """(B, n, m) squared distances, exact where the fast |x|^2 + |y|^2 - 2<x, y> formula loses precision."""
    # Distances are translation invariant: moving the origin to a token of the pair removes the large common offset
    # of hidden states, which would otherwise dominate the cancellation error of the matmul formula.
    origin = x[:, :1].clone()
    x, y = x.sub_(origin), y.sub_(origin)  # in place: the callers pass fresh copies
    sx, sy = torch.linalg.vector_norm(x, dim=-1).square(), torch.linalg.vector_norm(y, dim=-1).square()
    scale = sx[:, :, None] + sy[:, None, :]
    d2 = torch.baddbmm(scale, x, y.mT, alpha=-2).clamp_min_(0)
    bad = (d2 <= _REFINE * scale) & pmask
    if bad.any():  # near-duplicates (e.g. a shared prefix): identical tokens must cost exactly 0
        for chunk in bad.nonzero().split(max(1, _CHUNK // max(1, x.shape[-1]))):
            b, i, j = chunk.unbind(1)
            d2[b, i, j] = (x[b, i] - y[b, j]).square().sum(-1)
    return d2


def _rel_change(new, old, log_domain):
    """POT's stopping criterion max|u - u'| / max(max|u|, max|u'|, 1) per pair; u = exp(new) in the log domain."""
    if not log_domain:
        denom = torch.maximum(new.abs().amax(1), old.abs().amax(1)).clamp_min(1)
        return (new - old).abs().amax(1) / denom
    s = torch.maximum(new.amax(1), old.amax(1)).clamp_min(0)[:, None]  # = log of the denominator
    return ((new - s).exp() - (old - s).exp()).abs().amax(1)


def _matvec(K, v):
    """(B, n) = K v per pair. As a row vector times a matrix: ~10x faster than matrix times column in torch's CPU bmm."""
    return torch.bmm(v[:, None, :], K.mT).squeeze(1)


def _vecmat(u, K):
    """(B, m) = K^T u per pair."""
    return torch.bmm(u[:, None, :], K).squeeze(1)


def _sinkhorn(M, rmask, cmask, pmask, reg, fi, max_iter, tol):
    """Batched unbalanced Sinkhorn-Knopp, the iterates of POT's ``sinkhorn_knopp_unbalanced``; each pair is frozen at
    the iteration where POT would stop it. Returns u, v, K (the plan is diag(u) K diag(v)), the iterations run, and
    whether the scalings stayed finite."""
    done = ~rmask.any(1) | ~cmask.any(1)
    K = torch.where(pmask, torch.exp(-M / reg), 0)
    u, v = rmask.to(M.dtype), cmask.to(M.dtype)
    n_iter = 0
    while n_iter < max_iter and not (n_iter % _CHECK_EVERY == 0 and bool(done.all())):
        n_iter += 1
        # u = (1 / K v)^fi; masked rows have K v = 0: divide by 1 there, then zero them
        u_new = torch.where(rmask, torch.where(rmask, _matvec(K, v), 1).reciprocal().pow(fi), 0)
        v_new = torch.where(cmask, torch.where(cmask, _vecmat(u_new, K), 1).reciprocal().pow(fi), 0)
        err = 0.5 * (_rel_change(u_new, u, False) + _rel_change(v_new, v, False))
        u, v = torch.where(done[:, None], u, u_new), torch.where(done[:, None], v, v_new)
        done = done | (err < tol)
    finite = bool(u.isfinite().all() & v.isfinite().all())  # K <= 1, so finite scalings give a finite plan
    return u, v, K, n_iter, finite


def _absorbed_kernel(Mr, a, b, log_tiny):
    """K = exp(a_i + b_j - Mr_ij - s) for (B, n, m) ``Mr`` = M / reg (+inf off the valid pairs) and log-potentials
    a (B, n), b (B, m); s (B,) the largest exponent of each pair. Entries below the smallest normal float are 0
    (subnormals are slow on CPUs and carry no weight)."""
    logK = a[:, :, None] + b[:, None, :]
    logK.sub_(Mr)
    s = logK.flatten(1).amax(1)
    s = torch.where(s.isfinite(), s, 0)
    logK.sub_(s[:, None, None])
    return logK.masked_fill_(logK < log_tiny, -math.inf).exp_(), s


def _rel_change_split(base, new, old):
    """:func:`_rel_change` for u = exp(base + new) and u' = exp(base + old), computed without forming base + new:
    ``base`` (B, n) may be large, and its rounding would swamp the small changes the stopping rule looks for."""
    top = torch.maximum(new, old)
    top = torch.where(top.isfinite(), top, 0)  # masked tokens (both -inf) then contribute 0
    scale = (base + top - (base + top).amax(1, keepdim=True).clamp_min(0)).exp()  # 1 = the denominator's floor
    return (scale * ((new - top).exp() - (old - top).exp()).abs()).amax(1)


def _sinkhorn_stabilized(M, rmask, cmask, pmask, reg, fi, max_iter, tol):
    r"""The iterates and stopping rule of :func:`_sinkhorn`, safe at any ``M / reg``: stabilised scaling with
    absorption [3]_, as POT's ``sinkhorn_stabilized_unbalanced`` does it.

    POT's scalings are kept as :math:`e^{a} u` and :math:`e^{b} v`, with the log-potentials a, b absorbed into the
    kernel :math:`K_{ij} = e^{a_i + b_j - M_{ij} / \varepsilon - s}`; ``s`` (one per pair) makes its largest entry 1,
    so costs far above ``reg`` cannot underflow all of it. Between absorptions an iteration is the multiplicative one,
    two matrix-vector products; once u or v leaves [1 / tau, tau], they are absorbed into a, b and K is recomputed
    (one exp of the matrix). An iteration where K v or K^T u underflows for a token is redone in the log domain (a
    logsumexp over the matrix), then absorbed. Returns u, v, K, s (the plan is
    :math:`e^s \operatorname{diag}(u) K \operatorname{diag}(v)`) and the iterations run.
    """
    B, n, m = M.shape
    tiny = torch.finfo(M.dtype).tiny
    log_tiny, log_tau = math.log(tiny), math.log(_TAU)
    Mr = torch.where(pmask, M / reg, math.inf)
    done = ~rmask.any(1) | ~cmask.any(1)
    # POT's scalings are exp(a + lu), exp(b + lv): a, b absorbed into K, lu, lv (-inf at masked tokens) outside it
    lu, lv = (torch.where(mask, 0.0, -math.inf).to(M.dtype) for mask in (rmask, cmask))
    a, b = M.new_zeros(B, n), M.new_zeros(B, m)
    K, s = _absorbed_kernel(Mr, a, b, log_tiny)

    def log_product(mask, log_w, transpose):
        """log(K w) (or log(K^T w)) for w = exp(log_w), computed with w / max(w) so that w cannot overflow; and
        whether a token's product underflowed."""
        top = log_w.amax(1, keepdim=True)
        top = torch.where(top.isfinite(), top, 0)
        w = torch.exp(log_w - top)
        prod = _vecmat(w, K) if transpose else _matvec(K, w)
        return prod.log() + top, ((prod < tiny) & mask).any(1)

    n_iter = 0
    while n_iter < max_iter and not (n_iter % _CHECK_EVERY == 0 and bool(done.all())):
        n_iter += 1
        # POT: a + lu = -fi log(K0 e^(b + lv)), K0 = e^(-M / reg), and K0 e^(b + lv) = e^(s - a) K e^lv; so
        # lu = -fi (log(K e^lv) + s) - (1 - fi) a. Likewise for lv.
        log_Kv, under_u = log_product(rmask, lv, False)
        lu_new = torch.where(rmask, -fi * (log_Kv + s[:, None]) - (1 - fi) * a, -math.inf)
        log_Ktu, under_v = log_product(cmask, lu_new, True)
        lv_new = torch.where(cmask, -fi * (log_Ktu + s[:, None]) - (1 - fi) * b, -math.inf)
        underflow = (under_u | under_v) & ~done
        if bool(underflow.any()):  # the same update in the log domain, for those pairs
            logK0, rm, cm, au, bu = -Mr[underflow], rmask[underflow], cmask[underflow], a[underflow], b[underflow]
            lu_u = torch.where(rm, -fi * torch.logsumexp(logK0 + (bu + lv[underflow])[:, None, :], 2), -math.inf)
            lv_u = torch.where(cm, -fi * torch.logsumexp(logK0 + lu_u[:, :, None], 1), -math.inf)
            lu_new[underflow], lv_new[underflow] = lu_u - au, lv_u - bu
        err = 0.5 * (_rel_change_split(a, lu_new, lu) + _rel_change_split(b, lv_new, lv))
        lu, lv = torch.where(done[:, None], lu, lu_new), torch.where(done[:, None], lv, lv_new)
        done = done | (err < tol)
        far = torch.maximum(torch.where(rmask, lu, 0).abs().amax(1), torch.where(cmask, lv, 0).abs().amax(1))
        absorb = underflow | (far > log_tau)
        if bool(absorb.any()):
            a, lu = torch.where(absorb[:, None] & rmask, a + lu, a), torch.where(absorb[:, None] & rmask, 0, lu)
            b, lv = torch.where(absorb[:, None] & cmask, b + lv, b), torch.where(absorb[:, None] & cmask, 0, lv)
            if bool(absorb.all()):
                K, s = _absorbed_kernel(Mr, a, b, log_tiny)
            else:
                K[absorb], s[absorb] = _absorbed_kernel(Mr[absorb], a[absorb], b[absorb], log_tiny)
    return lu.exp(), lv.exp(), K, s, n_iter


def _normalize(wc, wr, n, m, normalization):
    """Rescale each pair's weights (B, L) to the target sums; rows that sum to 0 (empty pairs) stay 0."""
    if normalization == "none":
        return wc, wr
    n, m = n.to(wc.dtype), m.to(wc.dtype)
    tc = tr = {"min": torch.minimum(n, m), "mean": (n + m) / 2, "max": torch.maximum(n, m)}.get(normalization)
    if normalization == "length":
        tc, tr = n, m
    out = []
    for w, target in ((wc, tc), (wr, tr)):
        total = w.sum(1)
        out.append(w * torch.where(total > 0, target / torch.where(total > 0, total, 1), 0)[:, None])
    return out


def _compact(hidden, mask, length, dtype):
    """Valid tokens moved to the front in order, (B, length, H); the valid mask; the permutation that did it."""
    order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, :length]
    keep = torch.arange(length, device=mask.device) < mask.sum(1, keepdim=True)
    # Slots past a pair's length repeat its first valid token rather than padding, which may hold non-finite garbage.
    index = torch.where(keep, order, order[:, :1])
    batch = torch.arange(mask.shape[0], device=mask.device)[:, None]
    return hidden[batch, index].to(dtype), keep, order  # row copies: much faster than gather over H


def _cost_divisor(M, pmask, zero_costs, cost_scale):
    """(B,) what each pair's cost matrix is divided by: its maximum if above 1 ("pair"), that maximum taken over the
    official code's padded matrix, i.e. with the costs of the zeroed masked states ("official"), or 1 ("none").
    ``zero_costs``: the chosen and the rejected states' costs to a zero state, masked to the valid tokens."""
    if cost_scale == "none":
        return M.new_ones(M.shape[0])
    top = torch.where(pmask, M, 0).flatten(1).amax(1)
    if cost_scale == "official":
        for z in zero_costs:
            top = torch.maximum(top, z.amax(1))
    return top.clamp_min(1)


def _minmax(M, pmask):
    """(B, n, m) costs rescaled per pair to [0, 1] over the valid entries: (M - min M) / (max M - min M). A pair whose
    costs are all equal (or that has no valid entry) gets 0 everywhere, i.e. uniform weights."""
    lo = torch.where(pmask, M, math.inf).flatten(1).amin(1)
    hi = torch.where(pmask, M, -math.inf).flatten(1).amax(1)
    span = hi - lo
    ok = span.isfinite() & (span > 0)
    lo, span = torch.where(ok, lo, 0), torch.where(ok, span, 1)
    return torch.where(pmask & ok[:, None, None], (M - lo[:, None, None]) / span[:, None, None], 0)


def _cost_spread(M, pmask):
    """(B,) the largest spread of one column (over the chosen tokens) or one row (over the rejected tokens) of the
    scaled cost matrix: the Delta of the bound max_i w_i / min_i w_i <= exp(Delta / (reg + reg_m))."""
    hi, lo = torch.where(pmask, M, -math.inf), torch.where(pmask, M, math.inf)
    spreads = [(hi.amax(d) - lo.amin(d)).nan_to_num(0, 0, 0).clamp_min(0).amax(1) for d in (1, 2)]
    return torch.maximum(*spreads)


def _batched(hc, hr, mc, mr, reg, reg_m, cost, cost_scale, normalization, max_iter, tol, need_plan):
    """All pairs at once, on compact (B, n_max, H), (B, m_max, H) copies of the valid tokens."""
    dtype = torch.float64 if torch.float64 in (hc.dtype, hr.dtype) else torch.float32
    (B, Tc), Tr = mc.shape, mr.shape[1]
    n, m = mc.sum(1), mr.sum(1)
    n_max, m_max = (int(c.max()) if B else 0 for c in (n, m))
    if n_max == 0 or m_max == 0:  # every pair has an empty side
        zc, zr = hc.new_zeros(B, Tc, dtype=dtype), hc.new_zeros(B, Tr, dtype=dtype)
        empty = hc.new_zeros(B, dtype=dtype)
        return zc, zr, empty, zc.new_zeros(B, Tc, Tr) if need_plan else None, mc.new_zeros(B), 0, empty
    x, rows, oc = _compact(hc, mc, n_max, dtype)
    y, cols, orr = _compact(hr, mr, m_max, dtype)
    nonempty = (n > 0) & (m > 0)
    rows, cols = rows & nonempty[:, None], cols & nonempty[:, None]
    pmask = rows[:, :, None] & cols[:, None, :]
    zero_costs = ()
    if cost_scale == "official":  # before _sq_dists moves the origin
        zero_costs = tuple(torch.where(mask, _zero_state_cost(z, cost), 0) for z, mask in ((x, rows), (y, cols)))
    sq_norms = None
    if cost == "cosine":
        x, y = _unit(x), _unit(y)
        sq_norms = (x * x).sum(-1)[:, :, None] + (y * y).sum(-1)[:, None, :]
    M = torch.where(pmask, _finalize_cost(_sq_dists(x, y, pmask), sq_norms, cost), 0)
    # Non-finite hidden states (or overflow) make the pair's costs non-finite; other pairs are untouched.
    fallback = ~M.isfinite().flatten(1).all(1)
    for z in zero_costs:
        fallback |= ~z.isfinite().all(1)
    rows_s, cols_s = rows & ~fallback[:, None], cols & ~fallback[:, None]  # the pairs the solver works on
    pmask = pmask & ~fallback[:, None, None]
    if cost_scale == "minmax":
        M = _minmax(M, pmask)
    else:
        M = torch.where(pmask, M / _cost_divisor(M, pmask, zero_costs, cost_scale)[:, None, None], 0)
    fi = reg_m / (reg_m + reg)
    u = None
    if float(M.flatten(1).amax(1).max()) / reg < _EXP_LIMIT[dtype]:  # exp(-M / reg) cannot underflow
        u, v, K, n_iter, finite = _sinkhorn(M, rows_s, cols_s, pmask, reg, fi, max_iter, tol)
        log_scale = M.new_zeros(B)
        u = u if finite else None  # over/underflow after all: redo stabilised
    if u is None:
        u, v, K, log_scale, n_iter = _sinkhorn_stabilized(M, rows_s, cols_s, pmask, reg, fi, max_iter, tol)
    # The plan is e^log_scale diag(u) K diag(v); its marginals are kept without that factor, which may underflow
    # (costs far above reg), until the normalisation has cancelled it.
    row_sums, col_sums = u * _matvec(K, v), v * _vecmat(u, K)
    scale = log_scale.exp()
    wc = torch.where(fallback[:, None], rows.to(dtype), row_sums)
    wr = torch.where(fallback[:, None], cols.to(dtype), col_sums)
    if normalization == "none":
        wc, wr = wc * torch.where(fallback, 1, scale)[:, None], wr * torch.where(fallback, 1, scale)[:, None]
    wc, wr = _normalize(wc, wr, n, m, normalization)  # before scattering, so that padding cannot reorder the sums
    wc = wc.new_zeros(B, Tc).scatter_(1, oc, wc)
    wr = wr.new_zeros(B, Tr).scatter_(1, orr, wr)
    full = None
    if need_plan:
        plan = u[:, :, None] * K * v[:, None, :] * scale[:, None, None]
        full = plan.new_zeros(B, Tc, m_max).scatter_(1, oc[..., None].expand(-1, -1, m_max), plan)
        full = plan.new_zeros(B, Tc, Tr).scatter_(2, orr[:, None, :].expand(-1, Tc, -1), full)
    return wc, wr, row_sums.sum(1) * scale, full, fallback, n_iter, _cost_spread(M, pmask)


def _pot(hc, hr, mc, mr, reg, reg_m, cost, cost_scale, normalization, max_iter, tol, need_plan):
    """Reference: POT once per pair, on the valid tokens only, in float64 on the CPU."""
    import numpy as np
    import ot

    (B, Tc), Tr = mc.shape, mr.shape[1]
    wc, wr = torch.zeros(B, Tc, dtype=torch.float64), torch.zeros(B, Tr, dtype=torch.float64)
    mass, fallback = torch.zeros(B, dtype=torch.float64), torch.zeros(B, dtype=torch.bool)
    full = torch.zeros(B, Tc, Tr, dtype=torch.float64) if need_plan else None
    spread = torch.zeros(B, dtype=torch.float64)
    n_iter = 0
    for k in range(B):
        ic, ir = mc[k].nonzero().squeeze(1), mr[k].nonzero().squeeze(1)
        if len(ic) == 0 or len(ir) == 0:
            continue
        x, y = hc[k, ic].double().cpu(), hr[k, ir].double().cpu()
        ic, ir = ic.cpu(), ir.cpu()
        counts = torch.tensor([len(ic)]), torch.tensor([len(ir)])
        if cost == "cosine":
            M = (1 - _unit(x) @ _unit(y).T).clamp_min(0) + _COST_EPS
        else:
            d = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")
            M = (d if cost == "euclidean" else d.square()) + _COST_EPS
        top = M.max()
        if cost_scale == "official":
            top = max(top, *(_zero_state_cost(z[None], cost).max() for z in (x, y)))
        M = M.numpy()
        if not (np.isfinite(M).all() and math.isfinite(top)):
            fallback[k] = True
            wc[k, ic], wr[k, ir] = _normalize(*(x.new_ones(1, len(i)) for i in (ic, ir)), *counts, normalization)
            continue
        if cost_scale == "minmax":
            span = M.max() - M.min()
            M = (M - M.min()) / span if span > 0 else np.zeros_like(M)
        elif cost_scale != "none":
            M = M / max(float(top), 1.0)
        spread[k] = float(max((M.max(0) - M.min(0)).max(), (M.max(1) - M.min(1)).max()))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="If reg_type = entropy")
            P, log = ot.unbalanced.sinkhorn_unbalanced(
                np.ones(len(ic)),
                np.ones(len(ir)),
                M,
                reg,
                reg_m,
                reg_type="entropy",
                numItermax=max_iter,
                stopThr=tol,
                log=True,
            )
        n_iter = max(n_iter, len(log["err"]))
        P = torch.from_numpy(np.asarray(P, dtype=np.float64))
        wc[k, ic], wr[k, ir] = (w[0] for w in _normalize(P.sum(1)[None], P.sum(0)[None], *counts, normalization))
        mass[k] = P.sum()
        if need_plan:
            full[k, ic[:, None], ir[None, :]] = P
    device = hc.device
    return wc.to(device), wr.to(device), mass.to(device), full, fallback.to(device), n_iter, spread.to(device)


def _uniform(mc, mr, normalization, need_plan):
    """The "w/o OT" ablation: 1 per valid token, normalised as the OT weights are. As a plan, the constant coupling
    of mass min(n, m) (whose marginals are these weights under the "min" normalisation)."""
    n, m = mc.sum(1), mr.sum(1)
    nonempty = (n > 0) & (m > 0)
    wc, wr = (mask & nonempty[:, None] for mask in (mc, mr))
    wc, wr = _normalize(wc.double(), wr.double(), n, m, normalization)
    low = torch.minimum(n, m).double()
    mass = torch.where(nonempty, low, 0)
    plan = None
    if need_plan:
        value = torch.where(nonempty, low / (n * m).clamp_min(1), 0)[:, None, None]
        plan = (mc[:, :, None] & mr[:, None, :]) * value
    return wc, wr, mass, plan, torch.zeros_like(nonempty), 0, torch.zeros_like(mass)


def ot_token_weights(
    chosen_hidden: torch.Tensor,
    rejected_hidden: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    *,
    reg: float = 1.0,
    reg_m: float = 0.2,
    cost: str = "euclidean",
    cost_scale: str = "official",
    normalization: str = "min",
    weighting: str = "ot",
    solver: str = "batched",
    max_iter: int = 1000,
    tol: float = 1e-6,
    return_info: bool = False,
    return_plan: bool = True,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, OTInfo]:
    r"""OTPO token weights: marginals of an entropic unbalanced OT plan between each chosen and rejected completion.

    For a pair with valid chosen hidden states :math:`x_1, \dots, x_n` and rejected ones :math:`y_1, \dots, y_m`,
    the cost is :math:`M_{ij} = (c(x_i, y_j) + 10^{-6}) / D` with the divisor

    .. math::
        D = \max\Big(1,\; \max\big(\max_{ij} c(x_i, y_j),\; \max_i c(x_i, 0),\; \max_j c(0, y_j)\big) + 10^{-6}\Big)

    ("official", the official code's: it zeroes the states at masked positions, the prompt at least, and divides
    the cost over the whole padded sequences by its maximum when that exceeds 1; the zero states bring in
    :math:`c(x, 0)` = :math:`\|x\|_2`, :math:`\|x\|_2^2`, or 1 for the cosine cost, a zero vector's cosine being 0),
    :math:`D = \max(1, \max_{ij} c(x_i, y_j) + 10^{-6})` ("pair": the valid entries only) or :math:`D = 1` ("none");
    or, for "minmax", :math:`M_{ij} = (c_{ij} - \min_{kl} c_{kl}) / (\max_{kl} c_{kl} - \min_{kl} c_{kl})` over the
    pair's valid entries (0 everywhere if they are all equal). Then

    .. math::
        P^\star = \operatorname*{arg\,min}_{P \in \mathbb{R}_+^{n \times m}} \langle P, M \rangle
            + \varepsilon \sum_{ij} P_{ij} (\log P_{ij} - 1)
            + \tau \, \mathrm{KL}(P \mathbf{1}_m \,\|\, \mathbf{1}_n)
            + \tau \, \mathrm{KL}(P^\top \mathbf{1}_n \,\|\, \mathbf{1}_m)

    as ``ot.unbalanced.sinkhorn_unbalanced(1_n, 1_m, M, reg, reg_m, reg_type="entropy")`` solves it, by the
    Sinkhorn-Knopp scaling iterations [2]_ :math:`u \leftarrow (\mathbf{1}_n / K v)^{\phi}`,
    :math:`v \leftarrow (\mathbf{1}_m / K^\top u)^{\phi}`, :math:`K = e^{-M / \varepsilon}`,
    :math:`\phi = \tau / (\tau + \varepsilon)`, :math:`P^\star = \mathrm{diag}(u) K \mathrm{diag}(v)`. Chosen token
    :math:`i` is weighted by :math:`(P^\star \mathbf{1}_m)_i`, rejected token :math:`j` by
    :math:`(P^{\star\top} \mathbf{1}_n)_j`, each side rescaled to a target sum [1]_. With the "min" target both sides
    are divided by the same :math:`\sum_{ij} P^\star_{ij} / \min(n, m)` (the official code's ``scaled_coeff``).

    How far from uniform the weights can be: at the fixed point, a chosen token's mass is
    :math:`r_i = (K v)_i^{1 - \phi}`, so within one completion

    .. math::
        \max_i r_i / \min_i r_i \le \exp\big(\Delta / (\varepsilon + \tau)\big), \qquad
        \Delta = \max_j \big(\max_i M_{ij} - \min_i M_{ij}\big)

    (the rejected side likewise, with rows; ``info.cost_spread`` is the larger of the two :math:`\Delta`). The
    normalisation leaves the ratio unchanged. Under "official", :math:`\Delta` is the states' spread relative to
    their norms: a component shared by every state (as real hidden states have) makes it small, and the weights stay
    close to uniform at the paper's :math:`\varepsilon`, by an amount that depends on the model. "minmax" makes the
    costs' range 1 in every pair (and the weights invariant to a shift or a rescaling of all states), so that
    :math:`\varepsilon` and :math:`\tau` alone bound how far apart the weights may be, whatever the model
    (:math:`e^{1 / (\varepsilon + \tau)}`: 2.3 at the defaults, 28 at :math:`\varepsilon = 0.1`). A constant added to
    every cost of a pair rescales its plan and leaves the normalised weights unchanged, so "minmax" is in effect
    a division by the range of the costs.

    Parameters
    ----------
    chosen_hidden : torch.Tensor, shape (B, Tc, H)
        Hidden states of the chosen completions (any float dtype; computed in float32, float64 if given float64,
        with autocast disabled whatever the caller's autocast state).
    rejected_hidden : torch.Tensor, shape (B, Tr, H)
        Hidden states of the rejected completions.
    chosen_mask : torch.Tensor, shape (B, Tc)
        True (or 1) at the chosen completion's tokens: any subset of positions. Other positions are never read.
    rejected_mask : torch.Tensor, shape (B, Tr)
        Same for the rejected completions.
    reg : float, optional
        Entropic regularisation :math:`\varepsilon > 0`; larger spreads the plan towards uniform weights.
    reg_m : float, optional
        Marginal KL penalty :math:`\tau > 0`.
    cost : {"euclidean", "sqeuclidean", "cosine"}, optional
        :math:`c(x, y)` = :math:`\|x - y\|_2` (official code), :math:`\|x - y\|_2^2` (paper) or
        :math:`1 - \cos(x, y)`.
    cost_scale : {"official", "pair", "none"}, optional
        The divisor :math:`D` above. "official" reproduces the official code, under which the paper's :math:`\varepsilon`
        were tuned; it depends on the states' norms, so a large component shared by all states shrinks the costs.
        "pair" ignores the norms (this package's earlier scaling); "none" keeps the raw costs, which then set the
        scale of :math:`\varepsilon` (large costs are handled by the stabilised solver, and the weights are normalised
        without underflow; with ``normalization="none"`` the raw marginals may underflow to 0). "minmax" rescales each
        pair's costs to [0, 1], so that :math:`\varepsilon` means the same for every model (see the bound above).
    normalization : {"min", "mean", "max", "length", "none"}, optional
        Target sum of each side's weights: :math:`\min(n, m)`, :math:`(n + m) / 2`, :math:`\max(n, m)`, each side's
        own length (:math:`n`, :math:`m`), or none (raw plan marginals).
    weighting : {"ot", "uniform"}, optional
        "ot": the plan's marginals. "uniform": 1 per token before the same normalisation, the paper's "w/o OT"
        ablation (with "length" or "none" it is DPO); no OT problem is solved, the states are not read.
    solver : {"batched", "pot"}, optional
        "batched": all pairs at once on the hidden states' device; multiplicative updates, or stabilised ones with
        absorption [3]_ (the same iterates) when :math:`\max M / \varepsilon` could underflow :math:`K`. "pot": POT
        once per pair in float64 on the CPU.
    max_iter : int, optional
        Maximum number of Sinkhorn iterations.
    tol : float, optional
        POT's ``stopThr``: a pair stops once the mean of the relative changes of :math:`u` and :math:`v`,
        :math:`\max|u - u'| / \max(\max|u|, \max|u'|, 1)`, is below it.
    return_info : bool, optional
        Also return an :class:`OTInfo`.
    return_plan : bool, optional
        With ``return_info``, fill ``info.plan``; ``False`` leaves it ``None`` and spares the (B, Tc, Tr) scatter
        (the trainer needs only the diagnostics).

    Returns
    -------
    chosen_weights : torch.Tensor, shape (B, Tc), float32
    rejected_weights : torch.Tensor, shape (B, Tr), float32
        Detached, on the input device, 0 at masked positions and for pairs with an empty side. Pairs whose hidden
        states or costs are not finite get uniform weights (1 per valid token, then normalised).
    info : OTInfo, only if ``return_info``
        ``plan`` (B, Tc, Tr) float32, the plan at the input positions (0 elsewhere); ``plan_mass`` (B,)
        :math:`\sum_{ij} P^\star_{ij} / \min(n, m)` (0 for empty or fallback pairs); ``n_iter`` (int) iterations run;
        ``fallback`` (B,) bool, the pairs given uniform weights; ``cost_spread`` (B,) float32, the :math:`\Delta` of
        the bound above (0 for empty or fallback pairs). With ``weighting="uniform"``: the constant plan
        :math:`\min(n, m) / (n m)`, so ``plan_mass`` 1, ``n_iter`` 0, no fallback, ``cost_spread`` 0.

    References
    ----------
    .. [1] Li et al., "Optimal Transport-Based Token Weighting scheme for Enhanced Preference Optimization",
       arXiv:2505.18720, 2025.
    .. [2] Chizat, Peyré, Schmitzer, Vialard, "Scaling algorithms for unbalanced optimal transport problems",
       Mathematics of Computation, 2018.
    .. [3] Schmitzer, "Stabilized sparse scaling algorithms for entropy regularized transport problems",
       SIAM Journal on Scientific Computing, 2019.
    """
    for name, val in (("reg", reg), ("reg_m", reg_m), ("tol", tol)):
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not (math.isfinite(val) and val > 0):
            raise ValueError(f"`{name}` must be a finite number > 0, got {val!r}.")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"`max_iter` must be an int >= 1, got {max_iter!r}.")
    for name, val, choices in (
        ("cost", cost, COSTS),
        ("cost_scale", cost_scale, COST_SCALES),
        ("normalization", normalization, NORMALIZATIONS),
        ("weighting", weighting, WEIGHTINGS),
        ("solver", solver, SOLVERS),
    ):
        if val not in choices:
            raise ValueError(f"`{name}` must be one of {list(choices)}, got {val!r}.")
    for side, h, mask in (("chosen", chosen_hidden, chosen_mask), ("rejected", rejected_hidden, rejected_mask)):
        if h.dim() != 3 or tuple(mask.shape) != tuple(h.shape[:2]):
            raise ValueError(
                f"`{side}_hidden` (B, T, H) and `{side}_mask` (B, T) got {tuple(h.shape)}, {tuple(mask.shape)}."
            )
    for dim, what in ((0, "batch sizes"), (2, "hidden sizes")):
        if chosen_hidden.shape[dim] != rejected_hidden.shape[dim]:
            shapes = f"`chosen_hidden` {tuple(chosen_hidden.shape)}, `rejected_hidden` {tuple(rejected_hidden.shape)}"
            raise ValueError(f"{what} differ: {shapes}.")

    device = chosen_hidden.device
    hc, hr = chosen_hidden.detach(), rejected_hidden.detach().to(device)
    mc, mr = chosen_mask.detach().to(device) != 0, rejected_mask.detach().to(device) != 0
    need_plan = return_info and return_plan
    if weighting == "uniform":
        wc, wr, mass, plan, fallback, n_iter, spread = _uniform(mc, mr, normalization, need_plan)
    else:
        solve = _batched if solver == "batched" else _pot
        args = (float(reg), float(reg_m), cost, cost_scale, normalization, max_iter, tol, need_plan)
        # Trainers call this inside the model's forward, under mixed-precision autocast: without this, the cost
        # matmuls and Sinkhorn products would silently run in bf16/fp16. The solver's own dtype (fp32, fp64) is used.
        with torch.autocast(device_type=device.type, enabled=False):
            wc, wr, mass, plan, fallback, n_iter, spread = solve(hc, hr, mc, mr, *args)

    wc, wr = wc.float(), wr.float()
    if bool(fallback.any()):
        warnings.warn(
            f"OT weights: {int(fallback.sum())} pair(s) with non-finite hidden states or costs get uniform weights.",
            stacklevel=2,
        )
    if not return_info:
        return wc, wr
    mass = torch.where(fallback, 0, mass / torch.minimum(mc.sum(1), mr.sum(1)).clamp_min(1)).float()
    plan = plan.float().to(device) if plan is not None else None
    spread = torch.where(fallback, 0, spread).float()
    return wc, wr, OTInfo(plan=plan, plan_mass=mass, n_iter=n_iter, fallback=fallback, cost_spread=spread)
