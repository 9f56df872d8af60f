"""The length study's report, from its JSON's dict alone: the figures, the Markdown, and `--render_only`."""

import argparse
from pathlib import Path

import numpy as np

from .common import KNOWN_ARMS, arm_label, image, pyplot, render_from_json, report_paths, save_figure, table
from .length_settings import BASELINE_IGNORED, DEFAULT_ARMS, OT_LOGGED
from .length_stats import METRICS, answers, control_summary, significance


def listed(names) -> str:
    """`a`, `a and b`, `a, b and c`."""
    names = list(names)
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def checked_settings(baseline_arms) -> str:
    """Which training settings of a baseline's arms were checked: all but `BASELINE_IGNORED` for an arm that solves no
    OT problem, all of them for one that does."""
    ignored = ", ".join(BASELINE_IGNORED)
    solve_ot = [a for a in baseline_arms if a in KNOWN_ARMS and KNOWN_ARMS[a].solves_ot]
    if not solve_ot:
        return f"all but {ignored}"
    return f"all of them for {listed(map(arm_label, solve_ot))}, all but {ignored} for the others"


def study_arms(summary) -> list[str]:
    """The arms of a study's JSON, in its order (that of its `margins`: `<arm>-seed<seed>`)."""
    return list(dict.fromkeys(run.rsplit("-seed", 1)[0] for run in summary["margins"]))


def threads_note(compute) -> str:
    """` (torch threads: N)` where the study recorded the runs' threads; nothing where runs were trained or scored in
    other processes (`compute["torch_threads"]` None)."""
    return f" (torch threads: {compute['torch_threads']})" if compute.get("torch_threads") else ""


def greedy_cell(name, generation) -> str:
    """The results table's greedy-length cell of an arm (mean tokens, share at the budget) or of an arm difference
    (the difference of the means); "-" where an arm has no generations."""
    parts = name.split("-")
    if any(p not in generation for p in parts):
        return "-"
    means = [float(np.mean(generation[p]["lengths"])) for p in parts]
    if len(parts) == 2:
        return f"{means[0] - means[1]:+.1f}"
    return f"{means[0]:.1f} ({100 * np.mean(generation[name]['hit_budget']):.0f}% at the budget)"


def describe_arms(arms) -> str:
    """The report's line on the arms: what makes each one, from its flags."""
    if list(arms) == DEFAULT_ARMS:
        return (
            "- Arms: DPO (`trainer: dpo`), OTPO (`ot_weighting: ot`) and OTPO w/o OT (`ot_weighting: uniform`: 1 per "
            "token, then OTPO's normalisation; the paper's \"w/o OT\" ablation), trained alike."
        )
    described = []
    for arm in arms:
        flags = KNOWN_ARMS[arm].settings() if arm in KNOWN_ARMS else {}
        settings = ", ".join(f"{k.removeprefix('--')}: {v}" for k, v in flags.items())
        described.append(f"{arm_label(arm)} (`{settings}`)" if settings else arm_label(arm))
    return f"- Arms: {', '.join(described)}, trained alike."


SCATTER_COLUMNS = 4  # arms a figure row holds; more arms wrap, and the other figures make room


