r"""Batched entropic unbalanced Sinkhorn: the iterates of POT's ``ot.unbalanced`` solvers, for many pairs at once.

Every solver here solves, for each pair ``b`` of a batch, with costs ``M[b]`` on its valid entries,

.. math::
    P^\star = \operatorname*{arg\,min}_{P \in \mathbb{R}_+^{n \times m}} \langle P, M \rangle
        + \varepsilon \sum_{ij} P_{ij} (\log P_{ij} - 1)
        + \tau \, \mathrm{KL}(P \mathbf{1}_m \,\|\, \mathbf{1}_n)
        + \tau \, \mathrm{KL}(P^\top \mathbf{1}_n \,\|\, \mathbf{1}_m)

by the scaling iterations :math:`u \leftarrow (\mathbf{1}_n / K v)^{\phi}`,
:math:`v \leftarrow (\mathbf{1}_m / K^\top u)^{\phi}`, :math:`K = e^{-M / \varepsilon}`,
:math:`\phi = \tau / (\tau + \varepsilon)` [1]_, and stops each pair at the iteration where POT would stop it. One
function a variant, as in POT's ``ot/unbalanced/_sinkhorn.py``: :func:`sinkhorn_knopp_unbalanced` (multiplicative
updates), :func:`sinkhorn_stabilized_unbalanced` (the same iterates, safe at any :math:`\max M / \varepsilon`), and
:func:`sinkhorn_unbalanced`, which picks one.

References
----------
.. [1] Chizat, Peyré, Schmitzer, Vialard, "Scaling algorithms for unbalanced optimal transport problems",
   Mathematics of Computation, 2018.
.. [2] Schmitzer, "Stabilized sparse scaling algorithms for entropy regularized transport problems",
   SIAM Journal on Scientific Computing, 2019.
"""

import math
from dataclasses import dataclass

import torch


METHODS = ("auto", "sinkhorn", "sinkhorn_stabilized")
CHECK_EVERY = 10  # iterations between convergence checks (each is a host-device sync)
# Multiplicative updates are used while max(M) / reg stays below this, so that exp(-M / reg) cannot underflow.
EXP_LIMIT = {torch.float32: 50.0, torch.float64: 300.0}
TAU = 1e5  # the stabilised solver absorbs its scalings into the kernel once one leaves [1 / tau, tau] (POT's tau)


@dataclass
class SinkhornResult:
    r"""What a solver returns: the plan of pair ``b`` is
    :math:`e^{s_b} \operatorname{diag}(u_b) K_b \operatorname{diag}(v_b)`.

    Attributes
    ----------
    u : torch.Tensor, shape (B, n)
        Row scalings, 0 at invalid rows.
    v : torch.Tensor, shape (B, m)
        Column scalings, 0 at invalid columns.
    K : torch.Tensor, shape (B, n, m)
        The kernel, :math:`e^{-M / \varepsilon}` (or its stabilised form), 0 off the valid entries.
    log_scale : torch.Tensor, shape (B,)
        :math:`s_b`, 0 for the multiplicative updates; the stabilised kernel is divided by :math:`e^{s_b}` so that
        its largest entry is 1, and the plan's marginals may underflow without it.
    n_iter : int
        Iterations run (the largest over the pairs).
    finite : bool
        Whether the scalings stayed finite (the multiplicative updates may overflow; the stabilised ones do not).
    """

    u: torch.Tensor
    v: torch.Tensor
    K: torch.Tensor
    log_scale: torch.Tensor
    n_iter: int
    finite: bool = True

    def marginals(self) -> tuple[torch.Tensor, torch.Tensor]:
        r"""(B, n) :math:`u \odot K v` and (B, m) :math:`v \odot K^\top u`: the plan's marginals divided by
        :math:`e^{s}` (which a normalisation then cancels)."""
        return self.u * _matvec(self.K, self.v), self.v * _vecmat(self.u, self.K)

    def plan(self) -> torch.Tensor:
        """(B, n, m) the plan, :math:`e^{s} \\operatorname{diag}(u) K \\operatorname{diag}(v)`."""
        return self.u[:, :, None] * self.K * self.v[:, None, :] * self.log_scale.exp()[:, None, None]


def _rel_change(new, old):
    """POT's stopping criterion max|u - u'| / max(max|u|, max|u'|, 1) per pair."""
    denom = torch.maximum(new.abs().amax(1), old.abs().amax(1)).clamp_min(1)
    return (new - old).abs().amax(1) / denom


def _matvec(K, v):
    """(B, n) = K v per pair. As a row vector times a matrix: ~10x faster than matrix times column in torch's CPU bmm."""
    return torch.bmm(v[:, None, :], K.mT).squeeze(1)


def _vecmat(u, K):
    """(B, m) = K^T u per pair."""
    return torch.bmm(u[:, None, :], K).squeeze(1)


