"""Does the learned reward depend on length? DPO vs OTPO vs OTPO w/o OT, over seeds, with bootstrap intervals.

```bash
make study                                  # = python scripts/length_study.py (~2 h on 2 CPU cores)
python scripts/length_study.py --quick      # 2 steps, 1 seed, 16 pairs (~6 min): checks the pipeline
python scripts/length_study.py --seeds 42 43 --learning_rate 5e-5   # unknown flags go to scripts/train.py
# another ot_* setting: only the otpo arm trains; dpo and uniform come from the committed study (checked first)
python scripts/length_study.py --ot_reg 0.1 --out out/length_study_reg0.1 \
    --baseline reports/length_study/length_study.json \
    --report reports/length_study_reg0.1/length_study.md
python scripts/length_study.py --held_out_file my_pairs.jsonl --report out/my_pairs/length_study.md
python scripts/length_study.py --render_only --report reports/length_study_reg0.1/length_study.md  # from its JSON
```

Three arms train from one recipe with the same data, steps, LoRA and seed: `dpo` (`trainer: dpo`), `otpo`, and
`uniform` (labelled OTPO w/o OT: `ot_weighting: uniform`, 1 per token and then OTPO's min-length normalisation, the
paper's "w/o OT" ablation). Each trained model scores every held-out pair (the first `--test_pairs` of the test split
and the last `--held_out_train` of the train split, which training never reaches) with DPO's unweighted implicit
reward (w = 1 per token, a plain sum), as `scripts/evaluate.py` does. The primary measure is corr(margin, chosen
tokens - rejected tokens): how much the reward follows length. Intervals are paired bootstrap intervals over held-out
pairs (the same resample for every arm and seed). A finished run (`all_results.json`) and a run's scores
(`scores/<run>.json`) are reused, so an interrupted study resumes; `--render_only` redraws the figures and rewrites
the report from the study's JSON alone. The reference's log-probs do not depend on the run: they are computed once
per held-out set and scoring setting (`scores/reference-<key>.json`), and scoring a run then runs only its policy.
`--held_out_file` scores every pair of a file instead of the split slices. `--baseline` takes the dpo and uniform
arms, which no `ot_*` option but `ot_weighting` / `ot_normalization` changes, from an earlier study's JSON, after
checking that they are what this study would train and score (see [`load_baseline`]); the report says so.
"""

import argparse
import hashlib
import json
import os
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from trl.data_utils import maybe_extract_prompt

from otpo_trl.data import load_preference_dataset
from otpo_trl.evaluation import generate_responses, score_preferences
from otpo_trl.loading import load_model_and_tokenizer
from otpo_trl.otpo_config import ot_kwargs
from otpo_trl.runs import describe_changes, read_run_record, settings_changes
from otpo_trl.tokenization import template_kwargs, tokenize_pair

from .common import (
    at_repo_root,
    compute_description,
    cpu_flags,
    image,
    log_history,
    mean_logged,
    planned_settings,
    pyplot,
    render_from_json,
    report_paths,
    resolve_recipe,
    run_arm,
    save_figure,
    table,
    write_report,
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
SET_PER_RUN = ("--config", "--trainer", "--ot_weighting", "--seed", "--output_dir", "--max_train_samples")
ARMS = {
    "dpo": ["--trainer", "dpo"],
    "otpo": ["--trainer", "otpo", "--ot_weighting", "ot"],
    "uniform": ["--trainer", "otpo", "--ot_weighting", "uniform"],
}
# How the reports name the arms: `uniform` is the paper's "w/o OT" (1 per token, then the same normalisation), not the
# unweighted sum the margins are scored with.
ARM_LABELS = {"dpo": "DPO", "otpo": "OTPO", "uniform": "OTPO w/o OT"}
METRICS = ("accuracy", "margin_mean", "corr_margin_length", "acc_chosen_longer", "acc_chosen_shorter", "subset_gap")
# The study's setting on top of the recipe (issue 13's measurement, sized for ~2 h on 2 CPU cores); flags override it.
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
}
OT_LOGGED = ("ot/weight_entropy", "ot/weight_max", "ot/plan_mass")  # read back from the OTPO runs' logs
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
        description=__doc__.split("\n\n")[0], epilog="Other flags go to scripts/train.py.", allow_abbrev=False
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
        help="a study's JSON (e.g. reports/length_study/length_study.json) whose dpo and uniform arms are "
        "taken instead of trained and scored: only the otpo arm runs. Refused, naming the difference, "
        "unless its held-out pairs, scoring, seeds and the training settings of those arms (all but "
        f"{', '.join(sorted(BASELINE_IGNORED))}, which they do not use) are this study's",
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
    # A quick study never overwrites the real report.
    args.out = args.out or ("out/length_study_quick" if args.quick else "out/length_study")
    args.report = args.report or ("out/length_study_quick/report/length_study.md" if args.quick else STUDY_REPORT)
    args.train_flags = train_flags
    return args


# ------------------------------------------------------------------ statistics (pure numpy)


