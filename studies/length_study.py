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

By default three arms train from one recipe with the same data, steps, LoRA and seed: `dpo` (`trainer: dpo`), `otpo`,
and `uniform` (labelled OTPO w/o OT: `ot_weighting: uniform`, 1 per token and then OTPO's min-length normalisation, the
paper's "w/o OT" ablation). Each trained model scores every held-out pair (the first `--test_pairs` of the test split
and the last `--held_out_train` of the train split, which training never reaches) with DPO's unweighted implicit reward
(w = 1 per token, a plain sum), as `scripts/evaluate.py` does. The primary measure is corr(margin, chosen tokens -
rejected tokens): how much the reward follows length. Intervals are paired bootstrap intervals over held-out pairs (the
same resample for every arm and seed). `--arms` picks other arms of `studies/common.py`'s `KNOWN_ARMS` (the peer
methods LD-DPO, TRL's `sigmoid_norm`, SamPO among them).

A finished run (`all_results.json`) is reused, and so are scores: they are kept in one cache, `<out>/scores/`
(`studies/scoring.py`), each entry under a key of the settings that made it. The reference's log-probs do not depend
on the run: one entry per held-out set and scoring setting (`reference-<key>.json`) serves every run, whose own entry
(`<run>-<key>.json`) then takes only its policy's forward. So an interrupted study resumes; `--render_only` redraws
the figures and rewrites the report from the study's JSON alone. `--held_out_file` scores every pair of a file
instead of the split slices. `--baseline` takes the dpo and uniform arms, which no `ot_*` option but `ot_weighting` /
`ot_normalization` changes, from an earlier study's JSON, after checking that they are what this study would train
and score (see [`load_baseline`]); the report says so.

