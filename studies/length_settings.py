"""The length study's settings: its options on top of the recipe, the arms' training flags, and the held-out pairs.

`studies/length_study.py` runs the study; what it measures and how is said there.
"""

import argparse
import json
from pathlib import Path

from trl.data_utils import maybe_extract_prompt

from otpo_trl.data import load_preference_dataset

from .common import KNOWN_ARMS, arm_flags, cpu_flags, planned_settings, run_arm


DESCRIPTION = (
    "Does the learned reward depend on length? DPO vs OTPO vs OTPO w/o OT, over seeds, with bootstrap intervals."
)

STUDY_REPORT = "reports/length_study/length_study.md"

# The recipe's values the report shows, kept in its JSON so that `--render_only` needs no recipe.
REPORTED_RECIPE = (
    "model_name_or_path",
    "dataset_name",
    "per_device_train_batch_size",
    "learning_rate",
    "beta",
    "ot_reg",
    "ot_cost_scale",
)

# The training flags the study sets for each run: refused among the flags passed on to scripts/train.py.
SET_PER_RUN = ("--config", "--trainer", "--ot_weighting", "--seed", "--output_dir", "--max_train_samples")
DEFAULT_ARMS = ["dpo", "otpo", "uniform"]
OT_LOGGED = ("ot/weight_entropy", "ot/weight_max", "ot/plan_mass")  # read back from the OTPO runs' logs
# The study's setting on top of the recipe: that of the committed reports/length_study/, sized for ~2 h on 2 CPU
# cores. Flags override it.
STUDY = {
    "max_steps": 60,
    "max_length": 256,
    "learning_rate": 1e-4,
    "train_pairs": 200,
    "held_out_train": 100,
    "test_pairs": 100,
    "seeds": [42, 43, 44],
    "num_generations": 32,
    "max_new_tokens": 128,
    "bootstrap": 2000,
    "arms": DEFAULT_ARMS,
}

HELP = {
    "max_steps": "training steps of every run",
    "max_length": "truncation of prompt + completion (train, score)",
    "learning_rate": "learning rate of every run",
    "train_pairs": "the first N train pairs are the training pool",
    "held_out_train": "the last N train pairs are held out (never trained on)",
    "test_pairs": "the first N test pairs are held out",
    "seeds": "one run per arm and seed",
    "num_generations": "held-out prompts answered greedily",
    "max_new_tokens": "token budget of each answer",
    "bootstrap": "bootstrap resamples of the held-out pairs",
    "arms": f"the arms to train, of {', '.join(KNOWN_ARMS)} (studies/common.py); with --baseline, its arms too",
}

# The ot_* settings that change neither DPO nor uniform weighting: a baseline's dpo and uniform arms may differ in them.
BASELINE_IGNORED = ("ot_reg", "ot_reg_m", "ot_cost_scale", "ot_cost", "ot_solver", "ot_max_iter", "ot_tol")

BASELINE_ARMS = ("dpo", "uniform")

# The study's settings a baseline must share (bootstrap is recomputed here, so it may differ).
BASELINE_SETTINGS = (
    "max_steps",
    "max_length",
    "learning_rate",
    "train_pairs",
    "held_out_train",
    "test_pairs",
    "seeds",
    "num_generations",
    "max_new_tokens",
    "recipe",
    "quick",
    "held_out_file",
)


