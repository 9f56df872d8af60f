"""Long completions: the dense path's one n x m matrix, the memory budget that groups the pairs, and the online solver
that holds no n x m at all. Long sizes and their timings are in bench/ot_memory.py; here, small ones."""

import logging

import pytest
import torch

from otpo_trl.ot import COST_SCALES, COSTS, checked_setting, geometry, ot_token_weights, sinkhorn, solve

from .testing_utils import padded_batch


def ragged_batch(seed, B=4, Tc=40, Tr=34, H=12, dtype=torch.float32):
    """States with a shared offset and masks that are random subsets, of different lengths per pair."""
    g = torch.Generator().manual_seed(seed)
    common = 3.0 * torch.randn(H, generator=g, dtype=torch.float64)
    hc, hr = (torch.randn(B, T, H, generator=g, dtype=torch.float64) + common for T in (Tc, Tr))
    mc = torch.rand(B, Tc, generator=g) < torch.linspace(0.3, 0.9, B)[:, None]
    mr = torch.rand(B, Tr, generator=g) < torch.linspace(0.9, 0.4, B)[:, None]
    mc[:, 1], mr[:, 2] = True, True
    return hc.to(dtype), hr.to(dtype), mc, mr


def rel_err(a, b):
    """max over pairs of max_i |a_i - b_i| / max_i |b_i|."""
    return float(((a - b).abs().amax(1) / b.abs().amax(1).clamp_min(1e-30)).max())


# ------------------------------------------------------------------ the online solver


@pytest.mark.parametrize("cost", COSTS)
def test_online_equals_dense_for_every_cost_and_scale(cost):
    """The same iterates, by tiles recomputed from the states in the log domain: the same weights, to 1e-5 of the
    largest, at every cost scale; at ε = 0.1, and under the official scale also at ε = 1 and where the dense path runs
    the stabilised updates (0.01, float64)."""
    settings = [(scale, 0.1, torch.float32) for scale in COST_SCALES]
    settings += [("official", 1.0, torch.float32), ("official", 0.01, torch.float64)]
    for cost_scale, reg, dtype in settings:
        hc, hr, mc, mr = ragged_batch(COST_SCALES.index(cost_scale), B=3, Tc=30, Tr=26, dtype=dtype)
        kw = {"cost": cost, "cost_scale": cost_scale, "reg": reg, "return_info": True}
        wc, wr, info = ot_token_weights(hc, hr, mc, mr, **kw)
        oc, orr, oinfo = ot_token_weights(hc, hr, mc, mr, solver="online", **kw)
        where = (cost, cost_scale, reg)
        assert rel_err(oc, wc) < 1e-5 and rel_err(orr, wr) < 1e-5, where
        torch.testing.assert_close(oinfo.plan, info.plan, rtol=1e-4, atol=1e-6, msg=str(where))
        torch.testing.assert_close(oinfo.plan_mass, info.plan_mass, rtol=1e-5, atol=0, msg=str(where))
        torch.testing.assert_close(oinfo.cost_spread, info.cost_spread, rtol=1e-6, atol=0, msg=str(where))
        assert (oc[~mc] == 0).all() and (orr[~mr] == 0).all()


def test_online_tiles_cover_a_matrix_larger_than_one_tile(monkeypatch):
    """With tiles far smaller than the matrix (several per row and per column, and a last partial one), the online
    weights are still the dense ones: the products are combined across tiles."""
    monkeypatch.setattr(geometry, "TILE", 12)
    hc, hr, mc, mr = ragged_batch(3, B=2, Tc=20, Tr=18)
    cloud = geometry.PointCloud(hc[:, :15].clone(), hr[:, :16].clone(), [15, 15], [16, 16], "euclidean")
    assert len(cloud.tiles()) == 15 * 2 and len(cloud.tiles(transpose=True)) == 16 * 2  # rows of 12 + 4, ...
    for reg in (1.0, 0.05):
        dense = ot_token_weights(hc, hr, mc, mr, reg=reg)
        online = ot_token_weights(hc, hr, mc, mr, reg=reg, solver="online")
        assert rel_err(online[0], dense[0]) < 1e-5 and rel_err(online[1], dense[1]) < 1e-5


def test_online_non_finite_and_empty_pairs_as_dense():
    hc, hr, mc, mr = ragged_batch(5, B=4)
    hc[1, mc[1].nonzero()[0, 0], 0] = float("nan")
    mr[2] = False
    with pytest.warns(UserWarning, match="uniform"):
        dense = ot_token_weights(hc, hr, mc, mr, return_info=True)
    with pytest.warns(UserWarning, match="uniform"):
        online = ot_token_weights(hc, hr, mc, mr, solver="online", return_info=True)
    assert online[2].fallback.tolist() == dense[2].fallback.tolist() == [False, True, False, False]
    for a, b in zip(online[:2], dense[:2]):
        assert torch.isfinite(a).all() and rel_err(a[[0, 1, 3]], b[[0, 1, 3]]) < 1e-5 and (a[2] == 0).all()


