"""Long completions: the OT step's extra peak memory and time against n = m, and one training step at 8k and 16k
tokens a completion, OTPO vs DPO.

Every measurement runs in a fresh child process on one thread (OMP_NUM_THREADS=1): the peak resident set size of
that process during the call above its resident size just before (Linux: VmHWM after resetting it through
/proc/self/clear_refs, minus VmRSS), as bench/step_overhead.py measures steps. One pair, n = m tokens, random states
with a shared offset (as real hidden states have), the official cost scaling, `return_info=True, return_plan=False` as
the trainer calls it. Parts::

    python bench/ot_memory.py --part compare --baseline PATH   # 8k x 8k, hidden 256, eps 1: this checkout against
                                                                # another (PATH: a checkout of the previous revision),
                                                                # interleaved, --repeats each
    python bench/ot_memory.py --part sizes --baseline PATH      # n = m from 1k to 32k: dense (while it fits), online,
                                                                # the previous revision, the official per-pair POT loop
    python bench/ot_memory.py --part step                       # one training step, tiny model, 8k and 16k tokens
    python bench/ot_memory.py --plot                            # bench/results/ot_memory.png from the JSON

Each part rewrites its own key of bench/results/ot_memory.json. The same long-completion step on a GPU (1B-shaped
model, bf16): `bench/gpu/suite.py --parts long-1b`.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
JSON = BENCH / "results" / "ot_memory.json"
FIGURE = BENCH / "results" / "ot_memory.png"
REG_M = 0.2
# The grid of `--part sizes`: (method, hidden, eps) -> the n = m it runs at. Dense while it fits the default CPU
# budget (2 GiB: 16k); online to 32k at hidden 256 (each pass recomputes 2 n^2 H flops: hidden 2048 stops at 4k, the
# 32k point at eps 1 only, ~10 minutes); the previous revision (4.4 n x m) to 8k; the official loop to 4k.
K = 1024
GRID = {
    ("dense", 256, 1.0): (1 * K, 2 * K, 4 * K, 8 * K, 16 * K),
    ("dense", 256, 0.1): (1 * K, 2 * K, 4 * K, 8 * K, 16 * K),
    ("dense", 2048, 1.0): (1 * K, 2 * K, 4 * K, 8 * K, 16 * K),
    ("dense", 2048, 0.1): (1 * K, 2 * K, 4 * K, 8 * K),
    ("online", 256, 1.0): (1 * K, 2 * K, 4 * K, 8 * K, 16 * K, 32 * K),
    ("online", 256, 0.1): (1 * K, 2 * K, 4 * K, 8 * K, 16 * K),
    ("online", 2048, 1.0): (1 * K, 2 * K, 4 * K),
    ("online", 2048, 0.1): (1 * K, 2 * K, 4 * K),
    ("previous", 256, 1.0): (1 * K, 2 * K, 4 * K, 8 * K),
    ("previous", 256, 0.1): (1 * K, 2 * K, 4 * K, 8 * K),
    ("previous", 2048, 1.0): (1 * K, 2 * K, 4 * K),
    ("official", 256, 1.0): (1 * K, 2 * K, 4 * K),
    ("official", 256, 0.1): (1 * K, 2 * K, 4 * K),
}
# The weights of these are kept and compared: online against dense, dense against the previous revision.
CHECKED = {(4 * K, 256, 1.0), (4 * K, 256, 0.1), (8 * K, 256, 1.0)}
STEP_TOKENS = (8 * K, 16 * K)
PROMPT_TOKENS = 64
TINY = dict(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    tie_word_embeddings=False,
)


# ---------------------------------------------------------------------------------------------- in the child


def proc_status_bytes(field):
    """`VmRSS` / `VmHWM` of this process from /proc/self/status, in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_of(fn):
    """(seconds, extra peak RSS in bytes, result) of one call of `fn`."""
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark (Linux >= 4.0)
    before = proc_status_bytes("VmRSS")
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    return seconds, proc_status_bytes("VmHWM") - before, out


def states(n, hidden, seed=0):
    """One pair of n x hidden states with a shared offset (as real hidden states have), all tokens valid."""
    import torch

    g = torch.Generator().manual_seed(seed)
    common = 3.0 * torch.randn(hidden, generator=g)
    hc, hr = (torch.randn(1, n, hidden, generator=g) + common for _ in range(2))
    mask = torch.ones(1, n, dtype=torch.bool)
    return hc, hr, mask, mask.clone()