def pair_metrics(margins, length_diffs):
    """The study's measures of (..., N) margins and length differences; every leading axis is kept.

    Returns dict of (...) arrays: `accuracy` (share of margins > 0), `margin_mean`, `corr_margin_length` (Pearson),
    `acc_chosen_longer` / `acc_chosen_shorter` (accuracy on the pairs whose length difference is > 0 / < 0; NaN when
    a subset is empty) and `subset_gap` (longer - shorter).
    """
    m, d = np.asarray(margins, float), np.asarray(length_diffs, float)
    correct = m > 0
    mc, dc = m - m.mean(-1, keepdims=True), d - d.mean(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (mc * dc).sum(-1) / np.sqrt((mc**2).sum(-1) * (dc**2).sum(-1))
        longer = (correct & (d > 0)).sum(-1) / (d > 0).sum(-1)
        shorter = (correct & (d < 0)).sum(-1) / (d < 0).sum(-1)
    return {
        "accuracy": correct.mean(-1),
        "margin_mean": m.mean(-1),
        "corr_margin_length": corr,
        "acc_chosen_longer": longer,
        "acc_chosen_shorter": shorter,
        "subset_gap": longer - shorter,
    }


def bootstrap(margins, length_diffs, n_resamples=2000, seed=0, level=0.95):
    """Per-arm means over seeds and paired bootstrap intervals, for each metric and arm difference.

    Two intervals: over held-out pairs only (this study's seeds taken as given), and over pairs and seeds (a two-level
    bootstrap: each resample also draws S seeds with replacement). Both are paired: one resample of pairs is shared by
    every arm and seed, one draw of seeds by every arm (a seed fixes the data order and the LoRA init of all arms).

    Args:
        margins: {arm: (S, N) array}, S seeds in one order for every arm, the same N held-out pairs in one order.
        length_diffs: (N,) chosen - rejected tokens.
        n_resamples, seed, level: resamples, their RNG seed, the interval level.

    Returns:
        {name: {metric: {"mean", "low", "high", "low_seeds", "high_seeds", "per_seed"}}}, name an arm or
        `"otpo-dpo"` / `"otpo-uniform"` when those arms are there; `mean` is the metric on all pairs averaged over
        seeds, `per_seed` its S values, low/high the percentile interval over pairs, low_seeds/high_seeds over pairs
        and seeds.
    """
    d = np.asarray(length_diffs, float)
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(d), size=(n_resamples, len(d)))
    counts = {np.shape(m)[0] for m in margins.values()}
    if len(counts) != 1:
        raise ValueError(f"every arm needs the same seeds, got {sorted(counts)} seeds")
    n_seeds = counts.pop()
    seeds = rng.integers(0, n_seeds, size=(n_resamples, n_seeds))  # (B, S) seed draws, shared by the arms
    columns = np.arange(n_resamples)
    per_seed, boot, boot_seeds = {}, {}, {}
    with warnings.catch_warnings():  # an empty subset gives NaN, and says so in the report
        warnings.filterwarnings("ignore", "Mean of empty slice|All-NaN slice", RuntimeWarning)
        for arm, m in margins.items():
            m = np.asarray(m, float)
            per_seed[arm] = pair_metrics(m, d)  # (S,)
            resampled = pair_metrics(m[:, index], d[index])  # (S, B)
            boot[arm] = {k: np.nanmean(v, 0) for k, v in resampled.items()}
            boot_seeds[arm] = {k: np.nanmean(v[seeds.T, columns], 0) for k, v in resampled.items()}
    for a, b in (("otpo", "dpo"), ("otpo", "uniform")):
        if a in margins and b in margins:
            for table in (per_seed, boot, boot_seeds):
                table[f"{a}-{b}"] = {k: table[a][k] - table[b][k] for k in METRICS}
    tail = 100 * (1 - level) / 2

    def interval(values):
        return float(np.nanpercentile(values, tail)), float(np.nanpercentile(values, 100 - tail))

    out = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "All-NaN slice|Mean of empty slice", RuntimeWarning)
        for name in per_seed:
            out[name] = {}
            for k in METRICS:
                (low, high), (low_s, high_s) = interval(boot[name][k]), interval(boot_seeds[name][k])
                out[name][k] = {
                    "mean": float(np.nanmean(per_seed[name][k])),
                    "low": low,
                    "high": high,
                    "low_seeds": low_s,
                    "high_seeds": high_s,
                    "per_seed": [float(x) for x in per_seed[name][k]],
                }
    return out


