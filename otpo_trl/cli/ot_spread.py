"""How far from uniform are OTPO's token weights for a model, a data set and an ε? Measured before any training.

```bash
python scripts/ot_spread.py --model models/SmolLM2-135M-Instruct --data ../shared/data/ultrafeedback --split test \
    --ot_reg 1.0 0.5 0.1 0.05 --ot_cost_scale official minmax --max_length 256 --out reports/ot_spread
```

The policy's last hidden states (the ones OTPO's weights come from in training) are computed once per batch of pairs
([`otpo_trl.inspection.pair_token_stats`] with `return_hidden`); the OT weights are then computed from them for every
setting (each `--ot_reg` with each `--ot_cost_scale`; the other `ot_*` options are shared). Per setting, over the
completions (both sides of every pair) or the pairs (the per-completion ones are `otpo_trl.ot.token_weight_stats`, as
in the trainer's `ot/*` metrics and the pictures):

- `entropy`: the normalised entropy of a completion's weights, H(w / sum w) / log n (1: uniform), median;
- `max_mean`: a completion's largest weight over its mean weight (1: uniform), median and max;
- `below_half`: the share of all completion tokens whose weight is below half their completion's mean weight;
- `margin_change`: |m_ot - m_uniform| / |m_uniform| per pair, median, where m = sum_i w_i log pi(y_w,i) -
  sum_j w_j log pi(y_l,j) is the chosen - rejected log-prob margin under the policy (no reference: it is the quantity
  the weights act on), with the OT weights (m_ot) or uniform weights with the same normalisation (m_uniform:
  `ot_weighting: uniform`, the paper's "w/o OT");
- `delta`: the cost spread Delta of a pair (`OTInfo.cost_spread`), median, and the bound exp(Delta / (ε + τ)) on a
  completion's largest over smallest weight at that median; `max_min`: the observed largest / smallest weight, median.

A setting is *close to uniform* when its median max / mean weight is below 1.25 (`--uniform_threshold`): a typical
completion's largest weight is then within 25% of the mean, and OTPO trains close to its uniform-weight arm.

Writes `ot_spread.md` (the table), `ot_spread.json` (the numbers, per setting and per pair) and `ot_spread.png`
(the distribution of w / mean weight per setting, and one pair's chosen weights across the settings) to `--out`.
"""

import argparse
import json
import math
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from trl.data_utils import maybe_extract_prompt

from ..data import load_preference_dataset
from ..evaluation import scoring_order
from ..inspection import pair_token_stats
from ..loading import load_model_and_tokenizer
from ..ot import ot_token_weights, token_weight_stats
from ..otpo_config import OT_FIELDS, OTPOConfig
from ..runs import writable_dir
from .options import add_max_length_argument, add_model_arguments