def sinkhorn_knopp_unbalanced(
    M: torch.Tensor,
    *,
    row_mask: torch.Tensor,
    col_mask: torch.Tensor,
    pair_mask: torch.Tensor,
    reg: float,
    reg_m: float,
    max_iter: int = 1000,
    tol: float = 1e-6,
) -> SinkhornResult:
    r"""Batched unbalanced Sinkhorn-Knopp: the iterates of POT's ``sinkhorn_knopp_unbalanced``, each pair frozen at the
    iteration where POT would stop it.

    Parameters
    ----------
    M : torch.Tensor, shape (B, n, m)
        Costs, float32 or float64. :math:`e^{-M / \varepsilon}` must not underflow where it matters (see
        :data:`EXP_LIMIT`); ``result.finite`` is False if the scalings overflowed.
    row_mask : torch.Tensor, shape (B, n), bool
        The valid rows (chosen tokens) of each pair; a pair with none is not solved.
    col_mask : torch.Tensor, shape (B, m), bool
        The valid columns (rejected tokens).
    pair_mask : torch.Tensor, shape (B, n, m), bool
        ``row_mask[:, :, None] & col_mask[:, None, :]``.
    reg : float
        Entropic regularisation :math:`\varepsilon > 0`.
    reg_m : float
        Marginal KL penalty :math:`\tau > 0`.
    max_iter : int
        Maximum number of iterations.
    tol : float
        POT's ``stopThr``: a pair stops once the mean of the relative changes of :math:`u` and :math:`v`,
        :math:`\max|u - u'| / \max(\max|u|, \max|u'|, 1)`, is below it (checked every :data:`CHECK_EVERY`
        iterations for the whole batch, per pair at every iteration).

    Returns
    -------
    SinkhornResult
        ``log_scale`` 0; the plan is :math:`\operatorname{diag}(u) K \operatorname{diag}(v)`.
    """
    fi = reg_m / (reg_m + reg)
    done = ~row_mask.any(1) | ~col_mask.any(1)
    K = torch.where(pair_mask, torch.exp(-M / reg), 0)
    u, v = row_mask.to(M.dtype), col_mask.to(M.dtype)
    n_iter = 0
    while n_iter < max_iter and not (n_iter % CHECK_EVERY == 0 and bool(done.all())):
        n_iter += 1
        # u = (1 / K v)^fi; masked rows have K v = 0: divide by 1 there, then zero them
        u_new = torch.where(row_mask, torch.where(row_mask, _matvec(K, v), 1).reciprocal().pow(fi), 0)
        v_new = torch.where(col_mask, torch.where(col_mask, _vecmat(u_new, K), 1).reciprocal().pow(fi), 0)
        err = 0.5 * (_rel_change(u_new, u) + _rel_change(v_new, v))
        u, v = torch.where(done[:, None], u, u_new), torch.where(done[:, None], v, v_new)
        done = done | (err < tol)
    finite = bool(u.isfinite().all() & v.isfinite().all())  # K <= 1, so finite scalings give a finite plan
    return SinkhornResult(u=u, v=v, K=K, log_scale=M.new_zeros(M.shape[0]), n_iter=n_iter, finite=finite)


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


