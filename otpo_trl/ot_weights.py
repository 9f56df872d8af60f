"""Token weights for OTPO from an entropic unbalanced optimal-transport plan between two completions.

See :func:`ot_token_weights`. Pure torch; POT is imported only by the reference solver (``solver="pot"``).
"""

import math
import warnings
from dataclasses import dataclass

import torch


COSTS = ("euclidean", "sqeuclidean", "cosine")
NORMALIZATIONS = ("min", "mean", "max", "length", "none")
SOLVERS = ("batched", "pot")
_COST_EPS = 1e-6  # added to every cost, as in the official code
_REFINE = 0.1  # recompute ||x - y||^2 directly where the matmul formula cancels more than ~1 digit
_CHUNK = 2**24  # elements per block of that direct recomputation (64 MiB in fp32)
_CHECK_EVERY = 10  # iterations between convergence checks (each is a host-device sync)
# Multiplicative updates are used while max(M) / reg stays below this, so that exp(-M / reg) cannot underflow.
_EXP_LIMIT = {torch.float32: 50.0, torch.float64: 300.0}


@dataclass
class OTInfo:
    """Diagnostics of :func:`ot_token_weights`; see its ``Returns``."""

    plan: torch.Tensor | None
    plan_mass: torch.Tensor
    n_iter: int
    fallback: torch.Tensor


def _finalize_cost(d2, sq_norms, cost):
    """Cost from squared distances; ``sq_norms`` = |x|^2 + |y|^2 of the unit-normalised vectors (cosine only)."""
    if cost == "sqeuclidean":
        return d2 + _COST_EPS
    if cost == "euclidean":
        return d2.sqrt() + _COST_EPS
    return (1 - 0.5 * (sq_norms - d2)).clamp_min(0) + _COST_EPS  # 1 - cos = 1 - <x, y> for unit x, y


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


def _sinkhorn(M, rmask, cmask, pmask, reg, fi, max_iter, tol, log_domain):
    """Batched unbalanced Sinkhorn-Knopp; each pair is frozen at the iteration where POT would stop it.
    Returns the plan, the iterations run, and whether the scalings stayed finite."""
    done = ~rmask.any(1) | ~cmask.any(1)
    if log_domain:
        logK = torch.where(pmask, -M / reg, -math.inf)
        u, v = (torch.where(mask, 0.0, -math.inf).to(M.dtype) for mask in (rmask, cmask))
    else:
        K = torch.where(pmask, torch.exp(-M / reg), 0)
        u, v = rmask.to(M.dtype), cmask.to(M.dtype)
    n_iter = 0
    while n_iter < max_iter and not (n_iter % _CHECK_EVERY == 0 and bool(done.all())):
        n_iter += 1
        if log_domain:  # log u = fi * (log a - logsumexp(log K + log v)), log a = 0
            u_new = torch.where(rmask, -fi * torch.logsumexp(logK + v[:, None, :], 2), -math.inf)
            v_new = torch.where(cmask, -fi * torch.logsumexp(logK + u_new[:, :, None], 1), -math.inf)
        else:  # masked rows have K v = 0: divide by 1 there, then zero them
            # Products as row vector times matrix: ~10x faster than matrix times column vector in torch's CPU bmm.
            Kv = torch.bmm(v[:, None, :], K.mT).squeeze(1)
            u_new = torch.where(rmask, torch.where(rmask, Kv, 1).reciprocal().pow(fi), 0)
            Ktu = torch.bmm(u_new[:, None, :], K).squeeze(1)
            v_new = torch.where(cmask, torch.where(cmask, Ktu, 1).reciprocal().pow(fi), 0)
        err = 0.5 * (_rel_change(u_new, u, log_domain) + _rel_change(v_new, v, log_domain))
        u, v = torch.where(done[:, None], u, u_new), torch.where(done[:, None], v, v_new)
        done = done | (err < tol)
    if log_domain:
        return torch.exp(u[:, :, None] + logK + v[:, None, :]), n_iter, True
    finite = bool(u.isfinite().all() & v.isfinite().all())  # K <= 1, so finite scalings give a finite plan
    return u[:, :, None] * K * v[:, None, :], n_iter, finite


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


