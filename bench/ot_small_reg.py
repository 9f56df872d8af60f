"""Benchmark the batched solver at a small ε, where exp(-M / ε) underflows float32 and the stabilised path runs.

Times ``ot_token_weights`` (stabilised scaling with absorption) against the multiplicative updates forced onto the
same problem (the speed to aim for: they stay finite on this case, but nothing guarantees it in general), and,
with ``--baseline-rev``, against the plain log-domain solver of an earlier revision's ``otpo_trl/ot_weights.py`` (the
single module the OT package ``otpo_trl/ot/`` was split from; read with ``git show``). All three run the same Sinkhorn iterates. Usage::

    python bench/ot_small_reg.py --batch 2 --length 4096 --hidden 256 --reg 0.01 --threads 1 --baseline-rev 8dbbe60
"""

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    from otpo_trl.ot import ot_token_weights
    from otpo_trl.ot import sinkhorn as S
except ImportError:  # run from a checkout that is not pip-installed
    sys.path.insert(0, ROOT)
    from otpo_trl.ot import ot_token_weights
    from otpo_trl.ot import sinkhorn as S


def module_at(rev):
    """otpo_trl/ot_weights.py as it was at git revision `rev` (before the OT package), imported under another name."""
    source = subprocess.run(
        ["git", "show", f"{rev}:otpo_trl/ot_weights.py"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(f"ot_weights_{rev}", f.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    os.unlink(f.name)
    return module


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def rel_diff(a, b):
    return float(((a - b).abs().amax(1) / b.abs().amax(1).clamp_min(1e-30)).max())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=4096, help="tokens of every chosen and rejected completion")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--reg", type=float, default=0.01)
    parser.add_argument("--reg-m", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--baseline-rev", default=None, help="git revision whose (log-domain) solver to time too")
    parser.add_argument("--pot", action="store_true", help="also compare the weights with POT (float64, slow)")
    parser.add_argument("--json", default="bench/results/ot_small_reg.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    # Random states without a common offset: the official scaling then leaves max(M) near 1, so max(M) / reg = 100
    # at reg 0.01, past the float32 limit of the multiplicative updates (50).
    g = torch.Generator().manual_seed(0)
    hc, hr = (torch.randn(args.batch, args.length, args.hidden, generator=g) for _ in range(2))
    mc = torch.ones(args.batch, args.length, dtype=torch.bool)
    mr = mc.clone()
    kw = {"reg": args.reg, "reg_m": args.reg_m, "return_info": True, "return_plan": False}
    paths = []
    for name in ("sinkhorn_knopp_unbalanced", "sinkhorn_stabilized_unbalanced"):
        solver = getattr(S, name)
        setattr(S, name, lambda *a, solver=solver, name=name, **k: paths.append(name) or solver(*a, **k))
    ot_token_weights(hc[:, :64], hr[:, :64], mc[:, :64], mr[:, :64], **kw)  # warm-up
    paths.clear()
    runs = {}
    t, (wc, wr, info) = timed(lambda: ot_token_weights(hc, hr, mc, mr, **kw), args.repeats)
    runs["stabilised"] = {"times_s": t, "n_iter": info.n_iter, "path": paths[-1]}
    limit = S.EXP_LIMIT[torch.float32]
    S.EXP_LIMIT[torch.float32] = float("inf")  # force the multiplicative updates
    t, (mc_w, mr_w, minfo) = timed(lambda: ot_token_weights(hc, hr, mc, mr, **kw), args.repeats)
    S.EXP_LIMIT[torch.float32] = limit
    runs["multiplicative_forced"] = {
        "times_s": t,
        "n_iter": minfo.n_iter,
        "path": paths[-1],
        "max_rel_diff_to_stabilised": max(rel_diff(mc_w, wc), rel_diff(mr_w, wr)),
    }
    if args.baseline_rev:
        old = module_at(args.baseline_rev)
        t, (oc, orr, oinfo) = timed(lambda: old.ot_token_weights(hc, hr, mc, mr, **kw), 1)
        runs[f"log_domain_{args.baseline_rev}"] = {
            "times_s": t,
            "n_iter": oinfo.n_iter,
            "note": "pair cost scaling (that revision's only one)",
        }
    if args.pot:
        t, (pc, pr) = timed(lambda: ot_token_weights(hc, hr, mc, mr, reg=args.reg, reg_m=args.reg_m, solver="pot"), 1)
        runs["pot"] = {"times_s": t, "max_rel_diff_stabilised_to_pot": max(rel_diff(wc, pc), rel_diff(wr, pr))}
    for run in runs.values():
        run["median_s"] = statistics.median(run["times_s"])
    ratio = runs["stabilised"]["median_s"] / runs["multiplicative_forced"]["median_s"]
    result = {
        "config": vars(args),
        "runs": runs,
        "stabilised_over_multiplicative": ratio,
        "machine": {
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_average_1_5_15min": os.getloadavg(),
            "python": platform.python_version(),
        },
    }
    print(
        f"B={args.batch}, {args.length} x {args.length} tokens, H={args.hidden}, reg={args.reg}, "
        f"{torch.get_num_threads()} thread(s), load {os.getloadavg()[0]:.1f}"
    )
    for name, run in runs.items():
        extra = {k: v for k, v in run.items() if k not in ("times_s", "median_s")}
        print(f"  {name:<28} median {run['median_s']:8.3f} s  {extra}")
    print(f"stabilised / multiplicative: {ratio:.2f}x")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
