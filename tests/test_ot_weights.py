"""Mathematical properties of `ot_token_weights`: agreement with POT, optimality, masking, robustness."""

import itertools
import math
import random

import numpy as np
import pytest
import torch

from otpo_trl.ot import (
    COST_SCALES,
    COSTS,
    NORMALIZATIONS,
    checked_setting,
    ot_token_weights,
    sampo_token_weights,
    token_weight_stats,
    uniform_token_weights,
)
from otpo_trl.ot import sinkhorn as S


def random_batch(seed, B=4, Tc=24, Tr=20, H=16, dtype=torch.float32, offset=3.0, min_tokens=1):
    """Hidden states with a common offset (like real ones) and masks that are random subsets of the positions,
    with a different density per pair and never starting at index 0."""
    g = torch.Generator().manual_seed(seed)
    common = offset * torch.randn(H, generator=g, dtype=torch.float64)
    hidden = [torch.randn(B, T, H, generator=g, dtype=torch.float64) + common for T in (Tc, Tr)]
    masks = []
    for T in (Tc, Tr):
        mask = torch.rand(B, T, generator=g) < torch.empty(B, 1).uniform_(0.3, 0.9, generator=g)
        mask[:, 0] = False
        for k in range(B):  # at least `min_tokens` valid tokens, at random positions
            mask[k, 1 + torch.randperm(T - 1, generator=g)[:min_tokens]] = True
        masks.append(mask)
    return hidden[0].to(dtype), hidden[1].to(dtype), masks[0], masks[1]


def pair_rel_err(a, b):
    """Per pair, max_i |a_i - b_i| / max_i |b_i|; the worst pair."""
    return float(((a - b).abs().amax(1) / b.abs().amax(1).clamp_min(1e-30)).max())


def exact_cost(x, y, cost, cost_scale="official"):
    """The cost of one pair written directly from its definition, in float64. The official scaling divides by the
    largest cost to a zero state too: |x|, |x|^2, or 1 for the cosine cost."""
    x, y = x.double(), y.double()
    if cost == "cosine":
        M = 1 - torch.nn.functional.cosine_similarity(x[:, None], y[None], dim=-1, eps=1e-30)
        to_zero = torch.ones(1, dtype=torch.float64)
    else:
        d2 = (x[:, None] - y[None]).square().sum(-1)
        M = d2.sqrt() if cost == "euclidean" else d2
        norms = torch.cat([x, y]).norm(dim=-1)
        to_zero = norms if cost == "euclidean" else norms.square()
    M = M + 1e-6
    top = {"official": max(float(M.max()), float(to_zero.max()) + 1e-6), "pair": float(M.max()), "none": 1.0}
    return M / max(top[cost_scale], 1.0)


def targets(n, m, normalization):
    return {"min": (min(n, m),) * 2, "mean": ((n + m) / 2,) * 2, "max": (max(n, m),) * 2, "length": (n, m)}[
        normalization
    ]