def significance(stats):
    """One sentence per arm difference: which metrics' 95% intervals exclude 0, over pairs and seeds or over pairs
    only, and which differences have one sign in every seed."""

    def excludes(v, lo, hi):
        return v[lo] > 0 or v[hi] < 0

    out = []
    for name in ("otpo-dpo", "otpo-uniform"):
        if name not in stats:
            continue
        rows = stats[name]
        nan = [k for k, v in rows.items() if np.isnan([v["mean"], v["low"], v["high"]]).any()]
        one_seed = len(rows[METRICS[0]]["per_seed"]) < 2  # seeds were not resampled: pairs only
        both = [k for k in METRICS if k not in nan and not one_seed and excludes(rows[k], "low_seeds", "high_seeds")]
        pairs = [k for k in METRICS if k not in nan + both and excludes(rows[k], "low", "high")]
        rest = [k for k in METRICS if k not in nan + both + pairs]
        same_sign = [
            k
            for k in METRICS
            if k not in nan
            and len(rows[k]["per_seed"]) > 1
            and (np.all(np.array(rows[k]["per_seed"]) > 0) or np.all(np.array(rows[k]["per_seed"]) < 0))
        ]
        out.append(
            f"{label(name)}: the 95% interval excludes 0 over pairs and seeds for {', '.join(both) or 'no metric'}; "
            f"over pairs only (these seeds) for {', '.join(pairs) or 'no further metric'}; it includes 0 for "
            f"{', '.join(rest) or 'no metric'}"
            + (f"; undefined (an empty subset or constant values) for {', '.join(nan)}" if nan else "")
            + f". Same sign in every seed: {', '.join(same_sign) or 'no metric'}."
        )
    return " ".join(out)


def label(name):
    """The report's name of an arm (`uniform`: OTPO w/o OT) or of an arm difference (`otpo-uniform`)."""
    return " - ".join(ARM_LABELS.get(part, part.upper()) for part in name.split("-"))


def answers(stats):
    """The study's two questions answered from the primary measure, corr(margin, length difference), with its
    intervals: does OTPO's reward follow length less than DPO's, and do OT weights add anything over OTPO w/o OT?"""
    questions = {
        "otpo-dpo": ("Does OTPO's reward depend less on length than DPO's?", "DPO's"),
        "otpo-uniform": (
            "Do OT weights add anything over OTPO w/o OT (1 per token, the same normalisation)?",
            "OTPO w/o OT's",
        ),
    }
    out = []
    for name, (question, other) in questions.items():
        if name not in stats:
            continue
        r = stats[name]["corr_margin_length"]
        if np.isnan([r["mean"], r["low"], r["high"], r["low_seeds"], r["high_seeds"]]).any():
            out.append(f"{question} Undefined: the correlation could not be computed.")
            continue
        said = (
            f"OTPO's margin-length correlation minus {other} is {r['mean']:+.3f} (95% CI over pairs "
            f"[{r['low']:+.3f}, {r['high']:+.3f}], over pairs and seeds [{r['low_seeds']:+.3f}, "
            f"{r['high_seeds']:+.3f}]; per seed {', '.join(f'{x:+.3f}' for x in r['per_seed'])})"
        )
        if len(r["per_seed"]) < 2:  # nothing to say about other seeds
            side = "below" if r["high"] < 0 else "above" if r["low"] > 0 else None
            verdict = (
                f"For this one seed only: the interval over pairs is {side} 0; other seeds are untested."
                if side
                else "Not shown for this one seed: the interval over pairs includes 0."
            )
        elif r["high_seeds"] < 0:
            verdict = "Yes, at this scale: the interval over pairs and seeds is below 0."
        elif r["low_seeds"] > 0:
            verdict = "No, the opposite at this scale: the interval over pairs and seeds is above 0."
        elif r["high"] < 0:
            verdict = "Only for these seeds: the interval over pairs is below 0, the one over pairs and seeds is not."
        elif r["low"] > 0:
            verdict = (
                "Only for these seeds, and the opposite: the interval over pairs is above 0, the one over "
                "pairs and seeds is not."
            )
        else:
            verdict = "Not shown at this scale: both intervals include 0."
        out.append(f"**{question}** {verdict} {said}.")
    return out


# ------------------------------------------------------------------ runs and scores


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
    flags = ["--config", args.recipe, *ARMS[arm], "--seed", str(seed), "--max_steps", str(args.max_steps)]
    flags += ["--max_length", str(args.max_length), "--learning_rate", str(args.learning_rate)]
    flags += ["--max_train_samples", str(args.train_pairs), "--output_dir", str(run_dir)]
    flags += ["--do_eval", "false", "--eval_strategy", "no", "--report_to", "none"]
    overrides = {"model_name_or_path": args.model, "dataset_name": args.data}
    flags += [flag for key, value in overrides.items() if value for flag in (f"--{key}", value)]
    return flags + cpu_flags() + args.train_flags


def train(args, arm, seed, run_dir):
    """Train one run in this process with `scripts/train.py`'s code ([`run_arm`]), unless it has finished with these
    settings (an interrupted one resumes from its last checkpoint)."""
    run_arm(
        train_flags(args, arm, seed, run_dir), run_dir, on_mismatch="give the study a new --out, or delete that run"
    )


