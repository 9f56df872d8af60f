"""DPO vs OTPO on the same data: train both from one recipe, evaluate both, write a Markdown report with figures.

```bash
make report   # = python scripts/compare_dpo_otpo.py (quickstart model, UltraFeedback sample, CPU, 35 min on 2 cores)
python scripts/compare_dpo_otpo.py --recipe configs/quickstart.yaml --max_steps 30 \
    --report reports/dpo_vs_otpo/dpo_vs_otpo.md
python scripts/compare_dpo_otpo.py --render_only   # rewrite the report from reports/dpo_vs_otpo/dpo_vs_otpo.json
```

Both runs use the recipe as it is (model, LoRA, data, seed, batch, learning rate) and differ only in their arm's
flags (`studies.common.KNOWN_ARMS`: `trainer: dpo` / `otpo`); `--max_steps` sets their common length. Both train in
this process through the training CLI (`studies.common.run_arm`), then each is scored in this process by
`otpo_trl.evaluation.evaluate` (what `scripts/evaluate.py` runs) on the test split: held-out preference accuracy and
margin with unweighted (w = 1 per token, DPO's sum) and OT token weights, and greedy generations with a fixed token
budget. The base model's generations are measured too, for scale. A finished run is reused only if its
`run_args.json` records the settings these flags would train (another `--max_steps` into the same `--out` is refused,
naming the difference), and an evaluation only if made with the same settings (the studies' score cache,
`studies/scoring.py`, in `<out>/scores/`), so an interrupted comparison picks up where it stopped; `--fresh` redoes
everything.
"""

import argparse
import json
import math
import shutil
import statistics
import sys
from pathlib import Path

from otpo_trl.otpo_config import OT_FIELDS, ot_kwargs

from .common import (
    arm_flags,
    at_repo_root,
    cpu_flags,
    device_name,
    image,
    log_history,
    pyplot,
    render_from_json,
    report_paths,
    resolve_recipe,
    run_arm,
    save_figure,
    table,
    training_steps,
    write_report,
)
from .scoring import ScoreCache, evaluate_model


KINDS = ("dpo", "otpo")
REPORT = "reports/dpo_vs_otpo/dpo_vs_otpo.md"
# The recipe's values the report shows, kept in its JSON so that `--render_only` needs no recipe.
REPORTED_RECIPE = (
    *("model_name_or_path", "use_peft", "lora_r", "lora_alpha", "dataset_name", "learning_rate", "beta", "seed"),
    *("per_device_train_batch_size", "gradient_accumulation_steps", "max_length"),
    *("ot_reg", "ot_reg_m", "ot_cost", "ot_normalization"),
)
CURVES = {  # logged key: (figure title, file name)
    "loss": ("Training loss", "loss.png"),
    "rewards/accuracies": ("Training reward accuracy (rolling mean of 5 steps)", "reward_accuracy.png"),
    "rewards/margins": ("Training reward margin (rolling mean of 5 steps)", "reward_margin.png"),
}
COLORS = {"dpo": "tab:blue", "otpo": "tab:orange", "base": "tab:gray"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="configs/quickstart.yaml", help="the training recipe both runs share")
    p.add_argument("--max_steps", type=int, default=30, help="training steps of each run")
    p.add_argument("--out", default="out/report", help="folder for the two runs and their evaluations")
    p.add_argument("--report", default=REPORT, help="the Markdown report (its JSON beside it, figures in figures/)")
    p.add_argument("--split", default="test", help="held-out split of the recipe's data set")
    p.add_argument("--max_samples", type=int, default=100, help="held-out pairs to score")
    p.add_argument("--num_generations", type=int, default=64, help="prompts to answer greedily")
    p.add_argument("--max_new_tokens", type=int, default=256, help="token budget of each answer")
    p.add_argument("--fresh", action="store_true", help="retrain and re-evaluate even if results exist")
    p.add_argument(
        "--render_only",
        action="store_true",
        help="train and evaluate nothing: rewrite the report (and the figures its JSON has the data for) from the "
        "JSON beside --report",
    )
    return p.parse_args(argv)


def train_flags(kind, args, recipe, run_dir):
    flags = ["--config", args.recipe, *arm_flags(kind), "--max_steps", str(args.max_steps)]
    flags += ["--output_dir", str(run_dir), "--do_eval", "false", "--eval_strategy", "no", "--report_to", "none"]
    # Enough pairs for max_steps without a second epoch (twice as many: TRL drops those whose prompt fills max_length).
    pairs = args.max_steps * recipe["per_device_train_batch_size"] * recipe["gradient_accumulation_steps"]
    return flags + ["--max_train_samples", str(2 * pairs), *cpu_flags()]


