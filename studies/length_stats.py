"""The length study's statistics, in numpy alone: its measures of margins against length differences, paired bootstrap
intervals over held-out pairs (and seeds), and the sentences the report draws from them.
"""

import warnings

import numpy as np

from .common import KNOWN_ARMS, arm_label


METRICS = ("accuracy", "margin_mean", "corr_margin_length", "acc_chosen_longer", "acc_chosen_shorter", "subset_gap")


def differences(arms) -> list[tuple[str, str]]:
    """The arm differences a study reports, as (arm, minus arm), of those among `arms`: every arm against DPO; every
    arm whose weights come from an OT plan (OTPO at any ε) against OTPO w/o OT (what the plan adds); and the recipe's
    OTPO against each peer method (is OTPO ahead of LD-DPO, `sigmoid_norm`, SamPO, paired on the same pairs and seeds).
    OTPO at another ε is compared with the peers through DPO only, which keeps the table to one row per question."""
    pairs = [(a, "dpo") for a in arms if a != "dpo" and "dpo" in arms]
    pairs += [(a, "uniform") for a in arms if "uniform" in arms and solves_ot(a)]
    return pairs + [("otpo", a) for a in arms if "otpo" in arms and is_peer(a)]


def solves_ot(arm) -> bool:
    """Whether `arm` is a known arm whose token weights come from an OT plan."""
    return arm in KNOWN_ARMS and KNOWN_ARMS[arm].solves_ot


def is_peer(arm) -> bool:
    """Whether `arm` is a known peer method: neither DPO, nor OTPO (any ε), nor its w/o OT ablation."""
    return arm in KNOWN_ARMS and arm not in ("dpo", "uniform") and not solves_ot(arm)


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
        {name: {metric: {"mean", "low", "high", "low_seeds", "high_seeds", "per_seed"}}}, name an arm or an arm
        difference (`"otpo-dpo"`, of [`differences`]) in that order; `mean` is the metric on all pairs averaged over
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
    for a, b in differences(list(margins)):
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
    for name in (n for n in stats if "-" in n):
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
            f"{arm_label(name)}: the 95% interval excludes 0 over pairs and seeds for "
            f"{', '.join(both) or 'no metric'}; "
            f"over pairs only (these seeds) for {', '.join(pairs) or 'no further metric'}; it includes 0 for "
            f"{', '.join(rest) or 'no metric'}"
            + (f"; undefined (an empty subset or constant values) for {', '.join(nan)}" if nan else "")
            + f". Same sign in every seed: {', '.join(same_sign) or 'no metric'}."
        )
    return " ".join(out)


def with_intervals(r) -> str:
    """A difference with both its intervals and its per-seed values, as the answers state it."""
    return (
        f"{r['mean']:+.3f} (95% CI over pairs [{r['low']:+.3f}, {r['high']:+.3f}], over pairs and seeds "
        f"[{r['low_seeds']:+.3f}, {r['high_seeds']:+.3f}]; per seed {', '.join(f'{x:+.3f}' for x in r['per_seed'])})"
    )


def answers(stats):
    """The study's questions answered from the primary measure, corr(margin, length difference), with its intervals:
    for each OTPO arm (each ε), does its reward follow length less than DPO's, and do its OT weights add anything over
    OTPO w/o OT? Then, for each peer method, does the recipe's OTPO's follow length less than the peer's? The positive
    control's answer comes first."""
    out = []
    for arm in (a for a in KNOWN_ARMS if solves_ot(a)):
        label = arm_label(arm)
        questions = {  # the recipe's OTPO keeps its original wording
            f"{arm}-dpo": (
                "Does OTPO's reward depend less on length than DPO's?"
                if arm == "otpo"
                else f"Does the reward of {label} depend less on length than DPO's?",
                "DPO's",
            ),
            f"{arm}-uniform": (
                "Do OT weights add anything over OTPO w/o OT (1 per token, the same normalisation)?"
                if arm == "otpo"
                else f"Do the OT weights of {label} add anything over OTPO w/o OT?",
                "OTPO w/o OT's",
            ),
        }
        for name, (question, other) in questions.items():
            if name in stats:
                out.append(answer(stats, name, question, f"{label}'s margin-length correlation minus {other}"))
    for peer in (a for a in KNOWN_ARMS if is_peer(a) and f"otpo-{a}" in stats):
        other = f"{arm_label(peer)}'s"
        question = f"Does OTPO's reward depend less on length than {other}?"
        out.append(answer(stats, f"otpo-{peer}", question, f"OTPO's margin-length correlation minus {other}"))
    if POSITIVE_CONTROL in stats:
        out.insert(0, positive_control(stats))
    return out


def answer(stats, name, question, said) -> str:
    """One question answered from the intervals of difference `name` (`arm-other`) in the primary measure."""
    r = stats[name]["corr_margin_length"]
    if np.isnan([r["mean"], r["low"], r["high"], r["low_seeds"], r["high_seeds"]]).any():
        return f"{question} Undefined: the correlation could not be computed."
    said = f"{said} is {with_intervals(r)}"
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
    arm, other = name.split("-")
    return f"**{question}** {verdict} {said}." + (share(stats, arm) if other == "uniform" else "")


