"""Look inside a trained model: per-token OT weights and plans, implicit-reward accuracy, greedy generation lengths.

The library behind `scripts/plot_weights.py` and `scripts/evaluate.py` (their command lines and reports are in
`otpo_trl.cli`; models load through `otpo_trl.loading`). Pairs are tokenised as TRL 1.16's `DPOTrainer` does
(`otpo_trl.tokenization`) and batched by its `DataCollatorForPreference`; per-token log-probs and the policy's last
hidden states come from the same fused forward as in training (`otpo_trl.forward.fused_forward`), and the OT weights
from [`ot_token_weights`]. So the numbers
here are the ones the trainer computes, without a trainer.

```python
policy, reference, tokenizer = load_model_and_tokenizer("out/otpo-lora")  # adapter: the reference is its base
stats = pair_token_stats(policy, reference, tokenizer, examples, reg=1.0, normalization="min")
result = evaluate("out/otpo-lora", "../shared/data/ultrafeedback", split="test", max_samples=200)
```
"""

import logging
import math
import statistics
import time
from dataclasses import dataclass, fields
from types import SimpleNamespace
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase
from transformers.generation.streamers import BaseStreamer
from trl.data_utils import maybe_extract_prompt
from trl.trainer.dpo_trainer import DataCollatorForPreference

from .data import load_preference_dataset
from .forward import fused_forward, unwrap_peft
from .loading import load_model_and_tokenizer
from .ot import ot_token_weights
from .otpo_config import OT_FIELDS, OTPOConfig, ot_kwargs
from .tokenization import template_kwargs, tokenize_pair, tokenize_prompt


logger = logging.getLogger(__name__)

WEIGHTINGS = ("unweighted", "ot")  # DPO's plain sum (w = 1 per completion token); OTPO's OT weights
# OTPOConfig's defaults, as keyword arguments of ot_token_weights
OT_DEFAULTS = ot_kwargs(SimpleNamespace(**{f.name: f.default for f in fields(OTPOConfig) if f.name in OT_FIELDS}))
DEFAULT_MAX_LENGTH = next(f.default for f in fields(OTPOConfig) if f.name == "max_length")  # TRL's: 1024


# ------------------------------------------------------------------ models


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# ------------------------------------------------------------------ examples


def inline_example(prompt: str, chosen: str, rejected: str) -> dict[str, list[dict]]:
    """A conversational preference pair: one user turn, and one assistant turn on each side."""
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


# ------------------------------------------------------------------ per-token statistics of preference pairs


@dataclass
class PairStats:
    """Per-token statistics of B preference pairs, completion tokens only.

    Each side is left-aligned: position k of row i is the k-th completion token of pair i; past the completion's end
    the masks are False, ids the pad id and every value 0. Log-probs are of the token given everything before it.

    Attributes:
        chosen_ids, rejected_ids: (B, Lc), (B, Lr) long, the completion tokens.
        chosen_mask, rejected_mask: (B, Lc), (B, Lr) bool, True at the tokens.
        chosen_logps, rejected_logps: (B, Lc), (B, Lr) float32, the policy's per-token log-probs.
        ref_chosen_logps, ref_rejected_logps: the reference's; equal to the policy's when `has_reference` is False.
        chosen_weights, rejected_weights: (B, Lc), (B, Lr) float32, the OT weights, from the policy's last hidden
            state at the position predicting each token, as [`OTPOTrainer`] computes them.
        plan: (B, Lc, Lr) float32, the transport plan between the chosen and the rejected tokens.
        chosen_tokens, rejected_tokens: B lists of the tokens as text (each token decoded alone).
        has_reference: False when the policy is its own reference (all margins 0).
        chosen_hidden, rejected_hidden: (B, Lc, H), (B, Lr, H), the policy's last hidden states the weights were
            computed from (left-aligned like the ids; rows past a completion's end are arbitrary); None unless
            [`pair_token_stats`] was asked for them (`return_hidden`), e.g. to compute weights for other OT settings
            without another forward.
    """

    chosen_ids: torch.Tensor
    rejected_ids: torch.Tensor
    chosen_mask: torch.Tensor
    rejected_mask: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    chosen_weights: torch.Tensor
    rejected_weights: torch.Tensor
    plan: torch.Tensor
    chosen_tokens: list[list[str]]
    rejected_tokens: list[list[str]]
    has_reference: bool
    chosen_hidden: torch.Tensor | None = None
    rejected_hidden: torch.Tensor | None = None