def held_out_identity(args, recipe):
    """What the held-out pairs come from, so that scores of other data are never reused: the file (absolute path and
    SHA-256 of its bytes), or the recipe's data set."""
    if getattr(args, "held_out_file", None):
        path = Path(args.held_out_file).resolve()
        return {"file": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    name = recipe["dataset_name"]
    return {"dataset": os.path.abspath(name) if os.path.exists(name) else name}


def scoring_setting(args, recipe, pairs):
    """The scores' cache key: held-out pairs, their source, and the scoring settings."""
    return {
        "held_out": held_out_identity(args, recipe),
        "pairs": [[p["source"], p["row"]] for p in pairs],
        "max_length": args.max_length,
        "beta": recipe["beta"],
        "num_generations": args.num_generations,
        "max_new_tokens": args.max_new_tokens,
    }


def _log_prob_sums(model, tokenizer, pairs, args, recipe):
    """Each scored pair's summed completion log-probs under `model` alone (`weighting: uniform` solves no OT
    problem; the sums are unweighted whatever the weighting)."""
    options = {**ot_kwargs(argparse.Namespace(**recipe)), "weighting": "uniform"}
    scored = score_preferences(
        model, None, tokenizer, pairs, beta=recipe["beta"], max_length=args.max_length, progress=False, **options
    )
    return {p["index"]: p for p in scored["pairs"]}


def reference_scores(args, recipe, policy, reference, tokenizer, pairs, folder):
    """The reference's summed log-probs of every held-out pair, computed once per held-out set, scoring setting,
    reference and tokenisation, and cached in `folder` (`reference-<key>.json`): the reference (the base for an
    adapter) is the same for every run. Returns ({pair index: (chosen, rejected)}, the cache file, reused?)."""
    base = recipe["model_name_or_path"]
    tokens = hashlib.sha256(json.dumps([tokenize_pair(p, tokenizer) for p in pairs]).encode()).hexdigest()
    key = {
        **scoring_setting(args, recipe, pairs),
        "reference": os.path.abspath(base) if os.path.exists(base) else base,
        "dtype": recipe["dtype"],
        "tokens": tokens,
    }
    for k in ("num_generations", "max_new_tokens", "beta"):  # the reference's log-probs depend on none of these
        key.pop(k)
    path = folder / f"reference-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}.json"
    if path.exists() and json.loads(path.read_text())["setting"] == key:
        cached = json.loads(path.read_text())
        return {int(i): tuple(v) for i, v in cached["logps"].items()}, path, True
    start = time.perf_counter()
    if reference is policy:  # an adapter: its base, as DPOTrainer's reference forward
        with policy.disable_adapter():
            sums = _log_prob_sums(policy, tokenizer, pairs, args, recipe)
    else:
        sums = _log_prob_sums(reference, tokenizer, pairs, args, recipe)
    logps = {i: (p["chosen_logp"], p["rejected_logp"]) for i, p in sums.items()}
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"setting": key, "logps": logps, "seconds": time.perf_counter() - start}))
    return logps, path, False


