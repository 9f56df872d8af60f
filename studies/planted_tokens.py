"""What OTPO's transport plan weights, without training: held-out pairs with a known planted span.

```bash
python scripts/planted_tokens.py                 # -> reports/planted_tokens/ (~20 min on 2 busy CPU cores)
python scripts/planted_tokens.py --render_only   # rewrite the report and its figure from its JSON
```

Held-out pairs (the test split) become three kinds of variant, each with a known planted span (how, in
`studies/planted_variants.py`): `filler`, a generic closing appended to the rejected answer; `swap`, the chosen answer
with one number or entity changed as the rejected answer; `insert`, an off-topic sentence in the middle of the chosen
answer. A pair is kept only if prompt + each answer fits `--max_length` (nothing is truncated). A side's tokens fall
in three groups: `span` (the planted tokens), `before` and `after` it (the template's end-of-turn tokens included).
The pairs go through `pair_token_stats` (the trainer's tokenisation and forward) once; every weighting is computed
from the same last hidden states: OT at each ε and cost scale (OTPOConfig's other defaults), w/o OT (`uniform`) and
SamPO (`sampo`, averaged over draws).

Per pair and group, on the group's side: the share ratio, (group's share of the side's total weight) / (its share of
the side's tokens): 1 as w/o OT, > 1 the weighting singles the group out, < 1 it discounts it; and the AUROC of the
weights, group tokens against the side's other tokens (P(w_group > w_other), ties counted 1/2; 0.5: no signal).
Means over pairs, with 95% percentile bootstrap intervals over pairs.
"""

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from otpo_trl.data import load_preference_dataset
from otpo_trl.evaluation import OT_DEFAULTS
from otpo_trl.inspection import pair_token_stats
from otpo_trl.loading import load_model_and_tokenizer
from otpo_trl.ot import ot_token_weights
from otpo_trl.tokenization import tokenize_pair

from .common import at_repo_root, device_name, image, pyplot, render_from_json, save_figure, table, write_report
from .planted_variants import ENTITIES, FILLERS, IRRELEVANT, KINDS, build_variants


REPORT = "reports/planted_tokens/planted_tokens.md"
GROUPS = ("before", "span", "after")
SHOWN = ("span", "after")  # the groups of the Markdown tables and the figure (all three are in the JSON)
MEASURES = ("share_ratio", "auroc")
ROUNDING = 1e-9  # below this, a share ratio's distance from 1 (an AUROC's from 0.5) is rounding, not a finding
FIGURE = "planted_tokens.png"


# ------------------------------------------------------------------ the measures (pure torch / numpy)


def group_masks(positions: list[int], n_tokens: int) -> dict[str, torch.Tensor]:
    """(n_tokens,) bool masks of the `before`, `span` and `after` tokens of a side whose planted tokens are
    `positions` (contiguous)."""
    k = torch.arange(n_tokens)
    return {"before": k < positions[0], "span": (k >= positions[0]) & (k <= positions[-1]), "after": k > positions[-1]}


def group_measures(weights: torch.Tensor, group: torch.Tensor) -> tuple[float, float]:
    """(share ratio, AUROC) of the `group` (bool, (n,)) of one side's `weights` (n,): the group's share of the total
    weight over its share of the tokens, and P(w_group > w_other) + P(w_group = w_other) / 2 over all pairs of a
    group token and another token. NaN when the group or the rest is empty, or the weights sum to 0."""
    w = weights.double()
    inside, outside = w[group], w[~group]
    if not len(inside) or not len(outside) or not w.sum() > 0:
        return float("nan"), float("nan")
    ratio = (inside.sum() / w.sum()) / (len(inside) / len(w))
    greater = (inside[:, None] > outside[None, :]).double().mean()
    ties = (inside[:, None] == outside[None, :]).double().mean()
    return float(ratio), float(greater + ties / 2)


def bootstrap_mean(values, index: np.ndarray, level: float = 0.95) -> dict[str, float]:
    """Mean of the per-pair `values` (N,) (NaN pairs left out) and its percentile interval over the resamples
    `index` (B, N) of pairs."""
    v, tail = np.asarray(values, float), 100 * (1 - level) / 2
    with warnings.catch_warnings():  # a group no pair of a resample has (e.g. no token before the span): NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(v[index], 1)
        low, high = np.nanpercentile(means, [tail, 100 - tail])
        return {"mean": float(np.nanmean(v)), "low": float(low), "high": float(high)}


# ------------------------------------------------------------------ scoring


