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
:func:`sinkhorn_unbalanced`, which picks one. They never see a cost matrix: they ask a kernel for its products
(:class:`otpo_trl.ot.geometry.DenseKernel`, one stored matrix, or :class:`otpo_trl.ot.geometry.TiledKernel`, tiles
recomputed from the states at every pass), so that the dense and the online solver are the same iterations.

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
    :math:`e^{s_b} \operatorname{diag}(u_b) K_b \operatorname{diag}(v_b)`, :math:`s` the kernel's ``log_scale``.

    Attributes
    ----------
    u : torch.Tensor, shape (B, n)
        Row scalings, 0 at invalid rows.
    v : torch.Tensor, shape (B, m)
        Column scalings, 0 at invalid columns.
    kernel : DenseKernel or TiledKernel
        The kernel the scalings go with (for the stabilised solver, with the log-potentials absorbed in it).
    n_iter : int
        Iterations run (the largest over the pairs).
    finite : bool
        Whether the scalings stayed finite (the multiplicative updates may overflow; the stabilised ones do not).
    """

    u: torch.Tensor
    v: torch.Tensor
    kernel: object
    n_iter: int
    finite: bool = True

    def marginals(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r"""(B, n) and (B, m) the plan's marginals divided by :math:`e^{s}`, and :math:`s` (B,): the marginals
        themselves may underflow (costs far above :math:`\varepsilon`); a normalisation cancels the factor."""
        return self.kernel.marginals(self.u, self.v)

    def plan(self) -> torch.Tensor:
        """(B, n, m) the plan."""
        return self.kernel.plan(self.u, self.v)


def _rel_change(new, old):
    """POT's stopping criterion max|u - u'| / max(max|u|, max|u'|, 1) per pair."""
    denom = torch.maximum(new.abs().amax(1), old.abs().amax(1)).clamp_min(1)
    return (new - old).abs().amax(1) / denom


def sinkhorn_knopp_unbalanced(
    kernel,
    *,
    row_mask: torch.Tensor,
    col_mask: torch.Tensor,
    reg: float,
    reg_m: float,
    max_iter: int = 1000,
    tol: float = 1e-6,
) -> SinkhornResult:
    r"""Batched unbalanced Sinkhorn-Knopp: the iterates of POT's ``sinkhorn_knopp_unbalanced``, each pair frozen at the
    iteration where POT would stop it.

    Parameters
    ----------
    kernel : DenseKernel
        Holding :math:`K = e^{-M / \varepsilon}` (``kernel.exponentiate()``), 0 off the valid entries; asked for
        ``matvec`` and ``rmatvec``. :math:`K` must not underflow where it matters (see :data:`EXP_LIMIT`);
        ``result.finite`` is False if the scalings overflowed.
    row_mask : torch.Tensor, shape (B, n), bool
        The valid rows (chosen tokens) of each pair; a pair with none is not solved.
    col_mask : torch.Tensor, shape (B, m), bool
        The valid columns (rejected tokens).
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
        The plan is :math:`\operatorname{diag}(u) K \operatorname{diag}(v)`.
    """
    fi = reg_m / (reg_m + reg)
    done = ~row_mask.any(1) | ~col_mask.any(1)
    dtype = kernel.K.dtype
    u, v = row_mask.to(dtype), col_mask.to(dtype)
    n_iter = 0
    while n_iter < max_iter and not (n_iter % CHECK_EVERY == 0 and bool(done.all())):
        n_iter += 1
        # u = (1 / K v)^fi; masked rows have K v = 0: divide by 1 there, then zero them
        u_new = torch.where(row_mask, torch.where(row_mask, kernel.matvec(v), 1).reciprocal().pow(fi), 0)
        v_new = torch.where(col_mask, torch.where(col_mask, kernel.rmatvec(u_new), 1).reciprocal().pow(fi), 0)
        err = 0.5 * (_rel_change(u_new, u) + _rel_change(v_new, v))
        u, v = torch.where(done[:, None], u, u_new), torch.where(done[:, None], v, v_new)
        done = done | (err < tol)
    finite = bool(u.isfinite().all() & v.isfinite().all())  # K <= 1, so finite scalings give a finite plan
    return SinkhornResult(u=u, v=v, kernel=kernel, n_iter=n_iter, finite=finite)


def _rel_change_split(base, new, old):
    """:func:`_rel_change` for u = exp(base + new) and u' = exp(base + old), computed without forming base + new:
    ``base`` (B, n) may be large, and its rounding would swamp the small changes the stopping rule looks for."""
    top = torch.maximum(new, old)
    top = torch.where(top.isfinite(), top, 0)  # masked tokens (both -inf) then contribute 0
    scale = (base + top - (base + top).amax(1, keepdim=True).clamp_min(0)).exp()  # 1 = the denominator's floor
    return (scale * ((new - top).exp() - (old - top).exp()).abs()).amax(1)


def sinkhorn_stabilized_unbalanced(
    kernel,
    *,
    row_mask: torch.Tensor,
    col_mask: torch.Tensor,
    reg: float,
    reg_m: float,
    max_iter: int = 1000,
    tol: float = 1e-6,
) -> SinkhornResult:
    r"""The iterates and stopping rule of :func:`sinkhorn_knopp_unbalanced`, safe at any :math:`M / \varepsilon`:
    stabilised scaling with absorption [2]_, as POT's ``sinkhorn_stabilized_unbalanced`` does it.

    POT's scalings are kept as :math:`e^{a} u` and :math:`e^{b} v`, with the log-potentials a, b absorbed into the
    kernel :math:`K_{ij} = e^{a_i + b_j - M_{ij} / \varepsilon - s}`. An iteration asks the kernel for two log-domain
    products, :math:`\log K e^{\log v}` and :math:`\log K^\top e^{\log u}`; once u or v leaves
    [1 / :data:`TAU`, :data:`TAU`], they are absorbed into a, b (``kernel.absorb``). A dense kernel answers with
    matrix-vector products of its stored matrix (``s`` makes its largest entry 1, so costs far above ``reg`` cannot
    underflow all of it), rebuilds it from the states at an absorption, and redoes an iteration where a product
    underflowed for a token with a logsumexp over cost tiles, then absorbs. A tiled kernel answers every product with
    such a logsumexp, so it never underflows, and absorbing only stores a and b.

    Parameters
    ----------
    kernel : DenseKernel or TiledKernel
        Asked for ``absorb``, ``log_matvec``, ``exact_log_matvec`` and ``log_scale``.
    row_mask, col_mask, reg, reg_m, max_iter, tol
        As in :func:`sinkhorn_knopp_unbalanced`.

    Returns
    -------
    SinkhornResult
        The plan is :math:`e^{s} \operatorname{diag}(u) K \operatorname{diag}(v)`, ``s`` = ``kernel.log_scale``.
    """
    fi = reg_m / (reg_m + reg)
    B, n = row_mask.shape
    m = col_mask.shape[1]
    dtype = kernel.log_scale.dtype
    log_tau = math.log(TAU)
    done = ~row_mask.any(1) | ~col_mask.any(1)
    # POT's scalings are exp(a + lu), exp(b + lv): a, b absorbed into K, lu, lv (-inf at masked tokens) outside it
    lu, lv = (torch.where(mask, 0.0, -math.inf).to(dtype) for mask in (row_mask, col_mask))
    a, b = lu.new_zeros(B, n), lu.new_zeros(B, m)
    kernel.absorb(a, b, list(range(B)))
    n_iter = 0
    while n_iter < max_iter and not (n_iter % CHECK_EVERY == 0 and bool(done.all())):
        n_iter += 1
        s = kernel.log_scale[:, None]
        # POT: a + lu = -fi log(K0 e^(b + lv)), K0 = e^(-M / reg), and K0 e^(b + lv) = e^(s - a) K e^lv; so
        # lu = -fi (log(K e^lv) + s) - (1 - fi) a. Likewise for lv.
        log_Kv, under_u = kernel.log_matvec(lv, row_mask, transpose=False)
        lu_new = torch.where(row_mask, -fi * (log_Kv + s) - (1 - fi) * a, -math.inf)
        log_Ktu, under_v = kernel.log_matvec(lu_new, col_mask, transpose=True)
        lv_new = torch.where(col_mask, -fi * (log_Ktu + s) - (1 - fi) * b, -math.inf)
        underflow = (under_u | under_v) & ~done
        if bool(underflow.any()):  # the same update in the log domain, for those pairs
            rm, cm, au, bu = row_mask[underflow], col_mask[underflow], a[underflow], b[underflow]
            log_K0v = kernel.exact_log_matvec(bu + lv[underflow], False, underflow)
            lu_u = torch.where(rm, -fi * log_K0v, -math.inf)
            lv_u = torch.where(cm, -fi * kernel.exact_log_matvec(lu_u, True, underflow), -math.inf)
            lu_new[underflow], lv_new[underflow] = lu_u - au, lv_u - bu
        err = 0.5 * (_rel_change_split(a, lu_new, lu) + _rel_change_split(b, lv_new, lv))
        lu, lv = torch.where(done[:, None], lu, lu_new), torch.where(done[:, None], lv, lv_new)
        done = done | (err < tol)
        far = torch.maximum(torch.where(row_mask, lu, 0).abs().amax(1), torch.where(col_mask, lv, 0).abs().amax(1))
        absorb = underflow | (far > log_tau)
        if bool(absorb.any()):
            a, lu = torch.where(absorb[:, None] & row_mask, a + lu, a), torch.where(absorb[:, None] & row_mask, 0, lu)
            b, lv = torch.where(absorb[:, None] & col_mask, b + lv, b), torch.where(absorb[:, None] & col_mask, 0, lv)
            kernel.absorb(a, b, absorb.nonzero().flatten().tolist())
    return SinkhornResult(u=lu.exp(), v=lv.exp(), kernel=kernel, n_iter=n_iter)


def sinkhorn_unbalanced(
    kernel,
    *,
    row_mask: torch.Tensor,
    col_mask: torch.Tensor,
    reg: float,
    reg_m: float,
    max_cost: torch.Tensor,
    max_iter: int = 1000,
    tol: float = 1e-6,
    method: str = "auto",
) -> SinkhornResult:
    r"""Solve every pair with the multiplicative updates where they are safe, else with the stabilised ones.

    Parameters
    ----------
    kernel : DenseKernel
        Holding the costs or a kernel; made :math:`e^{-M / \varepsilon}` for the multiplicative updates.
    row_mask, col_mask, reg, reg_m, max_iter, tol
        As in :func:`sinkhorn_knopp_unbalanced`.
    max_cost : torch.Tensor, shape (B,)
        :math:`\max_{ij} M_{ij}` of each pair.
    method : {"auto", "sinkhorn", "sinkhorn_stabilized"}
        "auto": :func:`sinkhorn_knopp_unbalanced` while :math:`\max M / \varepsilon` is below
        :data:`EXP_LIMIT` for the kernel's dtype (so that :math:`e^{-M / \varepsilon}` cannot underflow) and its
        scalings stay finite; :func:`sinkhorn_stabilized_unbalanced` otherwise. Both run the same iterates.
    """
    kwargs = {"row_mask": row_mask, "col_mask": col_mask, "reg": reg, "reg_m": reg_m, "max_iter": max_iter, "tol": tol}
    safe = len(max_cost) == 0 or float(max_cost.max()) / reg < EXP_LIMIT[kernel.log_scale.dtype]
    if method == "sinkhorn" or (method == "auto" and safe):
        kernel.exponentiate()
        result = sinkhorn_knopp_unbalanced(kernel, **kwargs)
        if result.finite or method == "sinkhorn":
            return result
    return sinkhorn_stabilized_unbalanced(kernel, **kwargs)  # over/underflow after all: redo stabilised