# ------------------------------------------------------------------ agreement with POT


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("cost", COSTS)
def test_batched_matches_pot(cost, normalization):
    hc, hr, mc, mr = random_batch(10 * COSTS.index(cost) + NORMALIZATIONS.index(normalization))
    assert not torch.equal(mc.sum(1), mr.sum(1))
    kw = {"cost": cost, "normalization": normalization}
    wc, wr, info = ot_token_weights(hc, hr, mc, mr, return_info=True, **kw)
    rc, rr, rinfo = ot_token_weights(hc, hr, mc, mr, solver="pot", return_info=True, **kw)
    assert pair_rel_err(wc, rc) < 1e-4 and pair_rel_err(wr, rr) < 1e-4
    torch.testing.assert_close(info.plan, rinfo.plan, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(info.plan_mass, rinfo.plan_mass, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("cost", COSTS)
@pytest.mark.parametrize("reg, log_domain", [(0.1, False), (0.01, True)])
def test_batched_matches_pot_small_reg(cost, reg, log_domain, monkeypatch):
    """reg = 0.01 puts max(M) / reg = 100 past the fp32 limit: the log-domain updates must agree with POT too."""
    paths = []
    for name in ("sinkhorn_knopp_unbalanced", "sinkhorn_stabilized_unbalanced"):
        solver = getattr(S, name)
        monkeypatch.setattr(S, name, lambda *a, solver=solver, name=name, **k: paths.append(name) or solver(*a, **k))
    hc, hr, mc, mr = random_batch(7, Tc=30, Tr=26, offset=0.0)  # no offset: cosine costs reach 1 too
    wc, wr = ot_token_weights(hc, hr, mc, mr, reg=reg, cost=cost)
    rc, rr = ot_token_weights(hc, hr, mc, mr, reg=reg, cost=cost, solver="pot")
    assert paths == ["sinkhorn_stabilized_unbalanced" if log_domain else "sinkhorn_knopp_unbalanced"]
    assert pair_rel_err(wc, rc) < 1e-4 and pair_rel_err(wr, rr) < 1e-4


def test_log_domain_equals_multiplicative(monkeypatch):
    hc, hr, mc, mr = random_batch(3, dtype=torch.float64)
    kw = {"reg": 0.05, "reg_m": 0.5, "tol": 1e-12, "normalization": "none"}
    fast = ot_token_weights(hc, hr, mc, mr, **kw)
    monkeypatch.setitem(S.EXP_LIMIT, torch.float64, 0.0)
    logd = ot_token_weights(hc, hr, mc, mr, **kw)
    for a, b in zip(fast, logd):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_duplicates_under_a_large_offset_match_pot():
    """Tokens shared by both completions (a common prefix) under a large common offset: the matmul distance formula
    would cancel catastrophically in fp32; their cost must be ~1e-6, as POT's exact one."""
    hc, hr, mc, mr = random_batch(11, offset=1e3)
    hr[:, 1:6], mr[:, 1:6], mc[:, 1:6] = hc[:, 1:6], True, True
    for cost, cost_scale in itertools.product(COSTS, COST_SCALES[:2]):
        kw = {"reg": 0.05, "cost": cost, "cost_scale": cost_scale, "return_info": True}
        wc, wr, info = ot_token_weights(hc, hr, mc, mr, **kw)
        rc, rr, rinfo = ot_token_weights(hc, hr, mc, mr, solver="pot", **kw)
        assert pair_rel_err(wc, rc) < 1e-4 and pair_rel_err(wr, rr) < 1e-4, (cost, cost_scale)
        # Near-zero cost: duplicates take the mass. Not under the official scaling, which divides by the norms (~1e3
        # times the distances here), nor for cosine costs, which that offset makes all ~0.
        if cost != "cosine" and cost_scale == "pair":
            assert (info.plan[:, 1:6, 1:6].diagonal(dim1=1, dim2=2) > 0.5).all()


# ------------------------------------------------------------------ optimality


@pytest.mark.parametrize("cost", COSTS)
def test_plan_satisfies_first_order_conditions(cost):
    """The minimiser of <P, M> + reg sum P(log P - 1) + reg_m KL(P1 | 1) + reg_m KL(P^T1 | 1) satisfies
    M_ij + reg log P_ij + reg_m (log r_i + log c_j) = 0, r = P1, c = P^T1; and the raw weights are r and c."""
    hc, hr, mc, mr = random_batch(5, dtype=torch.float64)
    reg, reg_m = 0.3, 0.7
    wc, wr, info = ot_token_weights(
        hc, hr, mc, mr, reg=reg, reg_m=reg_m, cost=cost, normalization="none", tol=1e-12, return_info=True
    )
    for k in range(hc.shape[0]):
        ic, ir = mc[k].nonzero().squeeze(1), mr[k].nonzero().squeeze(1)
        P = info.plan[k][ic][:, ir].double()
        r, c = P.sum(1), P.sum(0)
        torch.testing.assert_close(wc[k, ic].double(), r, rtol=1e-6, atol=0)
        torch.testing.assert_close(wr[k, ir].double(), c, rtol=1e-6, atol=0)
        assert P.sum() / min(len(ic), len(ir)) == pytest.approx(float(info.plan_mass[k]), rel=1e-5)
        M = exact_cost(hc[k, ic], hr[k, ir], cost)
        residual = M + reg * P.log() + reg_m * (r.log()[:, None] + c.log()[None, :])
        assert residual.abs().max() < 1e-5
    assert info.plan[~(mc[:, :, None] & mr[:, None, :])].abs().max() == 0


# ------------------------------------------------------------------ masking and normalisation


def test_padding_changes_no_weight():
    """Extra masked positions, anywhere and holding garbage (NaN, inf, huge), are never read."""
    hc, hr, mc, mr = random_batch(2)
    wc, wr = ot_token_weights(hc, hr, mc, mr)
    g = torch.Generator().manual_seed(0)

    def pad(h, mask, extra=9):
        T = h.shape[1] + extra
        old = torch.sort(torch.randperm(T, generator=g)[: h.shape[1]]).values  # where the original positions go
        hp = torch.full((h.shape[0], T, h.shape[2]), float("nan"))
        hp[:, :, 0], hp[:, :, 1] = float("inf"), -1e38
        mp = torch.zeros(h.shape[0], T, dtype=torch.bool)
        hp[:, old], mp[:, old] = h, mask
        return hp, mp, old

    hcp, mcp, oc = pad(hc, mc)
    hrp, mrp, orr = pad(hr, mr)
    for solver in ("batched", "pot"):
        pc, pr = ot_token_weights(hcp, hrp, mcp, mrp, solver=solver)
        ref_c, ref_r = (wc, wr) if solver == "batched" else ot_token_weights(hc, hr, mc, mr, solver="pot")
        torch.testing.assert_close(pc[:, oc], ref_c, rtol=0, atol=0)
        torch.testing.assert_close(pr[:, orr], ref_r, rtol=0, atol=0)
        assert (pc[~mcp] == 0).all() and (pr[~mrp] == 0).all()


def test_pair_does_not_depend_on_its_batch():
    hc, hr, mc, mr = random_batch(4, B=5)
    wc, wr = ot_token_weights(hc, hr, mc, mr)
    for k in range(5):
        sc, sr = ot_token_weights(hc[k : k + 1], hr[k : k + 1], mc[k : k + 1], mr[k : k + 1])
        torch.testing.assert_close(sc[0], wc[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sr[0], wr[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("normalization", ["min", "mean", "max", "length"])
def test_masked_zero_and_sums_hit_the_target(normalization):
    hc, hr, mc, mr = random_batch(6, B=6)
    mask_c = mc.long()  # 0/1 integer masks are accepted
    wc, wr = ot_token_weights(hc, hr, mask_c, mr, normalization=normalization)
    assert wc.dtype == wr.dtype == torch.float32
    assert (wc[~mc] == 0).all() and (wr[~mr] == 0).all()
    assert (wc[mc] > 0).all() and (wr[mr] > 0).all()
    for k in range(6):
        tc, tr = targets(int(mc[k].sum()), int(mr[k].sum()), normalization)
        assert float(wc[k].sum()) == pytest.approx(tc, rel=1e-5)
        assert float(wr[k].sum()) == pytest.approx(tr, rel=1e-5)


# ------------------------------------------------------------------ edge cases


@pytest.mark.parametrize("solver", ["batched", "pot"])
def test_empty_side_gives_zero_weights(solver):
    hc, hr, mc, mr = random_batch(8, B=4)
    mc[0], mr[1], mc[2], mr[2] = False, False, False, False  # empty chosen, empty rejected, both empty
    for normalization in ("min", "length", "none"):
        wc, wr, info = ot_token_weights(hc, hr, mc, mr, solver=solver, normalization=normalization, return_info=True)
        assert torch.isfinite(wc).all() and torch.isfinite(wr).all()
        assert (wc[:3] == 0).all() and (wr[:3] == 0).all() and (info.plan[:3] == 0).all()
        assert (info.plan_mass[:3] == 0).all() and not info.fallback.any()
        assert wc[3].sum() > 0 and wr[3].sum() > 0
    # every pair empty (the early exit), and an empty batch
    wc, wr, info = ot_token_weights(hc, hr, mc & False, mr, solver=solver, return_info=True)
    assert (wc == 0).all() and (wr == 0).all() and info.n_iter == 0
    wc, wr = ot_token_weights(hc[:0], hr[:0], mc[:0], mr[:0], solver=solver)
    assert wc.shape == (0, hc.shape[1]) and wr.shape == (0, hr.shape[1])


def test_single_tokens():
    hc, hr, mc, mr = random_batch(9, B=2, min_tokens=1)
    mc[:] = False
    mc[:, 5] = True
    mr[1] = False
    mr[1, 3] = True
    wc, wr = ot_token_weights(hc, hr, mc, mr, normalization="min")
    assert wc[:, 5].tolist() == pytest.approx([1.0, 1.0]) and wr[1, 3] == pytest.approx(1.0)
    assert float(wr[0].sum()) == pytest.approx(1.0)
    wc, wr = ot_token_weights(hc, hr, mc, mr, normalization="max")
    assert float(wc[0, 5]) == pytest.approx(float(mr[0].sum()))


@pytest.mark.parametrize("cost", COSTS)
def test_identical_completions_give_symmetric_weights(cost):
    hc, _, mc, _ = random_batch(10)
    wc, wr = ot_token_weights(hc, hc.clone(), mc, mc.clone(), cost=cost, reg=0.1)
    torch.testing.assert_close(wc, wr, rtol=1e-5, atol=1e-6)


def test_bf16_input():
    hc, hr, mc, mr = random_batch(12)
    wc, wr = ot_token_weights(hc.bfloat16(), hr.bfloat16(), mc, mr)
    assert wc.dtype == wr.dtype == torch.float32
    # the same (bf16-rounded) values in fp32 give the same answer; the rounding itself changes little
    sc, sr = ot_token_weights(hc.bfloat16().float(), hr.bfloat16().float(), mc, mr)
    torch.testing.assert_close(wc, sc, rtol=1e-5, atol=1e-6)
    fc, fr = ot_token_weights(hc, hr, mc, mr)
    assert pair_rel_err(wc, fc) < 2e-2 and pair_rel_err(wr, fr) < 2e-2


def test_output_is_detached():
    hc, hr, mc, mr = random_batch(13)
    hc.requires_grad_(True)
    hr.requires_grad_(True)
    for solver in ("batched", "pot"):
        wc, wr, info = ot_token_weights(hc, hr, mc, mr, solver=solver, return_info=True)
        assert not (wc.requires_grad or wr.requires_grad or info.plan.requires_grad)


@pytest.mark.parametrize("solver", ["batched", "pot"])
def test_non_finite_pair_falls_back_to_uniform(solver):
    hc, hr, mc, mr = random_batch(14, B=5)
    good = [0, 2]
    clean = ot_token_weights(hc[good], hr[good], mc[good], mr[good], solver=solver)
    i = mc[1].nonzero()[0, 0]
    hc[1, i, 0] = float("nan")
    hr[3, mr[3].nonzero()[-1, 0], 2] = float("inf")
    hc[4, mc[4].nonzero()[0, 0]] = 1e30  # finite, but its squared distances overflow fp32
    with pytest.warns(UserWarning, match="uniform"):
        wc, wr, info = ot_token_weights(hc, hr, mc, mr, solver=solver, return_info=True)
    expected_fallback = [False, True, False, True, solver == "batched"]
    assert info.fallback.tolist() == expected_fallback
    assert torch.isfinite(wc).all() and torch.isfinite(wr).all() and torch.isfinite(info.plan).all()
    for k in (1, 3):
        n, m = int(mc[k].sum()), int(mr[k].sum())
        torch.testing.assert_close(wc[k][mc[k]], torch.full((n,), min(n, m) / n))
        torch.testing.assert_close(wr[k][mr[k]], torch.full((m,), min(n, m) / m))
        assert info.plan_mass[k] == 0
    torch.testing.assert_close(wc[good], clean[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wr[good], clean[1], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ random property test


def test_random_cases_are_valid_weights():
    rng = random.Random(0)
    dtypes = [torch.float32, torch.bfloat16, torch.float64]
    for case in range(50):
        B, Tc, Tr, H = rng.randint(1, 4), rng.randint(1, 30), rng.randint(1, 30), rng.choice([1, 8, 33])
        dtype = dtypes[case % 3]
        cost, normalization = COSTS[case % 3], NORMALIZATIONS[case % 5]
        reg, reg_m = (
            math.exp(rng.uniform(math.log(0.05), math.log(5))),
            math.exp(rng.uniform(math.log(0.05), math.log(5))),
        )
        g = torch.Generator().manual_seed(case)
        hc = (torch.randn(B, Tc, H, generator=g) * rng.choice([0.01, 1, 100])).to(dtype)
        hr = (torch.randn(B, Tr, H, generator=g) * rng.choice([0.01, 1, 100])).to(dtype)
        mc, mr = torch.rand(B, Tc, generator=g) < rng.random(), torch.rand(B, Tr, generator=g) < rng.random()
        wc, wr = ot_token_weights(hc, hr, mc, mr, reg=reg, reg_m=reg_m, cost=cost, normalization=normalization)
        msg = f"case {case}: {B=} {Tc=} {Tr=} {H=} {dtype} {cost} {normalization} {reg=:.3g} {reg_m=:.3g}"
        assert wc.dtype == torch.float32 and wc.shape == (B, Tc) and wr.shape == (B, Tr), msg
        assert torch.isfinite(wc).all() and torch.isfinite(wr).all(), msg
        assert (wc >= 0).all() and (wr >= 0).all(), msg
        assert (wc[~mc] == 0).all() and (wr[~mr] == 0).all(), msg
        for k in range(B):
            n, m = int(mc[k].sum()), int(mr[k].sum())
            if n == 0 or m == 0:
                assert wc[k].sum() == 0 and wr[k].sum() == 0, msg
            elif normalization != "none":
                tc, tr = targets(n, m, normalization)
                assert float(wc[k].sum()) == pytest.approx(tc, rel=1e-4), msg
                assert float(wr[k].sum()) == pytest.approx(tr, rel=1e-4), msg


# ------------------------------------------------------------------ arguments


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"reg": 0.0}, "reg"),
        ({"reg": -1.0}, "reg"),
        ({"reg": float("nan")}, "reg"),
        ({"reg_m": 0.0}, "reg_m"),
        ({"reg_m": float("inf")}, "reg_m"),
        ({"tol": 0}, "tol"),
        ({"max_iter": 0}, "max_iter"),
        ({"max_iter": 1.5}, "max_iter"),
        ({"cost": "manhattan"}, "cost"),
        ({"normalization": "sum"}, "normalization"),
        ({"solver": "sinkhorn"}, "solver"),
    ],
)
def test_bad_arguments(kwargs, name):
    hc, hr, mc, mr = random_batch(0, B=2)
    with pytest.raises(ValueError, match=f"`{name}`"):
        ot_token_weights(hc, hr, mc, mr, **kwargs)


def test_bad_shapes():
    hc, hr, mc, mr = random_batch(0, B=2)
    with pytest.raises(ValueError, match="`chosen_mask`"):
        ot_token_weights(hc, hr, mc[:, :-1], mr)
    with pytest.raises(ValueError, match="`rejected_mask`"):
        ot_token_weights(hc, hr, mc, mr[:1])
    with pytest.raises(ValueError, match="`chosen_hidden`"):
        ot_token_weights(hc[0], hr, mc, mr)
    with pytest.raises(ValueError, match="batch sizes"):
        ot_token_weights(hc, hr[:1], mc, mr[:1])
    with pytest.raises(ValueError, match="hidden sizes"):
        ot_token_weights(hc, hr[..., :3], mc, mr)


def test_return_plan_false_gives_the_same_weights_and_diagnostics_without_the_plan():
    gen = torch.Generator().manual_seed(3)
    hc, hr = torch.randn(3, 7, 5, generator=gen), torch.randn(3, 6, 5, generator=gen)
    mc, mr = torch.rand(3, 7, generator=gen) > 0.3, torch.rand(3, 6, generator=gen) > 0.3
    wc, wr, info = ot_token_weights(hc, hr, mc, mr, return_info=True)
    wc2, wr2, info2 = ot_token_weights(hc, hr, mc, mr, return_info=True, return_plan=False)
    assert info2.plan is None and info.plan is not None
    torch.testing.assert_close((wc2, wr2, info2.plan_mass), (wc, wr, info.plan_mass), rtol=0, atol=0)
    assert info2.n_iter == info.n_iter and torch.equal(info2.fallback, info.fallback)


# ------------------------------------------------------------------ the spread of the weights and cost_scale="minmax"


def weight_ratio(w, mask):
    """Per pair, max / min of the weights over the valid tokens."""
    return torch.stack([w[k][mask[k]].max() / w[k][mask[k]].min() for k in range(len(w))]).double()


@pytest.mark.parametrize("cost_scale", COST_SCALES)
@pytest.mark.parametrize("reg", [1.0, 0.1, 0.03])
def test_weight_ratio_is_bounded_by_the_cost_spread(cost_scale, reg):
    """At the fixed point r_i = (K v)_i^(1 - fi), so max_i r_i / min_i r_i <= exp(Delta / (reg + reg_m)), Delta the
    largest spread of one column of the scaled cost matrix (rows for the rejected side); cost_spread is that Delta."""
    reg_m = 0.2
    for seed in range(12):
        hc, hr, mc, mr = random_batch(100 + seed, offset=0.0 if seed % 2 else 3.0, dtype=torch.float64)
        kw = {"reg": reg, "reg_m": reg_m, "cost_scale": cost_scale, "return_info": True, "tol": 1e-12}
        wc, wr, info = ot_token_weights(hc, hr, mc, mr, max_iter=20000, **kw)
        bound = torch.exp(info.cost_spread.double() / (reg + reg_m))
        for w, mask in ((wc, mc), (wr, mr)):
            assert (weight_ratio(w, mask) <= bound * (1 + 1e-4)).all(), (seed, weight_ratio(w, mask), bound)
        # cost_spread is the Delta of the cost matrix the solver used
        for k in range(len(hc)):
            M = exact_cost(hc[k][mc[k]], hr[k][mr[k]], "euclidean", "pair" if cost_scale == "minmax" else cost_scale)
            if cost_scale == "minmax":
                M = (M - M.min()) / (M.max() - M.min())
            delta = max(float((M.amax(0) - M.amin(0)).max()), float((M.amax(1) - M.amin(1)).max()))
            assert float(info.cost_spread[k]) == pytest.approx(delta, rel=1e-5, abs=1e-7)


def test_minmax_scale_has_unit_range_and_matches_pot():
    hc, hr, mc, mr = random_batch(21, offset=3.0)
    for reg in (1.0, 0.1):
        wc, wr, info = ot_token_weights(hc, hr, mc, mr, reg=reg, cost_scale="minmax", return_info=True)
        rc, rr, rinfo = ot_token_weights(hc, hr, mc, mr, reg=reg, cost_scale="minmax", solver="pot", return_info=True)
        assert pair_rel_err(wc, rc) < 1e-4 and pair_rel_err(wr, rr) < 1e-4
        torch.testing.assert_close(info.cost_spread, rinfo.cost_spread.float(), rtol=1e-5, atol=1e-6)
    # the range of the costs is 1, so some column or row spans most of it; under "official" the offset shrinks it
    official = ot_token_weights(hc, hr, mc, mr, return_info=True)[2].cost_spread
    assert (info.cost_spread > 0.5).all() and (info.cost_spread <= 1 + 1e-6).all()
    assert (official < 0.5 * info.cost_spread).all(), (official, info.cost_spread)


def test_minmax_weights_do_not_depend_on_the_states_offset_or_scale():
    """What makes one ot_reg mean the same for every model: shifting every state by a shared vector or multiplying
    all of them by a constant leaves the minmax weights unchanged (up to the 1e-6 added to every cost); the official
    scaling's weights move towards uniform as the shared component grows."""
    hc, hr, mc, mr = random_batch(5, offset=0.0, dtype=torch.float64)
    shared = 40.0 * torch.randn(hc.shape[-1], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kw = {"reg": 0.1, "tol": 1e-10, "max_iter": 5000}
    base = ot_token_weights(hc, hr, mc, mr, cost_scale="minmax", **kw)
    for x, y in ((hc + shared, hr + shared), (7.0 * hc, 7.0 * hr), (0.2 * hc + shared, 0.2 * hr + shared)):
        moved = ot_token_weights(x, y, mc, mr, cost_scale="minmax", **kw)
        assert pair_rel_err(moved[0], base[0]) < 1e-4 and pair_rel_err(moved[1], base[1]) < 1e-4
    official = ot_token_weights(hc, hr, mc, mr, **kw)
    shifted = ot_token_weights(hc + shared, hr + shared, mc, mr, **kw)
    assert (weight_ratio(shifted[0], mc) < weight_ratio(official[0], mc)).all()
    assert pair_rel_err(shifted[0], official[0]) > 1e-2


def test_minmax_with_equal_costs_gives_uniform_weights():
    """One chosen and one rejected token (or all costs equal): nothing to rescale, uniform weights, not NaN."""
    hc, hr = torch.randn(1, 3, 8), torch.randn(1, 2, 8)
    mc, mr = torch.tensor([[False, True, False]]), torch.tensor([[True, False]])
    wc, wr, info = ot_token_weights(hc, hr, mc, mr, cost_scale="minmax", return_info=True)
    assert wc.tolist() == [[0.0, 1.0, 0.0]] and wr.tolist() == [[1.0, 0.0]]
    assert float(info.cost_spread[0]) == 0.0


# ------------------------------------------------------------------ the package's public pieces


@pytest.mark.parametrize("module", ["weights", "stats"])
def test_docstring_examples_run(module):
    """The Examples sections of the OT package's docstrings are doctests; each prints what it says."""
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"otpo_trl.ot.{module}"), verbose=False)
    assert result.attempted > 0 and result.failed == 0


def test_uniform_token_weights_are_the_uniform_weighting():
    hc, hr, mc, mr = random_batch(15, B=5)
    mr[4] = False  # an empty side
    for normalization in NORMALIZATIONS:
        wc, wr, info = uniform_token_weights(mc, mr, normalization=normalization, return_info=True)
        rc, rr, rinfo = ot_token_weights(
            hc, hr, mc, mr, weighting="uniform", normalization=normalization, return_info=True
        )
        assert torch.equal(wc, rc) and torch.equal(wr, rr) and torch.equal(info.plan, rinfo.plan)
        assert torch.equal(info.plan_mass, rinfo.plan_mass) and info.n_iter == 0
    wc, wr = uniform_token_weights(mc, mr)  # "min": the shorter side's tokens weigh 1
    for k in range(4):
        n, m = int(mc[k].sum()), int(mr[k].sum())
        assert wc[k][mc[k]].tolist() == pytest.approx([min(n, m) / n] * n) and (wc[k][~mc[k]] == 0).all()
        assert wr[k][mr[k]].tolist() == pytest.approx([min(n, m) / m] * m) and (wr[k][~mr[k]] == 0).all()
    assert (wc[4] == 0).all() and (wr[4] == 0).all()
    with pytest.raises(ValueError, match="`chosen_mask`"):
        uniform_token_weights(mc, mr[:2])
    with pytest.raises(ValueError, match="`normalization`"):
        uniform_token_weights(mc, mr, normalization="sum")


def test_token_weight_stats_known_values():
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 1.0, 1.0, float("nan")], [0.0, 2.0, 0.0, 0.0], [5.0, 0, 0, 0]])
    w = torch.cat([w, torch.zeros(2, 4)])
    mask = torch.tensor(
        [[True] * 4, [True, True, True, False], [False, True, False, False], [True, True, False, False]]
    )
    mask = torch.cat([mask, torch.tensor([[True, True, False, False], [False] * 4])])
    stats = token_weight_stats(w, mask)
    p = torch.tensor([4.0, 1.0, 1.0], dtype=torch.float64) / 6
    assert stats.entropy[0] == pytest.approx(1.0) and stats.entropy[1] == pytest.approx(
        float(-(p * p.log()).sum() / math.log(3))
    )
    assert stats.entropy[2] == 1.0  # one token: its weights are uniform
    assert stats.entropy[3] == 0.0  # all the weight on one of two tokens
    assert stats.entropy[4:].isnan().all()  # weights summing to 0, no token
    assert stats.max[:4].tolist() == [1.0, 4.0, 2.0, 5.0] and stats.mean[:4].tolist() == [1.0, 2.0, 2.0, 2.5]
    assert stats.max_mean[:4].tolist() == [1.0, 2.0, 1.0, 2.0] and stats.max_min[:3].tolist() == [1.0, 4.0, 1.0]
    assert stats.max_min[3] == math.inf and stats.max_mean[4:].isnan().all() and stats.max[5].isnan()
    assert stats.ratio[1, :3].tolist() == pytest.approx([2.0, 0.5, 0.5]) and stats.ratio[1, 3].isnan()
    assert stats.ratio[4:].isnan().all()