def score(args, recipe, run_dir, pairs, path):
    """Unweighted margins (DPO's plain sums) and token counts of every held-out pair, and greedy generation lengths;
    cached (reused only if made with the same held-out pairs and scoring settings). The reference's log-probs come from
    [`reference_scores`]'s cache: only the policy runs here once they are there."""
    setting = scoring_setting(args, recipe, pairs)
    if path.exists() and json.loads(path.read_text())["setting"] == setting:
        print(f"{run_dir.name}: reusing {path}")
        return json.loads(path.read_text())
    start = time.perf_counter()
    ref = None if recipe["use_peft"] else recipe["model_name_or_path"]  # an adapter's reference is its base
    policy, reference, tokenizer = load_model_and_tokenizer(str(run_dir), ref=ref, dtype=recipe["dtype"] or "auto")
    ref_logps, ref_path, reused = reference_scores(args, recipe, policy, reference, tokenizer, pairs, path.parent)
    print(
        f"{run_dir.name}: scoring" + (f" (the reference's scores from {ref_path.name})" if reused else ""), flush=True
    )
    scored = _log_prob_sums(policy, tokenizer, pairs, args, recipe)
    beta = recipe["beta"]

    def margin(i, p):  # beta * ((log pi - log pi_ref)(chosen) - (log pi - log pi_ref)(rejected)), summed over tokens
        ref_c, ref_r = ref_logps[i]
        return beta * ((p["chosen_logp"] - ref_c) - (p["rejected_logp"] - ref_r))

    prompts = pairs[: args.num_generations]
    gens = generate_responses(
        policy,
        tokenizer,
        [p["prompt"] for p in prompts],
        max_new_tokens=args.max_new_tokens,
        max_prompt_length=args.max_length,
        progress=False,
        prompt_template_kwargs=[template_kwargs(p) for p in prompts],
    )
    full = {i: tokenize_pair(pairs[i], tokenizer) for i in scored}  # the whole completions: length as a reader sees it
    result = {
        "pairs": [
            {
                "source": pairs[i]["source"],
                "row": pairs[i]["row"],
                "margin": margin(i, p),
                "chosen_tokens": len(full[i]["chosen_ids"]),
                "rejected_tokens": len(full[i]["rejected_ids"]),
                "scored_tokens": [p["chosen_tokens"], p["rejected_tokens"]],
            }
            for i, p in sorted(scored.items())
        ],
        "generation_lengths": [g["length"] for g in gens],
        "hit_budget": [g["hit_budget"] for g in gens],
        "reference_scores": ref_path.name,
        "setting": setting,
        "seconds": time.perf_counter() - start,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return result


def planned_run_settings(args, arm, seed, out):
    """The settings (`run_settings`, as run_args.json records them) that the study would train `arm`-`seed` with."""
    return planned_settings(train_flags(args, arm, seed, out / f"{arm}-seed{seed}"))


def load_baseline(args, recipe, pairs, out):
    """The dpo and uniform arms of the study JSON `args.baseline`, after checking that they are what this study would
    train and score: the same study settings (seeds, held-out pairs, scoring), the same held-out data, and the same
    run settings for those arms except `BASELINE_IGNORED` (ot_* options that DPO and uniform weighting do not use).
    A JSON that records its runs' settings (`run_settings`) is checked against them; an older one against what its
    command would train with today's recipe. Raises ValueError naming every difference."""
    path = Path(args.baseline)
    if not path.is_file():
        raise ValueError(f"--baseline {path}: no such file (relative to {Path.cwd()}).")
    base = json.loads(path.read_text())
    missing = [k for k in ("settings", "pairs", "margins", "generation", "command") if k not in base]
    if missing:
        raise ValueError(f"--baseline {path} is not a length study's JSON (no {', '.join(missing)}).")
    problems = []
    for k in BASELINE_SETTINGS:
        ours, theirs = getattr(args, k, None), base["settings"].get(k)
        if k == "held_out_file":  # compared below, by content
            continue
        if ours != theirs:
            problems.append(f"{k}: {theirs!r} there, {ours!r} here")
    setting = scoring_setting(args, recipe, pairs)
    if "scoring" in base:
        for k in sorted({*setting, *base["scoring"]}):
            if setting.get(k) != base["scoring"].get(k):
                shown = "other pairs" if k == "pairs" else f"{base['scoring'].get(k)!r} there, {setting.get(k)!r} here"
                problems.append(f"scoring {k}: {shown}")
    else:  # an older JSON: its held-out pairs must be among ours, from the same data (checked by the run settings)
        ours = {(p["source"], p["row"]) for p in pairs}
        if "file" in setting["held_out"]:
            problems.append("held-out pairs: the test and train split slices there, --held_out_file here")
        elif not {(p["source"], p["row"]) for p in base["pairs"]} <= ours:
            problems.append("held-out pairs: some of its pairs are not among this study's")
    if "run_settings" in base:
        theirs_by_run, how = base["run_settings"], "the run settings it records"
    else:
        argv = shlex.split(base["command"])[2:]  # after `python scripts/length_study.py`
        old = parse_args(argv)
        theirs_by_run = {
            f"{a}-seed{s}": planned_run_settings(old, a, s, out) for a in BASELINE_ARMS for s in old.seeds
        }
        how = f"the run settings its command (`{base['command']}`) trains with today's recipe"
    wanted = {}
    for arm in BASELINE_ARMS:
        for seed in args.seeds:
            run = f"{arm}-seed{seed}"
            if run not in base["margins"]:
                problems.append(f"{run}: not in it")
                continue
            wanted[run] = planned_run_settings(args, arm, seed, out)
            ours_s = {k: v for k, v in wanted[run].items() if k not in BASELINE_IGNORED}
            theirs_s = {k: v for k, v in theirs_by_run.get(run, {}).items() if k not in BASELINE_IGNORED}
            changes = settings_changes(theirs_s, ours_s)
            if changes:
                problems.append(f"{run} trained with other settings ({describe_changes(changes)})")
    if problems:
        raise ValueError(
            f"--baseline {path} cannot stand in for this study's dpo and uniform arms (checked against "
            f"{how}): {'; '.join(problems)}. Drop --baseline to train every arm, or match its settings."
        )
    order = [(p["source"], p["row"]) for p in base["pairs"]]
    return {
        "path": str(args.baseline),
        "command": base["command"],
        "checked_against": how,
        "length_diff": {k: p["length_diff"] for k, p in zip(order, base["pairs"])},
        "margins": {
            (a, s): dict(zip(order, base["margins"][f"{a}-seed{s}"])) for a in BASELINE_ARMS for s in args.seeds
        },
        "generation": {a: base["generation"][a] for a in BASELINE_ARMS},
        "run_settings": {run: theirs_by_run.get(run, wanted[run]) for run in wanted},
    }


# ------------------------------------------------------------------ report


def figures(summary, fig_dir):
    """The study's three figures from its JSON's dict: margin vs length difference per arm, accuracy on the subsets,
    and the greedy answers' lengths. Returns their paths."""
    plt = pyplot()
    seeds, stats = summary["settings"]["seeds"], summary["stats"]
    arms = [a for a in ARMS if f"{a}-seed{seeds[0]}" in summary["margins"]]
    margins = {a: np.array([summary["margins"][f"{a}-seed{s}"] for s in seeds]) for a in arms}
    diffs = np.array([p["length_diff"] for p in summary["pairs"]], float)
    gens = {a: g["lengths"] for a, g in summary["generation"].items()}
    budget = summary["settings"]["max_new_tokens"]
    colors = {"dpo": "tab:blue", "otpo": "tab:orange", "uniform": "tab:green"}
    fig, axes = plt.subplots(1, len(margins), figsize=(4 * len(margins), 3.6), sharey=True, squeeze=False)
    for ax, (arm, m) in zip(axes[0], margins.items()):
        x, y = np.tile(diffs, len(m)), m.ravel()  # every seed's points
        ax.scatter(x, y, s=6, alpha=0.4, color=colors[arm])
        if np.ptp(x) > 0:
            slope, intercept = np.polyfit(x, y, 1)
            ax.plot(np.sort(x), slope * np.sort(x) + intercept, "k-", lw=1)
        ax.set_title(f"{label(arm)}: corr {stats[arm]['corr_margin_length']['mean']:+.2f}")
        ax.set_xlabel("chosen - rejected tokens")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("implicit-reward margin")
    paths = [save_figure(fig, fig_dir / "length_study_scatter.png")]

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for k, subset in enumerate(("acc_chosen_longer", "acc_chosen_shorter")):
        for j, arm in enumerate(margins):
            s = stats[arm][subset]
            ax.bar(
                k * (len(margins) + 1) + j,
                s["mean"],
                color=colors[arm],
                label=label(arm) if k == 0 else None,
                yerr=[[s["mean"] - s["low"]], [s["high"] - s["mean"]]],
                capsize=3,
            )
    ax.set_xticks(
        [(len(margins) - 1) / 2, len(margins) + 1 + (len(margins) - 1) / 2], ["chosen longer", "chosen shorter"]
    )
    ax.set_ylabel("held-out accuracy (95% CI)")
    ax.legend()
    paths.append(save_figure(fig, fig_dir / "length_study_subsets.png"))

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for arm, lengths in gens.items():
        ax.hist(lengths, bins=np.linspace(0, budget, 17), alpha=0.5, color=colors[arm], label=label(arm))
    ax.set_xlabel(f"greedy response length (tokens, budget {budget})")
    ax.set_ylabel("responses (all seeds)")
    ax.legend()
    paths.append(save_figure(fig, fig_dir / "length_study_generation.png"))
    return paths


FIGURES = [f"length_study_{n}.png" for n in ("scatter", "subsets", "generation")]


def render(summary, report_dir):
    """The Markdown report of the study JSON's dict (`summary`); its figures are `report_dir/figures/`."""
    args = argparse.Namespace(**{"held_out_file": None, "baseline": None, **summary["settings"]})
    recipe, command, stats, compute = summary["recipe"], summary["command"], summary["stats"], summary["compute"]
    per_seed = {tuple(run.rsplit("-seed", 1)): m for run, m in summary["per_seed"].items()}
    gen, n_pairs, ot_logged = summary["generation"], len(summary["pairs"]), summary.get("ot_logged") or {}
    baseline = summary.get("baseline")

    def cell(s, pct):
        f = (lambda x: f"{100 * x:.1f}") if pct else (lambda x: f"{x:+.3g}")
        return f"{f(s['mean'])} [{f(s['low'])}, {f(s['high'])}]"

    pct = {"accuracy", "acc_chosen_longer", "acc_chosen_shorter", "subset_gap"}
    seed_note = (
        f"with {len(args.seeds)} seeds this is a rough guide to the seed spread, not a precise interval."
        if len(args.seeds) > 1
        else "with one seed it is the interval over pairs."
    )
    lines = [
        "# Length exploitation: DPO vs OTPO vs OTPO w/o OT",
        "",
        f"Made by `{command}`.",
        "",
        "## Setting",
        "",
        "- Arms: DPO (`trainer: dpo`), OTPO (`ot_weighting: ot`) and OTPO w/o OT (`ot_weighting: uniform`: 1 per "
        "token, then OTPO's normalisation; the paper's \"w/o OT\" ablation), trained alike.",
        f"- Recipe `{args.recipe}`: model `{recipe['model_name_or_path']}`, data `{recipe['dataset_name']}`, "
        f"{args.max_steps} steps, batch {recipe['per_device_train_batch_size']}, learning rate "
        f"{recipe['learning_rate']}, beta {recipe['beta']}, max_length {args.max_length}, seeds {args.seeds}; "
        f"the first {args.train_pairs} pairs of the train split are the training pool "
        f"({'/'.join(map(str, compute['train_pool']))} left after TRL drops those whose prompt fills max_length).",
        f"- Compute: {compute.get('runs', len(per_seed))} runs, {compute['train_minutes']:.1f} min of training and "
        f"{compute['score_minutes']:.1f} min of scoring in all, on "
        + (compute["cuda"] or f"{compute['cpu_count']} CPU cores (torch threads: {compute['torch_threads']})")
        + (
            "."
            if not compute.get("baseline_arms")
            else f". The {' and '.join(label(a) for a in compute['baseline_arms'])} arms were not trained or scored "
            f"here: their margins and generations are those of `{baseline['path']}` ("
            + (f"`{baseline['moved_from']}` when this study ran; " if baseline.get("moved_from") else "")
            + "made by "
            f"`{compute['baseline_command']}`), whose held-out pairs, scoring, seeds and training settings for "
            f"those arms (all but {', '.join(BASELINE_IGNORED)}) were checked to be this study's."
        ),
        (
            f"- Held out: every pair of `{args.held_out_file}` (none of them in the training pool)"
            if args.held_out_file
            else f"- Held out: the first {args.test_pairs} test pairs and the last {args.held_out_train} train pairs "
            "(never trained on)"
        )
        + f"; {n_pairs} scored by every run (pairs whose prompt fills max_length are skipped).",
        "- Margin: beta * sum of (log pi - log pi_ref) over the completion (truncated to max_length), unweighted "
        "(w = 1 per token, DPO's sum), the reference being the base model; length difference: chosen - rejected tokens of the whole "
        "completions. corr_margin_length is Pearson's; acc_chosen_longer / shorter the accuracy on the pairs "
        "whose chosen side is longer / shorter, subset_gap their difference.",
        f"- Intervals: 95% paired percentile bootstrap ({args.bootstrap} resamples). *Over pairs*: the held-out "
        "pairs are resampled (one resample shared by every arm and seed), the seeds taken as given. *Over pairs "
        f"and seeds*: each resample also draws {len(args.seeds)} seeds with replacement (one draw shared by every "
        f"arm); {seed_note} Percentages for accuracies.",
        "",
        "## Answers (primary measure: corr_margin_length)",
        "",
        "\n\n".join(answers(stats)),
        "",
        "## Results (mean over seeds [95% CI over pairs])",
        "",
    ]
    lines += table(
        ["", *METRICS], [[label(name), *(cell(row[k], k in pct) for k in METRICS)] for name, row in stats.items()]
    )
    rows = []
    for name in (n for n in stats if "-" in n):
        for k in METRICS:
            r, f = stats[name][k], (lambda x: f"{100 * x:+.1f}") if k in pct else (lambda x: f"{x:+.3g}")
            rows.append(
                [
                    label(name),
                    k,
                    f(r["mean"]),
                    ", ".join(f(x) for x in r["per_seed"]),
                    f"[{f(r['low'])}, {f(r['high'])}]",
                    f"[{f(r['low_seeds'])}, {f(r['high_seeds'])}]",
                ]
            )
    lines += ["", "## Differences, with both intervals", ""]
    lines += table(
        ["difference", "metric", "mean", "per seed", "95% CI over pairs", "95% CI over pairs and seeds"], rows
    )
    lines += ["", f"**Significance.** {significance(stats)}", "", "## Per seed", ""]
    lines += table(
        ["arm", "seed", "accuracy", "corr", "longer", "shorter"],
        [
            [
                label(arm),
                seed,
                f"{100 * m['accuracy']:.1f}",
                f"{m['corr_margin_length']:+.3f}",
                f"{100 * m['acc_chosen_longer']:.1f}",
                f"{100 * m['acc_chosen_shorter']:.1f}",
            ]
            for (arm, seed), m in per_seed.items()
        ],
    )
    if ot_logged:
        lines += [
            "",
            "## OTPO's token weights in training",
            "",
            f"The `ot/*` scalars the OTPO runs logged (ot_reg {recipe['ot_reg']}, ot_cost_scale "
            f"{recipe['ot_cost_scale']}), averaged over steps. ot/weight_entropy is the entropy of a completion's "
            "weights over log(length): 1 for uniform weights. ot/weight_max is a batch's largest weight, where a "
            "weight of 1 is the mean on the shorter side. Weights close to uniform leave OTPO close to its "
            "w/o OT arm.",
            "",
        ]
        lines += table(
            ["run", *OT_LOGGED], [[run, *(f"{v[k]:.4g}" for k in OT_LOGGED)] for run, v in ot_logged.items()]
        )
    lines += [
        "",
        f"## Greedy generations ({args.num_generations} held-out prompts, budget {args.max_new_tokens})",
        "",
        "An answer cut at the budget counts as the budget: where many are cut, the means are lower bounds.",
        "",
    ]
    lines += table(
        ["arm", "mean tokens", "share at the budget"],
        [
            [label(arm), f"{np.mean(g['lengths']):.1f}", f"{100 * np.mean(g['hit_budget']):.1f}%"]
            for arm, g in gen.items()
        ],
    )
    figure_dir = Path(report_dir) / "figures"
    lines += ["", *(image(Path(name).stem, figure_dir / name, report_dir) + "\n" for name in FIGURES)]
    return "\n".join(lines)


def render_only(report):
    """`--render_only`: redraw the figures and rewrite the Markdown from the JSON beside `report`; trains nothing."""
    summary, paths = render_from_json(report, figures, render)
    report, json_path, _ = report_paths(report)
    print(f"wrote {report} and {len(paths)} figures from {json_path}")
    return summary


def main(argv=None):
    """Run the study (paths, the recipe's included, are relative to the repository root); returns the JSON's dict."""
    with at_repo_root():  # training runs in this process: the recipe's relative paths must resolve as in `make`
        args = parse_args(argv)
        if args.render_only:
            return render_only(args.report)
        return _study(args, " ".join(["python scripts/length_study.py", *(sys.argv[1:] if argv is None else argv)]))


def cli(argv=None):
    """`scripts/length_study.py`: a refused setting or bad input exits with its message."""
    try:
        main(argv)
    except ValueError as err:
        sys.exit(f"error: {err}")


def _study(args, command):
    out, report = Path(args.out).resolve(), Path(args.report).resolve()
    # The recipe as the runs resolve it (scripts/train.py's parser, its defaults and checks included).
    recipe = resolve_recipe(train_flags(args, "otpo", args.seeds[0], out))
    pairs = held_out_pairs(args, recipe)

    baseline = load_baseline(args, recipe, pairs, out) if args.baseline else None
    trained_arms = [a for a in ARMS if baseline is None or a not in BASELINE_ARMS]
    scores = {}
    for arm in trained_arms:
        for seed in args.seeds:
            run_dir = out / f"{arm}-seed{seed}"
            train(args, arm, seed, run_dir)
            scores[arm, seed] = score(args, recipe, run_dir, pairs, out / "scores" / f"{run_dir.name}.json")

    # The pairs every run scored, in one order (the same tokenizer skips the same ones).
    table_ = {k: {(p["source"], p["row"]): p for p in s["pairs"]} for k, s in scores.items()}
    keys = set.intersection(*(set(t) for t in table_.values()))
    if baseline is not None:
        keys &= set(baseline["length_diff"])
        table_ |= baseline["margins"]
    order = sorted(keys)
    first = next(iter(scores.values()))
    first = {(p["source"], p["row"]): p for p in first["pairs"]}
    diffs = np.array([first[k]["chosen_tokens"] - first[k]["rejected_tokens"] for k in order], float)
    if baseline is not None:
        changed = [k for k, d in zip(order, diffs) if baseline["length_diff"][k] != d]
        if changed:
            raise ValueError(
                f"--baseline {baseline['path']}: the length differences of {len(changed)} pairs (e.g. "
                f"{changed[0]}) differ from this study's: another tokenizer or data."
            )

    def margin(entry):
        return entry["margin"] if isinstance(entry, dict) else entry

    margins = {arm: np.array([[margin(table_[arm, s][k]) for k in order] for s in args.seeds]) for arm in ARMS}
    stats = bootstrap(margins, diffs, n_resamples=args.bootstrap)
    per_seed = {
        (arm, s): {k: stats[arm][k]["per_seed"][i] for k in METRICS} for arm in ARMS for i, s in enumerate(args.seeds)
    }
    gen = {
        arm: {
            "lengths": sum((scores[arm, s]["generation_lengths"] for s in args.seeds), []),
            "hit_budget": sum((scores[arm, s]["hit_budget"] for s in args.seeds), []),
        }
        for arm in trained_arms
    }
    if baseline is not None:
        gen = {arm: baseline["generation"][arm] if arm in BASELINE_ARMS else gen[arm] for arm in ARMS}

    runs = [f"{arm}-seed{seed}" for arm, seed in scores]
    finished = [json.loads((out / run / "all_results.json").read_text()) for run in runs]
    compute = {
        "train_minutes": sum(r["train_runtime"] for r in finished) / 60,
        "score_minutes": sum(s["seconds"] for s in scores.values()) / 60,
        "train_pool": sorted({r.get("train_samples") for r in finished}, key=str),
        **compute_description(),
        "runs": len(runs),
        "baseline_arms": list(BASELINE_ARMS) if baseline else [],
        "baseline_command": baseline["command"] if baseline else None,
    }
    # How far from uniform OTPO's weights were in training: the ot/* scalars each run logged, averaged over steps.
    ot_logged = {}
    for run in (r for r in runs if r.startswith("otpo-")):
        logged = mean_logged(log_history(out / run), OT_LOGGED)
        if logged:
            ot_logged[run] = logged

    records = {run: read_run_record(out / run) for run in runs}
    recorded = {run: record["settings"] for run, record in records.items() if record is not None}
    summary = {
        "command": command,
        "settings": {k: getattr(args, k) for k in (*STUDY, "recipe", "quick", "held_out_file", "baseline")},
        "recipe": {k: recipe[k] for k in REPORTED_RECIPE},
        "scoring": scoring_setting(args, recipe, pairs),
        "run_settings": {**(baseline["run_settings"] if baseline else {}), **recorded},
        "baseline": None
        if baseline is None
        else {k: baseline[k] for k in ("path", "command", "checked_against")} | {"arms": list(BASELINE_ARMS)},
        "stats": stats,
        "per_seed": {f"{a}-seed{s}": m for (a, s), m in per_seed.items()},
        "pairs": [{"source": k[0], "row": k[1], "length_diff": d} for k, d in zip(order, diffs.tolist())],
        "margins": {f"{a}-seed{s}": margins[a][i].tolist() for a in ARMS for i, s in enumerate(args.seeds)},
        "generation": gen,
        "compute": compute,
        "ot_logged": ot_logged,
    }
    paths = write_report(summary, report, figures, render, indent=1)
    report, json_path, _ = report_paths(report)
    print(f"wrote {report}, {json_path} and {len(paths)} figures")
    return summary


__all__ = [
    "answers",
    "bootstrap",
    "cli",
    "load_baseline",
    "main",
    "pair_metrics",
    "parse_args",
    "reference_scores",
    "render",
    "significance",
]


if __name__ == "__main__":
    cli()
