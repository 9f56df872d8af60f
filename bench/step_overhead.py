"""OTPOTrainer vs DPOTrainer: seconds per training step and peak memory, side by side; and what the check of the token
weights (finite, >= 0, the right shape: one host sync per batch) costs.

The trainers are built on the same model folder, batch and sequence length. Timing alternates their steps in one
process (A B C A B C ...) after warm-up, on the same pre-collated batches, so drift in machine load hits all alike: DPO,
OTPO, and OTPO with the weight check switched off ("otpo_unchecked"), whose difference to OTPO is the check's cost; the
check's own time is also measured on each call (on a GPU that includes waiting for the work queued before it). Peak
memory is measured per trainer: CUDA's peak allocation on a GPU; on CPU the peak resident set size of a child process
that runs only that trainer, with the high-water mark reset after warm-up (so model loading does not set it).

    python bench/step_overhead.py --model models/SmolLM2-135M-Instruct --lora --batch 2 --max-length 512

On a GPU, offline, use bench/gpu/run.sh: the same alternating comparison on 1B- and 8B-shaped models built from
configs (bench/RESULTS.md).

Prints the median seconds per step, the OTPO/DPO ratio, the time spent in the OT weights and in the weight check, the
peak memory of each and its ratio, and writes the same to JSON.
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

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoTokenizer
from trl import DPOConfig, DPOTrainer

import otpo_trl.forward as forward_helpers
from otpo_trl import OTPOConfig, OTPOTrainer


DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ultrafeedback" / "train.jsonl"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="models/SmolLM2-135M-Instruct", help="model folder or hub id")
    p.add_argument("--data", default=str(DATA), help="preference data (.jsonl, TRL format)")
    p.add_argument("--batch", type=int, default=2, help="pairs per step")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lora", action="store_true", help="LoRA r=16 on the attention projections")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per trainer")
    p.add_argument("--steps", type=int, default=4, help="timed steps per trainer")
    p.add_argument("--json", default="bench/results/step_overhead.json")
    p.add_argument("--only", choices=["dpo", "otpo"], help=argparse.SUPPRESS)  # child mode: peak RSS of one trainer
    return p.parse_args(argv)


def build(kind, args, dataset, tokenizer):
    cfg_cls, trainer_cls = (DPOConfig, DPOTrainer) if kind == "dpo" else (OTPOConfig, OTPOTrainer)
    cfg = cfg_cls(
        output_dir=f"/tmp/step_overhead_{kind}",
        per_device_train_batch_size=args.batch,
        max_length=args.max_length,
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        learning_rate=1e-6,
        gradient_checkpointing=False,
        seed=0,
    )
    peft_config = None
    if args.lora:
        peft_config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    trainer = trainer_cls(
        model=args.model, args=cfg, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )
    trainer.model.train()
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which we bypass
    return trainer


def batches(trainer, n):
    """n collated batches padded to at least the longest pairs: the first n of the sampler's order."""
    loader = iter(trainer.get_train_dataloader())
    return [next(loader) for _ in range(n)]


def step(trainer, batch):
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    trainer.training_step(trainer.model, batch)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - start


def time_ot(trainer):
    """Accumulate the seconds spent in the OT weights (cost matrix + solver + metrics) of an OTPOTrainer."""
    spent = []
    inner = trainer.compute_token_weights

    def timed(*a, **k):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = inner(*a, **k)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        spent.append(time.perf_counter() - t)
        return out

    trainer.compute_token_weights = timed
    return spent


def time_weight_check():
    """Time every call of the token-weight check (`otpo_trl.forward.token_weight_problems`, which the trainer calls
    once per batch); `switch["on"] = False` skips it, for the "otpo_unchecked" arm. Returns (switch, seconds)."""
    check, switch, spent = forward_helpers.token_weight_problems, {"on": True}, []

    def timed(*a, **k):
        if not switch["on"]:
            return None
        t = time.perf_counter()
        out = check(*a, **k)  # ends in the host sync (`.any()` read on the host)
        spent.append(time.perf_counter() - t)
        return out

    forward_helpers.token_weight_problems = timed
    return switch, spent


