"""Evaluate a model (or a LoRA adapter) on preference pairs and by greedy generation.

```bash
python scripts/evaluate.py --model out/otpo-lora --data ../shared/data/ultrafeedback --split test \
    --max_samples 200 --num_generations 64 --output_dir out/eval/otpo-lora
python scripts/evaluate.py --model out/otpo-full --ref models/SmolLM2-135M-Instruct --data trl-lib/ultrafeedback_binarized
```

Writes to `--output_dir`:

- `eval.json`: implicit-reward preference accuracy and mean margin (also the mean chosen and rejected rewards) with
  unweighted (w = 1 per token: DPO) and OT (OTPO) token weights, and the length statistics of greedy responses;
- `eval.md`: the same as Markdown tables;
- `generations.jsonl`: one greedy response per prompt (`index`, `prompt`, `response`, `length`, `hit_budget`).

The reference is `--ref`, else an adapter's base (the adapter disabled); a full model without `--ref` is its own
reference, and every margin is then 0. A pair counts as correct when its chosen reward is strictly larger (ties are
wrong, as in TRL's `rewards/accuracies`); with no pair scored, the accuracy and margins are `null` in `eval.json`. The
work is done by `otpo_trl.analysis.evaluate`.
"""

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from ..analysis import evaluate
from ..otpo_config import ot_kwargs
from .options import add_max_length_argument, add_model_arguments, add_ot_arguments, check_ot_arguments
from .run_dir import writable_dir


def format_markdown(result: dict[str, Any]) -> str:
    """A Markdown report of one [`evaluate`] result: the preference table (unweighted vs OT) and the generation one."""
    pref = result["preference"]
    reference = result["reference"] or "none: the policy is its own reference, so every margin is 0"
    lines = [
        f"# Evaluation of `{result['model']}`",
        "",
        f"Data: `{result['data']}` [{result['split']}], {pref['n_pairs']} pairs"
        + (f" ({pref['n_skipped']} skipped: prompt longer than max_length)" if pref["n_skipped"] else "")
        + f"; reference: {reference}; beta = {result['beta']}.",
        "OT: " + ", ".join(f"{k}={v}" for k, v in result["ot"].items()) + ".",
        "",
        "| token weights | accuracy | mean margin | mean chosen reward | mean rejected reward |",
        "|---|---:|---:|---:|---:|",
    ]
    for weighting, label in (("unweighted", "unweighted (DPO)"), ("ot", "OT (OTPO)")):
        m = pref[weighting]
        lines.append(f"| {label} | {m['accuracy']:.3f} | {m['margin_mean']:.4f} | {m['chosen_reward_mean']:.4f} | "
                     f"{m['rejected_reward_mean']:.4f} |")  # fmt: skip
    lines += ["", "Accuracy: share of pairs whose chosen reward is strictly larger (ties count as wrong, as in TRL)."]
    gen = result["generation"]
    if gen is not None:
        lines += [
            "",
            f"Greedy generation, {gen['n']} prompts, budget {gen['max_new_tokens']} new tokens:",
            "",
            "| mean length | median length | share hitting the budget |",
            "|---:|---:|---:|",
            f"| {gen['length_mean']:.1f} | {gen['length_median']:.1f} | {gen['hit_budget_share']:.3f} |",
        ]
    return "\n".join(lines) + "\n"


def _finite_or_none(value):
    """`value` with every NaN or infinite float (a mean over no pairs) as None: JSON has no NaN, only null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def write_report(result: dict[str, Any], output_dir: str | Path) -> dict[str, Path]:
    """Write `eval.json` (all but the per-pair and per-response records; a metric over no pairs is null),
    `eval.md` and `generations.jsonl`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: output_dir / name for name in ("eval.json", "eval.md", "generations.jsonl")}
    summary = _finite_or_none({k: v for k, v in result.items() if k not in ("pairs", "generations")})
    paths["eval.json"].write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    paths["eval.md"].write_text(format_markdown(result))
    with paths["generations.jsonl"].open("w") as f:
        for record in result["generations"]:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return paths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    add_model_arguments(parser)
    parser.add_argument(
        "--data", "--held_out_file", dest="data", required=True,
        help="Hub data set id, a local folder of split files, or one .jsonl / .json / .parquet file in any of TRL's "
        "preference formats (standard or conversational, explicit or implicit prompt), whose pairs are all scored "
        "whatever --split. --held_out_file is the same option, named as in scripts/length_study.py.",
    )  # fmt: skip
    parser.add_argument("--split", default="test", help="Split of --data (ignored for a single file). Default: test.")
    parser.add_argument(
        "--max_samples", type=int, help="Score at most this many pairs (the first ones). Default: all."
    )
    parser.add_argument("--batch_size", type=int, default=8, help="Pairs per forward, prompts per generate call.")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO's beta for the implicit rewards. Default: 0.1.")
    add_max_length_argument(parser)
    parser.add_argument("--num_generations", type=int, default=64, help="Prompts to answer greedily (0: none).")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="Token budget per response. Default: 256.")
    parser.add_argument("--output_dir", default="out/eval", help="Folder for the results. Default: out/eval.")
    add_ot_arguments(parser)
    args = parser.parse_args(argv)
    for name in ("batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1.")
    for name in ("max_samples", "num_generations"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0.")
    check_ot_arguments(parser, args)  # --ot_* and --beta as OTPOConfig checks them
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


def cli(argv: list[str] | None = None) -> None:
    """`scripts/evaluate.py`: bad input exits with its message."""
    try:
        main(argv)
    except (FileNotFoundError, NotADirectoryError, ValueError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    cli()
