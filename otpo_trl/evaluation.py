"""Evaluate a model on preference pairs: implicit-reward accuracy and margins, and greedy generation lengths.

The library behind `otpo-trl evaluate` (its command line and reports: `otpo_trl.cli.evaluate`) and the studies'
scoring. Each batch of pairs goes through [`otpo_trl.inspection.pair_token_stats`] (the trainer's tokenisation, fused
forward and OT weights), and its implicit rewards are summed with each of the [`REWARD_WEIGHTINGS`]: DPO's plain sum
and OTPO's OT weights. Models load through `otpo_trl.loading`, data through `otpo_trl.data`.

```python
policy, reference, tokenizer = load_model_and_tokenizer("out/otpo-lora")  # adapter: the reference is its base
scored = score_preferences(policy, reference, tokenizer, examples, beta=0.1, max_length=512)  # in-process
result = evaluate("out/otpo-lora", "../shared/data/ultrafeedback", split="test", max_samples=200)  # load + score
```
"""

import logging
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import fields
from types import SimpleNamespace
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase
from transformers.generation.streamers import BaseStreamer
from trl.data_utils import maybe_extract_prompt

from .data import load_preference_dataset
from .forward import unwrap_peft
from .inspection import DEFAULT_MAX_LENGTH, REWARD_WEIGHTINGS, implicit_rewards, pair_token_stats, preference_metrics
from .loading import load_model_and_tokenizer
from .otpo_config import OT_FIELDS, OTPOConfig, ot_kwargs
from .tokenization import template_kwargs, tokenize_pair, tokenize_prompt


logger = logging.getLogger(__name__)

# OTPOConfig's defaults, as keyword arguments of ot_token_weights: the OT weights scored when no option is given.
OT_DEFAULTS = ot_kwargs(SimpleNamespace(**{f.name: f.default for f in fields(OTPOConfig) if f.name in OT_FIELDS}))


# ------------------------------------------------------------------ implicit-reward scoring


def scoring_order(
    examples: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int | None = DEFAULT_MAX_LENGTH
) -> list[int]:
    """The indices of the `examples` that can be scored, longest first (similar lengths batch with less padding):
    pairs whose prompt alone fills `max_length` are left out, as DPOTrainer drops them."""
    lengths = {}
    for i, example in enumerate(examples):
        ids = tokenize_pair(example, tokenizer)
        if max_length is None or len(ids["prompt_ids"]) < max_length:
            lengths[i] = len(ids["prompt_ids"]) + max(len(ids["chosen_ids"]), len(ids["rejected_ids"]))
    return sorted(lengths, key=lengths.get, reverse=True)


