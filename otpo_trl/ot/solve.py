"""Solving a batch of pairs within a memory budget: the pairs solved in groups by the dense solver, each with one
matrix per pair, and a pair that alone exceeds the budget by the online solver, which holds none.

What the budget bounds is the OT step's extra memory: for a dense group of ``B`` pairs padded to ``n x m``,
``DENSE_OVERHEAD * B * n * m`` floats (the one matrix per pair, and the row blocks it is built and rebuilt by); the
online solver needs ``O((n + m) H)`` per pair and cost tiles of ``geometry.TILE`` floats. The grouping changes no
weight: every pair is solved, and stopped, on its own.
"""

import logging
from dataclasses import dataclass

import torch

from .geometry import DenseKernel, PointCloud, TiledKernel
from .sinkhorn import sinkhorn_stabilized_unbalanced, sinkhorn_unbalanced


logger = logging.getLogger(__name__)

DENSE_OVERHEAD = 1.25  # the dense path's extra memory, in n x m matrices per pair (bench/ot_memory.py measures it)
# "auto": a quarter of the GPU's free memory when the weights are computed (free on the device or cached by torch; the
# forward's activations are already held then; the backward, the logits and the optimizer step need the rest), or
# 2 GiB on a CPU, where the free memory is shared with everything else on the machine and not portably known. 2 GiB
# holds the dense matrices of a batch of eight 4k x 4k pairs, or one 16k x 16k pair; a 32k x 32k pair (5 GiB) goes to
# the online solver.
AUTO_CUDA_FRACTION = 0.25
AUTO_CPU_GIB = 2.0


def memory_budget_bytes(memory_budget, device: torch.device) -> int:
    """Bytes that the OT step may use: ``memory_budget`` GiB, or for "auto" the default above on ``device``."""
    if memory_budget != "auto":
        return int(float(memory_budget) * 2**30)
    if device.type == "cuda":  # free on the device, and what torch's caching allocator holds but does not use
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(AUTO_CUDA_FRACTION * (torch.cuda.mem_get_info(device)[0] + cached))
    return int(AUTO_CPU_GIB * 2**30)


def plan_groups(
    n: list[int], m: list[int], itemsize: int, budget: int, online: bool = False
) -> tuple[list[list[int]], list[int]]:
    """The pairs with two non-empty sides, as dense groups (lists of pair indices) and online pairs.

    Largest first, each dense group takes pairs while ``DENSE_OVERHEAD * len(group) * max n * max m * itemsize`` stays
    within ``budget``; a pair that does not fit alone (or every pair, with ``online``) goes to the online solver."""

    def need(pairs):
        return DENSE_OVERHEAD * len(pairs) * max(n[p] for p in pairs) * max(m[p] for p in pairs) * itemsize

    order = sorted((p for p in range(len(n)) if n[p] and m[p]), key=lambda p: -n[p] * m[p])
    groups, tiled = [], []
    for p in order:
        if online or need([p]) > budget:
            tiled.append(p)
        elif groups and need([*groups[-1], p]) <= budget:
            groups[-1].append(p)
        else:
            groups.append([p])
    return groups, tiled


@dataclass
class BatchSolution:
    """The raw plan marginals of every pair of a batch, in compact layout (valid tokens first, in order).

    Attributes
    ----------
    chosen, rejected : torch.Tensor, shapes (B, Tc), (B, Tr)
        The plan's marginals divided by ``exp(log_scale)``; for fallback pairs 1 per valid token; 0 elsewhere.
    log_scale : torch.Tensor, shape (B,)
        The factor the marginals are divided by, as a log (0 for fallback and empty pairs).
    mass : torch.Tensor, shape (B,)
        The plan's total mass (0 for fallback and empty pairs; may underflow).
    fallback : torch.Tensor, shape (B,), bool
    cost_spread : torch.Tensor, shape (B,)
    n_iter : int
    plan : torch.Tensor or None, shape (B, Tc, Tr)
        At compact positions, when asked for.
    orders : tuple of torch.Tensor, shapes (B, Tc), (B, Tr)
        The permutations from the input positions to the compact ones (:func:`compact_order`).
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    log_scale: torch.Tensor
    mass: torch.Tensor
    fallback: torch.Tensor
    cost_spread: torch.Tensor
    n_iter: int = 0
    plan: torch.Tensor | None = None
    orders: tuple[torch.Tensor, torch.Tensor] | None = None


def compact_order(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) the permutation that moves each row's valid positions to the front, in order."""
    return torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)


def _gather(hidden, order, pairs, lengths, dtype):
    """(len(pairs), max length, H) the valid states of ``pairs``, first; slots past a pair's length repeat its first
    valid state rather than padding, which may hold non-finite garbage."""
    width = max(lengths)
    index = order[pairs, :width]
    keep = torch.arange(width, device=order.device) < torch.tensor(lengths, device=order.device)[:, None]
    index = torch.where(keep, index, index[:, :1])
    return hidden[pairs[:, None], index].to(dtype)  # row copies: much faster than gather over H