def _left_align(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For mask (N, T): the index (N, L) of each row's True positions in order, L = most Trues, and its validity."""
    lengths = mask.sum(1)
    width = int(lengths.max()) if mask.numel() else 0
    order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, :width]
    valid = torch.arange(width, device=mask.device) < lengths[:, None]
    return order, valid


@torch.no_grad()
def pair_token_stats(
    policy: torch.nn.Module,
    reference: torch.nn.Module | None,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[dict],
    *,
    max_length: int | None = DEFAULT_MAX_LENGTH,
    return_hidden: bool = False,
    **ot_options,
) -> PairStats:
    """One forward of [chosen; rejected] through the policy (and the reference): per-token log-probs and OT weights.

    Args:
        policy, reference: as returned by [`load_model_and_tokenizer`] (`reference` None: the policy's own log-probs;
            `reference is policy`: the PeftModel with its adapter disabled).
        tokenizer: the policy's tokenizer.
        examples: B preference pairs in TRL's format (standard or conversational, explicit or implicit prompt).
        max_length: truncate prompt + completion to this many tokens, keeping the start (TRL's default, 1024).
        return_hidden: also keep the policy's hidden states in the result (`chosen_hidden`, `rejected_hidden`), so
            that [`ot_token_weights`] can be called on them again with other settings.
        **ot_options: keyword arguments of [`ot_token_weights`] (`reg`, `reg_m`, `cost`, `cost_scale`,
            `normalization`, `weighting`, `solver`, `max_iter`, `tol`); see [`ot_kwargs`]. `weighting="uniform"` (the
            paper's "w/o OT": 1 per token, then the same normalisation) solves no OT problem.

    Returns:
        [`PairStats`], on the policy's device.
    """
    collator = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=max_length)
    inputs = {k: v.to(_device(policy)) for k, v in collator([tokenize_pair(e, tokenizer) for e in examples]).items()}
    # The hidden state at position t predicts token t + 1, as in OTPOTrainer.
    logps, hidden = fused_forward(policy, inputs, capture_hidden=True)
    if reference is None:
        ref_logps = logps
    elif reference is policy:
        with policy.disable_adapter():
            ref_logps, _ = fused_forward(policy, inputs)
    else:
        ref_logps, _ = fused_forward(reference, inputs)  # loaded on the policy's device

    token_ids, shift_mask = inputs["input_ids"][:, 1:], inputs["completion_mask"][:, 1:].bool()
    sides = {}
    for side, rows in zip(("chosen", "rejected"), torch.arange(len(token_ids), device=logps.device).chunk(2)):
        index, valid = _left_align(shift_mask[rows])
        sides[side] = {
            "ids": token_ids[rows].gather(1, index).masked_fill(~valid, tokenizer.pad_token_id),
            "mask": valid,
            "logps": logps[rows].gather(1, index).float() * valid,
            "ref_logps": ref_logps[rows].gather(1, index).float() * valid,
            "hidden": hidden[rows][torch.arange(len(rows), device=index.device)[:, None], index],
        }
    chosen, rejected = sides["chosen"], sides["rejected"]
    chosen_w, rejected_w, info = ot_token_weights(
        chosen["hidden"], rejected["hidden"], chosen["mask"], rejected["mask"], return_info=True, **ot_options
    )

    def decode(ids, mask):
        return [[tokenizer.decode([t]) for t in row[m].tolist()] for row, m in zip(ids, mask)]

    return PairStats(
        chosen_ids=chosen["ids"],
        rejected_ids=rejected["ids"],
        chosen_mask=chosen["mask"],
        rejected_mask=rejected["mask"],
        chosen_logps=chosen["logps"],
        rejected_logps=rejected["logps"],
        ref_chosen_logps=chosen["ref_logps"],
        ref_rejected_logps=rejected["ref_logps"],
        chosen_weights=chosen_w,
        rejected_weights=rejected_w,
        plan=info.plan,
        chosen_tokens=decode(chosen["ids"], chosen["mask"]),
        rejected_tokens=decode(rejected["ids"], rejected["mask"]),
        has_reference=reference is not None,
        chosen_hidden=chosen["hidden"] if return_hidden else None,
        rejected_hidden=rejected["hidden"] if return_hidden else None,
    )