def weightings(regs, scales) -> dict[str, dict]:
    """{label: keyword arguments of `ot_token_weights`}: w/o OT, SamPO, then OT at each ε of each cost scale
    (OTPOConfig's other defaults)."""
    out = {"w/o OT": {**OT_DEFAULTS, "weighting": "uniform"}, "SamPO": {**OT_DEFAULTS, "weighting": "sampo"}}
    for scale in scales:
        for reg in regs:
            name = f"OT ε {reg:g}" + ("" if scale == "official" else f", {scale}")
            out[name] = {**OT_DEFAULTS, "reg": reg, "cost_scale": scale}
    return out


def score(policy, tokenizer, variants, settings, *, max_length, batch_size, draws, seed) -> list[dict]:
    """Per variant, {setting: {side: {group: [share ratio, AUROC]}}} on each side with a planted span: one forward
    per batch of similar lengths (`pair_token_stats`), then every setting's weights from its hidden states; a random
    weighting (SamPO) averaged over `draws` draws."""
    generator = torch.Generator().manual_seed(seed)
    order = sorted(range(len(variants)), key=lambda i: sum(variants[i].n_tokens.values()), reverse=True)
    out, started = [None] * len(variants), time.perf_counter()
    for start in range(0, len(order), batch_size):
        batch = [variants[i] for i in order[start : start + batch_size]]
        examples = [v.example for v in batch]  # the states only: every weighting is computed from them below
        stats = pair_token_stats(
            policy, None, tokenizer, examples, max_length=max_length, token_weights=False, return_hidden=True
        )
        for k, v in enumerate(batch):  # the tokens the positions were taken from: nothing truncated or shifted
            for side in ("chosen", "rejected"):
                ids = getattr(stats, f"{side}_ids")[k][getattr(stats, f"{side}_mask")[k]].tolist()
                if ids != tokenize_pair(v.example, tokenizer)[f"{side}_ids"]:
                    raise RuntimeError(f"data row {v.row}: the scored {side} tokens are not the trainer's")
        states = (stats.chosen_hidden, stats.rejected_hidden, stats.chosen_mask, stats.rejected_mask)
        sums = [{n: {s: {g: np.zeros(2) for g in GROUPS} for s in v.positions} for n in settings} for v in batch]
        for name, options in settings.items():
            n_draws = draws if options["weighting"] == "sampo" else 1
            for _ in range(n_draws):
                extra = {"generator": generator} if options["weighting"] == "sampo" else {}
                weights = dict(zip(("chosen", "rejected"), ot_token_weights(*states, **options, **extra)))
                for k, v in enumerate(batch):
                    for side, positions in v.positions.items():
                        w = weights[side][k, : v.n_tokens[side]].cpu()
                        for group, mask in group_masks(positions, v.n_tokens[side]).items():
                            sums[k][name][side][group] += np.array(group_measures(w, mask)) / n_draws
        for i, s in zip(order[start : start + batch_size], sums):
            out[i] = {
                n: {side: {g: x.tolist() for g, x in groups.items()} for side, groups in s[n].items()} for n in s
            }
        print(f"  {start + len(batch)}/{len(variants)} pairs, {time.perf_counter() - started:.0f} s", flush=True)
    return out


def summarize(variants, measures, settings, *, n_resamples, seed) -> dict:
    """One kind's results, {setting: {side: {group: {"share_ratio" | "auroc": bootstrap_mean}}}}, and per pair."""
    index = np.random.default_rng(seed).integers(0, len(variants), size=(n_resamples, len(variants)))

    def cell(name, side, group):
        return {m: bootstrap_mean([x[name][side][group][j] for x in measures], index) for j, m in enumerate(MEASURES)}

    sides = list(variants[0].positions)
    results = {n: {s: {g: cell(n, s, g) for g in GROUPS} for s in sides} for n in settings}
    pairs = [
        {"row": v.row, "planted": v.planted, "positions": v.positions, "n_tokens": v.n_tokens, "measures": m}
        for v, m in zip(variants, measures)
    ]
    return {"n_pairs": len(variants), "results": results, "pairs": pairs}


# ------------------------------------------------------------------ the report


def verdict(cell: dict) -> str:
    """ "singled out" when the share ratio's interval lies above 1 and the AUROC's above 0.5; "discounted" when both
    lie below; else "neither". By more than rounding: an average of 1s over draws may come out as 1 + 2e-16."""
    r, a = cell["share_ratio"], cell["auroc"]
    if r["low"] > 1 + ROUNDING and a["low"] > 0.5 + ROUNDING:
        return "singled out"
    return "discounted" if r["high"] < 1 - ROUNDING and a["high"] < 0.5 - ROUNDING else "neither"