def solve_batch(
    hc: torch.Tensor,
    hr: torch.Tensor,
    mc: torch.Tensor,
    mr: torch.Tensor,
    *,
    reg: float,
    reg_m: float,
    cost: str,
    cost_scale: str,
    max_iter: int,
    tol: float,
    solver: str,
    memory_budget,
    need_plan: bool,
) -> BatchSolution:
    """Every pair's raw plan marginals (see :class:`BatchSolution`) within the memory budget; arguments as
    :func:`otpo_trl.ot.ot_token_weights`, masks bool. The states are read at the valid tokens only."""
    dtype = torch.float64 if torch.float64 in (hc.dtype, hr.dtype) else torch.float32
    (B, Tc), Tr = mc.shape, mr.shape[1]
    n, m = mc.sum(1).tolist(), mr.sum(1).tolist()
    orders = compact_order(mc), compact_order(mr)
    out = BatchSolution(
        chosen=hc.new_zeros(B, Tc, dtype=dtype),
        rejected=hc.new_zeros(B, Tr, dtype=dtype),
        log_scale=hc.new_zeros(B, dtype=dtype),
        mass=hc.new_zeros(B, dtype=dtype),
        fallback=mc.new_zeros(B),
        cost_spread=hc.new_zeros(B, dtype=dtype),
        plan=hc.new_zeros(B, Tc, Tr, dtype=dtype) if need_plan else None,
        orders=orders,
    )
    budget = memory_budget_bytes(memory_budget, hc.device)
    groups, online = plan_groups(n, m, torch.finfo(dtype).bits // 8, budget, online=solver == "online")
    if len(groups) > 1 or online:
        sizes = ", ".join(f"{len(g)} x {max(n[p] for p in g)} x {max(m[p] for p in g)}" for g in groups)
        online_sizes = [(n[p], m[p]) for p in online]
        logger.debug("OT weights within %.3g GiB: dense groups [%s]; online %s", budget / 2**30, sizes, online_sizes)
    solver_args = {"reg": reg, "reg_m": reg_m, "max_iter": max_iter, "tol": tol}
    for pairs, tiled in [*((g, False) for g in groups), *(([p], True) for p in online)]:
        index = torch.tensor(pairs, device=hc.device)
        ng, mg = [n[p] for p in pairs], [m[p] for p in pairs]
        x, y = (_gather(h, o, index, lengths, dtype) for h, o, lengths in ((hc, orders[0], ng), (hr, orders[1], mg)))
        geometry = PointCloud(x, y, ng, mg, cost)
        del x, y
        _solve_group(geometry, index, tiled, out, cost_scale=cost_scale, **solver_args)
    return out


def _solve_group(
    geometry: PointCloud, index: torch.Tensor, tiled: bool, out: BatchSolution, *, cost_scale, **solver_args
):
    """Solve the pairs of ``geometry`` (the batch's pairs ``index``): together with a dense kernel, or with a tiled
    one; their marginals into ``out``."""
    dtype = geometry.dtype
    if tiled:
        geometry.scan(cost_scale)
        kernel = TiledKernel(geometry, solver_args["reg"])
        masks = {"row_mask": geometry.row_valid, "col_mask": geometry.col_valid}
        result = sinkhorn_stabilized_unbalanced(kernel, **masks, **solver_args)
    else:
        buffer = geometry.x.new_empty(geometry.shape)
        geometry.scan(cost_scale, out=buffer)
        kernel = DenseKernel(geometry, solver_args["reg"], buffer)
        masks = {"row_mask": geometry.row_valid, "col_mask": geometry.col_valid}
        result = sinkhorn_unbalanced(kernel, max_cost=geometry.max_cost, **masks, **solver_args)
    rows, cols, log_scale = result.marginals()
    fallback = geometry.fallback
    N, M = geometry.shape[1:]
    valid_rows, valid_cols = geometry.valid
    out.chosen[index, :N] = torch.where(fallback[:, None], valid_rows.to(dtype), rows)
    out.rejected[index, :M] = torch.where(fallback[:, None], valid_cols.to(dtype), cols)
    log_scale = torch.where(fallback, 0, log_scale)
    out.log_scale[index] = log_scale
    out.mass[index] = torch.where(fallback, 0, rows.sum(1) * log_scale.exp())
    out.fallback[index] = fallback
    out.cost_spread[index] = geometry.cost_spread
    out.n_iter = max(out.n_iter, result.n_iter)
    if out.plan is not None:
        rows_at, cols_at = torch.arange(N, device=index.device)[:, None], torch.arange(M, device=index.device)
        out.plan[index[:, None, None], rows_at, cols_at] = result.plan()
