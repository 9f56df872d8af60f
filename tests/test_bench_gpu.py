"""`bench/gpu/run.sh` end to end on the CPU at tiny sizes (`--device cpu --tiny`), so that the GPU suite is known to
run before it meets a GPU. The install-from-wheels step is skipped here: WHEEL_DIR points at an empty
folder (the `.whl/` wheels are cp312 builds for the GPU machine), so the suite runs in this test's environment, which
has trl, datasets and POT. ~50 s on 2 shared CPU cores (one thread per part)."""

import json
import os
import subprocess
import sys

from .testing_utils import REPO_ROOT


RUN_SH = REPO_ROOT / "bench" / "gpu" / "run.sh"
SUITE = REPO_ROOT / "bench" / "gpu" / "suite.py"
RUNS = ("dpo", "otpo_reg1.0", "otpo_reg0.1")


def run(args, tmp_path, timeout):
    env = {**os.environ, "PYTHON": sys.executable, "WHEEL_DIR": str(tmp_path / "no-wheels")}
    return subprocess.run(["bash", *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)


def test_run_sh_cpu_tiny_end_to_end(tmp_path):
    """Every part, the long-completion one (not a default part) included."""
    out = tmp_path / "out"
    parts = "step-8b-lora,step-1b-full,ot-weights,long-1b"
    proc = run([str(RUN_SH), str(out), "--device", "cpu", "--tiny", "--parts", parts], tmp_path, timeout=400)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, log
    assert "install step skipped" in proc.stdout, log
    result = json.loads((out / "suite.json").read_text())

    machine = result["machine"]
    assert machine["device"] == "cpu" and machine["torch"] and machine["python"]
    for dist in ("torch", "transformers", "trl", "datasets", "peft", "POT"):
        assert machine["versions"][dist], dist
    assert machine["unmet_requirements"] == [], machine["unmet_requirements"]

    parts = result["parts"]
    assert list(parts) == ["step-8b-lora", "step-1b-full", "ot-weights", "long-1b"]
    for name, part in parts.items():
        assert part["status"] == "ok", (name, part.get("error"), part.get("traceback"))
    for name in ("step-8b-lora", "step-1b-full"):
        res = parts[name]["results"]
        assert res["timed_rounds"] == 2
        assert set(res["median_seconds"]) == set(RUNS) and all(v > 0 for v in res["median_seconds"].values())
        for key in RUNS[1:]:
            r = res[key]
            assert r["time_ratio"] > 0 and r["paired_time_ratio_median"] > 0
            assert r["ot_seconds_median"] > 0 and r["ot_timer"] == "host_perf_counter"
            assert 0 < r["ot_share_of_step"] < 1
            assert len(r["solver_iters"]) == 2 and all(i >= 1 for i in r["solver_iters"])
            for mem in ("peak_ratio", "peak_alone_ratio", "step_growth_ratio"):
                assert mem in r and r[mem] is None  # CUDA's allocator only
        assert parts[name]["config"]["lora"] is not None if name == "step-8b-lora" else True
    ot = parts["ot-weights"]["results"]
    assert set(ot) == {"reg1.0", "reg0.1"}
    for r in ot.values():
        assert len(r["times_s"]["batched"]) == len(r["times_s"]["official"]) == 2
        assert r["speedup"] > 0 and r["batched_n_iter"] >= 1
        assert r["max_rel_diff_batched_vs_official"] < 1e-3  # the same weights as the official loop
        assert r["batched_profile"]["cpu_ops"] > 0

    check_long_part(parts["long-1b"])

    targets = result["targets"]
    assert len(targets) == 12
    for t in targets:  # peak memory is CUDA's allocator's: not measured on the CPU
        assert (t["value"] is None) == ("memory" in t["target"]), t
    assert all(t["pass"] is None for t in targets)  # a tiny run judges nothing

    summary = (out / "summary.md").read_text()
    assert "| otpo_1024 |" in summary and "| online_1024_reg0.1 |" in summary  # the long part's two tables
    assert "## Targets" in summary and summary.count("**n/a **") == 12
    for name in parts:
        assert f"## {name}: ok" in summary


def check_long_part(part):
    """`long-1b` at tiny sizes: DPO and OTPO steps at both lengths and the OT step alone, dense and online at both ε,
    with the same iterations (within a check) whichever solver."""
    tokens = part["config"]["tokens"]
    assert tokens == [512, 1024]  # 8k and 16k over the tiny divisor
    steps, alone = part["results"]["steps"], part["results"]["ot_alone"]
    assert set(steps) == {f"{kind}_{n}" for kind in ("dpo", "otpo") for n in tokens}
    assert all(r["seconds"] > 0 and r["peak_bytes"] is None for r in steps.values())  # peaks: CUDA only
    assert all(steps[f"otpo_{n}"]["ot_seconds"] > 0 for n in tokens) and steps["dpo_512"]["ot_seconds"] is None
    assert set(alone) == {f"{s}_{n}_reg{r}" for s in ("batched", "online") for n in tokens for r in (1.0, 0.1)}
    for n in tokens:
        for reg in (1.0, 0.1):
            assert abs(alone[f"online_{n}_reg{reg}"]["n_iter"] - alone[f"batched_{n}_reg{reg}"]["n_iter"]) <= 10


def test_the_default_parts_fit_one_lent_gpu():
    """Without --parts the suite runs the three parts of the 8-minute budget; long-1b is asked for by name."""
    suite = load_suite()
    assert suite.parse_args(["--out", "x", "--device", "cpu"]).parts == ["step-8b-lora", "step-1b-full", "ot-weights"]
    assert suite.parse_args(["--out", "x", "--device", "cpu", "--parts", "long-1b"]).parts == ["long-1b"]


def test_parts_that_cannot_start_in_the_budget_are_skipped(tmp_path):
    """Full sizes on a 1 s budget: every part is skipped before any process starts, and both files are written."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(SUITE), "--out", str(out), "--device", "cpu", "--budget-s", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "suite.json").read_text())
    assert {p["status"] for p in result["parts"].values()} == {"skipped"}
    assert all(t["value"] is None and t["pass"] is None for t in result["targets"])
    assert "## ot-weights: skipped" in (out / "summary.md").read_text()


def load_suite():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_figures_give_ratios_and_verdicts():
    """The CUDA-only figures (peak memory, CUDA-event OT time), which the CPU run leaves empty, through the same
    summary and targets: made-up numbers with known ratios."""
    suite = load_suite()
    gib = 2**30

    def run(seconds, peak, ot=None):
        return {
            "seconds": seconds,
            "peak_bytes": [peak],
            "step_growth_bytes": [peak - 30 * gib],
            "ot_gpu_seconds": [ot] * len(seconds) if ot else [],
            "ot_host_seconds": [0.2] * len(seconds) if ot else [],
            "solver_iters": [40] * len(seconds) if ot else [],
        }

    measured = {
        "dpo": run([1.0, 1.2, 1.1], 40 * gib),
        "otpo_reg1.0": run([1.01, 1.21, 1.11], 40.1 * gib, ot=0.005),
        "otpo_reg0.1": run([1.1, 1.3, 1.2], 40.3 * gib, ot=0.05),
    }
    other = {"dpo": 20 * gib, "otpo": 20 * gib}  # each trainer's view of the other's resident bytes
    res = suite.summarize_steps(measured, other)
    r1, r01 = res["otpo_reg1.0"], res["otpo_reg0.1"]
    assert abs(r1["time_ratio"] - 1.11 / 1.1) < 1e-12 and abs(r01["time_ratio"] - 1.2 / 1.1) < 1e-12
    assert abs(r1["peak_alone_ratio"] - 20.1 / 20) < 1e-12  # the other trainer's 20 GiB taken out
    assert abs(r1["peak_ratio"] - 40.1 / 40) < 1e-12
    assert r1["ot_timer"] == "cuda_events" and abs(r1["ot_share_of_step"] - 0.005 / 1.11) < 1e-12

    def ot_result(batched, official, speedup, profile):
        return {"median_s": {"batched": batched, "official": official}, "speedup": speedup, "batched_profile": profile}

    ot_results = {
        "reg1.0": ot_result(0.01, 1.5, 150.0, {"kernels": 400}),
        "reg0.1": ot_result(0.05, 2.0, 40.0, "error"),
    }
    parts = {
        "step-8b-lora": {"status": "ok", "results": res, "config": {}, "rounds": []},
        "ot-weights": {"status": "ok", "config": {}, "results": ot_results},
    }
    verdicts = {t["target"]: t["pass"] for t in suite.target_rows(parts)}
    assert verdicts["Llama-3-8B shape, LoRA r 16, ot_reg 1.0: median step time OTPO / DPO"] is True
    assert verdicts["Llama-3-8B shape, LoRA r 16, ot_reg 0.1: median step time OTPO / DPO"] is False
    assert (
        verdicts["Llama-3-8B shape, LoRA r 16, ot_reg 0.1: peak max_memory_allocated OTPO / DPO (each trainer alone)"]
        is True
    )
    assert verdicts["OT weights alone, ot_reg 1.0: official per-pair POT loop / batched (medians)"] is True
    assert verdicts["OT weights alone, ot_reg 0.1: official per-pair POT loop / batched (medians)"] is False
    assert verdicts["Llama-3.2-1B shape, full fine-tuning, ot_reg 1.0: median step time OTPO / DPO"] is None  # not run
    result = {
        "machine": {
            "device": "cuda",
            "gpu": {"name": "NVIDIA H200"},
            "versions": {},
            "torch": "2.11.0",
            "torch_cuda": "13.0",
            "python": "3.12.3",
        },
        "args": {"tiny": False},
        "started_utc": "now",
        "budget_s": 420,
        "seconds": 200,
        "parts": parts,
        "targets": suite.target_rows(parts),
    }
    summary = suite.summary_markdown(result)
    assert summary.startswith("# OTPO vs DPO on NVIDIA H200")
    assert summary.count("**PASS**") == 5 and summary.count("**FAIL**") == 3
    assert "| otpo_reg0.1 | 1.200 | 1.091 |" in summary and "| 1.0 | 0.0100 | 1.500 | 150.0x |" in summary


def test_the_timed_official_loop_is_the_official_procedure():
    """`bench/ot_weights.py`'s `official_torch`, the loop the GPU suite times the batched solver against (POT's torch
    backend on the states' device, float32), gives the weights of test_ot_official's float64 oracle of the official
    code, on its padded batches (junk in the masked positions, with and without a shared offset)."""
    import pytest

    pytest.importorskip("ot")
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    try:
        from ot_weights import official_torch
    finally:
        sys.path.remove(str(REPO_ROOT / "bench"))
    from .testing_utils import official_weights, padded_batch, worst_error

    for seed, offset in ((0, 0.0), (1, 6.0)):
        hc, hr, mc, mr = padded_batch(seed, offset_ratio=offset)
        for reg in (1.0, 0.1):
            oc, orr, _ = official_weights(hc, hr, mc, mr, reg)
            tc, tr = official_torch(hc.float(), hr.float(), mc, mr, reg, 0.2)
            assert worst_error((tc, tr), (oc, orr), (mc, mr)) < 1e-5, (seed, reg)  # measured <= 9.7e-7
