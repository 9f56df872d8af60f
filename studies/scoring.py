"""How the studies score a model, in this process through `otpo_trl.evaluation`, and the one cache of those scores.

[`ScoreCache`] is a folder of JSON files, each named by what it holds and a digest of the settings that made it (its
key, stored in it too): an entry is reused only when the settings asked for are the ones stored, so scores of other
pairs, models or budgets are never read back. Both studies go through it:

- the length study's margins ([`score_run`]): the reference's summed log-probs of the held-out pairs do not depend on
  the run, so they are one entry (`reference-<key>`) shared by every run; a run's entry (`<run>-<key>`) holds its
  margins against them, the token counts and its greedy generation lengths;
- the DPO vs OTPO comparison's evaluations ([`evaluate_model`]): `otpo_trl.evaluation.evaluate`'s result
  (`<name>-<key>`).
"""

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import torch

from otpo_trl.evaluation import evaluate, generate_responses, score_preferences
from otpo_trl.loading import load_model_and_tokenizer
from otpo_trl.otpo_config import ot_kwargs
from otpo_trl.runs import read_run_record
from otpo_trl.tokenization import template_kwargs, tokenize_pair


KEY_DIGITS = 16  # hex digits of the key's SHA-256 in a file name


class ScoreCache:
    """Scores kept in `folder`, one JSON file an entry: `<name>-<digest of key>.json` holding `{"key", "value"}`.

    `key` is a JSON-serialisable dict of every setting the value depends on; it is compared whole on reading (the
    digest only names the file)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    @staticmethod
    def canonical(key: dict) -> dict:
        """`key` as it reads back from JSON (tuples as lists, keys as strings): what a stored key is compared with."""
        return json.loads(json.dumps(key))

    def path(self, name: str, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(self.canonical(key), sort_keys=True).encode()).hexdigest()
        return self.folder / f"{name}-{digest[:KEY_DIGITS]}.json"

    def load(self, name: str, key: dict):
        """The value stored for `name` under `key`, or None."""
        path = self.path(name, key)
        if not path.is_file():
            return None
        stored = json.loads(path.read_text())
        return stored["value"] if stored["key"] == self.canonical(key) else None

    def save(self, name: str, key: dict, value) -> Path:
        path = self.path(name, key)
        self.folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": self.canonical(key), "value": value}))
        return path

    def others(self, name: str, key: dict) -> list[Path]:
        """The entries of `name` made with other settings than `key`."""
        return [p for p in sorted(self.folder.glob(f"{name}-{'?' * KEY_DIGITS}.json")) if p != self.path(name, key)]


def model_identity(path: str | Path) -> str:
    """A local model's absolute path, or a Hub id as it is."""
    return os.path.abspath(path) if os.path.exists(path) else str(path)


# ------------------------------------------------------------------ the length study's margins