def train(kind, args, recipe, out):
    """Train `kind` into `out/kind` in this process, or reuse the finished run there if it has these settings."""
    run_dir = out / kind
    if args.fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    hint = "give the comparison a new --out, or --fresh to train both runs again"
    run_arm(train_flags(kind, args, recipe, run_dir), run_dir, on_mismatch=hint)


def evaluate_settings(name, args, recipe):
    """`otpo_trl.evaluation.evaluate`'s settings for `name` (a run, or "base"): the recipe's data, filters, beta,
    max_length and OT settings, for the base model too (it has no run whose settings to follow)."""
    # The base model is its own reference (every margin 0): only its generations are measured.
    settings = {
        "data": recipe["dataset_name"],
        "split": args.split,
        "max_samples": 0 if name == "base" else args.max_samples,
    }
    settings |= {"beta": recipe["beta"], "max_length": recipe["max_length"]}
    # The pairs and prompts training kept.
    settings |= {key: recipe.get(key, False) for key in ("drop_ties", "drop_identical")}
    # The held-out OT weights are those OTPO trained with (a recipe without them: OTPOConfig's defaults).
    settings |= ot_kwargs(argparse.Namespace(**recipe)) if all(k in recipe for k in OT_FIELDS) else {}
    # A LoRA run's reference is its base (the adapter disabled); a full run's, the recipe's model.
    settings["ref"] = recipe["model_name_or_path"] if name != "base" and not recipe["use_peft"] else None
    return settings | {"num_generations": args.num_generations, "max_new_tokens": args.max_new_tokens}


def evaluate(name, model, args, recipe, out):
    """Evaluate `model` in this process, or reuse its evaluation with the same settings from the score cache in
    `out/scores` (`studies/scoring.py`). Returns the evaluation without its per-pair records."""
    return evaluate_model(
        name, model, evaluate_settings(name, args, recipe), ScoreCache(out / "scores"), fresh=args.fresh
    )