def weights_child(spec):
    import torch

    torch.set_num_threads(1)
    hc, hr, mc, mr = states(spec["n"], spec["hidden"])
    if spec["method"] == "official":
        sys.path.insert(0, str(BENCH))
        from ot_weights import official_torch  # the official code's loop, as it runs in training

        call = lambda h, g, a, b: official_torch(h, g, a, b, spec["reg"], REG_M)  # noqa: E731
        n_iter = None
    else:
        from otpo_trl import ot_token_weights  # this checkout, or the one on PYTHONPATH (the previous revision)

        kw = {"reg": spec["reg"], "reg_m": REG_M, "return_info": True, "return_plan": False}
        if spec["method"] == "online":
            kw["solver"] = "online"
        call = lambda h, g, a, b: ot_token_weights(h, g, a, b, **kw)  # noqa: E731
    call(hc[:, :64], hr[:, :64], mc[:, :64], mr[:, :64])  # imports, first-call costs
    seconds, extra, out = peak_of(lambda: call(hc, hr, mc, mr))
    if spec["method"] != "official":
        n_iter = out[2].n_iter
    if spec.get("save"):
        torch.save((out[0].float(), out[1].float()), spec["save"])
    return {"seconds": seconds, "extra_peak_bytes": extra, "n_iter": n_iter, "load_1min": os.getloadavg()[0]}


def long_batch(tokens, vocab, seed=0, prompt=PROMPT_TOKENS, device="cpu"):
    """One collated pair with `tokens`-token chosen and rejected completions (synthetic ids), as TRL's collator pads
    it."""
    import torch
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    g = torch.Generator().manual_seed(seed)
    ids = lambda k: torch.randint(3, vocab, (k,), generator=g).tolist()  # noqa: E731 - 0-2 are pad, eos, unk
    example = {"prompt_ids": ids(prompt), "chosen_ids": ids(tokens), "rejected_ids": ids(tokens)}
    batch = DataCollatorForPreference(pad_token_id=0, max_length=prompt + tokens).torch_call([example])
    return {k: v.to(device) for k, v in batch.items()}


def build_trainer(kind, shape, max_length, device, dtype, checkpointing, extra=None):
    """A DPOTrainer or OTPOTrainer on a model built from `shape` (random weights), ready for `training_step`."""
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, LlamaConfig
    from trl import DPOConfig, DPOTrainer

    from otpo_trl import OTPOConfig, OTPOTrainer

    sys.path.insert(0, str(BENCH / "gpu"))
    from suite import make_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        config = LlamaConfig(**shape, max_position_embeddings=max_length + 64)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    cfg_cls, trainer_cls = (OTPOConfig, OTPOTrainer) if kind == "otpo" else (DPOConfig, DPOTrainer)
    cfg = cfg_cls(
        output_dir=str(Path(tempfile.gettempdir()) / f"ot-memory-{kind}"),
        per_device_train_batch_size=1,
        max_length=max_length,
        bf16=dtype == torch.bfloat16,
        use_cpu=not str(device).startswith("cuda"),
        report_to="none",
        learning_rate=1e-7,
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        **(extra or {}),
    )
    dataset = Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]})  # unused: batches are given
    ref = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval().requires_grad_(False)
    ref.load_state_dict(model.state_dict())
    trainer = trainer_cls(
        model=model, ref_model=ref, args=cfg, train_dataset=dataset, processing_class=make_tokenizer()
    )
    if checkpointing:  # Trainer.train() would do this; training_step is called directly
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer.model.train()
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which is bypassed
    return trainer


def timed_ot(trainer):
    """Seconds of each `compute_token_weights` call of an OTPOTrainer (cost, solver, metrics)."""
    import torch

    spent, inner = [], trainer.compute_token_weights

    def timed(*a, **k):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = inner(*a, **k)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        spent.append(time.perf_counter() - start)
        return out

    trainer.compute_token_weights = timed
    return spent


def step_child(spec):
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(BENCH))
    from step_overhead import step

    trainer = build_trainer(spec["trainer"], TINY, spec["tokens"] + PROMPT_TOKENS, "cpu", torch.float32, False)
    spent = timed_ot(trainer) if spec["trainer"] == "otpo" else []
    step(trainer, long_batch(256, TINY["vocab_size"], seed=1))  # warm-up: first-call costs, optimizer state
    batch = long_batch(spec["tokens"], TINY["vocab_size"])
    spent.clear()
    seconds, extra, _ = peak_of(lambda: step(trainer, batch))
    return {"seconds": seconds, "extra_peak_bytes": extra, "ot_seconds": sum(spent) if spent else None}


# ---------------------------------------------------------------------------------------------- in the parent