def held_out_identity(args, recipe) -> dict:
    """What the held-out pairs come from, so that scores of other data are never reused: the file (absolute path and
    SHA-256 of its bytes), or the recipe's data set."""
    if getattr(args, "held_out_file", None):
        path = Path(args.held_out_file).resolve()
        return {"file": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {"dataset": model_identity(recipe["dataset_name"])}


def scoring_setting(args, recipe, pairs) -> dict:
    """The length study's scoring settings: held-out pairs, their source, and what margins and generations depend on
    (the study JSON's `scoring`, which a `--baseline` must share)."""
    return {
        "held_out": held_out_identity(args, recipe),
        "pairs": [[p["source"], p["row"]] for p in pairs],
        "max_length": args.max_length,
        "beta": recipe["beta"],
        "num_generations": args.num_generations,
        "max_new_tokens": args.max_new_tokens,
    }


def log_prob_sums(model, tokenizer, pairs, args, recipe) -> dict[int, dict]:
    """Each scored pair's summed completion log-probs under `model` alone (`weighting: uniform` solves no OT
    problem; the sums are unweighted whatever the weighting)."""
    options = {**ot_kwargs(argparse.Namespace(**recipe)), "weighting": "uniform"}
    scored = score_preferences(
        model, None, tokenizer, pairs, beta=recipe["beta"], max_length=args.max_length, progress=False, **options
    )
    return {p["index"]: p for p in scored["pairs"]}


def reference_scores(args, recipe, policy, reference, tokenizer, pairs, cache: ScoreCache):
    """The reference's summed log-probs of every held-out pair: one cache entry (`reference-<key>`) per held-out set,
    scoring setting, reference and tokenisation, as the reference (the base for an adapter) is the same for every
    run. Returns ({pair index: (chosen, rejected)}, the entry's file, reused?)."""
    tokens = hashlib.sha256(json.dumps([tokenize_pair(p, tokenizer) for p in pairs]).encode()).hexdigest()
    key = {
        **scoring_setting(args, recipe, pairs),
        "reference": model_identity(recipe["model_name_or_path"]),
        "dtype": recipe["dtype"],
        "tokens": tokens,
    }
    for k in ("num_generations", "max_new_tokens", "beta"):  # the reference's log-probs depend on none of these
        key.pop(k)
    cached = cache.load("reference", key)
    if cached is not None:
        return {int(i): tuple(v) for i, v in cached["logps"].items()}, cache.path("reference", key), True
    start = time.perf_counter()
    if reference is policy:  # an adapter: its base, as DPOTrainer's reference forward
        with policy.disable_adapter():
            sums = log_prob_sums(policy, tokenizer, pairs, args, recipe)
    else:
        sums = log_prob_sums(reference, tokenizer, pairs, args, recipe)
    logps = {i: (p["chosen_logp"], p["rejected_logp"]) for i, p in sums.items()}
    path = cache.save("reference", key, {"logps": logps, "seconds": time.perf_counter() - start})
    return logps, path, False


def score_run(args, recipe, run_dir, pairs, cache: ScoreCache) -> dict:
    """Unweighted margins (DPO's plain sums) and token counts of every held-out pair under the run in `run_dir`, and
    greedy generation lengths; one cache entry (`<run>-<key>`) keyed by the scoring setting and the run's recorded
    training settings. The reference's log-probs come from [`reference_scores`]'s entry: once it is there, only the
    policy runs."""
    run_dir = Path(run_dir)
    record = read_run_record(run_dir)
    key = {**scoring_setting(args, recipe, pairs), "run_settings": record["settings"] if record else None}
    cached = cache.load(run_dir.name, key)
    if cached is not None:
        print(f"{run_dir.name}: reusing {cache.path(run_dir.name, key)}")
        return cached
    start = time.perf_counter()
    ref = None if recipe["use_peft"] else recipe["model_name_or_path"]  # an adapter's reference is its base
    policy, reference, tokenizer = load_model_and_tokenizer(str(run_dir), ref=ref, dtype=recipe["dtype"] or "auto")
    ref_logps, ref_path, reused = reference_scores(args, recipe, policy, reference, tokenizer, pairs, cache)
    print(
        f"{run_dir.name}: scoring" + (f" (the reference's scores from {ref_path.name})" if reused else ""), flush=True
    )
    scored = log_prob_sums(policy, tokenizer, pairs, args, recipe)
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
        "seconds": time.perf_counter() - start,
        "torch_threads": torch.get_num_threads(),  # the seconds' context (this entry may be reused elsewhere)
    }
    cache.save(run_dir.name, key, result)
    return result


# ------------------------------------------------------------------ a whole evaluation (the comparison)


def evaluate_model(name: str, model: str | Path, settings: dict, cache: ScoreCache, *, fresh: bool = False) -> dict:
    """`otpo_trl.evaluation.evaluate(model, **settings)` in this process, without its per-pair records; one cache entry
    (`<name>-<key>`) keyed by the model, its recorded training settings (a run's `run_args.json`) and `settings`.
    `fresh`: evaluate again even if the entry is there."""
    record = read_run_record(model)  # None for a model that no training run saved (the base, a Hub id)
    key = {"model": model_identity(model), "run_settings": record["settings"] if record else None, **settings}
    cached = None if fresh else cache.load(name, key)
    if cached is not None:
        print(f"{name}: reusing {cache.path(name, key)}")
        return cached
    others = [] if fresh else cache.others(name, key)
    if others:
        print(f"{name}: {others[-1]} was made with other settings: evaluating again")
    print(f"{name}: evaluating", flush=True)
    result = evaluate(str(model), progress=False, **settings)
    result = {k: v for k, v in result.items() if k != "pairs"}
    cache.save(name, key, result)
    return result


__all__ = [
    "ScoreCache",
    "evaluate_model",
    "held_out_identity",
    "log_prob_sums",
    "reference_scores",
    "score_run",
    "scoring_setting",
]