def largest_allocations(fn):
    """Sizes in bytes of the tensors allocated while `fn` runs (the profiler's allocating ops), largest first."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0 and not e.cpu_children]
    return sorted(sizes, reverse=True)


@pytest.mark.parametrize("stabilised", [False, True])
def test_dense_path_allocates_one_matrix_and_online_none(stabilised, monkeypatch):
    """The dense path allocates one n x m matrix and, besides, row blocks of 1/16 of it, with the multiplicative and
    with the stabilised updates; the online path, with tiles of 1/8 of it, nothing larger. (At this size the
    blocks' floor, MIN_BLOCK, would be the whole matrix: lowered, as if the matrix were large.)"""
    monkeypatch.setattr(geometry, "MIN_BLOCK", 64)
    if stabilised:
        monkeypatch.setitem(sinkhorn.EXP_LIMIT, torch.float32, 0.0)
    n = 128
    hc, hr, mc, mr = ragged_batch(6, B=1, Tc=n, Tr=n, H=16)
    mc[:], mr[:] = True, True
    matrix = n * n * 4
    kw = {"return_info": True, "return_plan": False, "max_iter": 2}  # what an iteration allocates, twice
    dense = largest_allocations(lambda: ot_token_weights(hc, hr, mc, mr, **kw))
    assert dense[0] == matrix and dense[1] <= matrix / 16, [s / matrix for s in dense[:4]]
    if stabilised:
        return  # the online solver has one path
    monkeypatch.setattr(geometry, "TILE", n * n // 8)
    online = largest_allocations(lambda: ot_token_weights(hc, hr, mc, mr, solver="online", **kw))
    assert online[0] <= matrix / 8, [s / matrix for s in online[:4]]


# ------------------------------------------------------------------ the memory budget


def test_groups_stay_within_the_budget_and_the_largest_pair_goes_online():
    n, m = [300, 10, 0, 120, 280, 50], [290, 12, 40, 100, 30, 60]

    def need(pairs):
        return solve.DENSE_OVERHEAD * len(pairs) * max(n[p] for p in pairs) * max(m[p] for p in pairs) * 4

    budget = int(need([0])) - 1  # the largest pair alone does not fit
    groups, online = solve.plan_groups(n, m, 4, budget)
    assert online == [0] and sorted(p for g in groups for p in g) == [1, 3, 4, 5]  # pair 2 is empty: not solved
    assert all(need(g) <= budget for g in groups) and len(groups) > 1
    assert solve.plan_groups(n, m, 4, 10**12) == ([[0, 3, 4, 5, 1]], [])  # largest n x m first, all in one
    assert solve.plan_groups(n, m, 4, 10**12, online=True) == ([], [0, 3, 4, 5, 1])


def test_the_weights_do_not_depend_on_the_budget(caplog):
    """One group, several groups, every pair online: the same weights; the split logged once at debug level."""
    hc, hr, mc, mr = ragged_batch(7, B=5, Tc=60, Tr=50)
    caplog.set_level(logging.DEBUG, logger="otpo_trl.ot.solve")
    one = ot_token_weights(hc, hr, mc, mr, reg=0.1, return_info=True)
    assert not caplog.records  # everything fits: nothing to say
    several = ot_token_weights(hc, hr, mc, mr, reg=0.1, memory_budget=1.5 * 60 * 50 * 4 / 2**30, return_info=True)
    (record,) = caplog.records
    assert record.levelno == logging.DEBUG and "dense groups" in record.getMessage()
    caplog.clear()
    online = ot_token_weights(hc, hr, mc, mr, reg=0.1, memory_budget=1e-9, return_info=True)
    assert "online [" in caplog.records[0].getMessage()
    for a, b in zip(several[:2], one[:2]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(online[:2], one[:2]):
        assert rel_err(a, b) < 1e-5
    assert several[2].n_iter == one[2].n_iter


def test_auto_budget(monkeypatch):
    assert solve.memory_budget_bytes("auto", torch.device("cpu")) == 2 * 2**30
    assert solve.memory_budget_bytes(0.5, torch.device("cpu")) == 2**29
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (7 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 30 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 29 * 2**30)
    # a quarter of the free memory: 7 GiB free on the device, 1 GiB held by torch's cache and unused
    assert solve.memory_budget_bytes("auto", torch.device("cuda")) == 2 * 2**30


@pytest.mark.parametrize("value", [0, -1.0, float("inf"), "lots", True, None])
def test_bad_memory_budget(value):
    with pytest.raises(ValueError, match="`memory_budget` must be 'auto' or a number of GiB > 0"):
        ot_token_weights(*padded_batch(0, B=1), memory_budget=value)


def test_memory_budget_in_the_config():
    from otpo_trl import OTPOConfig

    assert checked_setting("memory_budget", "1.5") == 1.5  # from a command line
    assert checked_setting("memory_budget", "auto") == "auto"
    args = OTPOConfig(output_dir="unused", use_cpu=True, report_to=[], ot_memory_budget=4, ot_solver="online")
    assert (args.ot_memory_budget, args.ot_solver) == (4.0, "online")
    with pytest.raises(ValueError, match="`ot_memory_budget` must be 'auto' or a number of GiB > 0, got -2"):
        OTPOConfig(output_dir="unused", use_cpu=True, report_to=[], ot_memory_budget=-2)