def sinkhorn_stabilized_unbalanced(
    M: torch.Tensor,
    *,
    row_mask: torch.Tensor,
    col_mask: torch.Tensor,
    pair_mask: torch.Tensor,
    reg: float,
    reg_m: float,
    max_iter: int = 1000,
    tol: float = 1e-6,
) -> SinkhornResult:
    r"""The iterates and stopping rule of :func:`sinkhorn_knopp_unbalanced`, safe at any :math:`M / \varepsilon`:
    stabilised scaling with absorption [2]_, as POT's ``sinkhorn_stabilized_unbalanced`` does it.

    POT's scalings are kept as :math:`e^{a} u` and :math:`e^{b} v`, with the log-potentials a, b absorbed into the
    kernel :math:`K_{ij} = e^{a_i + b_j - M_{ij} / \varepsilon - s}`; ``s`` (one per pair) makes its largest entry 1,
    so costs far above ``reg`` cannot underflow all of it. Between absorptions an iteration is the multiplicative one,
    two matrix-vector products; once u or v leaves [1 / :data:`TAU`, :data:`TAU`], they are absorbed into a, b and K
    is recomputed (one exp of the matrix). An iteration where K v or K^T u underflows for a token is redone in the log
    domain (a logsumexp over the matrix), then absorbed.

    Parameters
    ----------
    M, row_mask, col_mask, pair_mask, reg, reg_m, max_iter, tol
        As in :func:`sinkhorn_knopp_unbalanced`.

    Returns
    -------
    SinkhornResult
        The plan is :math:`e^{s} \operatorname{diag}(u) K \operatorname{diag}(v)`, ``s`` = ``log_scale``.
    """
    fi = reg_m / (reg_m + reg)
    B, n, m = M.shape
    tiny = torch.finfo(M.dtype).tiny
    log_tiny, log_tau = math.log(tiny), math.log(TAU)
    Mr = torch.where(pair_mask, M / reg, math.inf)
    done = ~row_mask.any(1) | ~col_mask.any(1)
    # POT's scalings are exp(a + lu), exp(b + lv): a, b absorbed into K, lu, lv (-inf at masked tokens) outside it
    lu, lv = (torch.where(mask, 0.0, -math.inf).to(M.dtype) for mask in (row_mask, col_mask))
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
    while n_iter < max_iter and not (n_iter % CHECK_EVERY == 0 and bool(done.all())):
        n_iter += 1
        # POT: a + lu = -fi log(K0 e^(b + lv)), K0 = e^(-M / reg), and K0 e^(b + lv) = e^(s - a) K e^lv; so
        # lu = -fi (log(K e^lv) + s) - (1 - fi) a. Likewise for lv.
        log_Kv, under_u = log_product(row_mask, lv, False)
        lu_new = torch.where(row_mask, -fi * (log_Kv + s[:, None]) - (1 - fi) * a, -math.inf)
        log_Ktu, under_v = log_product(col_mask, lu_new, True)
        lv_new = torch.where(col_mask, -fi * (log_Ktu + s[:, None]) - (1 - fi) * b, -math.inf)
        underflow = (under_u | under_v) & ~done
        if bool(underflow.any()):  # the same update in the log domain, for those pairs
            logK0, rm, cm = -Mr[underflow], row_mask[underflow], col_mask[underflow]
            au, bu = a[underflow], b[underflow]
            lu_u = torch.where(rm, -fi * torch.logsumexp(logK0 + (bu + lv[underflow])[:, None, :], 2), -math.inf)
            lv_u = torch.where(cm, -fi * torch.logsumexp(logK0 + lu_u[:, :, None], 1), -math.inf)
            lu_new[underflow], lv_new[underflow] = lu_u - au, lv_u - bu
        err = 0.5 * (_rel_change_split(a, lu_new, lu) + _rel_change_split(b, lv_new, lv))
        lu, lv = torch.where(done[:, None], lu, lu_new), torch.where(done[:, None], lv, lv_new)
        done = done | (err < tol)
        far = torch.maximum(torch.where(row_mask, lu, 0).abs().amax(1), torch.where(col_mask, lv, 0).abs().amax(1))
        absorb = underflow | (far > log_tau)
        if bool(absorb.any()):
            a, lu = torch.where(absorb[:, None] & row_mask, a + lu, a), torch.where(absorb[:, None] & row_mask, 0, lu)
            b, lv = torch.where(absorb[:, None] & col_mask, b + lv, b), torch.where(absorb[:, None] & col_mask, 0, lv)
            if bool(absorb.all()):
                K, s = _absorbed_kernel(Mr, a, b, log_tiny)
            else:
                K[absorb], s[absorb] = _absorbed_kernel(Mr[absorb], a[absorb], b[absorb], log_tiny)
    return SinkhornResult(u=lu.exp(), v=lv.exp(), K=K, log_scale=s, n_iter=n_iter)


def sinkhorn_unbalanced(
    M: torch.Tensor,
    *,
    row_mask: torch.Tensor,
    col_mask: torch.Tensor,
    pair_mask: torch.Tensor,
    reg: float,
    reg_m: float,
    max_iter: int = 1000,
    tol: float = 1e-6,
    method: str = "auto",
) -> SinkhornResult:
    r"""Solve every pair with the multiplicative updates where they are safe, else with the stabilised ones.

    Parameters
    ----------
    M, row_mask, col_mask, pair_mask, reg, reg_m, max_iter, tol
        As in :func:`sinkhorn_knopp_unbalanced`.
    method : {"auto", "sinkhorn", "sinkhorn_stabilized"}
        "auto": :func:`sinkhorn_knopp_unbalanced` while :math:`\max M / \varepsilon` is below
        :data:`EXP_LIMIT` for ``M``'s dtype (so that :math:`e^{-M / \varepsilon}` cannot underflow) and its
        scalings stay finite; :func:`sinkhorn_stabilized_unbalanced` otherwise. Both run the same iterates.
    """
    kwargs = {"row_mask": row_mask, "col_mask": col_mask, "pair_mask": pair_mask, "reg": reg, "reg_m": reg_m}
    kwargs |= {"max_iter": max_iter, "tol": tol}
    if method == "sinkhorn_stabilized":
        return sinkhorn_stabilized_unbalanced(M, **kwargs)
    if method == "sinkhorn" or float(M.flatten(1).amax(1).max()) / reg < EXP_LIMIT[M.dtype]:
        result = sinkhorn_knopp_unbalanced(M, **kwargs)
        if result.finite or method == "sinkhorn":
            return result
    return sinkhorn_stabilized_unbalanced(M, **kwargs)  # over/underflow after all: redo stabilised
