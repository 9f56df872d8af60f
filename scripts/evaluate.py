"""Evaluate a model (or a LoRA adapter) on preference pairs and by greedy generation.

```bash
python scripts/evaluate.py --model out/otpo-lora --data ../shared/data/ultrafeedback --split test \
    --max_samples 200 --num_generations 64 --output_dir out/eval/otpo-lora
python scripts/evaluate.py --model out/otpo-full --ref models/SmolLM2-135M-Instruct --data trl-lib/ultrafeedback_binarized
```

Writes to `--output_dir`:

- `eval.json`: implicit-reward preference accuracy and mean margin (also the mean chosen and rejected rewards) with
  uniform (DPO) and OT (OTPO) token weights, and the length statistics of greedy responses;
- `eval.md`: the same as Markdown tables;
- `generations.jsonl`: one greedy response per prompt (`index`, `prompt`, `response`, `length`, `hit_budget`).

The reference is `--ref`, else an adapter's base (the adapter disabled); a full model without `--ref` is its own
reference, and every margin is then 0. A pair counts as correct when its chosen reward is strictly larger (ties are
wrong, as in TRL's `rewards/accuracies`); with no pair scored, the accuracy and margins are `null` in `eval.json`. The
work is done by `otpo_trl.analysis.evaluate`.
"""

import argparse
import logging
import sys

from otpo_trl.analysis import (
    DEFAULT_MAX_LENGTH,
    add_ot_arguments,
    evaluate,
    format_markdown,
    ot_kwargs,
    writable_dir,
    write_report,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--model", required=True, help="Model folder or Hub id, or a PEFT adapter folder.")
    parser.add_argument(
        "--ref", help="Reference model; for an adapter, the base to load it on (default: its base_model_name_or_path)."
    )
    parser.add_argument(
        "--data", required=True, help="Hub data set id, or a local .jsonl / .json / .parquet file or folder."
    )
    parser.add_argument("--split", default="test", help="Split of --data. Default: test.")
    parser.add_argument(
        "--max_samples", type=int, help="Score at most this many pairs (the first ones). Default: all."
    )
    parser.add_argument("--batch_size", type=int, default=8, help="Pairs per forward, prompts per generate call.")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO's beta for the implicit rewards. Default: 0.1.")
    parser.add_argument(
        "--max_length", type=int, default=DEFAULT_MAX_LENGTH,
        help=f"Truncate prompt + completion to this many tokens, as in training. Default: {DEFAULT_MAX_LENGTH}.",
    )  # fmt: skip
    parser.add_argument("--num_generations", type=int, default=64, help="Prompts to answer greedily (0: none).")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="Token budget per response. Default: 256.")
    parser.add_argument("--output_dir", default="out/eval", help="Folder for the results. Default: out/eval.")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    add_ot_arguments(parser)
    args = parser.parse_args(argv)
    for name in ("batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1.")
    for name in ("max_samples", "num_generations"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0.")
    if args.beta <= 0:
        parser.error("--beta must be > 0.")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s")
    logging.getLogger("otpo_trl").setLevel(logging.INFO)  # what is loaded and used as the reference
    writable_dir(args.output_dir, "--output_dir")  # before the evaluation, not after it
    result = evaluate(
        args.model, args.data, ref=args.ref, split=args.split, max_samples=args.max_samples,
        batch_size=args.batch_size, beta=args.beta, num_generations=args.num_generations,
        max_new_tokens=args.max_new_tokens, max_length=args.max_length, device=args.device, dtype=args.dtype,
        **ot_kwargs(args),
    )  # fmt: skip
    paths = write_report(result, args.output_dir)
    if result["preference"]["n_pairs"] == 0 and args.max_samples != 0:
        logging.getLogger(__name__).warning("No pair was scored: the accuracy and margins in eval.json are null.")
    print(format_markdown(result))
    print(f"Wrote {', '.join(str(p) for p in paths.values())} in {result['seconds']:.1f} s.")
    return result


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, NotADirectoryError, ValueError) as err:
        sys.exit(f"error: {err}")
