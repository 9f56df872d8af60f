"""A length study's `--baseline`: arms (`--baseline_arms`, by default dpo and uniform) taken from an earlier study's
JSON instead of trained and scored again, once checked to be what this study would train and score
([`load_baseline`]).
"""

import json
import shlex
from pathlib import Path

from otpo_trl.runs import describe_changes, settings_changes

from .length_settings import BASELINE_IGNORED, BASELINE_SETTINGS, parse_args, planned_run_settings
from .scoring import scoring_setting


def ignored_settings(settings: dict) -> tuple[str, ...]:
    """The run settings a baseline's run may differ in: `BASELINE_IGNORED` (ot_* options) for a run that solves no OT
    problem (DPO, uniform or SamPO weighting), none for one that does (`trainer: otpo`, `ot_weighting: ot`)."""
    solves_ot = settings.get("trainer") == "otpo" and settings.get("ot_weighting", "ot") == "ot"
    return () if solves_ot else BASELINE_IGNORED


def load_baseline(args, recipe, pairs, out):
    """The arms `args.baseline_arms` of the study JSON `args.baseline`, after checking that they are what this study
    would train and score: the same study settings (seeds, held-out pairs, scoring), the same held-out data, and the
    same run settings for those arms, but for `BASELINE_IGNORED` (ot_* options) in the arms that solve no OT problem
    ([`ignored_settings`]). A JSON that records its runs' settings (`run_settings`) is checked against them; an older
    one against what its command would train with today's recipe. Raises ValueError naming every difference."""
    arms = list(args.baseline_arms)
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
        theirs_by_run = {f"{a}-seed{s}": planned_run_settings(old, a, s, out) for a in arms for s in old.seeds}
        how = f"the run settings its command (`{base['command']}`) trains with today's recipe"
    wanted = {}
    for arm in arms:
        for seed in args.seeds:
            run = f"{arm}-seed{seed}"
            if run not in base["margins"]:
                problems.append(f"{run}: not in it")
                continue
            wanted[run] = planned_run_settings(args, arm, seed, out)
            ignored = ignored_settings(wanted[run])
            ours_s = {k: v for k, v in wanted[run].items() if k not in ignored}
            theirs_s = {k: v for k, v in theirs_by_run.get(run, {}).items() if k not in ignored}
            changes = settings_changes(theirs_s, ours_s)
            if changes:
                problems.append(f"{run} trained with other settings ({describe_changes(changes)})")
    if problems:
        raise ValueError(
            f"--baseline {path} cannot stand in for this study's {' and '.join(arms)} arms (checked against "
            f"{how}): {'; '.join(problems)}. Drop --baseline to train every arm, or match its settings."
        )
    order = [(p["source"], p["row"]) for p in base["pairs"]]
    return {
        "path": str(args.baseline),
        "command": base["command"],
        "checked_against": how,
        "length_diff": {k: p["length_diff"] for k, p in zip(order, base["pairs"])},
        "margins": {(a, s): dict(zip(order, base["margins"][f"{a}-seed{s}"])) for a in arms for s in args.seeds},
        "generation": {a: base["generation"][a] for a in arms},
        "run_settings": {run: theirs_by_run.get(run, wanted[run]) for run in wanted},
        "ot_logged": {run: v for run, v in (base.get("ot_logged") or {}).items() if run in wanted},
    }