def _batched(hc, hr, mc, mr, reg, reg_m, cost, normalization, max_iter, tol, need_plan):
    """All pairs at once, on compact (B, n_max, H), (B, m_max, H) copies of the valid tokens."""
    dtype = torch.float64 if torch.float64 in (hc.dtype, hr.dtype) else torch.float32
    (B, Tc), Tr = mc.shape, mr.shape[1]
    n, m = mc.sum(1), mr.sum(1)
    n_max, m_max = (int(c.max()) if B else 0 for c in (n, m))
    if n_max == 0 or m_max == 0:  # every pair has an empty side
        zc, zr = hc.new_zeros(B, Tc, dtype=dtype), hc.new_zeros(B, Tr, dtype=dtype)
        return zc, zr, hc.new_zeros(B, dtype=dtype), zc.new_zeros(B, Tc, Tr) if need_plan else None, mc.new_zeros(B), 0
    x, rows, oc = _compact(hc, mc, n_max, dtype)
    y, cols, orr = _compact(hr, mr, m_max, dtype)
    nonempty = (n > 0) & (m > 0)
    rows, cols = rows & nonempty[:, None], cols & nonempty[:, None]
    pmask = rows[:, :, None] & cols[:, None, :]
    sq_norms = None
    if cost == "cosine":
        x, y = _unit(x), _unit(y)
        sq_norms = (x * x).sum(-1)[:, :, None] + (y * y).sum(-1)[:, None, :]
    M = torch.where(pmask, _finalize_cost(_sq_dists(x, y, pmask), sq_norms, cost), 0)
    # Non-finite hidden states (or overflow) make the pair's costs non-finite; other pairs are untouched.
    fallback = ~M.isfinite().flatten(1).all(1)
    rows_s, cols_s = rows & ~fallback[:, None], cols & ~fallback[:, None]  # the pairs the solver works on
    pmask = pmask & ~fallback[:, None, None]
    M_max = torch.where(fallback, 0, M.flatten(1).amax(1))[:, None, None]
    M = torch.where(pmask, M / M_max.clamp_min(1), 0)  # divided by the pair's max over its valid entries if above 1
    fi = reg_m / (reg_m + reg)
    log_domain = float(M_max.clamp_max(1).max()) / reg >= _EXP_LIMIT[dtype]
    if not log_domain:
        plan, n_iter, finite = _sinkhorn(M, rows_s, cols_s, pmask, reg, fi, max_iter, tol, False)
        log_domain = not finite  # over/underflow after all: redo in the log domain
    if log_domain:
        plan, n_iter, _ = _sinkhorn(M, rows_s, cols_s, pmask, reg, fi, max_iter, tol, True)
    row_sums = plan.sum(2)
    wc = torch.where(fallback[:, None], rows.to(dtype), row_sums)
    wr = torch.where(fallback[:, None], cols.to(dtype), plan.sum(1))
    wc, wr = _normalize(wc, wr, n, m, normalization)  # before scattering, so that padding cannot reorder the sums
    wc = wc.new_zeros(B, Tc).scatter_(1, oc, wc)
    wr = wr.new_zeros(B, Tr).scatter_(1, orr, wr)
    full = None
    if need_plan:
        full = plan.new_zeros(B, Tc, m_max).scatter_(1, oc[..., None].expand(-1, -1, m_max), plan)
        full = plan.new_zeros(B, Tc, Tr).scatter_(2, orr[:, None, :].expand(-1, Tc, -1), full)
    return wc, wr, row_sums.sum(1), full, fallback, n_iter


