"""Does a trained reward pay for appended filler? r(y + filler) - r(y) under each run of a length study.

```bash
python scripts/filler_reward.py --runs out/length_study_peers --arms dpo ld_dpo   # -> reports/filler_reward/
python scripts/filler_reward.py --render_only                                    # from its JSON, scoring nothing
```

A measure of length reliance that holds an answer's content fixed. Every held-out answer y (both sides of the first
`--pairs` test pairs, each cut after its last sentence end within `--answer_tokens` tokens, as the planted-token
report cuts them) is scored against itself with a generic closing appended (y + a blank line + one of
`planted_variants.FILLERS`, by row): the implicit reward's gain, beta * sum of (log pi - log pi_ref) over the whole
completion, unweighted (DPO's sum), of y + filler over y. A reward that follows length pays for the filler (gain > 0);
one that does not is indifferent. Each arm's gain is a mean over answers and seeds; each arm minus the first is given
with a paired bootstrap interval over answers (one resample shared by every arm and seed) and over answers and seeds.

The runs are those a length study trained (`<runs>/<arm>-seed<seed>`, LoRA adapters scored against their base).
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from trl.data_utils import maybe_extract_prompt

from otpo_trl.data import load_preference_dataset
from otpo_trl.evaluation import score_preferences
from otpo_trl.loading import load_model_and_tokenizer
from otpo_trl.runs import read_run_record
from otpo_trl.tokenization import tokenize_pair

from .common import arm_label, at_repo_root, compute_description, render_from_json, table, write_report
from .planted_variants import FILLERS, append_filler, trim_answer


REPORT = "reports/filler_reward/filler_reward.md"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--runs", default="out/length_study_peers", help="a length study's --out: <arm>-seed<seed> runs")
    p.add_argument("--arms", nargs="+", default=["dpo", "ld_dpo"], help="arms to score; the first is the baseline")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    p.add_argument("--data", default="../shared/data/ultrafeedback", help="a folder with test.jsonl")
    p.add_argument("--pairs", type=int, default=100, help="the first N test pairs give 2 answers each")
    p.add_argument("--answer_tokens", type=int, default=128, help="each answer cut within this many tokens")
    p.add_argument("--max_length", type=int, default=512, help="prompt + answer + filler must fit (none truncated)")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--report", default=REPORT)
    p.add_argument("--render_only", action="store_true", help="rewrite the report from the JSON beside --report")
    return p.parse_args(argv)


def filler_examples(dataset, tokenizer, n_pairs: int, answer_tokens: int, max_length: int) -> list[dict]:
    """Both answers of the first `n_pairs` pairs, cut, each as the pair (answer + filler, answer); those whose prompt
    and answer + filler do not fit `max_length` are left out (nothing is truncated)."""
    examples = []
    for row in range(min(n_pairs, len(dataset))):
        example = maybe_extract_prompt(dict(dataset[row]))
        for side in ("chosen", "rejected"):
            answer = trim_answer(example[side][-1]["content"], tokenizer, answer_tokens)
            if answer is None:
                continue
            padded, _ = append_filler(answer, FILLERS[row % len(FILLERS)])
            turn = [{"role": "assistant", "content": padded}], [{"role": "assistant", "content": answer}]
            pair = {"prompt": example["prompt"], "chosen": turn[0], "rejected": turn[1], "row": row}
            ids = tokenize_pair(pair, tokenizer)
            if len(ids["prompt_ids"]) + len(ids["chosen_ids"]) <= max_length:
                examples.append(pair)
    if not examples:
        raise ValueError(f"no answer of the first {n_pairs} pairs fits --max_length {max_length} with its filler.")
    return examples


def log_prob_sums(model, tokenizer, examples, args) -> np.ndarray:
    """(answer + filler, answer) summed completion log-probs of every example under `model` alone: one forward."""
    scored = score_preferences(
        model, None, tokenizer, examples, max_length=args.max_length, reward_weightings=("unweighted",), progress=False
    )
    by_index = {p["index"]: (p["chosen_logp"], p["rejected_logp"]) for p in scored["pairs"]}
    return np.array([by_index[i] for i in range(len(examples))])


def score_runs(args) -> dict:
    """{run name: [gain per example, in the examples' order]} for every arm and seed; the examples' rows. The
    reference's sums are computed once per reference (a LoRA run's is its base, the same for every run)."""
    runs = {}  # every run checked before any model loads
    for arm in args.arms:
        for seed in args.seeds:
            run_dir = Path(args.runs) / f"{arm}-seed{seed}"
            record = read_run_record(run_dir)
            if record is None or not (run_dir / "all_results.json").exists():
                raise ValueError(f"{run_dir} holds no finished run: train it with the length study first.")
            runs[run_dir] = record["settings"]
    gains, examples, references, seconds = {}, None, {}, 0.0
    for run_dir, settings in runs.items():
        ref = None if settings.get("use_peft") else settings["model_name_or_path"]
        start = time.perf_counter()
        policy, reference, tokenizer = load_model_and_tokenizer(str(run_dir), ref=ref)
        if examples is None:
            dataset = load_preference_dataset(args.data, "test")
            examples = filler_examples(dataset, tokenizer, args.pairs, args.answer_tokens, args.max_length)
        key = (settings["model_name_or_path"], bool(settings.get("use_peft")))
        if key not in references:
            if reference is policy:  # an adapter: its base, as DPOTrainer's reference forward
                with policy.disable_adapter():
                    references[key] = log_prob_sums(policy, tokenizer, examples, args)
            else:
                references[key] = log_prob_sums(reference, tokenizer, examples, args)
        own, ref_sums = log_prob_sums(policy, tokenizer, examples, args), references[key]
        gain = settings["beta"] * ((own[:, 0] - ref_sums[:, 0]) - (own[:, 1] - ref_sums[:, 1]))
        gains[run_dir.name] = gain.tolist()
        seconds += time.perf_counter() - start
        print(f"{run_dir.name}: mean gain {gain.mean():+.4f}", flush=True)
    return {"gains": gains, "rows": [e["row"] for e in examples], "seconds": seconds}


def bootstrap(gains: dict, arms: list, seeds: list, n: int, seed: int = 0) -> dict:
    """Each arm's mean gain and each arm minus the first, with 95% percentile intervals over answers (the seeds as
    given) and over answers and seeds (one draw of each shared by every arm)."""
    table_ = {a: np.array([gains[f"{a}-seed{s}"] for s in seeds]) for a in arms}  # seeds x answers
    rng = np.random.default_rng(seed)
    n_answers = next(iter(table_.values())).shape[1]
    draws = [(rng.integers(0, n_answers, n_answers), rng.integers(0, len(seeds), len(seeds))) for _ in range(n)]
    rows = {a: table_[a] for a in arms} | {f"{a}-{arms[0]}": table_[a] - table_[arms[0]] for a in arms[1:]}
    out = {}
    for name, values in rows.items():
        pairs = [values[:, i].mean() for i, _ in draws]
        both = [values[s][:, i].mean() for i, s in draws]
        out[name] = {
            "mean": float(values.mean()),
            "per_seed": [float(v) for v in values.mean(1)],
            "low": float(np.percentile(pairs, 2.5)),
            "high": float(np.percentile(pairs, 97.5)),
            "low_seeds": float(np.percentile(both, 2.5)),
            "high_seeds": float(np.percentile(both, 97.5)),
        }
    return out


def figures(summary, fig_dir) -> list:
    return []  # the table says it all


def render(summary, report_dir) -> str:
    s, stats = summary["settings"], summary["stats"]
    label = {a: arm_label(a) for a in s["arms"]}

    def name(row):
        return " - ".join(label[a] for a in row.split("-")) if "-" in row else label[row]

    rows = [
        [
            name(row),
            f"{r['mean']:+.4f}",
            ", ".join(f"{v:+.4f}" for v in r["per_seed"]),
            f"[{r['low']:+.4f}, {r['high']:+.4f}]",
            f"[{r['low_seeds']:+.4f}, {r['high_seeds']:+.4f}]",
        ]
        for row, r in stats.items()
    ]
    compute = summary["compute"]
    lines = [
        "# Does the reward pay for appended filler?",
        "",
        f"Made by `{summary['command']}`.",
        "",
        f"- Runs: `{s['runs']}/<arm>-seed<seed>` (a length study's), seeds {s['seeds']}; each LoRA adapter against its "
        "base as the reference.",
        f"- Answers: both sides of the first {s['pairs']} test pairs of `{s['data']}`, each cut after its last sentence "
        f"end within {s['answer_tokens']} tokens: {summary['n_answers']} answers that fit max_length {s['max_length']} "
        "with the filler (none truncated). Each is scored as the pair (answer + a blank line + a generic closing, answer): the "
        "closings are `studies/planted_variants.py`'s FILLERS, by row.",
        "- Gain: beta * sum of (log pi - log pi_ref) over the whole completion, unweighted (DPO's sum), of the answer "
        "with the filler minus the answer alone. Above 0: the reward pays for the filler.",
        f"- Intervals: 95% paired percentile bootstrap ({s['bootstrap']} resamples) over answers (the seeds as given) "
        "and over answers and seeds (one draw shared by every arm).",
        f"- Compute: {compute['seconds'] / 60:.1f} min of scoring on {compute['cpu_count']} CPU cores.",
        "",
        *table(["arm", "mean gain", "per seed", "95% CI over answers", "over answers and seeds"], rows),
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    with at_repo_root():
        args = parse_args(argv)
        if args.render_only:
            return render_from_json(args.report, figures, render)[0]
        scored = score_runs(args)
        summary = {
            "command": " ".join(["python scripts/filler_reward.py", *(sys.argv[1:] if argv is None else argv)]),
            "settings": {k: v for k, v in vars(args).items() if k not in ("report", "render_only")},
            "n_answers": len(scored["rows"]),
            "rows": scored["rows"],
            "gains": scored["gains"],
            "stats": bootstrap(scored["gains"], args.arms, args.seeds, args.bootstrap),
            "compute": {**compute_description(), "seconds": scored["seconds"]},
        }
        write_report(summary, args.report, figures, render, indent=1)
        print(f"wrote {args.report}")
        return summary


def cli(argv=None):
    try:
        main(argv)
    except ValueError as err:
        sys.exit(f"error: {err}")