def rolling(values, window=5):
    return [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def paired_difference(a, b):
    """Mean of a - b over the same prompts and its standard error."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    sem = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return statistics.fmean(diffs), sem


def figures(summary, fig_dir):
    """The training curves (from the JSON's `training.histories`) and the length histogram (from its
    `generation_lengths`); a figure whose data the JSON lacks is not drawn. Returns the paths drawn."""
    plt = pyplot()
    paths = []
    histories = summary["training"].get("histories")
    for key, (title, name) in CURVES.items() if histories else ():
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for kind, history in histories.items():
            values = [h[key] for h in history]
            ax.plot(
                [h["step"] for h in history],
                values if key == "loss" else rolling(values),
                label=kind.upper(),
                color=COLORS[kind],
            )
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        paths.append(save_figure(fig, fig_dir / name))
    lengths, budget = summary.get("generation_lengths"), summary["settings"]["max_new_tokens"]
    if lengths:
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        bins = list(range(0, budget + 17, 16))
        for kind, values in lengths.items():
            label = f"{kind.upper()} (mean {statistics.fmean(values):.0f})"
            ax.hist(values, bins=bins, alpha=0.5, label=label, color=COLORS[kind])
        ax.axvline(budget, color="k", linestyle=":", label=f"budget {budget}")
        ax.set_xlabel("response length (tokens)")
        ax.set_ylabel("prompts")
        ax.set_title("Greedy response lengths on held-out prompts")
        ax.legend()
        paths.append(save_figure(fig, fig_dir / "lengths.png"))
    return paths


def main(argv=None):
    """Train, evaluate and report (paths relative to the repository root); returns the JSON's dict."""
    args = parse_args(argv)
    with at_repo_root():
        if args.render_only:
            return render_only(args.report)
        return _compare(args)


def cli(argv=None):
    """`scripts/compare_dpo_otpo.py`: a refused setting or bad input exits with its message."""
    try:
        main(argv)
    except ValueError as err:
        sys.exit(f"error: {err}")


def _compare(args):
    # The recipe as scripts/train.py resolves it (its defaults included), for the report's settings.
    recipe = resolve_recipe(["--config", args.recipe])
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    # 1. Train both, same recipe, same steps.
    for kind in KINDS:
        train(kind, args, recipe, out)

    # 2. Evaluate both and the base model.
    results = {}
    for name, model in (("base", recipe["model_name_or_path"]), *((k, out / k) for k in KINDS)):
        results[name] = evaluate(name, model, args, recipe, out)

    # 3. Curves, lengths, the summary.
    keys = ("step", *CURVES)
    histories = {k: [{key: h[key] for key in keys} for h in training_steps(log_history(out / k))] for k in KINDS}
    train_results = {kind: json.loads((out / kind / "train_results.json").read_text()) for kind in KINDS}
    lengths = {name: [g["length"] for g in results[name]["generations"]] for name in ("base", *KINDS)}
    diff, sem = paired_difference(lengths["otpo"], lengths["dpo"])
    summary = {
        "recipe": args.recipe,
        "max_steps": args.max_steps,
        "split": args.split,
        "settings": {k: getattr(args, k) for k in ("max_samples", "num_generations", "max_new_tokens", "out")},
        "recipe_values": {k: recipe[k] for k in REPORTED_RECIPE},
        "held_out": {
            name: {k: v for k, v in results[name].items() if k != "generations"} for name in ("base", *KINDS)
        },
        "seconds_per_step": {k: train_results[k]["train_runtime"] / args.max_steps for k in KINDS},
        "train_runtime_s": {k: train_results[k]["train_runtime"] for k in KINDS},
        "eval_seconds": {name: results[name]["seconds"] for name in ("base", *KINDS)},
        "device": device_name(),
        "mean_length_difference_otpo_minus_dpo": diff,
        "standard_error": sem,
        "training": {
            "final_loss": {k: histories[k][-1]["loss"] for k in KINDS},
            "reward_accuracy_last_10": {
                k: statistics.fmean(h["rewards/accuracies"] for h in histories[k][-10:]) for k in KINDS
            },
            "histories": histories,
        },
        "generation_lengths": lengths,
    }
    write_report(summary, args.report, figures, render, indent=2)
    report, json_path, _ = report_paths(args.report)
    print(f"wrote {report} and {json_path}")
    return summary


def render_only(report):
    """`--render_only`: rewrite the report, and the figures whose data its JSON holds, from the JSON beside `report`."""
    summary, drawn = render_from_json(report, figures, render)
    report, json_path, _ = report_paths(report)
    kept = sorted({"loss.png", "reward_accuracy.png", "reward_margin.png", "lengths.png"} - {p.name for p in drawn})
    print(
        f"wrote {report} from {json_path}; redrew {len(drawn)} figures"
        + (f"; kept {', '.join(kept)} as they are (the JSON has no data for them)" if kept else "")
    )
    return summary


def render(summary, report_dir):
    """The Markdown report of the JSON's dict (`summary`); its figures are `report_dir/figures/`."""
    held, recipe, settings = summary["held_out"], summary["recipe_values"], summary["settings"]
    training, budget, max_steps = summary["training"], settings["max_new_tokens"], summary["max_steps"]
    fig_dir = Path(report_dir) / "figures"

    def pct(x):
        return f"{100 * x:.1f}%"

    lines = [
        "# DPO vs OTPO on the same data",
        "",
        f"Made by `python scripts/compare_dpo_otpo.py --recipe {summary['recipe']} --max_steps {max_steps}` "
        "(`make report`); re-run it to reproduce. The numbers below are read from the runs' files.",
        "",
        "## Setting",
        "",
        f"- Model `{recipe['model_name_or_path']}`, "
        + (f"LoRA r={recipe['lora_r']} alpha={recipe['lora_alpha']}, " if recipe["use_peft"] else "full fine-tuning, ")
        + f"data `{recipe['dataset_name']}`, "
        f"learning rate {recipe['learning_rate']}, beta {recipe['beta']}, seed {recipe['seed']}, "
        f"batch {recipe['per_device_train_batch_size']} pairs, max_length {recipe['max_length']}, "
        f"{max_steps} steps each (one pass over "
        f"{max_steps * recipe['per_device_train_batch_size'] * recipe['gradient_accumulation_steps']} "
        "training pairs, the same ones in the same order for both).",
        f"- OTPO: ot_reg {recipe['ot_reg']}, ot_reg_m {recipe['ot_reg_m']}, ot_cost {recipe['ot_cost']}, "
        f"ot_normalization {recipe['ot_normalization']}. DPO: the same recipe with `trainer: dpo`.",
        f"- Compute: training {summary['train_runtime_s']['dpo'] / 60:.1f} + {summary['train_runtime_s']['otpo'] / 60:.1f}"
        f" min (DPO + OTPO), evaluation {sum(summary['eval_seconds'].values()) / 60:.1f} min (base, DPO, OTPO), on "
        f"{summary['device']}.",
        f"- Held out: the first {settings['max_samples']} pairs of the `{summary['split']}` split "
        f"({held['otpo']['preference']['n_pairs']} scored, {held['otpo']['preference']['n_skipped']} skipped: prompt "
        "longer than max_length); generations for "
        f"{settings['num_generations']} of their prompts, greedy, budget {budget} new tokens.",
        "",
        "## Held-out preference accuracy and margin",
        "",
        "Implicit reward beta * (log pi - log pi_ref) summed over the completion, unweighted (w = 1 per token: DPO) "
        "or with OT (OTPO) token weights; the reference is the base model.",
        "",
    ]
    rows = []
    for kind in KINDS:
        r = held[kind]["preference"]
        rows.append(
            [
                kind.upper(),
                pct(r["unweighted"]["accuracy"]),
                pct(r["ot"]["accuracy"]),
                f"{r['unweighted']['margin_mean']:.4f}",
                f"{r['ot']['margin_mean']:.4f}",
            ]
        )
    lines += table(["model", "accuracy, unweighted", "accuracy, OT", "margin, unweighted", "margin, OT"], rows)
    lines += ["", "## Generated lengths", ""]
    rows = []
    for name in ("base", *KINDS):
        g = held[name]["generation"]
        rows.append([name.upper(), f"{g['length_mean']:.1f}", f"{g['length_median']:.1f}", pct(g["hit_budget_share"])])
    lines += table(["model", "mean tokens", "median tokens", "share at the budget"], rows)
    diff, sem = summary["mean_length_difference_otpo_minus_dpo"], summary["standard_error"]
    mean_dpo, mean_otpo = held["dpo"]["generation"]["length_mean"], held["otpo"]["generation"]["length_mean"]
    verdict = "shorter than" if diff < 0 else "longer than" if diff > 0 else "as long as"
    significant = abs(diff) > 2 * sem
    at_budget = max(held[k]["generation"]["hit_budget_share"] for k in KINDS)
    lines += [
        "",
        image("response lengths", fig_dir / "lengths.png", report_dir),
        "",
        "**Against the paper.** The paper reports shorter answers for OTPO than for DPO (Llama-3-8B-Instruct on the "
        "full UltraFeedback: mean length 1791 vs 2168, -17%). In this small run OTPO's answers are "
        f"{verdict} DPO's: mean {mean_otpo:.1f} vs {mean_dpo:.1f} tokens, a paired difference of "
        f"{diff:+.1f} ± {sem:.1f} (standard error) over the same {held['dpo']['generation']['n']} prompts, "
        + (
            "more than twice its standard error."
            if significant
            else "within twice its standard error: no length difference can be claimed at this scale."
        )
        + (
            f" {pct(at_budget)} of the answers stop at the "
            f"{budget}-token budget, which caps the lengths and hides differences beyond it."
            if at_budget > 0.2
            else ""
        )
        + f" After {max_steps} steps on `{Path(recipe['model_name_or_path']).name}` the policies stay close to "
        "the base model, so this is a check of the pipeline more than a test of the paper's claim.",
        "",
        "## Training curves",
        "",
        image("loss", fig_dir / "loss.png", report_dir),
        "",
        image("reward accuracy", fig_dir / "reward_accuracy.png", report_dir),
        "",
        image("reward margin", fig_dir / "reward_margin.png", report_dir),
        "",
    ]
    lines += table(
        ["", "DPO", "OTPO"],
        [
            ["seconds per step (train_runtime / steps)", *(f"{summary['seconds_per_step'][k]:.1f}" for k in KINDS)],
            ["final training loss", *(f"{training['final_loss'][k]:.4f}" for k in KINDS)],
            [
                "mean training reward accuracy, last 10 steps",
                *(f"{training['reward_accuracy_last_10'][k]:.2f}" for k in KINDS),
            ],
        ],
    )
    lines += [
        "",
        "The DPO and OTPO training losses are not on the same scale: OTPO's rewards sum re-weighted log-ratios. "
        "OTPO's `ot/*` diagnostics are in `" + f"{settings['out']}/otpo/trainer_state.json`.",
        "",
    ]
    return "\n".join(lines)


__all__ = ["cli", "main", "paired_difference", "parse_args", "render"]


if __name__ == "__main__":
    cli()
