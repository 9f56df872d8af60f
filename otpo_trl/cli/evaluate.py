"""Evaluate a model (or a LoRA adapter) on preference pairs and by greedy generation.

```bash
python scripts/evaluate.py --model out/otpo-lora --data ../shared/data/ultrafeedback --split test \
    --max_samples 200 --num_generations 64 --output_dir out/eval/otpo-lora
python scripts/evaluate.py --model out/otpo-full --ref models/SmolLM2-135M-Instruct --data trl-lib/ultrafeedback_binarized
```

Writes to `--output_dir`, never over an earlier evaluation's results unless `--overwrite` (the rule, and the default
folder: docs/evaluation.md):

- `eval.json`: implicit-reward preference accuracy and mean margin (also the mean chosen and rejected rewards) with
  unweighted (w = 1 per token: DPO) and OT (OTPO) token weights, and the length statistics of greedy responses;
- `eval.md`: the same as Markdown tables;
- `generations.jsonl`: one greedy response per prompt (`index`, `prompt`, `response`, `length`, `hit_budget`).

The reference is `--ref`, else an adapter's base (the adapter disabled); a full model without `--ref` is its own
reference, and every margin is then 0. A pair counts as correct when its chosen reward is strictly larger (ties are
wrong, as in TRL's `rewards/accuracies`); with no pair scored, the accuracy and margins are `null` in `eval.json`. The
work is done by `otpo_trl.evaluation.evaluate`.

The settings follow the run evaluated ([`RUN_DEFAULTS`]): when `--model` is a training run's folder (`output_dir`)
or one of its `checkpoint-<step>` folders, `--max_length`, `--drop_ties`, `--drop_identical`, `--beta` and the `--ot_*`
options default to that run's, read from its `run_args.json` (`otpo_trl.runs`); a flag given wins. The log and
`eval.json` (`defaults_from_run`) say which values came from the run.
"""

import argparse
import contextlib
import json
import logging
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from ..evaluation import evaluate
from ..inspection import DEFAULT_MAX_LENGTH
from ..otpo_config import OT_FIELDS, OTPOConfig, ot_kwargs
from ..runs import NOT_TRAINING_ARGS, RUN_FILE, run_record_of, writable_dir
from .options import (
    add_max_length_argument,
    add_model_arguments,
    add_ot_arguments,
    boolean,
    check_ot_arguments,
    settings_from_run,
)


logger = logging.getLogger(__name__)

# The options that default to the evaluated run's setting (its run_args.json), each with its default without a run.
RUN_DEFAULTS = {
    "max_length": DEFAULT_MAX_LENGTH,
    "drop_ties": False,
    "drop_identical": False,
    "beta": 0.1,
    # ot_memory_budget fits the OT step to a machine's memory, not to the run: this machine's default
    **{f.name: f.default for f in fields(OTPOConfig) if f.name in OT_FIELDS and f.name not in NOT_TRAINING_ARGS},
}


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
        lines.append(
            f"| {label} | {m['accuracy']:.3f} | {m['margin_mean']:.4f} | {m['chosen_reward_mean']:.4f} | "
            f"{m['rejected_reward_mean']:.4f} |"
        )
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


DEFAULT_OUTPUT_DIR = "out/eval"
RESULT_FILES = ("eval.json", "eval.md", "generations.jsonl")  # what an evaluation writes: all three, every time
LOCK_FILE = ".evaluate.lock"  # held while an evaluation writes to its folder; the file stays (see `results_dir`)


def _numbered(base: Path) -> Iterator[Path]:
    """`base`, then `base-2`, `base-3`, ...: the folders the default output folder may be."""
    yield base
    for k in range(2, 10_000):
        yield base.with_name(f"{base.name}-{k}")


