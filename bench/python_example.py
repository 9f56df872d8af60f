"""README's Python example on a CPU: one training step at `OTPOConfig`'s defaults, full fine-tuning and LoRA.

The defaults are DPOConfig's (batch 8, max_length 1024; full fine-tuning keeps a frozen reference copy), with
`bf16=False` as README says for a CPU. Each variant runs in its own process, which reports the step's wall time, the
CPU time of its training (user + system, all threads: steadier than wall time on a shared machine), the peak resident
memory of the process (model loading included) and the 1-minute load average around it.

    python bench/python_example.py --model models/SmolLM2-135M-Instruct   # -> bench/results/python_example.json

`--malloc_mmap_threshold BYTES` runs the children with glibc's `MALLOC_MMAP_THRESHOLD_` fixed at BYTES (recorded in
the JSON): every allocation above it is mapped and returned on free, so the peak resident memory is close to the peak
of live memory; at glibc's default the threshold grows to 32 MiB and freed blocks below it stay in the heap.

    python bench/python_example.py --malloc_mmap_threshold 65536 --out bench/results/python_example_mmap.json

`--trainer dpo` measures TRL's DPOTrainer with DPOConfig's defaults instead (the same step, the comparison).
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ultrafeedback" / "train.jsonl"
VARIANTS = ("full", "lora")


def one_step(model: str, variant: str, trainer_name: str = "otpo") -> dict:
    """Train one step of README's example (`variant`: "full" or "lora") on `model` with `trainer_name` ("otpo", or
    "dpo": TRL's DPOTrainer); return the measurements."""
    import torch
    import transformers
    import trl
    from datasets import load_dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from otpo_trl import OTPOConfig, OTPOTrainer

    config_class, trainer_class = (OTPOConfig, OTPOTrainer) if trainer_name == "otpo" else (DPOConfig, DPOTrainer)

    dataset = load_dataset("json", data_files=str(DATA), split="train")
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory() as output_dir:
        args = config_class(
            output_dir=output_dir, bf16=False, max_steps=1, report_to="none", save_strategy="no", disable_tqdm=True
        )
        trainer = trainer_class(
            model=model, args=args, train_dataset=dataset, peft_config=lora if variant == "lora" else None
        )
        load_before = os.getloadavg()[0]
        cpu = time.process_time()
        metrics = trainer.train().metrics
        cpu = time.process_time() - cpu
    return {
        "variant": variant,
        "trainer": trainer_class.__name__,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "max_length": args.max_length,
        "step_wall_s": round(metrics["train_runtime"], 1),
        "step_cpu_s": round(cpu, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "load_avg_1min_before": load_before,
        "load_avg_1min_after": os.getloadavg()[0],
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "python_example.json"))
    parser.add_argument("--malloc_mmap_threshold", type=int, help="glibc's MALLOC_MMAP_THRESHOLD_ for the children")
    parser.add_argument("--trainer", choices=("otpo", "dpo"), default="otpo", help="dpo: TRL's DPOTrainer instead")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)  # one measurement, in this process
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(one_step(args.model, args.child, args.trainer)))
        return
    env = dict(os.environ)
    if args.malloc_mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    runs = []
    for variant in args.variants:
        command = [sys.executable, __file__, "--model", args.model, "--trainer", args.trainer, "--child", variant]
        result = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(runs[-1])
    record = {
        "what": "README's Python example, one step at OTPOConfig's defaults with bf16=False, on the UltraFeedback sample"
        + (", with TRL's DPOTrainer and DPOConfig instead" if args.trainer == "dpo" else ""),
        "model": Path(args.model).name,
        "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), no GPU",
        "date": time.strftime("%Y-%m-%d"),
        "malloc_mmap_threshold": args.malloc_mmap_threshold,  # None: glibc's default (a dynamic threshold)
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
