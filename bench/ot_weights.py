"""Benchmark `ot_token_weights(solver="batched")` against the official OTPO code's per-pair POT loop.

The official code pads every pair to the full padded length L, computes the euclidean cost over the padded L x L
hidden states, and calls ``ot.unbalanced.sinkhorn_unbalanced(a, b, M, reg, reg_m, reg_type="entropy")`` with
zero-mass marginals (1 on valid tokens, 0 on padding), one pair at a time. Usage::

    python bench/ot_weights.py --batch 8 --padded-length 1024 --completion-length 300 --hidden 2048
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings

import numpy as np
import ot
import torch


try:
    from otpo_trl.ot import ot_token_weights
except ImportError:  # run from a checkout that is not pip-installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from otpo_trl.ot import ot_token_weights


def make_inputs(batch, padded_length, completion_length, hidden, device, seed=0, spread=50):
    """Random hidden states; each completion has completion_length +- spread tokens (250-350 for 300 and the default
    spread) starting at a non-zero offset."""
    g = torch.Generator().manual_seed(seed)
    hs, masks = [], []
    for _ in range(2):
        h = torch.randn(batch, padded_length, hidden, generator=g) + 3.0 * torch.randn(hidden, generator=g)
        mask = torch.zeros(batch, padded_length, dtype=torch.bool)
        for k in range(batch):
            n = completion_length + int(torch.randint(-spread, spread + 1, (), generator=g))
            n = max(1, min(n, padded_length - 1))
            start = int(torch.randint(1, padded_length - n + 1, (), generator=g))
            mask[k, start : start + n] = True
        hs.append(h.to(device))
        masks.append(mask.to(device))
    return hs[0], hs[1], masks[0], masks[1]


def official(hc, hr, mc, mr, reg, reg_m):
    """The official code's way, as it ran with POT 0.9.4 (reg_type "entropy" was then the default): per pair, the
    padded L x L euclidean cost (torch.cdist, matmul-based), divided by its max over the whole padded matrix, and
    marginals that are 1 on valid tokens and 0 on padding."""
    weights_c, weights_r = [], []
    for k in range(hc.shape[0]):
        M = torch.cdist(hc[k], hr[k]).cpu().double().numpy() + 1e-6
        if M.max() > 1:
            M = M / M.max()
        a, b = mc[k].cpu().double().numpy(), mr[k].cpu().double().numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            P = ot.unbalanced.sinkhorn_unbalanced(a, b, M, reg, reg_m, reg_type="entropy")
        wc, wr = P.sum(1), P.sum(0)
        n = min(a.sum(), b.sum())
        weights_c.append(wc * n / wc.sum())
        weights_r.append(wr * n / wr.sum())
    return np.stack(weights_c), np.stack(weights_r)


def official_torch(hc, hr, mc, mr, reg, reg_m):
    """The official code's `get_ot_weight` as it runs in training: on the hidden states' device (POT's torch
    backend), per pair, the padded L x L float32 `torch.cdist` of the states with masked positions zeroed, + 1e-6,
    divided by its maximum when that exceeds 1 (a host sync), NaN replaced, marginals 1 on valid tokens and 0 on
    padding, ``sinkhorn_unbalanced(..., method="sinkhorn_stabilized")`` (``reg_type="entropy"``, POT 0.9.4's default
    then), the NaN/inf asserts (host syncs) and each side's marginal divided by ``scaled_coeff``. Returns (B, L) torch
    weights of the chosen and rejected tokens."""
    weights_c, weights_r = [], []
    for k in range(hc.shape[0]):
        a, b = mc[k].to(torch.float32), mr[k].to(torch.float32)
        cost = torch.cdist((a[:, None] * hc[k]).float(), (b[:, None] * hr[k]).float(), p=2) + 1e-6
        top = cost.abs().max()
        if not torch.isnan(top) and top.item() > 1:
            cost = cost / top
        cost = torch.nan_to_num(cost, nan=1e10)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = ot.unbalanced.sinkhorn_unbalanced(
                a, b, cost, reg, reg_m, method="sinkhorn_stabilized", reg_type="entropy"
            )
        assert not torch.isnan(plan).any() and not torch.isinf(plan).any()
        coeff = plan.sum() / min(a.sum(), b.sum())  # as the official code: a Python min, a host sync
        weights_c.append(plan.sum(-1) / coeff)
        weights_r.append(plan.sum(0) / coeff)
    return torch.stack(weights_c), torch.stack(weights_r)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def timed(fn, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def max_rel_diff(a, b):
    """max over pairs of max_i |a_i - b_i| / max_i |b_i| (pairs with all-zero reference skipped)."""
    scale = b.abs().amax(1)
    keep = scale > 0
    return float(((a - b).abs().amax(1)[keep] / scale[keep]).max()) if keep.any() else 0.0


def profile_ops(fn, top=8):
    """The ops taking most self time in one call of `fn`, from torch.profiler: cost matrix (baddbmm, sqrt), Sinkhorn
    iterations (bmm, pow, reciprocal, where), compaction and scatter (index, argsort, scatter_), host syncs (item)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [
        {"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total, "calls": e.count}
        for e in events[:top]
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--padded-length", type=int, default=1024)
    parser.add_argument("--completion-length", type=int, default=300)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reg", type=float, default=1.0)
    parser.add_argument("--reg-m", type=float, default=0.2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--json", default="bench/results/ot_weights.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    hc, hr, mc, mr = make_inputs(args.batch, args.padded_length, args.completion_length, args.hidden, args.device)
    kw = {"reg": args.reg, "reg_m": args.reg_m}
    batched = lambda: ot_token_weights(hc, hr, mc, mr, **kw)  # noqa: E731
    batched()  # warm-up (allocator, kernels)
    # Interleaved, so that both see the same load when the machine is shared.
    all_batched, all_official = [], []
    for _ in range(args.repeats):
        all_batched.append(timed(batched, args.device))
        all_official.append(timed(lambda: official(hc, hr, mc, mr, **kw), args.device))
    t_batched, t_official = statistics.median(all_batched), statistics.median(all_official)
    t0 = time.perf_counter()
    ref_c, ref_r = ot_token_weights(hc, hr, mc, mr, solver="pot", **kw)
    t_pot = time.perf_counter() - t0
    wc, wr, info = ot_token_weights(hc, hr, mc, mr, return_info=True, **kw)
    off_c, off_r = (torch.from_numpy(w).float() for w in official(hc.cpu(), hr.cpu(), mc.cpu(), mr.cpu(), **kw))
    profile = profile_ops(batched)
    result = {
        "config": vars(args),
        "batched_profile_top_ops": profile,
        "median_s": {"batched": t_batched, "official_loop": t_official, "pot_valid_tokens_once": t_pot},
        "times_s": {"batched": all_batched, "official_loop": all_official},
        "speedup_official_over_batched": t_official / t_batched,
        "speedup_of_min_times": min(all_official) / min(all_batched),
        "max_rel_diff_batched_vs_pot": max(max_rel_diff(wc.cpu(), ref_c.cpu()), max_rel_diff(wr.cpu(), ref_r.cpu())),
        "max_rel_diff_official_vs_pot": max(max_rel_diff(off_c, ref_c.cpu()), max_rel_diff(off_r, ref_r.cpu())),
        "batched_n_iter": info.n_iter,
        "completion_lengths": {"chosen": mc.sum(1).tolist(), "rejected": mr.sum(1).tolist()},
        "machine": {
            "torch": torch.__version__,
            "pot": ot.__version__,
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name(),
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_average_1_5_15min": os.getloadavg(),  # other jobs on the machine slow multi-threaded torch ops
            "python": platform.python_version(),
        },
    }
    print(f"batched (median of {args.repeats}): {t_batched:.3f} s (min {min(all_batched):.3f} s)")
    print(
        f"official per-pair POT loop over padded {args.padded_length}^2 (median): {t_official:.3f} s"
        f" (min {min(all_official):.3f} s)"
    )
    print(
        f"speed-up official / batched: {result['speedup_official_over_batched']:.1f}x of medians, "
        f"{result['speedup_of_min_times']:.1f}x of minima"
    )
    print(f"max relative difference batched vs POT on valid tokens: {result['max_rel_diff_batched_vs_pot']:.2e}")
    print(f"max relative difference official vs POT on valid tokens: {result['max_rel_diff_official_vs_pot']:.2e}")
    print("where the batched solver's time goes (torch.profiler, self time):")
    for row in profile:
        print(f"  {row['op']:<28} {row['self_ms']:8.1f} ms  {row['share']:6.1%}  x{row['calls']}")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