def test_token_weight_stats_of_ot_weights():
    """Uniform weights give entropy 1 and max / mean 1; OT weights at a small reg less and more."""
    hc, hr, mc, mr = random_batch(16, offset=0.0)
    uniform = token_weight_stats(uniform_token_weights(mc, mr)[0], mc)
    torch.testing.assert_close(uniform.entropy, torch.ones(len(mc), dtype=torch.float64))
    torch.testing.assert_close(uniform.max_mean, torch.ones(len(mc), dtype=torch.float64))
    ot = token_weight_stats(ot_token_weights(hc, hr, mc, mr, reg=0.05)[0], mc)
    assert (ot.entropy < 0.999).all() and (ot.max_mean > 1.01).all()


@pytest.mark.parametrize(
    "name, bad, good",
    [
        ("reg", [0, -1.0, float("nan"), True, "1"], [np.float32(0.5), 2]),
        ("tol", [float("inf"), 0.0], [np.float64(1e-7)]),
        ("max_iter", [0, 1.5, True], [np.int64(5), 10]),
        ("cost", ["manhattan"], ["cosine"]),
        ("cost_scale", ["max"], ["minmax"]),
        ("weighting", ["none"], ["uniform", "sampo"]),
    ],
)
def test_the_config_and_the_function_share_one_check(name, bad, good):
    """OTPOConfig's `ot_<name>` and `ot_token_weights(<name>=...)` refuse and accept the same values, with the same
    message (each naming its own key)."""
    from otpo_trl.otpo_config import checked_value

    hc, hr, mc, mr = random_batch(0, B=1)
    for value in bad:
        with pytest.raises(ValueError) as from_function:
            ot_token_weights(hc, hr, mc, mr, **{name: value})
        with pytest.raises(ValueError) as from_config:
            checked_value(f"ot_{name}", value)
        assert str(from_config.value) == str(from_function.value).replace(f"`{name}`", f"`ot_{name}`")
    for value in good:
        ot_token_weights(hc, hr, mc, mr, **{name: value})
        assert checked_setting(name, value) == checked_value(f"ot_{name}", value) == value