QUICK = {
    "max_steps": 2,
    "max_length": 512,
    "train_pairs": 8,
    "held_out_train": 8,
    "test_pairs": 8,
    "seeds": [42],
    "num_generations": 4,
    "max_new_tokens": 8,
    "bootstrap": 200,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=DESCRIPTION, epilog="Other flags go to scripts/train.py.", allow_abbrev=False
    )  # `--seed` is train.py's, not `--seeds`
    p.add_argument("--recipe", default="configs/quickstart.yaml", help="the training recipe every arm shares")
    p.add_argument("--model", help="override the recipe's model_name_or_path")
    p.add_argument("--data", help="override the recipe's dataset_name (a folder with train.jsonl and test.jsonl)")
    p.add_argument("--quick", action="store_true", help="a tiny study for tests: " + json.dumps(QUICK))
    for key, value in STUDY.items():
        p.add_argument(
            f"--{key}",
            type=type(value[0]) if isinstance(value, list) else type(value),
            nargs="+" if isinstance(value, list) else None,
            help=f"{HELP[key]} (default {value})",
        )
    p.add_argument(
        "--held_out_file",
        help="score the pairs of this file (any of TRL's preference formats, the recipe's "
        "filters applied) instead of the test and train split slices (--test_pairs, --held_out_train); it "
        "must share no pair with the training pool",
    )
    p.add_argument(
        "--baseline",
        help="a study's JSON (e.g. reports/length_study/length_study.json) whose --baseline_arms are taken "
        "instead of trained and scored: only the other arms run. Refused, naming the difference, unless its "
        "held-out pairs, scoring, seeds and the training settings of those arms (for an arm that solves no OT "
        f"problem, all but {', '.join(sorted(BASELINE_IGNORED))}, which it does not use) are this study's",
    )
    p.add_argument(
        "--baseline_arms",
        nargs="+",
        help=f"the arms taken from --baseline, added to --arms (default {' '.join(BASELINE_ARMS)})",
    )
    p.add_argument("--out", help="folder for the runs and their scores (default out/length_study[_quick])")
    p.add_argument(
        "--report",
        help="the Markdown report, JSON and figures beside it (default "
        f"{STUDY_REPORT}; with --quick out/length_study_quick/report/length_study.md)",
    )
    p.add_argument(
        "--render_only",
        action="store_true",
        help="train and score nothing: redraw the figures and "
        "rewrite the Markdown report from the study's JSON beside --report",
    )
    args, train_flags = p.parse_known_args(argv)
    taken = sorted({f.split("=")[0] for f in train_flags} & set(SET_PER_RUN))
    if taken:
        p.error(
            f"{', '.join(taken)} cannot be passed on to scripts/train.py: the study sets them for each run "
            "(seeds: --seeds; the recipe: --recipe)."
        )
    for key, value in {**STUDY, **(QUICK if args.quick else {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.baseline_arms and not args.baseline:
        p.error("--baseline_arms needs --baseline (the study JSON to take them from).")
    args.baseline_arms = args.baseline_arms or list(BASELINE_ARMS)
    for option in ("arms", "baseline_arms"):
        arms = getattr(args, option)
        if any(a not in KNOWN_ARMS for a in arms) or len(set(arms)) != len(arms):
            p.error(f"--{option} {' '.join(arms)}: each once, of {', '.join(KNOWN_ARMS)}.")
    # An arm's own flags (say `--ot_reg` of otpo_reg0.02) define it: they are not passed on to every arm.
    pinned = sorted({f.split("=")[0] for f in train_flags} & {f for a in args.arms for f in arm_flags(a)[::2]})
    if pinned:
        p.error(f"{', '.join(pinned)}: set by the arms {' '.join(args.arms)} themselves (studies/common.py).")
    # A quick study never overwrites the real report.
    args.out = args.out or ("out/length_study_quick" if args.quick else "out/length_study")
    args.report = args.report or ("out/length_study_quick/report/length_study.md" if args.quick else STUDY_REPORT)
    args.train_flags = train_flags
    return args


def _pair_text(example):
    return json.dumps([example.get("prompt"), example["chosen"], example["rejected"]], sort_keys=True)


def held_out_pairs(args, recipe):
    """The first `test_pairs` of the test split and the last `held_out_train` of the train split (never trained on),
    after the recipe's filters, or every pair of `held_out_file` (which must share none with the training pool: the
    first `train_pairs` of the train split); each example tagged with its `source` (`test`, `train` or `file`) and
    row."""
    if recipe.get("eval_split_size") is not None:  # the training pool would be a shuffled part of the train split
        raise ValueError("the recipe sets `eval_split_size`: remove it, the study holds out its own pairs.")
    kwargs = {"drop_ties": recipe["drop_ties"], "drop_identical": recipe["drop_identical"]}
    train = load_preference_dataset(recipe["dataset_name"], recipe["dataset_train_split"], **kwargs)
    if getattr(args, "held_out_file", None):
        path = Path(args.held_out_file)
        if not path.is_file():
            raise ValueError(f"--held_out_file {path}: no such file (relative to {Path.cwd()}).")
        data = load_preference_dataset(str(path), "test", **kwargs)  # a single file is one split, whatever its name
        pairs = [{**maybe_extract_prompt(dict(e)), "source": "file", "row": i} for i, e in enumerate(data)]
        pool = {_pair_text(maybe_extract_prompt(dict(train[i]))) for i in range(min(args.train_pairs, len(train)))}
        trained = [p["row"] for p in pairs if _pair_text(p) in pool]
        if trained:
            raise ValueError(
                f"--held_out_file {path}: {len(trained)} of its pairs (rows {trained[:5]}) are in the "
                f"training pool (the first {args.train_pairs} train pairs): they are not held out."
            )
        return pairs
    if args.train_pairs + args.held_out_train > len(train):
        raise ValueError(
            f"train_pairs {args.train_pairs} + held_out_train {args.held_out_train} exceed the "
            f"{len(train)} pairs of the train split: the held-out pairs would be trained on."
        )
    test = load_preference_dataset(recipe["dataset_name"], recipe["dataset_test_split"], **kwargs)
    rows = [(test, "test", i) for i in range(min(args.test_pairs, len(test)))]
    rows += [(train, "train", i) for i in range(len(train) - args.held_out_train, len(train))]
    return [{**maybe_extract_prompt(dict(data[i])), "source": source, "row": i} for data, source, i in rows]


def train_flags(args, arm, seed, run_dir):
    flags = ["--config", args.recipe, *arm_flags(arm), "--seed", str(seed), "--max_steps", str(args.max_steps)]
    flags += ["--max_length", str(args.max_length), "--learning_rate", str(args.learning_rate)]
    flags += ["--max_train_samples", str(args.train_pairs), "--output_dir", str(run_dir)]
    flags += ["--do_eval", "false", "--eval_strategy", "no", "--report_to", "none"]
    overrides = {"model_name_or_path": args.model, "dataset_name": args.data}
    flags += [flag for key, value in overrides.items() if value for flag in (f"--{key}", value)]
    return flags + cpu_flags() + args.train_flags


def train(args, arm, seed, run_dir):
    """Train one run in this process with `scripts/train.py`'s code ([`run_arm`]), unless it has finished with these
    settings (an interrupted one resumes from its last checkpoint). True if it trained here, False if it was reused."""
    return run_arm(
        train_flags(args, arm, seed, run_dir), run_dir, on_mismatch="give the study a new --out, or delete that run"
    )


def planned_run_settings(args, arm, seed, out):
    """The settings (`run_settings`, as run_args.json records them) that the study would train `arm`-`seed` with."""
    return planned_settings(train_flags(args, arm, seed, out / f"{arm}-seed{seed}"))