The study's parts: its settings and held-out pairs (`length_settings.py`), scoring (`scoring.py`), statistics
(`length_stats.py`), the baseline (`length_baseline.py`) and the report (`length_report.py`).
"""

import json
import sys
from pathlib import Path

import numpy as np

from otpo_trl.runs import read_run_record

from .common import (
    KNOWN_ARMS,
    at_repo_root,
    compute_description,
    log_history,
    mean_logged,
    report_paths,
    resolve_recipe,
    write_report,
)
from .length_baseline import load_baseline
from .length_report import figures, render, render_only
from .length_settings import (
    OT_LOGGED,
    REPORTED_RECIPE,
    STUDY,
    STUDY_REPORT,
    held_out_pairs,
    parse_args,
    train,
    train_flags,
)
from .length_stats import METRICS, answers, bootstrap, pair_metrics, significance
from .scoring import ScoreCache, reference_scores, score_run, scoring_setting


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
    # The recipe as the runs resolve it (scripts/train.py's parser, its defaults and checks included; the otpo arm's
    # flags, so that its ot_* settings are there to report).
    recipe = resolve_recipe(train_flags(args, "otpo", args.seeds[0], out))
    pairs = held_out_pairs(args, recipe)
    cache = ScoreCache(out / "scores")

    baseline = load_baseline(args, recipe, pairs, out) if args.baseline else None
    from_baseline = args.baseline_arms if baseline is not None else []
    # The study's arms in the reports' order: those given, and those of the baseline.
    arms = [a for a in KNOWN_ARMS if a in args.arms or a in from_baseline]
    trained_arms = [a for a in arms if a not in from_baseline]
    if not trained_arms:
        raise ValueError(f"--arms {' '.join(args.arms)}: every arm comes from --baseline, none is left to train.")
    scores, trained_here = {}, []
    for arm in trained_arms:
        for seed in args.seeds:
            run_dir = out / f"{arm}-seed{seed}"
            trained_here.append(train(args, arm, seed, run_dir))
            scores[arm, seed] = score_run(args, recipe, run_dir, pairs, cache)

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

    # How many scored pairs had an answer cut at max_length (margins then sum fewer tokens than the length difference
    # counts; both cut: trained and scored at one length, where LD-DPO is DPO).
    cut = [
        [a < b for a, b in zip(first[k]["scored_tokens"], (first[k]["chosen_tokens"], first[k]["rejected_tokens"]))]
        for k in order
    ]
    truncation = {"one_or_both": sum(any(c) for c in cut), "both": sum(all(c) for c in cut)}

    def margin(entry):
        return entry["margin"] if isinstance(entry, dict) else entry

    margins = {arm: np.array([[margin(table_[arm, s][k]) for k in order] for s in args.seeds]) for arm in arms}
    stats = bootstrap(margins, diffs, n_resamples=args.bootstrap)
    per_seed = {
        (arm, s): {k: stats[arm][k]["per_seed"][i] for k in METRICS} for arm in arms for i, s in enumerate(args.seeds)
    }
    gen = {
        arm: {
            "lengths": sum((scores[arm, s]["generation_lengths"] for s in args.seeds), []),
            "hit_budget": sum((scores[arm, s]["hit_budget"] for s in args.seeds), []),
        }
        for arm in trained_arms
    }
    if baseline is not None:
        gen = {arm: baseline["generation"][arm] if arm in from_baseline else gen[arm] for arm in arms}

    runs = [f"{arm}-seed{seed}" for arm, seed in scores]
    machine = compute_description()
    finished = [json.loads((out / run / "all_results.json").read_text()) for run in runs]
    compute = {
        "train_minutes": sum(r["train_runtime"] for r in finished) / 60,
        "score_minutes": sum(s["seconds"] for s in scores.values()) / 60,
        "train_pool": sorted({r.get("train_samples") for r in finished}, key=str),
        **machine,
        "runs": len(runs),
        # The threads this process gave torch are the runs' only if it trained and scored them all (runs trained or
        # scored elsewhere, e.g. several at a time, leave it None: the report then names no thread count).
        "torch_threads": machine["torch_threads"]
        if all(trained_here) and {s.get("torch_threads") for s in scores.values()} == {machine["torch_threads"]}
        else None,
        "baseline_arms": from_baseline,
        "baseline_command": baseline["command"] if baseline else None,
    }
    # How far from uniform OTPO's weights were in training: the ot/* scalars each run logged, averaged over steps.
    ot_logged = dict(baseline["ot_logged"]) if baseline else {}
    ot_arms = {a for a in trained_arms if KNOWN_ARMS[a].solves_ot}
    for run in (r for r in runs if r.rsplit("-seed", 1)[0] in ot_arms):
        logged = mean_logged(log_history(out / run), OT_LOGGED)
        if logged:
            ot_logged[run] = logged

    records = {run: read_run_record(out / run) for run in runs}
    recorded = {run: record["settings"] for run, record in records.items() if record is not None}
    summary = {
        "command": command,
        "settings": {
            k: getattr(args, k) for k in (*STUDY, "recipe", "quick", "held_out_file", "baseline", "baseline_arms")
        },
        "recipe": {k: recipe[k] for k in REPORTED_RECIPE},
        "scoring": scoring_setting(args, recipe, pairs),
        "run_settings": {**(baseline["run_settings"] if baseline else {}), **recorded},
        "baseline": None
        if baseline is None
        else {k: baseline[k] for k in ("path", "command", "checked_against")} | {"arms": from_baseline},
        "stats": stats,
        "per_seed": {f"{a}-seed{s}": m for (a, s), m in per_seed.items()},
        "pairs": [{"source": k[0], "row": k[1], "length_diff": d} for k, d in zip(order, diffs.tolist())],
        "truncation": truncation,
        "margins": {f"{a}-seed{s}": margins[a][i].tolist() for a in arms for i, s in enumerate(args.seeds)},
        "generation": gen,
        "compute": compute,
        "ot_logged": ot_logged,
    }
    paths = write_report(summary, report, figures, render, indent=1)
    report, json_path, _ = report_paths(report)
    print(f"wrote {report}, {json_path} and {len(paths)} figures")
    return summary


__all__ = [
    "METRICS",
    "STUDY",
    "STUDY_REPORT",
    "answers",
    "bootstrap",
    "cli",
    "held_out_pairs",
    "load_baseline",
    "main",
    "pair_metrics",
    "parse_args",
    "reference_scores",
    "render",
    "render_only",
    "significance",
]


if __name__ == "__main__":
    cli()
