r"""How the costs and the kernel products of a batch of pairs are made: the geometry, apart from the solver.

As in OTT-JAX, the Sinkhorn iterations (:mod:`otpo_trl.ot.sinkhorn`) only ask for kernel products, and the objects
here answer them in two ways:

- :class:`DenseKernel` holds one matrix per pair: the kernel :math:`K = e^{-M / \varepsilon}` (or its stabilised,
  absorbed form), built in place from the costs the first pass stored, and rebuilt from the states when the
  stabilised solver absorbs its scalings. Memory: one :math:`n \times m` matrix per pair, plus row blocks.
- :class:`TiledKernel` holds none: every product recomputes the cost tiles from the hidden states and reduces them
  in the log domain (any :math:`\varepsilon`). Memory: :math:`O((n + m) H + \text{tile}^2)` per pair; time: the
  :math:`2 n m H` flops of the cost at every pass, two passes an iteration.

Both read their costs from a :class:`PointCloud`, which makes any tile of any pair's cost matrix from the states and
knows, after one pass over all tiles (:meth:`PointCloud.scan`), how each pair's costs are scaled.

Layout: pair ``b`` of a batch has ``n[b]`` chosen states ``x[b, :n[b]]`` and ``m[b]`` rejected ones
``y[b, :m[b]]``; rows and columns past them are never part of a result.
"""

import math

import torch

from .costs import COST_EPS, cost_scaling, zero_state_costs


_REFINE = 0.1  # recompute ||x - y||^2 directly where the matmul formula cancels more than ~1 digit
TILE = 2**20  # elements of one cost tile of the online solver (4 MiB in fp32)
# The dense path's row blocks: 1/16 of the matrix, so that they add little to it, within [MIN_BLOCK, BLOCK] elements
# (the cost's matrix product runs ~1.3x slower in blocks of 128 x 8k than in blocks of 512 x 8k).
BLOCK = 2**22
MIN_BLOCK = 2**16


def _blocks(total: int, size: int):
    """Slices of ``range(total)`` of at most ``size`` elements."""
    size = max(1, size)
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