def run_child(spec, root=None):
    """Run one measurement in a fresh process (one thread), with `root` first on the import path if given."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root or REPO), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout)[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rel_diff(path_a, path_b):
    """max over both sides of max_i |a_i - b_i| / max_i |b_i|."""
    import torch

    a, b = torch.load(path_a), torch.load(path_b)
    return max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(a, b))


def machine():
    import torch

    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)

    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "cpu"
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": 1,
        "git_commit": commit.stdout.strip() or None,
        "load_average_1_5_15min_at_start": os.getloadavg(),
    }


def part_compare(args):
    """This checkout against `--baseline` at 8k x 8k, hidden 256, eps 1, interleaved; and their weights."""
    spec = {"kind": "weights", "method": "dense", "n": 8 * K, "hidden": 256, "reg": 1.0}
    runs = {"this": [], "baseline": []}
    for i in range(args.repeats):
        for name, root in (("this", None), ("baseline", args.baseline)):
            save = str(Path(args.work) / f"compare-{name}.pt") if i == 0 else None
            runs[name].append(run_child({**spec, "save": save}, root))
            print(f"compare {name} {i}: {runs[name][-1]}", flush=True)
    out = {"config": spec, "baseline": str(args.baseline), "runs": runs}
    for name, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        out[f"{name}_median_s"] = statistics.median(r["seconds"] for r in ok)
        out[f"{name}_median_extra_peak_mib"] = statistics.median(r["extra_peak_bytes"] for r in ok) / 2**20
    out["speedup_of_medians"] = out["baseline_median_s"] / out["this_median_s"]
    out["extra_peak_over_one_fp32_matrix"] = out["this_median_extra_peak_mib"] / (spec["n"] ** 2 * 4 / 2**20)
    out["max_rel_diff_weights"] = rel_diff(*(Path(args.work) / f"compare-{n}.pt" for n in ("this", "baseline")))
    return out


def part_sizes(args):
    """The grid; with --methods, only those methods, the JSON's other rows kept."""
    previous = json.loads(args.json.read_text()).get("sizes", {}) if args.json.exists() and args.methods else {}
    rows = [r for r in previous.get("rows", []) if r["method"] not in args.methods]
    for (method, hidden, reg), sizes in GRID.items():
        if (method == "previous" and not args.baseline) or (args.methods and method not in args.methods):
            continue
        for n in sizes:
            if args.max_n and n > args.max_n:
                continue
            spec = {
                "kind": "weights",
                "method": "online" if method == "online" else "dense",
                "n": n,
                "hidden": hidden,
                "reg": reg,
            }
            if method == "official":
                spec["method"] = "official"
            if (n, hidden, reg) in CHECKED and method in ("dense", "online", "previous"):
                spec["save"] = str(Path(args.work) / f"w-{method}-{n}-{hidden}-{reg}.pt")
            result = run_child(spec, args.baseline if method == "previous" else None)
            rows.append({"method": method, "n": n, "hidden": hidden, "reg": reg, **result})
            print(f"sizes {rows[-1]}", flush=True)
    checks = {}
    for n, hidden, reg in sorted(CHECKED):
        saved = {m: Path(args.work) / f"w-{m}-{n}-{hidden}-{reg}.pt" for m in ("dense", "online", "previous")}
        for other in ("online", "previous"):
            if saved["dense"].exists() and saved[other].exists():
                checks[f"{other}_vs_dense_n{n}_h{hidden}_reg{reg}"] = rel_diff(saved[other], saved["dense"])
    return {"rows": rows, "max_rel_diff_weights": {**previous.get("max_rel_diff_weights", {}), **checks}}


def part_step(args):
    rows = []
    for tokens in args.tokens or STEP_TOKENS:
        for trainer in ("dpo", "otpo"):
            rows.append(
                {
                    "trainer": trainer,
                    "tokens": tokens,
                    **run_child({"kind": "step", "trainer": trainer, "tokens": tokens}),
                }
            )
            print(f"step {rows[-1]}", flush=True)
    return {"model": TINY, "prompt_tokens": PROMPT_TOKENS, "batch_pairs": 1, "dtype": "float32", "rows": rows}