def _proc_status_bytes(field):
    """`VmRSS` / `VmHWM` of this process from /proc/self/status, in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_child(kind, args, dataset, tokenizer):
    trainer = build(kind, args, dataset, tokenizer)
    data = batches(trainer, args.warmup + args.steps)
    for batch in data[: args.warmup]:  # optimizer state and allocator pools exist after the first step
        step(trainer, batch)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    # Reset the RSS high-water mark (Linux >= 4.0), so the peak is that of the training steps, not of model loading.
    Path("/proc/self/clear_refs").write_text("5")
    before = _proc_status_bytes("VmRSS")
    for batch in data[args.warmup :]:
        step(trainer, batch)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    rss = _proc_status_bytes("VmHWM")
    print(json.dumps({"kind": kind, "peak_cuda_bytes": peak, "peak_rss_bytes": rss, "rss_before_steps": before}))


def main(argv=None):
    args = parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dataset = load_dataset("json", data_files=args.data, split="train")
    # spare rows: TRL drops pairs whose prompt alone fills max_length
    dataset = dataset.select(range(min(len(dataset), 4 * (args.warmup + args.steps) * args.batch)))
    # keep only TRL's preference columns
    dataset = dataset.select_columns([c for c in ("prompt", "chosen", "rejected") if c in dataset.column_names])
    if args.only:
        return peak_memory_child(args.only, args, dataset, tokenizer)

    kinds = ("dpo", "otpo", "otpo_unchecked")
    trainers = {kind: build(kind, args, dataset, tokenizer) for kind in kinds}
    data = {kind: batches(t, args.warmup + args.steps) for kind, t in trainers.items()}
    ot_seconds = time_ot(trainers["otpo"])
    check, check_seconds = time_weight_check()
    times = {kind: [] for kind in kinds}
    for i in range(args.warmup + args.steps):
        for kind in kinds:  # A B C A B C ...
            check["on"] = kind != "otpo_unchecked"
            seconds = step(trainers[kind], data[kind][i])
            if i >= args.warmup:
                times[kind].append(seconds)
    ot_seconds = ot_seconds[args.warmup :]
    check_seconds = check_seconds[args.warmup :]
    tokens = int(sum(b["attention_mask"].sum() for b in data["dpo"][args.warmup :])) // args.steps

    memory, step_growth = {}, {}  # step_growth: CPU only, peak RSS of the steps above the RSS before them
    if torch.cuda.is_available():
        for kind in ("dpo", "otpo"):  # peak of one more step each, measured alone
            trainer = trainers[kind]
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            step(trainer, data[kind][-1])
            memory[kind] = torch.cuda.max_memory_allocated()
        memory_kind = "peak_cuda_bytes"
    else:
        del trainers
        for kind in ("dpo", "otpo"):
            out = subprocess.run(
                [sys.executable, __file__, *(argv or sys.argv[1:]), "--only", kind],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            child = json.loads(out.strip().splitlines()[-1])
            memory[kind] = child["peak_rss_bytes"]
            step_growth[kind] = child["peak_rss_bytes"] - child["rss_before_steps"]
        memory_kind = "peak_rss_bytes"

    median = {kind: statistics.median(v) for kind, v in times.items()}
    result = {
        "model": args.model,
        "lora": args.lora,
        "dtype": "bf16" if args.bf16 else "fp32",
        "batch_pairs": args.batch,
        "max_length": args.max_length,
        "tokens_per_step": tokens,
        "steps_timed": args.steps,
        "seconds_per_step": median,
        "all_seconds": times,
        "time_ratio_otpo_over_dpo": median["otpo"] / median["dpo"],
        "ot_weights_seconds_per_step": statistics.median(ot_seconds),
        "ot_share_of_otpo_step": statistics.median(ot_seconds) / median["otpo"],
        "weight_check_seconds_per_step": statistics.median(check_seconds),
        "weight_check_share_of_otpo_step": statistics.median(check_seconds) / median["otpo"],
        "time_ratio_otpo_over_otpo_unchecked": median["otpo"] / median["otpo_unchecked"],
        "load_average_at_end": list(os.getloadavg()),  # 1, 5, 15 min, read after the memory runs
        "memory_kind": memory_kind,
        "peak_memory_bytes": memory,
        "memory_ratio_otpo_over_dpo": memory["otpo"] / memory["dpo"],
        "step_rss_growth_bytes": step_growth or None,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
    }
    print(f"model {args.model}  batch {args.batch} pairs  max_length {args.max_length}  {tokens} tokens/step")
    print(f"DPO  median {median['dpo']:.3f} s/step   peak {memory['dpo'] / 2**20:.0f} MiB ({memory_kind})")
    print(f"OTPO median {median['otpo']:.3f} s/step   peak {memory['otpo'] / 2**20:.0f} MiB")
    print(f"OTPO without the weight check: median {median['otpo_unchecked']:.3f} s/step")
    print(
        f"OT weights {result['ot_weights_seconds_per_step'] * 1e3:.1f} ms/step ({result['ot_share_of_otpo_step']:.2%})"
    )
    print(
        f"weight check {result['weight_check_seconds_per_step'] * 1e3:.3f} ms/step "
        f"({result['weight_check_share_of_otpo_step']:.4%}); OTPO / OTPO unchecked "
        f"{result['time_ratio_otpo_over_otpo_unchecked']:.3f}"
    )
    if step_growth:
        growth = "   ".join(f"{k.upper()} {v / 2**20:.0f} MiB" for k, v in step_growth.items())
        print(f"peak RSS of the steps above the RSS before them: {growth}")
    print(
        f"ratio OTPO/DPO: time {result['time_ratio_otpo_over_dpo']:.3f}  memory {result['memory_ratio_otpo_over_dpo']:.3f}"
    )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