# ------------------------------------------------------------------ SamPO's down-sampling ("sampo")


def sampo(mc, mr, seed, **kwargs):
    return sampo_token_weights(mc, mr, generator=torch.Generator().manual_seed(seed), **kwargs)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_sampo_keeps_min_length_tokens_of_each_side(normalization):
    """min(n, m) tokens of each side weigh the same (1 before normalisation), the rest 0; the shorter side keeps all
    of its tokens; the sums hit the same targets as the other weightings."""
    _, _, mc, mr = random_batch(30, B=8, Tc=40, Tr=25)
    wc, wr = sampo(mc, mr, 0, normalization=normalization)
    for k in range(8):
        n, m = int(mc[k].sum()), int(mr[k].sum())
        low = min(n, m)
        for w, mask, length in ((wc[k], mc[k], n), (wr[k], mr[k], m)):
            chosen = w != 0
            assert int(chosen.sum()) == low and not (chosen & ~mask).any()  # masked positions never drawn
            if length == low:
                assert torch.equal(chosen, mask)
            if normalization in ("none", "length"):
                target = low if normalization == "none" else length
            else:
                target = targets(n, m, normalization)[0]
            assert float(w.sum()) == pytest.approx(target, rel=1e-6)
            torch.testing.assert_close(w[chosen], torch.full((low,), target / low), rtol=1e-6, atol=0)
    if normalization == "min":  # already min(n, m): exactly 1 and 0
        assert set(wc.unique().tolist()) | set(wr.unique().tolist()) == {0.0, 1.0}