def finding(kind: dict, sides, group: str, ot: dict) -> str:
    """The share ratios and AUROCs of `group` on `sides` at each OT setting (`ot`: {name: ε}), and where the group is
    singled out or discounted on every one of those sides."""
    said = []
    for side in sides:
        cells = [kind["results"][n][side][group] for n in ot]
        ratios, aurocs = (", ".join(f"{c[m]['mean']:.2f}" for c in cells) for m in MEASURES)
        said.append(f"share ratio {ratios}, AUROC {aurocs}" + (f" ({side})" if len(sides) > 1 else ""))
    found = []
    for what in ("singled out", "discounted"):
        at = [f"{eps:g}" for n, eps in ot.items() if all(verdict(kind["results"][n][s][group]) == what for s in sides)]
        found += [f"{what} at ε {', '.join(at)}"] if at else []
    return "; ".join(said) + ": " + ("; ".join(found) or "neither singled out nor discounted at any ε") + "."


def fmt(s: dict) -> str:
    return f"{s['mean']:.2f} [{s['low']:.2f}, {s['high']:.2f}]"


def render(summary: dict, report_dir) -> str:
    """The Markdown report of the study JSON's dict."""
    settings, kinds = summary["settings"], summary["kinds"]
    names = [n for n, o in settings.items() if o["weighting"] != "ot" or o["cost_scale"] == "official"]
    others = {n: n.split(", ")[0] for n in settings if n not in names}  # another cost scale -> its official twin
    ot = next(o for o in settings.values() if o["weighting"] == "ot")
    shared = ", ".join(f"{k}={v}" for k, v in ot.items() if k not in ("reg", "cost_scale", "weighting"))
    lines = [
        "# What the transport plan weights: planted spans in held-out pairs",
        "",
        f"Made by `{summary['command']}` in {summary['seconds'] / 60:.1f} min on {summary['device']} (load "
        f"average {summary['load'][0]:.1f} before, {summary['load'][1]:.1f} after). No training: `{summary['model']}`'s "
        f"own last hidden states on pairs of `{summary['data']}` [{summary['split']}], each answer cut after its last "
        f"sentence end within {summary['answer_tokens']} tokens, pairs longer than max_length {summary['max_length']} "
        "left out (nothing truncated). How the variants are made: `studies/planted_variants.py`.",
        "",
        "- `filler`: the rejected answer + a blank line + one of "
        + "; ".join(f'"{f}"' for f in summary["fillers"])
        + ".",
        "- `swap`: the rejected answer is the chosen one with its first number's digits each moved by 5 (mod 10) or, "
        "without one, a listed entity (countries, cities, weekdays, months, languages) replaced: the answers differ "
        "only there. *span*: the changed tokens, on each side.",
        "- `insert`: the chosen answer with one of " + "; ".join(f'"{s}"' for s in summary["irrelevant"]) + " after "
        "the sentence end nearest its middle.",
        f"- Weightings, from the same states: w/o OT (`uniform`), SamPO (`sampo`, mean over {summary['sampo_draws']} "
        f"draws), OT (official cost scale; {shared}).",
        "- *Share ratio*: a group's share of its side's weight over its share of the side's tokens (1: as w/o OT, > 1 "
        "singled out, < 1 discounted). *AUROC*: P(weight of a group token > weight of another token of its side), "
        f"ties 1/2. Means over pairs [95% bootstrap interval over pairs, {summary['bootstrap']} resamples]. *span*: "
        "the planted tokens; *after*: the later tokens of that side (end-of-turn tokens included).",
    ]
    for kind, k in kinds.items():
        sides = list(k["results"][names[0]])
        spans = [len(p["positions"][s]) for p in k["pairs"] for s in sides]
        n_side = [p["n_tokens"][s] for p in k["pairs"] for s in sides]
        after = [p["n_tokens"][s] - 1 - p["positions"][s][-1] for p in k["pairs"] for s in sides]
        lines += [
            "",
            f"## `{kind}`: {k['n_pairs']} pairs, span on the {' and '.join(sides)} side (medians: span "
            f"{np.median(spans):.0f}, after {np.median(after):.0f}, side {np.median(n_side):.0f} tokens)",
            "",
        ]
        header = ["side", "weighting", *(f"{g} {m}" for g in SHOWN for m in ("share ratio", "AUROC"))]
        cells = [
            [s, n, *(fmt(k["results"][n][s][g][m]) for g in SHOWN for m in MEASURES)] for s in sides for n in names
        ]
        lines += table(header, cells)
    if others:
        gap = max(
            abs(k["results"][n][s][g][m]["mean"] - k["results"][twin][s][g][m]["mean"])
            for k in kinds.values()
            for n, twin in others.items()
            for s in k["results"][n]
            for g in GROUPS
            for m in MEASURES
        )
        lines += ["", f"{', '.join(others)}: every mean within {gap:.3f} of the official scale's (in the JSON)."]
    ot = {n: settings[n]["reg"] for n in names if settings[n]["weighting"] == "ot"}
    swap, eps = kinds["swap"], ", ".join(f"{e:g}" for e in ot.values())
    decisive = finding(swap, ["chosen", "rejected"], "span", ot)
    appended, inserted = (
        finding(kinds["filler"], ["rejected"], "span", ot),
        finding(kinds["insert"], ["chosen"], "span", ot),
    )
    baseline = max(
        abs(k["results"][n][side][g][m]["mean"] - (1 if m == "share_ratio" else 0.5))
        for k in kinds.values()
        for n in names
        if n not in ot
        for side in k["results"][n]
        for g in SHOWN
        for m in MEASURES
    )
    singles = "singled out at" in decisive
    discounts = "discounted at" in appended and "discounted at" in inserted
    answer = {
        (True, True): "both",
        (True, False): "singles out the decisive tokens only",
        (False, True): "discounts the filler, and does not single out the decisive tokens",
        (False, False): "neither",
    }
    lines += [
        "",
        "## Reading",
        "",
        f"At ε {eps} (official cost scale), means over pairs; *singled out*: both intervals above (1, 0.5); "
        f"*discounted*: both below. Without OT the weights single nothing out: every mean of w/o OT and SamPO "
        f"is within {baseline:.3f} of 1 (share ratio) or 0.5 (AUROC).",
        "",
        f"- The decisive tokens (`swap` span): {decisive}",
        "- The tokens after them, whose states have seen the change (`swap` after): "
        + finding(swap, ["chosen", "rejected"], "after", ot),
        f"- The appended filler (`filler` span): {appended}",
        f"- The inserted sentence (`insert` span): {inserted}",
        "",
        f"**Does OT single out the decisive tokens, discount the filler, both, or neither? Here: "
        f"{answer[singles, discounts]}.**",
        "",
        "A token's weight comes from the state that predicts it, which has seen only the tokens before it (as in "
        "training): in `swap` the first changed token's state is the same on both sides, and every later state "
        "differs between the sides, so the tail of the answer (*after*) differs too, not the span alone.",
        "",
        image("planted_tokens", Path(report_dir) / "figures" / FIGURE, report_dir),
        "",
    ]
    return "\n".join(lines)