def figures(summary, fig_dir):
    """The study's three figures from its JSON's dict: margin vs length difference per arm, accuracy on the subsets,
    and the greedy answers' lengths. Returns their paths."""
    plt = pyplot()
    seeds, stats = summary["settings"]["seeds"], summary["stats"]
    arms = [a for a in study_arms(summary) if f"{a}-seed{seeds[0]}" in summary["margins"]]
    margins = {a: np.array([summary["margins"][f"{a}-seed{s}"] for s in seeds]) for a in arms}
    diffs = np.array([p["length_diff"] for p in summary["pairs"]], float)
    gens = {a: g["lengths"] for a, g in summary["generation"].items()}
    budget = summary["settings"]["max_new_tokens"]
    colors = {a: KNOWN_ARMS[a].color if a in KNOWN_ARMS else "C7" for a in (*arms, *gens)}
    cols = min(len(margins), SCATTER_COLUMNS)
    rows = -(-len(margins) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.6 * rows), sharey=True, squeeze=False)
    for ax in axes.ravel()[len(margins) :]:
        ax.set_visible(False)
    for ax, (arm, m) in zip(axes.ravel(), margins.items()):
        x, y = np.tile(diffs, len(m)), m.ravel()  # every seed's points
        ax.scatter(x, y, s=6, alpha=0.4, color=colors[arm])
        if np.ptp(x) > 0:
            slope, intercept = np.polyfit(x, y, 1)
            ax.plot(np.sort(x), slope * np.sort(x) + intercept, "k-", lw=1)
        ax.set_title(f"{arm_label(arm)}: corr {stats[arm]['corr_margin_length']['mean']:+.2f}")
        ax.set_xlabel("chosen - rejected tokens")
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("implicit-reward margin")
    paths = [save_figure(fig, fig_dir / "length_study_scatter.png")]

    many = len(margins) > SCATTER_COLUMNS  # the legend beside the bars, not over them
    fig, ax = plt.subplots(figsize=(6.4 + 3.6 * many, 3.6))
    for k, subset in enumerate(("acc_chosen_longer", "acc_chosen_shorter")):
        for j, arm in enumerate(margins):
            s = stats[arm][subset]
            ax.bar(
                k * (len(margins) + 1) + j,
                s["mean"],
                color=colors[arm],
                label=arm_label(arm) if k == 0 else None,
                yerr=[[s["mean"] - s["low"]], [s["high"] - s["mean"]]],
                capsize=3,
            )
    ax.set_xticks(
        [(len(margins) - 1) / 2, len(margins) + 1 + (len(margins) - 1) / 2], ["chosen longer", "chosen shorter"]
    )
    ax.set_ylabel("held-out accuracy (95% CI)")
    ax.legend(**({"loc": "upper left", "bbox_to_anchor": (1.01, 1)} if many else {}))
    paths.append(save_figure(fig, fig_dir / "length_study_subsets.png"))

    if len(gens) <= SCATTER_COLUMNS:  # few arms: their histograms overlaid
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for arm, lengths in gens.items():
            ax.hist(lengths, bins=np.linspace(0, budget, 17), alpha=0.5, color=colors[arm], label=arm_label(arm))
        ax.set_xlabel(f"greedy response length (tokens, budget {budget})")
        ax.set_ylabel("responses (all seeds)")
        ax.legend()
    else:  # many: overlaid histograms hide each other, so one box per arm, its mean marked
        fig, ax = plt.subplots(figsize=(8, 0.5 * len(gens) + 1.2))
        names = list(gens)[::-1]  # the first arm on top
        boxes = ax.boxplot(
            [gens[a] for a in names],
            vert=False,
            showmeans=True,
            patch_artist=True,
            widths=0.6,
            medianprops={"color": "k"},
            meanprops={"marker": "^", "markerfacecolor": "k", "markeredgecolor": "k"},
        )
        for box, arm in zip(boxes["boxes"], names):
            box.set(facecolor=colors[arm], alpha=0.5)
        ax.set_yticks(range(1, len(names) + 1), [arm_label(a) for a in names])
        ax.axvline(budget, color="k", ls=":", lw=1)
        ax.set_xlabel(
            f"greedy response length (tokens, all seeds; budget {budget} dotted;\nbar: median, triangle: mean)"
        )
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
    if baseline and baseline.get("moved_from"):  # the command as it runs today; the setting line names the old path
        command = command.replace(f"--baseline {baseline['moved_from']}", f"--baseline {baseline['path']}")

    def cell(s, pct):
        f = (lambda x: f"{100 * x:.1f}") if pct else (lambda x: f"{x:+.3g}")
        return f"{f(s['mean'])} [{f(s['low'])}, {f(s['high'])}]"

    pct = {"accuracy", "acc_chosen_longer", "acc_chosen_shorter", "subset_gap"}
    seed_note = (
        f"with {len(args.seeds)} seeds this is a rough guide to the seed spread, not a precise interval."
        if len(args.seeds) > 1
        else "with one seed it is the interval over pairs."
    )
    opening = control_summary(stats)
    lines = [
        f"# Length exploitation: {' vs '.join(arm_label(a) for a in study_arms(summary))}",
        "",
        *([opening, ""] if opening else []),
        f"Made by `{command}`.",
        "",
        "## Setting",
        "",
        describe_arms(study_arms(summary)),
        f"- Recipe `{args.recipe}`: model `{recipe['model_name_or_path']}`, data `{recipe['dataset_name']}`, "
        f"{args.max_steps} steps, batch {recipe['per_device_train_batch_size']}, learning rate "
        f"{recipe['learning_rate']}, beta {recipe['beta']}, max_length {args.max_length}, seeds {args.seeds}; "
        f"the first {args.train_pairs} pairs of the train split are the training pool "
        f"({'/'.join(map(str, compute['train_pool']))} left after TRL drops those whose prompt fills max_length).",
        f"- Compute: {compute.get('runs', len(per_seed))} runs, {compute['train_minutes']:.1f} min of training and "
        f"{compute['score_minutes']:.1f} min of scoring summed over the runs (process-minutes: runs in parallel "
        "processes each count), on "
        + (compute["cuda"] or f"{compute['cpu_count']} CPU cores" + threads_note(compute))
        + (
            "."
            if not compute.get("baseline_arms")
            else f". The {listed(map(arm_label, compute['baseline_arms']))} arms were not trained or scored "
            f"here: their margins and generations are those of `{baseline['path']}` ("
            + (f"`{baseline['moved_from']}` when this study ran; " if baseline.get("moved_from") else "")
            + "made by "
            f"`{compute['baseline_command']}`), whose held-out pairs, scoring, seeds and training settings for "
            f"those arms ({checked_settings(compute['baseline_arms'])}) were checked to be this study's."
        ),
        (
            f"- Held out: every pair of `{args.held_out_file}` (none of them in the training pool)"
            if args.held_out_file
            else f"- Held out: the first {args.test_pairs} pairs of the test split"
            + (f" and the last {args.held_out_train} of the train split" if args.held_out_train else "")
            + " (never trained on)"
        )
        + f"; {n_pairs} scored by every run (pairs whose prompt fills max_length are skipped)"
        + (
            f"; {cut['one_or_both']} of them with an answer cut at max_length, {cut['both']} with both cut."
            if (cut := summary.get("truncation"))
            else "."
        ),
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
        ["", *METRICS, "greedy tokens (no CI)"],
        [
            [arm_label(name), *(cell(row[k], k in pct) for k in METRICS), greedy_cell(name, gen)]
            for name, row in stats.items()
        ],
    )
    rows = []
    for name in (n for n in stats if "-" in n):
        for k in METRICS:
            r, f = stats[name][k], (lambda x: f"{100 * x:+.1f}") if k in pct else (lambda x: f"{x:+.3g}")
            rows.append(
                [
                    arm_label(name),
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
                arm_label(arm),
                seed,
                f"{100 * m['accuracy']:.1f}",
                f"{m['corr_margin_length']:+.3f}",
                f"{100 * m['acc_chosen_longer']:.1f}",
                f"{100 * m['acc_chosen_shorter']:.1f}",
            ]
            for (arm, seed), m in per_seed.items()
        ],
    )
    # The runs' own ot_reg (an arm may set another than the recipe's, e.g. OTPO at ε 0.02), from their records.
    regs = {run: (summary.get("run_settings") or {}).get(run, {}).get("ot_reg", recipe["ot_reg"]) for run in ot_logged}
    mixed_reg = any(r != recipe["ot_reg"] for r in regs.values())
    if ot_logged:
        lines += [
            "",
            "## OTPO's token weights in training",
            "",
            "The `ot/*` scalars the OTPO runs logged ("
            + (
                f"ot_cost_scale {recipe['ot_cost_scale']}, each run's ot_reg in the table"
                if mixed_reg
                else f"ot_reg {recipe['ot_reg']}, ot_cost_scale {recipe['ot_cost_scale']}"
            )
            + "), averaged over steps. ot/weight_entropy is the entropy of a completion's "
            "weights over log(length): 1 for uniform weights. ot/weight_max is a batch's largest weight, where a "
            "weight of 1 is the mean on the shorter side. Weights close to uniform leave OTPO close to its "
            "w/o OT arm.",
            "",
        ]
        lines += table(
            ["run", *(["ot_reg"] if mixed_reg else []), *OT_LOGGED],
            [
                [run, *([f"{regs[run]}"] if mixed_reg else []), *(f"{v[k]:.4g}" for k in OT_LOGGED)]
                for run, v in ot_logged.items()
            ],
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
            [arm_label(arm), f"{np.mean(g['lengths']):.1f}", f"{100 * np.mean(g['hit_budget']):.1f}%"]
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