def test_sampo_draws_follow_the_generator():
    _, _, mc, mr = random_batch(31, B=4, Tc=50, Tr=20)
    a, b, c = sampo(mc, mr, 1), sampo(mc, mr, 1), sampo(mc, mr, 2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # the same seed, the same tokens
    assert not torch.equal(a[0], c[0])  # another seed, other tokens (the chosen side is the longer here)
    torch.manual_seed(5)  # None: torch's global generator
    d = sampo_token_weights(mc, mr)
    torch.manual_seed(5)
    assert torch.equal(sampo_token_weights(mc, mr)[0], d[0])
    # through ot_token_weights, which reads no state for it: NaN states change nothing
    hc, hr = torch.full((4, 50, 3), float("nan")), torch.zeros(4, 20, 3)
    e = ot_token_weights(hc, hr, mc, mr, weighting="sampo", generator=torch.Generator().manual_seed(1))
    assert torch.equal(e[0], a[0]) and torch.equal(e[1], a[1])
    with pytest.raises(ValueError, match="`generator`"):
        sampo_token_weights(mc, mr, generator=1)


def test_sampo_draws_uniformly_without_replacement():
    """Each of the longer side's n tokens is drawn with probability min(n, m) / n: 2,000 draws of one pair."""
    mc = torch.zeros(2000, 12, dtype=torch.bool)
    mc[:, 2:12] = True  # n = 10
    mr = torch.zeros(2000, 5, dtype=torch.bool)
    mr[:, :4] = True  # m = 4
    wc, wr = sampo(mc, mr, 3)
    assert (wc[:, :2] == 0).all() and ((wc != 0).sum(1) == 4).all() and (wr[:, :4] == 1).all()
    frequency = (wc[:, 2:] != 0).double().mean(0)
    assert (frequency - 0.4).abs().max() < 0.05, frequency  # 4.5 standard deviations


def test_sampo_with_an_empty_side_and_the_diagnostics():
    _, _, mc, mr = random_batch(32, B=3)
    mr[1] = False
    wc, wr, info = sampo(mc, mr, 0, return_info=True)
    assert (wc[1] == 0).all() and (wr[1] == 0).all() and info.plan_mass.tolist() == [1.0, 0.0, 1.0]
    assert info.n_iter == 0 and not info.fallback.any() and (info.cost_spread == 0).all()
    for k in (0, 2):  # the plan couples the drawn tokens; its marginals are the weights
        torch.testing.assert_close(info.plan[k].sum(1), wc[k]), torch.testing.assert_close(info.plan[k].sum(0), wr[k])
    wc, wr = sampo(mc[:0], mr[:0], 0)
    assert wc.shape == (0, mc.shape[1]) and wr.shape == (0, mr.shape[1])


def test_token_weight_stats_in_float32_as_on_mps():
    """The float32 path (devices without float64, such as Apple's MPS) gives float64's statistics to 1e-5, on OT
    weights of long and short completions, uniform weights, single tokens and empty rows."""
    g = torch.Generator().manual_seed(17)
    w = torch.rand(6, 3000, generator=g) ** 4 * 5
    mask = torch.rand(6, 3000, generator=g) < torch.tensor([1.0, 0.9, 0.01, 0.5, 0.0, 1.0])[:, None]
    mask[3], w[5] = False, 1.0
    mask[3, 7] = True
    f64, f32 = token_weight_stats(w, mask), token_weight_stats(w, mask, dtype=torch.float32)
    assert f32.entropy.dtype == torch.float32 and f64.entropy.dtype == torch.float64
    for name in ("entropy", "max", "mean", "max_mean", "max_min", "ratio"):
        a, b = getattr(f32, name).double(), getattr(f64, name)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0, equal_nan=True, msg=name)
    assert f32.entropy[5] == pytest.approx(1.0, abs=1e-6) and f32.entropy[4].isnan() and f32.entropy[3] == 1.0