def _pot(hc, hr, mc, mr, reg, reg_m, cost, normalization, max_iter, tol, need_plan):
    """Reference: POT once per pair, on the valid tokens only, in float64 on the CPU."""
    import numpy as np
    import ot

    (B, Tc), Tr = mc.shape, mr.shape[1]
    wc, wr = torch.zeros(B, Tc, dtype=torch.float64), torch.zeros(B, Tr, dtype=torch.float64)
    mass, fallback = torch.zeros(B, dtype=torch.float64), torch.zeros(B, dtype=torch.bool)
    full = torch.zeros(B, Tc, Tr, dtype=torch.float64) if need_plan else None
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
        M = M.numpy()
        if not np.isfinite(M).all():
            fallback[k] = True
            wc[k, ic], wr[k, ir] = _normalize(*(x.new_ones(1, len(i)) for i in (ic, ir)), *counts, normalization)
            continue
        M = M / max(M.max(), 1.0)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="If reg_type = entropy")
            P, log = ot.unbalanced.sinkhorn_unbalanced(
                np.ones(len(ic)), np.ones(len(ir)), M, reg, reg_m, reg_type="entropy",
                numItermax=max_iter, stopThr=tol, log=True,
            )  # fmt: skip
        n_iter = max(n_iter, len(log["err"]))
        P = torch.from_numpy(np.asarray(P, dtype=np.float64))
        wc[k, ic], wr[k, ir] = (w[0] for w in _normalize(P.sum(1)[None], P.sum(0)[None], *counts, normalization))
        mass[k] = P.sum()
        if need_plan:
            full[k, ic[:, None], ir[None, :]] = P
    device = hc.device
    return wc.to(device), wr.to(device), mass.to(device), full, fallback.to(device), n_iter


def ot_token_weights(
    chosen_hidden: torch.Tensor,
    rejected_hidden: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    *,
    reg: float = 1.0,
    reg_m: float = 0.2,
    cost: str = "euclidean",
    normalization: str = "min",
    solver: str = "batched",
    max_iter: int = 1000,
    tol: float = 1e-6,
    return_info: bool = False,
    return_plan: bool = True,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, OTInfo]:
    r"""OTPO token weights: marginals of an entropic unbalanced OT plan between each chosen and rejected completion.

    For a pair with valid chosen hidden states :math:`x_1, \dots, x_n` and rejected ones :math:`y_1, \dots, y_m`,

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
    :math:`(P^{\star\top} \mathbf{1}_n)_j`, each side rescaled to a target sum [1]_.

    Parameters
    ----------
    chosen_hidden : torch.Tensor, shape (B, Tc, H)
        Hidden states of the chosen completions (any float dtype; computed in float32, float64 if given float64).
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
        :math:`M_{ij}` = :math:`\|x_i - y_j\|_2` (official code), :math:`\|x_i - y_j\|_2^2` (paper) or
        :math:`1 - \cos(x_i, y_j)`, plus 1e-6; a pair's :math:`M` is divided by its maximum when that exceeds 1.
    normalization : {"min", "mean", "max", "length", "none"}, optional
        Target sum of each side's weights: :math:`\min(n, m)`, :math:`(n + m) / 2`, :math:`\max(n, m)`, each side's
        own length (:math:`n`, :math:`m`), or none (raw plan marginals).
    solver : {"batched", "pot"}, optional
        "batched": all pairs at once on the hidden states' device; multiplicative updates, or log-domain ones when
        :math:`\max M / \varepsilon` could underflow :math:`K`. "pot": POT once per pair in float64 on the CPU.
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
        ``fallback`` (B,) bool, the pairs given uniform weights.

    References
    ----------
    .. [1] Li et al., "Optimal Transport-Based Token Weighting scheme for Enhanced Preference Optimization",
       arXiv:2505.18720, 2025.
    .. [2] Chizat, Peyré, Schmitzer, Vialard, "Scaling algorithms for unbalanced optimal transport problems",
       Mathematics of Computation, 2018.
    """
    for name, val in (("reg", reg), ("reg_m", reg_m), ("tol", tol)):
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not (math.isfinite(val) and val > 0):
            raise ValueError(f"`{name}` must be a finite number > 0, got {val!r}.")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"`max_iter` must be an int >= 1, got {max_iter!r}.")
    for name, val, choices in (("cost", cost, COSTS), ("normalization", normalization, NORMALIZATIONS),
                               ("solver", solver, SOLVERS)):  # fmt: skip
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
    solve = _batched if solver == "batched" else _pot
    args = (float(reg), float(reg_m), cost, normalization, max_iter, tol, return_info and return_plan)
    wc, wr, mass, plan, fallback, n_iter = solve(hc, hr, mc, mr, *args)

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
    return wc, wr, OTInfo(plan=plan, plan_mass=mass, n_iter=n_iter, fallback=fallback)