def score_preferences(
    policy: torch.nn.Module,
    reference: torch.nn.Module | None,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[dict],
    *,
    beta: float = 0.1,
    batch_size: int = 8,
    max_length: int | None = DEFAULT_MAX_LENGTH,
    reward_weightings: Sequence[str] = REWARD_WEIGHTINGS,
    progress: bool = True,
    **ot_options,
) -> dict[str, Any]:
    """Implicit-reward accuracy and margins of preference pairs under a loaded policy and reference, in this process.

    What `otpo-trl evaluate` scores, and what a study calls to score its arms. Pairs whose prompt alone fills
    `max_length` are skipped, as DPOTrainer drops them (counted in `n_skipped`); the others go through the models
    `batch_size` at a time, longest first ([`scoring_order`]).

    Args:
        policy, reference: as returned by [`load_model_and_tokenizer`] (`reference` None: the policy is its own
            reference, every margin 0; `reference is policy`: a PeftModel, its adapter disabled for the reference).
        tokenizer: the policy's tokenizer.
        examples: N preference pairs in TRL's format (standard or conversational, explicit or implicit prompt).
        beta: DPO's beta.
        batch_size: pairs per forward.
        max_length: truncation of prompt + completion, TRL's `max_length`.
        reward_weightings: which of [`REWARD_WEIGHTINGS`] to sum the rewards with: `"unweighted"` (DPO's plain sum)
            and / or `"ot"` (OTPO's OT weights). Without `"ot"` no OT problem is solved.
        progress: show a tqdm bar of the pairs scored.
        **ot_options: keyword arguments of [`ot_token_weights`] for the `"ot"` rewards ([`ot_kwargs`] of a config
            or of parsed `--ot_*` options); those not given are OTPOConfig's defaults ([`OT_DEFAULTS`]). Refused
            without `"ot"` in `reward_weightings`.

    Returns:
        dict with `n_pairs` (scored), `n_skipped`, one [`preference_metrics`] per reward weighting (`unweighted`,
        `ot`), and `pairs`: one dict per scored pair, in the order of `examples`: `index` in `examples`,
        `margin_<weighting>` per reward weighting, `chosen_tokens`, `rejected_tokens` (within `max_length`), and the
        summed log-probs of each side under the policy and the reference, `chosen_logp`, `rejected_logp`,
        `ref_chosen_logp`, `ref_rejected_logp` (float64 sums; the reference's are the policy's when `reference` is
        None).
    """
    reward_weightings = tuple(reward_weightings)
    unknown = [w for w in reward_weightings if w not in REWARD_WEIGHTINGS]
    if unknown or not reward_weightings:
        raise ValueError(
            f"`reward_weightings` must be some of {list(REWARD_WEIGHTINGS)}, got {list(reward_weightings)}."
        )
    with_ot = "ot" in reward_weightings
    if ot_options and not with_ot:
        raise ValueError(f"OT options ({', '.join(ot_options)}) were given without 'ot' in `reward_weightings`.")
    ot_options = {**OT_DEFAULTS, **ot_options} if with_ot else {}
    order = scoring_order(examples, tokenizer, max_length)
    rewards = {w: ([], []) for w in reward_weightings}
    pairs = []
    bar = tqdm(total=len(order), desc="Scoring pairs", unit="pair", disable=not progress)
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        batch = [examples[i] for i in indices]
        stats = pair_token_stats(
            policy, reference, tokenizer, batch, max_length=max_length, token_weights=with_ot, **ot_options
        )
        margins = {}
        for weighting, (chosen, rejected) in rewards.items():
            c, r = implicit_rewards(stats, beta, weighting)
            chosen.append(c.cpu())
            rejected.append(r.cpu())
            margins[f"margin_{weighting}"] = (c - r).tolist()
        # Each side's summed log-probs (float64 sums), so that a reference's can be computed once and reused.
        sums = {
            f"{who}{side}_logp": getattr(stats, f"{who}{side}_logps").double().sum(1).tolist()
            for who in ("", "ref_")
            for side in ("chosen", "rejected")
        }
        for k, i in enumerate(indices):
            pairs.append(
                {
                    "index": i,
                    **{name: values[k] for name, values in margins.items()},
                    "chosen_tokens": int(stats.chosen_mask[k].sum()),
                    "rejected_tokens": int(stats.rejected_mask[k].sum()),
                    **{name: values[k] for name, values in sums.items()},
                }
            )
        bar.update(len(indices))
    bar.close()
    pairs.sort(key=lambda p: p["index"])
    result = {"n_pairs": len(order), "n_skipped": len(examples) - len(order)}
    for weighting, (chosen, rejected) in rewards.items():
        result[weighting] = preference_metrics(
            torch.cat(chosen or [torch.zeros(0)]), torch.cat(rejected or [torch.zeros(0)])
        )
    result["pairs"] = pairs
    return result


# ------------------------------------------------------------------ greedy generation


class _TokenProgress(BaseStreamer):
    """A `generate` streamer that shows on a tqdm bar which token of the budget is being generated (`generate` hands it
    the prompts, then each step's new tokens): a batch of long responses takes minutes on a CPU."""

    def __init__(self, bar, max_new_tokens: int, every: float = 1.0):
        self.bar, self.max_new_tokens, self.every = bar, max_new_tokens, every
        self.step, self.shown = -1, 0.0  # the first call is the prompts

    def put(self, value) -> None:
        self.step += 1
        if self.step and time.monotonic() - self.shown >= self.every:
            self.bar.set_postfix_str(f"token {self.step}/{self.max_new_tokens}")
            self.shown = time.monotonic()

    def end(self) -> None:
        self.bar.set_postfix_str(f"token {self.step}/{self.max_new_tokens}")  # where the batch stopped