def share(stats, arm) -> str:
    """How large the plan's part (`arm` - OTPO w/o OT) is beside `arm` - DPO, where `arm` - DPO's interval over pairs
    and seeds excludes 0: a part of the plan that an interval excludes from 0 may still be a small part of the whole.
    Nothing where `arm` - DPO is not shown (there is no whole to share), nor where the part is not (its interval over
    pairs and seeds includes 0: a share of noise says nothing)."""
    whole = stats.get(f"{arm}-dpo", {}).get("corr_margin_length")
    row = stats[f"{arm}-uniform"]["corr_margin_length"]
    part = row["mean"]
    if whole is None or not np.isfinite([whole["mean"], part]).all():
        return ""
    if any(not (r["high_seeds"] < 0 or r["low_seeds"] > 0) or len(r["per_seed"]) < 2 for r in (whole, row)):
        return ""
    beside = f" Beside {arm_label(f'{arm}-dpo')} ({whole['mean']:+.3f}), the weights' part"
    if part / whole["mean"] < 0:
        return f"{beside} goes the other way."
    return f"{beside} is {part / whole['mean']:.0%} of it; the rest is OTPO's normalisation, which OTPO w/o OT shares."


# The positive control: a method built to take length out of the loss (LD-DPO with `ld_alpha` 0: only the tokens both
# answers have are trained), compared with DPO. A study that sees no effect of OTPO is informative only if it sees
# this one.
POSITIVE_CONTROL = "ld_dpo-dpo"
Z_POWER = 1.96 + 0.84  # a true difference of this many standard errors is found 80% of the time at the 5% level


def detectable(row) -> tuple[float, float]:
    """The smallest difference the study would detect (80% power, 5% level) over pairs, and over pairs and seeds:
    `Z_POWER` standard errors, each read from its 95% interval's width (3.92 standard errors)."""
    return tuple(Z_POWER * (row[f"high{s}"] - row[f"low{s}"]) / 3.92 for s in ("", "_seeds"))


def control_verdict(r) -> str:
    """Whether the positive control's correlation row `r` shows it: "detected" (the interval over pairs and seeds below
    0), "one_seed" or "these_seeds" (only the one over pairs below 0, with one seed or several), "opposite" (the one
    over pairs above 0) or "not". As in `significance`, with one seed the "over pairs and seeds" interval is over pairs
    and says nothing of other seeds."""
    one_seed = len(r["per_seed"]) < 2
    if r["high_seeds"] < 0 and not one_seed:
        return "detected"
    if r["high"] < 0:
        return "one_seed" if one_seed else "these_seeds"
    return "opposite" if r["low"] > 0 else "not"


def control_summary(stats) -> str:
    """The report's opening sentence: whether the positive control was detected and what the study can detect (its
    `control_verdict`, as the answer says it); "" where the study has no positive control."""
    if POSITIVE_CONTROL not in stats:
        return ""
    r = stats[POSITIVE_CONTROL]["corr_margin_length"]
    over_pairs, over_seeds = detectable(r)
    verdict = {
        "detected": "was detected",
        "one_seed": "was detected for this one seed only",
        "these_seeds": "was detected for these seeds only",
        "opposite": "was not detected, and went the other way",
        "not": "was not detected",
    }[control_verdict(r)]
    interval = f"[{r['low']:+.3f}, {r['high']:+.3f}] over pairs" + (
        "" if len(r["per_seed"]) < 2 else f", [{r['low_seeds']:+.3f}, {r['high_seeds']:+.3f}] over pairs and seeds"
    )
    return (
        f"**The positive control (LD-DPO, `ld_alpha` 0, against DPO) {verdict}** ({r['mean']:+.3f} in the "
        f"margin-length correlation, 95% CI {interval}), and this study detects a difference of about "
        f"{over_pairs:.3f} over pairs, {over_seeds:.3f} over pairs and seeds (80% power at the 5% level)."
    )


def positive_control(stats) -> str:
    """One sentence on whether the positive control was detected (its margin-length correlation below DPO's), and one on
    what the study can detect, from the same difference's bootstrap spread."""
    r = stats[POSITIVE_CONTROL]["corr_margin_length"]
    over_pairs, over_seeds = detectable(r)
    verdict = {
        "detected": "Detected: the interval over pairs and seeds is below 0.",
        "one_seed": "Detected for this seed only: the interval over pairs is below 0; one seed says nothing of the "
        "others.",
        "these_seeds": "Detected for these seeds only: the interval over pairs is below 0, the one over pairs and "
        "seeds is not.",
        "opposite": "Not detected, and the opposite: LD-DPO's reward follows length more than DPO's (the interval "
        "over pairs is above 0).",
        "not": "Not detected: the interval over pairs includes 0.",
    }[control_verdict(r)]
    return (
        f"**Was the positive control detected (LD-DPO, `ld_alpha` 0, built to take length out of the loss, against "
        f"DPO)?** {verdict} Its margin-length correlation minus DPO's is {with_intervals(r)}. This study detects a "
        "difference of about "
        f"{over_pairs:.3f} over pairs, {over_seeds:.3f} over pairs and seeds (80% power at the 5% level, from the "
        "bootstrap spread of this difference)."
    )