@contextlib.contextmanager
def results_dir(output_dir: str | None, overwrite: bool = False) -> Iterator[Path]:
    """The folder this evaluation writes its results to, chosen by the rule in docs/evaluation.md (earlier results
    are kept) and held from before any model loads until the block ends: a lock in it ([`LOCK_FILE`]) keeps a second
    evaluation out, and the results found are read with the lock held. `output_dir` None: `--output_dir` not given.
    A `ValueError` names the folder and the way out."""
    chosen = output_dir is not None or overwrite
    base = Path(output_dir or DEFAULT_OUTPUT_DIR).expanduser()
    for folder in [base] if chosen else _numbered(base):
        if not chosen and folder.exists() and not folder.is_dir():
            continue
        writable_dir(folder, "--output_dir")
        lock = FileLock(folder / LOCK_FILE)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if not chosen:
                continue
            raise ValueError(f"--output_dir {folder}: another evaluation is writing to it now.") from None
        try:
            found = [name for name in RESULT_FILES if (folder / name).exists()]  # no other evaluation writes them now
            if found and not overwrite:
                if not chosen:
                    continue
                raise ValueError(
                    f"--output_dir {folder} holds the results of an earlier evaluation ({', '.join(found)}). Give "
                    f"another --output_dir (or none: the first free {DEFAULT_OUTPUT_DIR}-<n>), or --overwrite to "
                    "replace them."
                )
            if folder != base:
                logger.info(f"{base} holds an earlier evaluation's results: this one goes to {folder}.")
            yield folder
            return
        finally:
            # The file stays: deleting it would let an evaluation waiting on the old file and one creating a new
            # file both hold "the" lock.
            lock.release()
    raise ValueError(f"No free folder {base}-<n> is left; give --output_dir.")