def _eos_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    eos = getattr(unwrap_peft(model).generation_config, "eos_token_id", None)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return sorted({*eos, tokenizer.eos_token_id} - {None})


@torch.no_grad()
def generate_responses(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str | list[dict]],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    max_prompt_length: int | None = None,
    prompt_template_kwargs: list[dict[str, Any]] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Greedy responses to `prompts`, batched with left padding, each stopped at EOS or after `max_new_tokens`.

    Args:
        model: a causal LM or a PeftModel (its adapter on).
        tokenizer: its tokenizer (with a pad token).
        prompts: text prompts, or conversations (lists of messages) rendered with the chat template and its
            generation prompt.
        max_new_tokens: the budget of new tokens per response.
        batch_size: prompts per `generate` call.
        max_prompt_length: keep only the last this many prompt tokens (the end is what the response continues).
        prompt_template_kwargs: for each conversational prompt, chat-template arguments ([`template_kwargs`]).
        progress: show a tqdm bar of the prompts answered, with the token being generated.

    Returns:
        One dict per prompt, in order: `index`, `response` (text, special tokens removed), `length` (new tokens up to
        and including the first EOS), `hit_budget` (no EOS within `max_new_tokens`).
    """
    eos_ids = _eos_ids(model, tokenizer)
    kwargs = prompt_template_kwargs or [{}] * len(prompts)
    prompt_ids = [tokenize_prompt(p, tokenizer, **kw) for p, kw in zip(prompts, kwargs, strict=True)]
    if max_prompt_length is not None:
        prompt_ids = [ids[-max_prompt_length:] for ids in prompt_ids]
    device, pad_id = next(model.parameters()).device, tokenizer.pad_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompt_ids[i]), reverse=True)  # the largest batch first
    records = {}
    bar = tqdm(total=len(prompts), desc="Generating", unit="prompt", disable=not progress)
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        width = max(len(prompt_ids[i]) for i in indices)
        input_ids = torch.tensor([[pad_id] * (width - len(prompt_ids[i])) + prompt_ids[i] for i in indices])
        attention_mask = torch.tensor([[0] * (width - len(prompt_ids[i])) + [1] * len(prompt_ids[i]) for i in indices])
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad_id,
            eos_token_id=eos_ids,
            streamer=None if bar.disable else _TokenProgress(bar, max_new_tokens),
        )
        new_tokens = output[:, width:].cpu()
        is_eos = torch.isin(new_tokens, torch.tensor(eos_ids, dtype=new_tokens.dtype))
        has_eos = is_eos.any(1)
        # Up to and including the first EOS; past it, generate pads finished rows.
        lengths = torch.where(has_eos, is_eos.int().argmax(1) + 1, new_tokens.size(1))
        for k, i in enumerate(indices):
            length = int(lengths[k])
            records[i] = {
                "index": i,
                "response": tokenizer.decode(new_tokens[k, :length], skip_special_tokens=True),
                "length": length,
                "hit_budget": not bool(has_eos[k]) and length >= max_new_tokens,
            }
        bar.update(len(indices))
    bar.close()
    return [records[i] for i in range(len(prompts))]


def generation_metrics(records: list[dict[str, Any]], max_new_tokens: int) -> dict[str, float]:
    """Mean and median response length (tokens) and the share of responses that hit the budget."""
    lengths = [r["length"] for r in records]
    return {
        "n": len(records),
        "max_new_tokens": max_new_tokens,
        "length_mean": statistics.fmean(lengths) if lengths else math.nan,
        "length_median": float(statistics.median(lengths)) if lengths else math.nan,
        "hit_budget_share": statistics.fmean(r["hit_budget"] for r in records) if records else math.nan,
    }


# ------------------------------------------------------------------ the whole evaluation


def evaluate(
    model_path: str,
    data: str,
    *,
    ref: str | None = None,
    split: str = "test",
    max_samples: int | None = None,
    batch_size: int = 8,
    beta: float = 0.1,
    num_generations: int = 64,
    max_new_tokens: int = 256,
    max_length: int | None = DEFAULT_MAX_LENGTH,
    drop_ties: bool = False,
    drop_identical: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = True,
    **ot_options,
) -> dict[str, Any]:
    """Evaluate one model: implicit-reward preference accuracy and margins (unweighted and OT weights) on the first
    `max_samples` pairs of `data[split]`, and greedy responses to the prompts of its first `num_generations` pairs.

    The driver `otpo-trl evaluate` calls: it loads the data (first, so that bad data fail before the model loads) and
    the models, then [`score_preferences`] and [`generate_responses`]. It writes nothing (the command writes the
    reports).

    Args:
        model_path, ref, device, dtype: see [`load_model_and_tokenizer`].
        data: a Hub data set id or a local file / folder (see [`load_preference_dataset`]).
        split: the split to evaluate on.
        max_samples: score at most this many pairs (all if None).
        batch_size: pairs per forward, prompts per `generate` call.
        beta: DPO's beta for the implicit rewards.
        num_generations: generate for this many prompts (the first ones); 0 skips generation.
        max_new_tokens: generation budget per response.
        max_length: truncation of prompt + completion when scoring (TRL's `max_length`); also bounds the prompts
            generated from (their last tokens are kept).
        drop_ties, drop_identical: drop the pairs whose scores tie, or whose chosen equals rejected, before taking
            the first `max_samples` (and `num_generations`), as training does (see [`load_preference_dataset`]).
        progress: show tqdm bars (pairs scored; prompts answered, with the token being generated).
        **ot_options: keyword arguments of [`ot_token_weights`] (see [`ot_kwargs`]); OTPOConfig's defaults
            ([`OT_DEFAULTS`]) for those not given.

    Returns:
        JSON-serialisable dict: `model`, `reference` (a path, `"base (adapter disabled)"` or `None`), `data`, `split`,
        `beta`, `max_length`, `drop_ties`, `drop_identical`, `ot` (the options used), `preference`
        ([`score_preferences`]'s result without `pairs`), `pairs`, `generation` ([`generation_metrics`], or None),
        `generations` (the records of [`generate_responses`], each with its `prompt`), `seconds`.
    """
    started = time.perf_counter()
    ot_options = {**OT_DEFAULTS, **ot_options}
    wanted = None if max_samples is None else max(max_samples, num_generations, 1)  # 1: the data are still checked
    dataset = load_preference_dataset(  # before the model: bad data fails fast
        data, split, max_samples=wanted, drop_ties=drop_ties, drop_identical=drop_identical
    )
    policy, reference, tokenizer = load_model_and_tokenizer(model_path, ref=ref, dtype=dtype, device=device)
    examples = [maybe_extract_prompt(dict(e)) for e in dataset]

    scored = score_preferences(
        policy,
        reference,
        tokenizer,
        examples[:max_samples],
        beta=beta,
        batch_size=batch_size,
        max_length=max_length,
        progress=progress,
        **ot_options,
    )
    prompts = [e["prompt"] for e in examples[:num_generations]]
    generations = generate_responses(
        policy,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        max_prompt_length=max_length,
        progress=progress,
        prompt_template_kwargs=[template_kwargs(e) for e in examples[:num_generations]],
    )
    for record, prompt in zip(generations, prompts):
        record["prompt"] = prompt
    return {
        "model": model_path,
        "reference": ref if ref is not None else "base (adapter disabled)" if reference is policy else None,
        "data": data,
        "split": split,
        "beta": beta,
        "max_length": max_length,
        "drop_ties": drop_ties,
        "drop_identical": drop_identical,
        "ot": ot_options,
        "preference": {k: v for k, v in scored.items() if k != "pairs"},
        "pairs": scored["pairs"],
        "generation": generation_metrics(generations, max_new_tokens) if generations else None,
        "generations": generations,
        "seconds": time.perf_counter() - started,
    }


__all__ = [
    "OT_DEFAULTS",
    "evaluate",
    "generate_responses",
    "generation_metrics",
    "score_preferences",
    "scoring_order",
]