class PointCloud:
    r"""The costs :math:`c(x_i, y_j) + 10^{-6}` between the chosen and the rejected states of each pair, made tile by
    tile and scaled per pair as ``cost_scale`` says (see :mod:`otpo_trl.ot.costs`).

    Squared distances come from a matrix product, :math:`\|x\|^2 + \|y\|^2 - 2 \langle x, y \rangle`, after moving the
    origin to each pair's first chosen state (distances do not depend on it, and hidden states share a large offset
    that would otherwise dominate the rounding); entries where that formula cancels more than about one digit
    (near-duplicate states, such as a shared prefix) are recomputed directly, so that identical states cost exactly
    :math:`10^{-6}`.

    Parameters
    ----------
    x : torch.Tensor, shape (B, N, H)
        The chosen states, valid ones first; rows past ``n[b]`` must be finite (they are computed, never used). Float32
        or float64. Taken over: it is modified in place.
    y : torch.Tensor, shape (B, M, H)
        The rejected states, likewise.
    n, m : list of int
        The valid lengths of each pair.
    cost : {"euclidean", "sqeuclidean", "cosine"}

    Attributes (after :meth:`scan`)
    -------------------------------
    offset, divisor : torch.Tensor, shape (B,)
        The scaled cost is :math:`(c - \text{offset}) / \text{divisor}`.
    fallback : torch.Tensor, shape (B,), bool
        Pairs with a non-finite cost or state: not solved.
    row_valid, col_valid : torch.Tensor, shapes (B, N), (B, M), bool
        The rows and columns the solver works on (none for empty and fallback pairs).
    cost_spread, max_cost : torch.Tensor, shape (B,)
        :math:`\Delta` of the scaled costs (see :func:`otpo_trl.ot.costs.cost_scaling`) and their largest value; 0
        for empty and fallback pairs.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, n: list[int], m: list[int], cost: str):
        self.cost, self.n, self.m = cost, list(n), list(m)
        self.shape = (x.shape[0], x.shape[1], y.shape[1])
        device = x.device
        self.lengths = (torch.tensor(self.n, device=device), torch.tensor(self.m, device=device))
        self.valid = tuple(torch.arange(T, device=device) < L[:, None] for T, L in zip(self.shape[1:], self.lengths))
        # The official scaling's cost of a zeroed (masked) state, before the origin moves: (B,) largest per pair.
        self.zero_cost = torch.maximum(
            *(torch.where(v, zero_state_costs(z, cost), 0).amax(1) for z, v in zip((x, y), self.valid))
        )
        self.unit_sq = None
        if cost == "cosine":  # |x|^2 of the unit vectors: 1, or 0 for a zero state
            x, y = (
                x.div_(x.norm(dim=-1, keepdim=True).clamp_min(1e-12)),
                y.div_(y.norm(dim=-1, keepdim=True).clamp_min(1e-12)),
            )
            self.unit_sq = tuple((z * z).sum(-1) for z in (x, y))
        origin = x[:, :1].clone()
        self.x, self.y = x.sub_(origin), y.sub_(origin)
        self.sq = tuple(torch.linalg.vector_norm(z, dim=-1).square() for z in (self.x, self.y))
        self.workspace = {}  # tile-sized buffers, reused: a fresh one per tile costs its page faults every time

    def work(self, name: str, shape: tuple, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A buffer of ``shape`` for ``name``, the same memory at every call (its content is not kept)."""
        dtype = dtype or self.x.dtype
        numel = math.prod(shape)
        buffer = self.workspace.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
            buffer = self.workspace[name] = torch.empty(numel, dtype=dtype, device=self.x.device)
        return buffer[:numel].view(shape)

    @property
    def dtype(self):
        return self.x.dtype

    @property
    def device(self):
        return self.x.device

    def select(self, pairs: slice) -> "PointCloud":
        """The same geometry for the pairs of ``pairs`` (a slice: views, nothing copied)."""
        other = PointCloud.__new__(PointCloud)
        other.__dict__.update(self.__dict__)
        other.n, other.m = self.n[pairs], self.m[pairs]
        other.shape = (len(other.n), *self.shape[1:])
        for name, value in self.__dict__.items():
            if isinstance(value, torch.Tensor):
                setattr(other, name, value[pairs])
            elif isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor):
                setattr(other, name, tuple(v[pairs] for v in value))
        return other

    def full(self, rows: slice, cols: slice) -> bool:
        """Whether every entry of the tile is a valid one of every pair (then no mask is needed)."""
        return rows.stop <= min(self.n, default=0) and cols.stop <= min(self.m, default=0)

    def cost_tile(self, rows: slice, cols: slice, out: torch.Tensor | None = None) -> torch.Tensor:
        """(B, r, c) raw costs of rows ``rows`` and columns ``cols`` of every pair (finite garbage outside the
        lengths), into ``out`` if given, else into the workspace's "tile" (valid until the next call)."""
        x, y = self.x[:, rows], self.y[:, cols]
        shape = (self.shape[0], x.shape[1], y.shape[1])
        sx, sy = self.sq[0][:, rows], self.sq[1][:, cols]
        scale = torch.add(sx[:, :, None], sy[:, None, :], out=self.work("scale", shape))
        d2 = torch.baddbmm(scale, x, y.mT, alpha=-2, out=self.work("tile", shape) if out is None else out)
        # Entries where the formula cancelled more than ~1 digit, d2 <= 0.1 (|x|^2 + |y|^2), negative ones included,
        # are recomputed directly. Only a row whose smallest d2 is below 0.1 (|x|^2 + max |y|^2) can hold one.
        full = self.full(rows, cols)
        maybe = d2.amin(2) <= _REFINE * (sx + sy.amax(1, keepdim=True))
        if not full:
            maybe &= self.valid[0][:, rows]
        if maybe.any():
            b, i = maybe.nonzero().unbind(1)
            bad = d2[b, i] <= _REFINE * scale[b, i]
            if not full:
                bad &= self.valid[1][b, cols]
            k, j = bad.nonzero().unbind(1)
            b, i = b[k], i[k]
            d2[b, i, j] = (x[b, i] - y[b, j]).square().sum(-1)
        if not full:
            d2.clamp_min_(0)  # the entries outside the lengths, which are not recomputed
        if self.cost == "sqeuclidean":
            return d2.add_(COST_EPS)
        if self.cost == "euclidean":
            return d2.sqrt_().add_(COST_EPS)
        # 1 - cos(x, y) = 1 - (|x|^2 + |y|^2 - |x - y|^2) / 2 for the unit vectors, in that order of operations
        d2.sub_(torch.add(self.unit_sq[0][:, rows, None], self.unit_sq[1][:, None, cols], out=scale)).neg_()
        return d2.mul_(0.5).neg_().add_(1).clamp_min_(0).add_(COST_EPS)

    def scaled_tile(self, rows: slice, cols: slice) -> torch.Tensor:
        """(B, r, c) the scaled costs the solver uses, :math:`(c - \\text{offset}) / \\text{divisor}`."""
        tile = self.cost_tile(rows, cols).sub_(self.offset[:, None, None])
        return tile.div_(self.divisor[:, None, None])

    @property
    def block(self) -> int:
        """Elements of the dense path's row blocks: 1/16 of the padded matrix, within [MIN_BLOCK, BLOCK]."""
        return min(BLOCK, max(MIN_BLOCK, self.shape[1] * self.shape[2] // 16))

    def tiles(self, transpose: bool = False, size: int | None = None):
        """(rows, cols) slices covering the matrix, tiles of at most ``size`` (default :data:`TILE`) elements: full
        rows (or full columns, with ``transpose``) when that allows."""
        N, M = self.shape[1:]
        size = size or TILE
        if transpose:
            return [(r, c) for c in _blocks(M, max(1, size // max(N, 1))) for r in _blocks(N, size)]
        return [(r, c) for r in _blocks(N, max(1, size // max(M, 1))) for c in _blocks(M, size)]

    def scan(self, cost_scale: str, out: torch.Tensor | None = None) -> None:
        """One pass over every cost: each pair's scaling, non-finite pairs, and the spread of the scaled costs.

        ``out`` (B, N, M): also store the raw costs there, 0 outside the lengths (the dense path's one matrix)."""
        B, N, M = self.shape
        inf = math.inf
        row_hi, row_lo = (self.x.new_full((B, N), v) for v in (-inf, inf))
        col_hi, col_lo = (self.x.new_full((B, M), v) for v in (-inf, inf))
        for rows, cols in self.tiles(size=TILE if out is None else self.block):
            tile = self.cost_tile(rows, cols, None if out is None else out[:, rows, cols])
            full = self.full(rows, cols)
            if not full:
                valid = torch.logical_and(
                    self.valid[0][:, rows, None],
                    self.valid[1][:, None, cols],
                    out=self.work("valid", tile.shape, torch.bool),
                )
            masked = self.work("scale", tile.shape)  # free once the tile is made
            low = tile if full else torch.where(valid, tile, tile.new_tensor(inf), out=masked)
            row_lo[:, rows], col_lo[:, cols] = (
                row_lo[:, rows].minimum(low.amin(2)),
                col_lo[:, cols].minimum(low.amin(1)),
            )
            high = tile if full else torch.where(valid, tile, tile.new_tensor(-inf), out=masked)
            row_hi[:, rows], col_hi[:, cols] = (
                row_hi[:, rows].maximum(high.amax(2)),
                col_hi[:, cols].maximum(high.amax(1)),
            )
            if not full:
                tile.masked_fill_(valid.logical_not_(), 0)  # 0 outside the lengths, in `out`
            del tile
        rv, cv = self.valid
        top = torch.where(rv, row_hi, -inf).amax(1)  # amax keeps NaN: a NaN cost makes its pair non-finite
        low = torch.where(rv, row_lo, inf).amin(1)
        nonempty = self.lengths[0].gt(0) & self.lengths[1].gt(0)
        self.fallback = ~(top.isfinite() & low.isfinite() & self.zero_cost.isfinite()) & nonempty
        ok = nonempty & ~self.fallback
        self.offset, self.divisor = cost_scaling(top, low, self.zero_cost, cost_scale)
        spread = torch.maximum(
            torch.where(rv, row_hi - row_lo, -inf).amax(1), torch.where(cv, col_hi - col_lo, -inf).amax(1)
        )
        self.cost_spread = torch.where(ok, spread / self.divisor, 0)
        self.max_cost = torch.where(ok, (top - self.offset) / self.divisor, 0)
        self.row_valid, self.col_valid = rv & ok[:, None], cv & ok[:, None]


class DenseKernel:
    r"""The kernel of every pair as one (B, N, M) matrix: products by matrix-vector multiplication.

    It holds :math:`K_{ij} = e^{a_i + b_j - M_{ij} / \varepsilon - s}` (:math:`a = b = 0`, :math:`s = 0` for the
    multiplicative updates), 0 outside each pair's lengths; ``log_scale`` is :math:`s` (B,).

    Parameters
    ----------
    geometry : PointCloud
        Scanned; where the costs come from when the kernel is rebuilt.
    reg : float
        :math:`\varepsilon`.
    buffer : torch.Tensor, shape (B, N, M)
        The matrix, taken over; holding the raw costs (as :meth:`PointCloud.scan` stores them) until
        :meth:`exponentiate`.
    """

    def __init__(self, geometry: PointCloud, reg: float, buffer: torch.Tensor):
        self.geometry, self.reg, self.K = geometry, reg, buffer
        self.log_scale = buffer.new_zeros(buffer.shape[0])
        self.holds_costs = True
        for b in geometry.fallback.nonzero().flatten().tolist():
            self.K[b].zero_()

    def exponentiate(self) -> None:
        """:math:`K = e^{-M / \\varepsilon}` (``log_scale`` 0), the multiplicative updates' kernel."""
        self._fill(None, None, [b for b in range(self.K.shape[0]) if not bool(self.geometry.fallback[b])], False)

    def absorb(self, a: torch.Tensor, b: torch.Tensor, pairs: list[int]) -> None:
        """Rebuild the kernel of ``pairs`` with the log-potentials ``a`` (B, N), ``b`` (B, M), and ``log_scale`` its
        largest exponent. Entries below the smallest normal float are 0 (subnormals are slow on CPUs and carry no
        weight)."""
        self._fill(a, b, [p for p in pairs if not bool(self.geometry.fallback[p])], True)

    def _fill(self, a, b, pairs: list[int], shift: bool) -> None:
        """K = exp(a_i + b_j - M_ij / reg - s) for each pair of ``pairs``, in row blocks of the one matrix: from the
        costs it stores (the first time), else from the states (a pass of the cost's matrix products)."""
        g, log_tiny = self.geometry, math.log(torch.finfo(self.K.dtype).tiny)
        for p in pairs:
            n, m = g.n[p], g.m[p]
            blocks = _blocks(n, max(1, g.block // max(m, 1)))
            top = -math.inf
            for rows in blocks:  # the exponents, and their largest
                block = self.K[p, rows, :m]
                if self.holds_costs:  # -M / reg from the stored costs, as scaled_tile makes it
                    if bool(g.offset[p] != 0):
                        block.sub_(g.offset[p])
                    block.div_(g.divisor[p]).div_(-self.reg)
                else:  # recomputed into the block, then scaled as scaled_tile does
                    pair = g.select(slice(p, p + 1))
                    pair.cost_tile(rows, slice(0, m), out=block[None]).sub_(g.offset[p]).div_(g.divisor[p])
                    block.div_(-self.reg)
                if a is not None:
                    block.add_(a[p, rows, None] + b[p, None, :m])
                if shift:
                    top = max(top, float(block.amax()))
            s = top if shift and math.isfinite(top) else 0.0
            for rows in blocks:
                block = self.K[p, rows, :m]
                if shift:
                    torch.nn.functional.threshold_(block.sub_(s), log_tiny, -math.inf)
                block.exp_()
            self.log_scale[p] = s
        self.holds_costs = False

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """(B, N) K v. As a row vector times a matrix: ~10x faster than matrix times column in torch's CPU bmm."""
        return torch.bmm(v[:, None, :], self.K.mT).squeeze(1)

    def rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        """(B, M) K^T u."""
        return torch.bmm(u[:, None, :], self.K).squeeze(1)

    def log_matvec(self, log_w: torch.Tensor, mask: torch.Tensor, transpose: bool):
        """log(K w) (log(K^T w) with ``transpose``) for w = exp(``log_w``), computed with w / max(w) so that w
        cannot overflow; and, per pair, whether a product underflowed at a token of ``mask``."""
        top = log_w.amax(1, keepdim=True)
        top = torch.where(top.isfinite(), top, 0)
        w = torch.exp(log_w - top)
        prod = self.rmatvec(w) if transpose else self.matvec(w)
        return prod.log() + top, ((prod < torch.finfo(prod.dtype).tiny) & mask).any(1)

    def exact_log_matvec(self, log_w: torch.Tensor, transpose: bool, pairs: torch.Tensor) -> torch.Tensor:
        """log(K0 e^log_w) (log(K0^T e^log_w) with ``transpose``), K0 = exp(-M / reg), for the pairs where ``pairs``
        (B,) is True, ``log_w`` holding their rows only: by cost tiles recomputed from the states (a logsumexp)."""
        index = pairs.nonzero().flatten().tolist()
        geometry = self.geometry
        return torch.cat(
            [
                _log_product(geometry.select(slice(p, p + 1)), self.reg, log_w[k : k + 1], transpose)
                for k, p in enumerate(index)
            ]
        )

    def marginals(self, u: torch.Tensor, v: torch.Tensor):
        """The plan's marginals divided by e^log_scale: (B, N) u * K v, (B, M) v * K^T u; and log_scale."""
        return u * self.matvec(v), v * self.rmatvec(u), self.log_scale

    def plan(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, N, M) the plan, e^s diag(u) K diag(v)."""
        return u[:, :, None] * self.K * v[:, None, :] * self.log_scale.exp()[:, None, None]


def _logsumexp_(t: torch.Tensor, dim: int) -> torch.Tensor:
    """log(sum(exp(t))) along ``dim``, computed in ``t`` (which it overwrites): no temporary of t's size."""
    top = t.amax(dim, keepdim=True)
    top = torch.where(top.isfinite(), top, 0)
    return t.sub_(top).exp_().sum(dim).log_().add_(top.squeeze(dim))


def _log_product(geometry: PointCloud, reg: float, log_w: torch.Tensor, transpose: bool) -> torch.Tensor:
    """log(K0 e^log_w) (B, N) (or log(K0^T e^log_w) (B, M)), K0 = exp(-M / reg), by tiles: a logsumexp of each tile,
    combined across tiles. ``log_w`` is -inf where w = 0 (outside the lengths)."""
    B, N, M = geometry.shape
    out = log_w.new_full((B, M if transpose else N), -math.inf)
    for rows, cols in geometry.tiles(transpose):
        tile = geometry.scaled_tile(rows, cols).div_(-reg)
        if transpose:
            out[:, cols] = torch.logaddexp(out[:, cols], _logsumexp_(tile.add_(log_w[:, rows, None]), 1))
        else:
            out[:, rows] = torch.logaddexp(out[:, rows], _logsumexp_(tile.add_(log_w[:, None, cols]), 2))
    return out


class TiledKernel:
    r"""The kernel :math:`K_{ij} = e^{a_i + b_j - M_{ij} / \varepsilon}` of every pair, never stored: each product
    recomputes the cost tiles from the states (:meth:`PointCloud.scaled_tile`) and reduces them in the log domain, so
    it is exact at any :math:`\varepsilon` and never underflows. ``log_scale`` is 0.

    Parameters
    ----------
    geometry : PointCloud
        Scanned.
    reg : float
        :math:`\varepsilon`.
    """

    def __init__(self, geometry: PointCloud, reg: float):
        self.geometry, self.reg = geometry, reg
        B, N, M = geometry.shape
        self.a, self.b = geometry.x.new_zeros(B, N), geometry.x.new_zeros(B, M)
        self.log_scale = geometry.x.new_zeros(B)

    def absorb(self, a: torch.Tensor, b: torch.Tensor, pairs: list[int]) -> None:
        """Take the log-potentials ``a``, ``b`` of ``pairs`` into the kernel: nothing to recompute."""
        index = torch.tensor(pairs, dtype=torch.long, device=a.device)
        self.a[index], self.b[index] = a[index], b[index]

    def log_matvec(self, log_w: torch.Tensor, mask: torch.Tensor, transpose: bool):
        """log(K w) (log(K^T w) with ``transpose``) for w = exp(``log_w``): one pass over the cost tiles; a product
        never underflows."""
        g = self.geometry
        if transpose:
            log = _log_product(g, self.reg, torch.where(g.row_valid, self.a + log_w, -math.inf), True) + self.b
        else:
            log = _log_product(g, self.reg, torch.where(g.col_valid, self.b + log_w, -math.inf), False) + self.a
        return log, mask.new_zeros(mask.shape[0])

    def exact_log_matvec(self, log_w, transpose, pairs):
        """Never needed: no product underflows."""
        raise AssertionError("the tiled kernel's products never underflow")

    def marginals(self, u: torch.Tensor, v: torch.Tensor):
        """The plan's marginals, each pair divided by the largest of them (which the normalisation cancels), and the
        log of that factor (B,): one pass over the cost tiles for both sides."""
        g = self.geometry
        f = torch.where(g.row_valid, u.log() + self.a, -math.inf)
        h = torch.where(g.col_valid, v.log() + self.b, -math.inf)
        rows, cols = torch.full_like(f, -math.inf), torch.full_like(h, -math.inf)
        for r, c in g.tiles():
            tile = g.scaled_tile(r, c).div_(-self.reg)
            other = torch.add(tile, h[:, None, c], out=g.work("other", tile.shape))
            rows[:, r] = torch.logaddexp(rows[:, r], _logsumexp_(other, 2))
            cols[:, c] = torch.logaddexp(cols[:, c], _logsumexp_(tile.add_(f[:, r, None]), 1))
        rows, cols = rows + f, cols + h
        top = torch.maximum(rows.amax(1), cols.amax(1))
        top = torch.where(top.isfinite(), top, 0)
        return (rows - top[:, None]).exp(), (cols - top[:, None]).exp(), top

    def plan(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, N, M) the plan, by tiles (it is the caller's n x m output)."""
        g = self.geometry
        out = u.new_zeros(g.shape)
        log_u = torch.where(g.row_valid, u.log() + self.a, -math.inf)
        log_v = torch.where(g.col_valid, v.log() + self.b, -math.inf)
        for rows, cols in g.tiles():
            tile = g.scaled_tile(rows, cols).div_(-self.reg)
            out[:, rows, cols] = tile.add_(log_u[:, rows, None]).add_(log_v[:, None, cols]).exp_()
        return out