def write_report(result: dict[str, Any], output_dir: str | Path) -> dict[str, Path]:
    """Write `eval.json` (all but the per-pair and per-response records; a metric over no pairs is null),
    `eval.md` and `generations.jsonl`: each to a temporary file first, then all three renamed into place, so that
    earlier results being replaced are never left half-written or mixed with the new ones by an error on the way."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = _finite_or_none({k: v for k, v in result.items() if k not in ("pairs", "generations")})
    texts = {
        "eval.json": json.dumps(summary, indent=2, allow_nan=False) + "\n",
        "eval.md": format_markdown(result),
        "generations.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result["generations"]),
    }
    paths = {name: output_dir / name for name in RESULT_FILES}
    for name, text in texts.items():
        Path(f"{paths[name]}.tmp").write_text(text)
    for path in paths.values():
        os.replace(f"{path}.tmp", path)
    return paths


EPILOG = f"""Defaults from the run: when --model is the folder a training run saved (`otpo-trl train`, scripts/train.py:
its output_dir, or a checkpoint-<step> in it), --max_length, --drop_ties, --drop_identical, --beta and the --ot_*
options default to that run's values, read from its {RUN_FILE}; a flag given here wins, and the log says which values
came from the run. Without {RUN_FILE} (a Hub id, a model not trained here) the defaults are the ones listed."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, with the run's settings filled in where not given (see [`RUN_DEFAULTS`]): `args.run_file` (the
    run record read, or None), `args.from_run` and `args.given` (name -> value). Bad values exit naming the option,
    or the run record they came from, before any model loads."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EPILOG, allow_abbrev=False)
    add_model_arguments(parser)
    parser.add_argument(
        "--data",
        "--held_out_file",
        dest="data",
        required=True,
        help="Hub data set id, a local folder of split files, or one .jsonl / .json / .parquet file in any of TRL's "
        "preference formats (standard or conversational, explicit or implicit prompt), whose pairs are all scored "
        "whatever --split. --held_out_file is the same option, named as in scripts/length_study.py.",
    )
    parser.add_argument("--split", default="test", help="Split of --data (ignored for a single file). Default: test.")
    parser.add_argument(
        "--max_samples",
        type=int,
        help="Score at most this many pairs (the first ones, after --drop_ties / --drop_identical). Default: all. "
        "Cost: 4.5-6.6 s a pair for SmolLM2-135M on 2 CPU cores (docs/evaluation.md).",
    )
    parser.add_argument(
        "--drop_ties",
        type=boolean,
        nargs="?",
        const=True,
        metavar="true|false",
        help="Drop pairs whose chosen and rejected scores are equal (score_chosen == score_rejected), as training's "
        "`drop_ties` does. Default: the evaluated run's, else false.",
    )
    parser.add_argument(
        "--drop_identical",
        type=boolean,
        nargs="?",
        const=True,
        metavar="true|false",
        help="Drop pairs whose chosen equals rejected, as training's `drop_identical` does. Default: the evaluated "
        "run's, else false.",
    )
    parser.add_argument("--batch_size", type=int, default=8, help="Pairs per forward, prompts per generate call.")
    parser.add_argument(
        "--beta", type=float, help="DPO's beta for the implicit rewards. Default: the evaluated run's, else 0.1."
    )
    add_max_length_argument(parser, run_defaults=True)
    parser.add_argument(
        "--num_generations",
        type=int,
        default=64,
        help="Prompts to answer greedily (0: none). Default: 64. Cost: each batch of --batch_size prompts runs until "
        "its longest answer ends, at most --max_new_tokens steps: 0.12-0.19 s a step for SmolLM2-135M on 2 CPU cores, "
        "5-7 min for the defaults (docs/evaluation.md).",
    )
    parser.add_argument("--max_new_tokens", type=int, default=256, help="Token budget per response. Default: 256.")
    parser.add_argument(
        "--output_dir",
        help=f"Folder for the results. Default: {DEFAULT_OUTPUT_DIR}, or, if it holds an earlier evaluation's results, "
        f"the first free {DEFAULT_OUTPUT_DIR}-2, {DEFAULT_OUTPUT_DIR}-3, ... A folder given that holds results is "
        "refused unless --overwrite.",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=f"Replace the results ({', '.join(RESULT_FILES)}) in --output_dir (default: {DEFAULT_OUTPUT_DIR}) once "
        "the new ones are written; nothing else there is touched.",
    )
    parser.add_argument(
        "--disable_tqdm",
        type=boolean,
        nargs="?",
        const=True,
        default=False,
        metavar="true|false",
        help="No progress bars (as TrainingArguments' disable_tqdm). Default: false.",
    )
    add_ot_arguments(parser, run_defaults=True)
    args = parser.parse_args(argv)
    for name in ("batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1.")
    for name in ("max_samples", "num_generations"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0.")
    try:
        found = run_record_of(args.model)
    except ValueError as err:
        parser.error(str(err))
    args.run_file = found[0] if found else None
    args.from_run, args.given = settings_from_run(args, RUN_DEFAULTS, found[1]["settings"] if found else None)
    labels = {name: f"`{name}` of the run in {args.run_file}" for name in args.from_run}
    if args.max_length is not None and not (type(args.max_length) is int and args.max_length >= 1):
        parser.error(f"{labels.get('max_length', '--max_length')} must be an int >= 1, got {args.max_length!r}.")
    check_ot_arguments(parser, args, labels)  # --ot_* and --beta as OTPOConfig checks them
    return args


def _listed(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items())


def describe_settings(args: argparse.Namespace) -> str:
    """One line for the log: which of the [`RUN_DEFAULTS`] options came from the run, which were given, which are
    the defaults."""
    rest = {k: getattr(args, k) for k in RUN_DEFAULTS if k not in args.from_run and k not in args.given}
    if args.run_file is None:
        parts = [f"No {RUN_FILE} in {args.model} (not a training run's folder), so no setting comes from a run"]
    else:
        parts = [f"Settings of the run in {args.run_file}: {_listed(args.from_run) or 'none'}"]
    if args.given:
        parts.append(f"given on the command line: {_listed(args.given)}")
    if rest:
        parts.append(f"{'not in the run, ' if args.run_file else ''}the defaults: {_listed(rest)}")
    return "; ".join(parts) + "."


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s")
    logging.getLogger("otpo_trl").setLevel(logging.INFO)  # what is loaded and used as the reference
    logger.info(describe_settings(args))
    with results_dir(args.output_dir, args.overwrite) as output_dir:  # before the evaluation, not after it
        result = evaluate(
            args.model,
            args.data,
            ref=args.ref,
            split=args.split,
            max_samples=args.max_samples,
            batch_size=args.batch_size,
            beta=args.beta,
            num_generations=args.num_generations,
            max_new_tokens=args.max_new_tokens,
            max_length=args.max_length,
            drop_ties=args.drop_ties,
            drop_identical=args.drop_identical,
            device=args.device,
            dtype=args.dtype,
            progress=not args.disable_tqdm,
            **ot_kwargs(args),
        )
        result["defaults_from_run"] = {
            "file": str(args.run_file) if args.run_file else None,
            "settings": args.from_run,
        }
        paths = write_report(result, output_dir)
    if result["preference"]["n_pairs"] == 0 and args.max_samples != 0:
        logger.warning("No pair was scored: the accuracy and margins in eval.json are null.")
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