def figures(summary: dict, fig_dir: Path) -> list[Path]:
    """Share ratio (top) and AUROC (bottom) per weighting, a column per kind; span solid, after dashed."""
    plt, kinds = pyplot(), summary["kinds"]
    names = [n for n, o in summary["settings"].items() if o["weighting"] != "ot" or o["cost_scale"] == "official"]
    fig, axes = plt.subplots(2, len(kinds), figsize=(4.4 * len(kinds), 6), sharex=True, sharey="row", squeeze=False)
    x = np.arange(len(names))
    for col, (kind, k) in enumerate(kinds.items()):
        for side in k["results"][names[0]]:
            for group in SHOWN:
                for row, measure in enumerate(MEASURES):
                    c = np.array(
                        [[k["results"][n][side][group][measure][f] for f in ("mean", "low", "high")] for n in names]
                    )
                    axes[row][col].errorbar(
                        x + 0.1 * (group == "after"),
                        c[:, 0],
                        yerr=np.abs(c[:, 1:].T - c[:, 0]),
                        capsize=2,
                        marker="o",
                        ms=3,
                        ls="-" if group == "span" else "--",
                        color="tab:blue" if side == "chosen" else "tab:red",
                        label=f"{side} {group}",
                    )
        axes[0][col].set_title(f"{kind} ({k['n_pairs']} pairs)")
        axes[0][col].axhline(1, color="k", lw=0.8)
        axes[1][col].axhline(0.5, color="k", lw=0.8)
        axes[1][col].set_xticks(x, names, rotation=45, fontsize=8)
        axes[0][col].legend(fontsize=7)
    axes[0][0].set_ylabel("share of weight / share of tokens")
    axes[1][0].set_ylabel("AUROC vs the side's other tokens")
    return [save_figure(fig, Path(fig_dir) / FIGURE)]