LISTED = ("ot_reg", "ot_cost_scale")  # options that take several values: one setting per combination
UNIFORM_THRESHOLD = 1.25


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    add_model_arguments(p)
    p.add_argument(
        "--data", required=True, help="Hub data set id, or a local .jsonl / .json / .parquet file or folder."
    )
    p.add_argument("--split", default="test", help="Split of --data (a single file is one split). Default: test.")
    p.add_argument(
        "--num_pairs",
        type=int,
        default=32,
        help="The first N pairs of the split whose prompt does not fill max_length. Default: 32.",
    )
    add_max_length_argument(p)
    p.add_argument("--batch_size", type=int, default=8, help="Pairs per forward. Default: 8.")
    p.add_argument("--index", type=int, default=0, help="The pair (of those scored) the figure shows. Default: 0.")
    p.add_argument(
        "--uniform_threshold",
        type=float,
        default=UNIFORM_THRESHOLD,
        help="A setting is close to uniform when its median max / mean weight is below this. Default: "
        f"{UNIFORM_THRESHOLD}.",
    )
    p.add_argument(
        "--out", default="out/ot_spread", help="Folder for ot_spread.{md,json,png}. Default: out/ot_spread."
    )
    group = p.add_argument_group("OT token weights (OTPOConfig's ot_* fields; ot_reg and ot_cost_scale take a list)")
    for f in fields(OTPOConfig):
        if f.name in OT_FIELDS and f.name != "ot_weighting":  # both weightings are computed
            listed = f.name in LISTED
            group.add_argument(
                f"--{f.name}",
                type=type(f.default),
                nargs="+" if listed else None,
                default=[f.default] if listed else f.default,
                choices=f.metadata.get("choices"),
                help=f"{f.metadata['help']} Default: {f.default}."
                + (" Several values: one setting each." if listed else ""),
            )
    args = p.parse_args(argv)
    for name in ("num_pairs", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1.")
    if args.max_length is not None and args.max_length < 2:
        p.error("--max_length must be >= 2.")
    if not args.uniform_threshold > 1:
        p.error("--uniform_threshold must be > 1.")
    # ot_token_weights' own checks, on one token per side: a bad value fails here, before the model loads.
    one, mask = torch.zeros(1, 1, 1), torch.ones(1, 1, dtype=torch.bool)
    for options in settings(args):
        try:
            ot_token_weights(one, one, mask, mask, **options)
        except ValueError as err:
            p.error(f"--ot_{str(err).split('`')[1]}: {err}")
    try:
        writable_dir(args.out, "--out")
    except ValueError as err:
        p.error(str(err))
    return args


def settings(args) -> list[dict]:
    """The keyword arguments of [`ot_token_weights`] for every setting: each ot_reg with each ot_cost_scale."""
    shared = {
        name.removeprefix("ot_"): getattr(args, name)
        for name in OT_FIELDS
        if name not in LISTED and name != "ot_weighting"
    }
    return [{**shared, "reg": reg, "cost_scale": scale} for scale in args.ot_cost_scale for reg in args.ot_reg]


def label(options: dict) -> str:
    return f"{options['cost_scale']}, ε {options['reg']:g}"


# ------------------------------------------------------------------ the measures of a pair and of a setting


def log_prob_margin(chosen_w, rejected_w, chosen_logps, rejected_logps) -> torch.Tensor:
    """(B,) sum_i w_i log pi(y_w,i) - sum_j w_j log pi(y_l,j): the weights are 0 outside the completions."""
    return (chosen_w.double() * chosen_logps.double()).sum(1) - (rejected_w.double() * rejected_logps.double()).sum(1)


def summarize(per_pair: dict[str, np.ndarray], ratios: np.ndarray, options: dict) -> dict[str, float]:
    """One setting's row of the table from its per-completion / per-pair values and the pooled per-token ratios."""

    def median(x):
        x = np.asarray(x, float)
        x = x[np.isfinite(x)]
        return float(np.median(x)) if len(x) else math.nan

    delta = median(per_pair["delta"])
    max_mean = np.asarray(per_pair["max_mean"], float)
    return {
        "entropy_median": median(per_pair["entropy"]),
        "max_mean_median": median(max_mean),
        "max_mean_max": float(np.nanmax(max_mean)) if np.isfinite(max_mean).any() else math.nan,
        "below_half": float(np.mean(ratios < 0.5)) if len(ratios) else math.nan,
        "margin_change_median": median(per_pair["margin_change"]),
        "max_min_median": median(per_pair["max_min"]),
        "delta_median": delta,
        "bound_at_median_delta": math.exp(delta / (options["reg"] + options["reg_m"])),
    }


# ------------------------------------------------------------------ the run


def spread(policy, tokenizer, examples, options_list, *, max_length, batch_size=8, index=0):
    """Every setting's measures on `examples`: one forward per batch, then the weights for each setting.

    Returns:
        (rows, per_pair, figure_data, n_scored): rows {label: [`summarize`]}, per_pair {label: {measure: list}}
        (completion measures chosen side then rejected side, pair measures per pair), figure_data {"ratios": {label:
        pooled w / mean}, "pair": {label: chosen weights of the `index`-th scored pair}, "tokens": its tokens}.
    """
    order = scoring_order(examples, tokenizer, max_length)
    keep = sorted(order)  # the figure's pair: the index-th pair that can be scored, in data order
    shown = keep[min(index, len(keep) - 1)] if keep else None
    acc = {
        label(o): {"entropy": [], "max_mean": [], "max_min": [], "margin_change": [], "delta": [], "ratio": []}
        for o in options_list
    }
    pair_weights, tokens = {}, None
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        # One forward: log-probs and hidden states, no weights; each setting's weights come from these states.
        stats = pair_token_stats(
            policy,
            None,
            tokenizer,
            [examples[i] for i in indices],
            max_length=max_length,
            token_weights=False,
            return_hidden=True,
        )
        hc, hr, mc, mr = stats.chosen_hidden, stats.rejected_hidden, stats.chosen_mask, stats.rejected_mask
        for options in options_list:
            name = label(options)
            wc, wr, info = ot_token_weights(hc, hr, mc, mr, return_info=True, return_plan=False, **options)
            uc, ur = ot_token_weights(hc, hr, mc, mr, **{**options, "weighting": "uniform"})
            m_ot = log_prob_margin(wc, wr, stats.chosen_logps, stats.rejected_logps)
            m_uniform = log_prob_margin(uc, ur, stats.chosen_logps, stats.rejected_logps)
            sides = [token_weight_stats(w, m) for w, m in ((wc, mc), (wr, mr))]
            a = acc[name]
            for key in ("entropy", "max_mean", "max_min"):
                a[key] += [x for side in sides for x in getattr(side, key).tolist()]
            a["ratio"] += [x for side in sides for x in side.ratio[~side.ratio.isnan()].tolist()]
            a["margin_change"] += ((m_ot - m_uniform).abs() / m_uniform.abs()).tolist()
            a["delta"] += info.cost_spread.tolist()
            if shown in indices:
                k = indices.index(shown)
                pair_weights[name] = wc[k][mc[k]].tolist()
                tokens = stats.chosen_tokens[k]
    rows = {name: summarize(a, np.asarray(a["ratio"]), o) for o, (name, a) in zip(options_list, acc.items())}
    per_pair = {name: {k: v for k, v in a.items() if k != "ratio"} for name, a in acc.items()}
    figure_data = {
        "ratios": {name: a["ratio"] for name, a in acc.items()},
        "pair": pair_weights,
        "tokens": tokens,
        "pair_index": shown,
    }
    return rows, per_pair, figure_data, len(order)


def first_scorable(dataset, tokenizer, n, max_length):
    """The first `n` pairs of `dataset` that can be scored (DPOTrainer drops a pair whose prompt fills max_length),
    in TRL's format with the prompt extracted, and their rows."""
    examples, rows = [], []
    for start in range(0, len(dataset), 4 * n):
        chunk = [maybe_extract_prompt(dict(dataset[i])) for i in range(start, min(start + 4 * n, len(dataset)))]
        for i in sorted(scoring_order(chunk, tokenizer, max_length)):
            examples.append(chunk[i])
            rows.append(start + i)
        if len(examples) >= n:
            break
    return examples[:n], rows[:n]


def close_to_uniform(rows: dict, threshold: float) -> str:
    """The plain-words verdict: which settings leave the weights close to uniform."""
    close = [n for n, r in rows.items() if r["max_mean_median"] < threshold]
    far = [n for n, r in rows.items() if not r["max_mean_median"] < threshold]
    rule = f"median max / mean weight below {threshold:g}"
    if not far:
        return f"Every setting leaves the weights close to uniform ({rule}): OTPO would train close to its uniform-weight arm."
    if not close:
        return f"No setting leaves the weights close to uniform ({rule}): in all of them the transport plan reweights tokens."
    return (
        f"Close to uniform ({rule}), so OTPO would train close to its uniform-weight arm: {'; '.join(close)}. "
        f"Clearly reweighted: {'; '.join(far)}."
    )


def table(rows: dict) -> list[str]:
    lines = [
        "| setting | entropy, median | max / mean, median (max) | below half the mean | margin change, median | "
        "Δ, median | bound exp(Δ/(ε+τ)) | max / min, median |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['entropy_median']:.4f} | {r['max_mean_median']:.2f} ({r['max_mean_max']:.2f}) | "
            f"{100 * r['below_half']:.1f}% | {100 * r['margin_change_median']:.1f}% | {r['delta_median']:.3f} | "
            f"{r['bound_at_median_delta']:.3g} | {r['max_min_median']:.2f} |"
        )
    return lines


def figure(figure_data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(figure_data["ratios"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1, 1.3]})
    data = [np.clip(np.asarray(figure_data["ratios"][n], float), 1e-3, None) for n in names]
    left.boxplot(data, whis=(1, 99), showfliers=False)
    left.set_xticks(range(1, len(names) + 1), [n.replace(", ", "\n") for n in names], fontsize=8)
    left.set_yscale("log")
    left.axhline(1, color="k", lw=0.8)
    left.set_ylabel("token weight / its completion's mean")
    left.set_title("All completion tokens (box: quartiles, whiskers: 1-99%)", fontsize=10)
    regs = sorted({n.split("ε ")[1] for n in names}, key=float, reverse=True)
    scales = list(dict.fromkeys(n.split(",")[0] for n in names))
    colors = dict(zip(regs, plt.cm.viridis(np.linspace(0, 0.9, len(regs)))))
    for n in names:  # colour: ε; line style: the cost scale
        w = figure_data["pair"].get(n)
        if w:
            w = np.asarray(w)
            style = ("-", "--", ":", "-.")[scales.index(n.split(",")[0]) % 4]
            right.plot(w / w.mean(), lw=1, ls=style, color=colors[n.split("ε ")[1]], label=n)
    right.axhline(1, color="k", lw=0.8)
    right.set_xlabel(f"chosen completion token (pair {figure_data['pair_index']})")
    right.set_ylabel("weight / mean")
    right.set_title("One pair's chosen weights across the settings", fontsize=10)
    right.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_matplotlib() -> None:
    """The figure is drawn last, after every solve: a missing matplotlib is named before any work."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError(
            "`otpo-trl spread` draws ot_spread.png with matplotlib, which is not installed: "
            '`pip install "otpo-trl[viz]"` (or `pip install matplotlib`).'
        ) from None


def main(argv=None) -> dict:
    args = parse_args(argv)
    check_matplotlib()
    command = " ".join(["python scripts/ot_spread.py", *(sys.argv[1:] if argv is None else argv)])
    started = time.perf_counter()
    dataset = load_preference_dataset(args.data, args.split)  # before the model: bad data fail fast
    policy, _, tokenizer = load_model_and_tokenizer(args.model, ref=args.ref, dtype=args.dtype, device=args.device)
    examples, data_rows = first_scorable(dataset, tokenizer, args.num_pairs, args.max_length)
    options_list = settings(args)
    rows, per_pair, figure_data, n_scored = spread(
        policy,
        tokenizer,
        examples,
        options_list,
        max_length=args.max_length,
        batch_size=args.batch_size,
        index=args.index,
    )
    seconds = time.perf_counter() - started
    verdict = close_to_uniform(rows, args.uniform_threshold)
    out = Path(args.out)
    figure(figure_data, out / "ot_spread.png")
    summary = {
        "command": command,
        "model": args.model,
        "data": args.data,
        "split": args.split,
        "max_length": args.max_length,
        "n_pairs": n_scored,
        "data_rows": data_rows,
        "n_skipped": (data_rows[-1] + 1 - len(data_rows)) if data_rows else 0,
        "settings": options_list,
        "uniform_threshold": args.uniform_threshold,
        "close_to_uniform": verdict,
        "results": rows,
        "per_pair": per_pair,
        "figure_pair": figure_data["pair_index"],
        "seconds": seconds,
    }
    (out / "ot_spread.json").write_text(json.dumps(summary, indent=1))
    lines = [
        f"# OT weight spread of `{args.model}`",
        "",
        f"Made by `{command}` in {seconds:.0f} s.",
        "",
        f"{n_scored} pairs of `{args.data}` [{args.split}] (max_length {args.max_length}"
        + (
            f"; the first {n_scored} whose prompt does not fill max_length, {summary['n_skipped']} skipped"
            if summary["n_skipped"]
            else ""
        )
        + "); shared OT options: "
        + ", ".join(f"{k}={v}" for k, v in options_list[0].items() if k not in ("reg", "cost_scale"))
        + ".",
        "",
        *table(rows),
        "",
        "Entropy: of a completion's normalised weights over log(length), 1 for uniform. Max / mean: a "
        "completion's largest weight over its mean (1: uniform), median over completions (largest in "
        "brackets). Below half the mean: share of all tokens. Margin change: |m_OT - m_uniform| / |m_uniform| "
        "per pair, m the chosen - rejected sum of weighted policy log-probs, uniform weights with the same "
        "normalisation. Δ: the pair's cost spread; exp(Δ/(ε+τ)) bounds a completion's max / min weight.",
        "",
        f"**{verdict}**",
        "",
        "![ot_spread](ot_spread.png)",
        "",
    ]
    (out / "ot_spread.md").write_text("\n".join(lines))
    print("\n".join(table(rows)))
    print(f"\n{verdict}\nWrote {out}/ot_spread.{{md,json,png}} ({n_scored} pairs, {seconds:.1f} s).")
    return summary


def cli(argv=None) -> None:
    """`scripts/ot_spread.py`: bad input exits with its message."""
    try:
        main(argv)
    except (FileNotFoundError, NotADirectoryError, ValueError) as err:
        sys.exit(f"error: {err}")


__all__ = ["close_to_uniform", "log_prob_margin", "main", "parse_args", "settings", "spread"]


if __name__ == "__main__":
    cli()