# ------------------------------------------------------------------ implicit rewards


def implicit_rewards(stats: PairStats, beta: float, weighting: str = "ot") -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's implicit rewards `beta * sum_t w_t (log pi(y_t) - log pi_ref(y_t))` of each pair's two completions.

    Args:
        stats: from [`pair_token_stats`].
        beta: DPO's beta.
        weighting: `"unweighted"` (w = 1 on every completion token, no normalisation: DPO's sum) or `"ot"` (the OT
            weights: OTPO).

    Returns:
        `(chosen_rewards, rejected_rewards)`, each (B,) float32.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"`weighting` must be one of {list(WEIGHTINGS)}, got {weighting!r}.")
    rewards = []
    for side in ("chosen", "rejected"):
        mask = getattr(stats, f"{side}_mask")
        weights = mask.float() if weighting == "unweighted" else getattr(stats, f"{side}_weights")
        delta = getattr(stats, f"{side}_logps") - getattr(stats, f"ref_{side}_logps")
        rewards.append(beta * (weights * delta * mask).sum(1))
    return rewards[0], rewards[1]


def preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """Accuracy and mean margin of (N,) implicit rewards, as TRL logs `rewards/accuracies` and `rewards/margins`.

    A pair is correct when its chosen reward is strictly larger: ties (margin exactly 0, e.g. without a reference)
    count as not correct, as in TRL.
    """
    margins = (chosen_rewards - rejected_rewards).double()
    empty = margins.numel() == 0
    return {
        "accuracy": math.nan if empty else (margins > 0).double().mean().item(),
        "margin_mean": math.nan if empty else margins.mean().item(),
        "chosen_reward_mean": math.nan if empty else chosen_rewards.double().mean().item(),
        "rejected_reward_mean": math.nan if empty else rejected_rewards.double().mean().item(),
    }


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
    progress: bool = True,
    **ot_options,
) -> dict[str, Any]:
    """Implicit-reward accuracy and margins of `examples`, unweighted (DPO's sum) and with OT (OTPO) token weights.

    Pairs whose prompt alone fills `max_length` are skipped, as DPOTrainer drops them (counted in `n_skipped`).

    Returns:
        dict with `n_pairs`, `n_skipped`, `unweighted` and `ot` (each [`preference_metrics`]), and `pairs`: one
        dict per scored pair (`index` in `examples`, `margin_unweighted`, `margin_ot`, `chosen_tokens`, `rejected_tokens`,
        and the summed log-probs of each side under the policy and the reference, `chosen_logp`, `rejected_logp`,
        `ref_chosen_logp`, `ref_rejected_logp`; the reference's are the policy's when `reference` is None).
    """
    order = scoring_order(examples, tokenizer, max_length)
    rewards = {w: ([], []) for w in WEIGHTINGS}
    pairs = []
    bar = tqdm(total=len(order), desc="Scoring pairs", unit="pair", disable=not progress)
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        stats = pair_token_stats(
            policy, reference, tokenizer, [examples[i] for i in indices], max_length=max_length, **ot_options
        )
        margins = {}
        for weighting, (chosen, rejected) in rewards.items():
            c, r = implicit_rewards(stats, beta, weighting)
            chosen.append(c.cpu())
            rejected.append(r.cpu())
            margins[weighting] = (c - r).tolist()
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
                    "margin_unweighted": margins["unweighted"][k],
                    "margin_ot": margins["ot"][k],
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
    device, pad_id = _device(model), tokenizer.pad_token_id
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
        **ot_options: keyword arguments of [`ot_token_weights`] (see [`ot_kwargs`]).

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
    "PairStats",
    "evaluate",
    "generate_responses",
    "generation_metrics",
    "implicit_rewards",
    "inline_example",
    "pair_token_stats",
    "preference_metrics",
    "score_preferences",
    "scoring_order",
]