# ------------------------------------------------------------------ the command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    add = p.add_argument
    add("--model", default="models/SmolLM2-135M-Instruct", help="model folder or Hub id")
    add("--data", default="../shared/data/ultrafeedback", help="preference data, held-out pairs")
    add("--split", default="test", help="a split training never sees (default test)")
    for name, value, what in (
        ("num_pairs", 48, "pairs per kind at most"),
        ("max_length", 512, "prompt + answer tokens at most"),
        ("answer_tokens", 128, "answers cut within this many tokens"),
        ("sampo_draws", 200, "SamPO draws averaged per pair"),
        ("batch_size", 4, "pairs per forward"),
        ("bootstrap", 2000, "bootstrap resamples"),
        ("seed", 0, "seed of SamPO's draws and of the bootstrap"),
    ):
        add(f"--{name}", type=int, default=value, help=f"{what} (default {value})")
    add("--ot_reg", type=float, nargs="+", default=[1.0, 0.1, 0.02], help="the ε values (default 1 0.1 0.02)")
    add("--ot_cost_scale", nargs="+", default=["official", "minmax"], help="cost scales (default official minmax)")
    add("--report", default=REPORT, help=f"the Markdown report; its JSON and figure go beside it ({REPORT})")
    add("--render_only", action="store_true", help="rewrite the report and its figure from the JSON, scoring nothing")
    args = p.parse_args(argv)
    for name in ("num_pairs", "max_length", "answer_tokens", "sampo_draws", "batch_size", "bootstrap"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}.")
    one, mask = torch.zeros(1, 1, 1), torch.ones(1, 1, dtype=torch.bool)
    for name, options in weightings(args.ot_reg, args.ot_cost_scale).items():  # bad values fail before loading
        try:
            ot_token_weights(one, one, mask, mask, **options)
        except ValueError as err:
            p.error(f"{name}: {err}")
    return args


def main(argv=None) -> dict:
    """Build, score and report (paths relative to the repository root); returns the JSON's dict."""
    with at_repo_root():
        args = parse_args(argv)
        if args.render_only:
            return render_from_json(args.report, figures, render)[0]
        return _study(args, " ".join(["python scripts/planted_tokens.py", *(sys.argv[1:] if argv is None else argv)]))


def cli(argv=None):
    """`scripts/planted_tokens.py`: bad input exits with its message."""
    try:
        main(argv)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")


def _study(args, command):
    started, load = time.perf_counter(), os.getloadavg()[0]
    dataset = load_preference_dataset(args.data, args.split)  # before the model: bad data fail fast
    policy, _, tokenizer = load_model_and_tokenizer(args.model)
    settings, kinds = weightings(args.ot_reg, args.ot_cost_scale), {}
    for i, kind in enumerate(KINDS):
        variants = build_variants(
            dataset, tokenizer, kind, args.num_pairs, max_length=args.max_length, answer_tokens=args.answer_tokens
        )
        if not variants:
            raise ValueError(f"no pair of {args.data} [{args.split}] has a {kind} variant within --max_length")
        print(f"{kind}: {len(variants)} pairs", flush=True)
        measures = score(
            policy,
            tokenizer,
            variants,
            settings,
            max_length=args.max_length,
            batch_size=args.batch_size,
            draws=args.sampo_draws,
            seed=args.seed,
        )
        kinds[kind] = summarize(variants, measures, settings, n_resamples=args.bootstrap, seed=args.seed + i)
    keys = ("model", "data", "split", "max_length", "answer_tokens", "num_pairs", "sampo_draws", "bootstrap", "seed")
    summary = {
        "command": command,
        **{k: getattr(args, k) for k in keys},
        **{"settings": settings, "fillers": FILLERS, "irrelevant": IRRELEVANT, "entities": ENTITIES, "kinds": kinds},
        "seconds": time.perf_counter() - started,
        "load": [load, os.getloadavg()[0]],
        "device": f"{device_name()}, {torch.get_num_threads()} torch thread(s)",
    }
    write_report(summary, args.report, figures, render, indent=1)
    print(f"wrote {args.report}, its JSON and figure, in {summary['seconds'] / 60:.1f} min")
    return summary


__all__ = ["bootstrap_mean", "group_masks", "group_measures", "main", "render", "score", "weightings"]
