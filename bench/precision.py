"""OTPO training steps in fp32 vs bf16 mixed precision (DPOConfig's default) on the same model, batches and LoRA.

On a GPU bf16 is the paper's setting and the fast one. On a CPU it depends on the CPU: with bf16 instructions
(AVX512-BF16, AMX) bf16 autocast can beat fp32; without them it is emulated and much slower. This measures it here.

    python bench/precision.py --model models/SmolLM2-135M-Instruct --batch 2 --max-length 512 --steps 2

Prints the median seconds per step of each precision, their ratio and the step-1 losses, and writes JSON.
"""

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoTokenizer

from otpo_trl import OTPOConfig, OTPOTrainer


DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ultrafeedback" / "train.jsonl"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="models/SmolLM2-135M-Instruct", help="model folder or hub id")
    p.add_argument("--data", default=str(DATA), help="preference data (.jsonl, TRL format)")
    p.add_argument("--batch", type=int, default=2, help="pairs per step")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per precision")
    p.add_argument("--steps", type=int, default=2, help="timed steps per precision")
    p.add_argument("--json", default="bench/results/precision.json")
    return p.parse_args(argv)


def build(bf16, args, dataset, tokenizer):
    cfg = OTPOConfig(
        output_dir=f"/tmp/precision_{'bf16' if bf16 else 'fp32'}",
        per_device_train_batch_size=args.batch,
        max_length=args.max_length,
        bf16=bf16,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        learning_rate=1e-6,
        seed=0,
    )
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    trainer = OTPOTrainer(
        model=args.model, args=cfg, train_dataset=dataset, processing_class=tokenizer, peft_config=lora
    )
    trainer.model.train()
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which we bypass
    # Trainer.train() prepares the model (accelerate's autocast wrapper); this benchmark bypasses train(), so do it.
    trainer.model = trainer.accelerator.prepare_model(trainer.model)
    return trainer


def main(argv=None):
    args = parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dataset = load_dataset("json", data_files=args.data, split="train")
    dataset = dataset.select(range(4 * (args.warmup + args.steps) * args.batch))
    dataset = dataset.select_columns([c for c in ("prompt", "chosen", "rejected") if c in dataset.column_names])
    trainers = {name: build(name == "bf16", args, dataset, tokenizer) for name in ("fp32", "bf16")}
    loader = iter(trainers["fp32"].get_train_dataloader())
    data = [next(loader) for _ in range(args.warmup + args.steps)]
    times, first_loss = {"fp32": [], "bf16": []}, {}
    for i, batch in enumerate(data):
        for name, trainer in trainers.items():  # alternate, so load drift hits both alike
            start = time.perf_counter()
            loss = trainer.training_step(trainer.model, batch)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            first_loss.setdefault(name, loss.item())
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(v) for name, v in times.items()}
    tokens = int(sum(b["attention_mask"].sum() for b in data[args.warmup :])) // args.steps
    result = {
        "model": args.model,
        "lora": True,
        "batch_pairs": args.batch,
        "max_length": args.max_length,
        "tokens_per_step": tokens,
        "steps_timed": args.steps,
        "seconds_per_step": median,
        "all_seconds": times,
        "bf16_over_fp32": median["bf16"] / median["fp32"],
        "step1_loss": first_loss,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
    }
    print(f"model {args.model}  LoRA  batch {args.batch} pairs  max_length {args.max_length}  {tokens} tokens/step")
    for name in ("fp32", "bf16"):
        print(f"{name}: median {median[name]:.2f} s/step  (steps {', '.join(f'{t:.2f}' for t in times[name])})")
    print(
        f"bf16 / fp32 = {result['bf16_over_fp32']:.1f}x   step-1 loss fp32 {first_loss['fp32']:.5f}  bf16 {first_loss['bf16']:.5f}"
    )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