def tables(result):
    """Markdown tables of the parts in `result` (as bench/RESULTS.md shows them)."""
    lines = []
    c = result.get("compare")
    if c:
        lines += [
            f"8,192 x 8,192, hidden 256, eps 1, {len(c['runs']['this'])} interleaved runs each (median):",
            "",
            "| | seconds | extra peak MiB | / one fp32 n x m |",
            "|---|---|---|---|",
        ]
        for name in ("baseline", "this"):
            mib = c[f"{name}_median_extra_peak_mib"]
            label = "previous revision" if name == "baseline" else "this revision"
            lines.append(f"| {label} | {c[f'{name}_median_s']:.2f} | {mib:,.0f} | {mib / 256:.2f} |")
        diff = f"weights' max relative difference {c['max_rel_diff_weights']:.1e}"
        lines += ["", f"speed-up {c['speedup_of_medians']:.2f}x; {diff}", ""]
    rows = result.get("sizes", {}).get("rows", [])
    if rows:
        ns = sorted({r["n"] for r in rows})
        lines += ["| method, hidden, eps | " + " | ".join(f"{n // K}k" for n in ns) + " |", "|---|" + "---|" * len(ns)]
        found = {(r["method"], r["hidden"], r["reg"], r["n"]): r for r in rows}
        for method, hidden, reg in GRID:
            cells = []
            for n in ns:
                r = found.get((method, hidden, reg, n))
                if r is None or "error" in r:
                    cells.append("" if r is None else "error")
                else:
                    cells.append(f"{r['seconds']:.3g} s, {r['extra_peak_bytes'] / 2**20:,.0f} MiB")
            lines.append(f"| {method}, {hidden}, {reg} | " + " | ".join(cells) + " |")
        lines.append("")
        for key, value in result["sizes"].get("max_rel_diff_weights", {}).items():
            lines.append(f"- {key}: {value:.1e}")
        lines.append("")
    steps = result.get("step", {}).get("rows", [])
    if steps:
        lines += [
            "| completion tokens | trainer | step seconds | extra peak MiB | OT seconds |",
            "|---|---|---|---|---|",
        ]
        for r in steps:
            ot = "" if r.get("ot_seconds") is None else f"{r['ot_seconds']:.2f}"
            extra = r["extra_peak_bytes"] / 2**20
            lines.append(f"| {r['tokens']:,} | {r['trainer']} | {r['seconds']:.2f} | {extra:,.0f} | {ot} |")
    return "\n".join(lines)


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.get("sizes", {}).get("rows", [])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"dense": ("C0", "o"), "online": ("C1", "s"), "previous": ("C3", "^"), "official": ("C2", "x")}
    names = {
        "dense": "dense (this revision)",
        "online": "online",
        "previous": "previous revision",
        "official": "official per-pair POT loop",
    }
    for (method, hidden, reg), _ in GRID.items():
        pts = sorted(
            (r["n"], r)
            for r in rows
            if (r["method"], r["hidden"], r["reg"]) == (method, hidden, reg) and "error" not in r
        )
        if not pts or reg != 1.0:
            continue
        color, marker = styles[method]
        dash = "-" if hidden == 256 else ":"
        label = f"{names[method]}, H {hidden}"
        axes[0].plot(
            [n for n, _ in pts],
            [r["extra_peak_bytes"] / 2**20 for _, r in pts],
            dash,
            color=color,
            marker=marker,
            label=label,
        )
        axes[1].plot(
            [n for n, _ in pts], [r["seconds"] for _, r in pts], dash, color=color, marker=marker, label=label
        )
    ns = sorted({r["n"] for r in rows})
    if ns:
        axes[0].plot(ns, [n * n * 4 / 2**20 for n in ns], color="grey", lw=1, label="one fp32 n x m")
    axes[0].set_ylabel("extra peak memory, MiB")
    axes[1].set_ylabel("seconds, one thread")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("n = m tokens a completion")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("ot_token_weights, one pair, official scaling, eps 1 (bench/ot_memory.py)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("compare", "sizes", "step"), action="append", default=[])
    p.add_argument("--baseline", type=Path, help="a checkout of the previous revision (for compare and sizes)")
    p.add_argument("--repeats", type=int, default=5, help="compare: runs of each, interleaved")
    p.add_argument("--max-n", type=int, default=None, help="sizes: skip larger n")
    p.add_argument("--methods", nargs="*", default=[], help="sizes: only these (dense online previous official)")
    p.add_argument("--tokens", type=int, nargs="*", help=f"step: completion lengths (default {STEP_TOKENS})")
    p.add_argument("--work", default="/tmp/ot-memory", help="folder for the compared weights")
    p.add_argument("--json", type=Path, default=JSON)
    p.add_argument("--plot", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(weights_child(spec) if spec["kind"] == "weights" else step_child(spec)))
        return 0
    if "compare" in args.part and not args.baseline:
        p.error("--part compare needs --baseline")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    result = json.loads(args.json.read_text()) if args.json.exists() else {}
    for part in args.part:
        start, facts = time.time(), machine()
        out = {"compare": part_compare, "sizes": part_sizes, "step": part_step}[part](args)
        out["machine"] = {**facts, "load_average_1_5_15min_at_end": os.getloadavg()}
        out["wall_seconds"] = time.time() - start
        result[part] = out
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json} ({part})")
    if args.plot:
        plot(result, FIGURE)
    print(tables(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
