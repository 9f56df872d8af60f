"""Look inside a trained model: per-token OT weights and plans, implicit-reward accuracy, greedy generation lengths.

The shared core of `scripts/plot_weights.py` and `scripts/evaluate.py`. Pairs are tokenised as TRL 1.16's
`DPOTrainer` does and batched by its `DataCollatorForPreference`; per-token log-probs come from TRL's fused LM head
and the OT weights from [`ot_token_weights`] on the policy's last hidden states, as in [`OTPOTrainer`]. So the numbers
here are the ones the trainer computes, without a trainer.

```python
policy, reference, tokenizer = load_model_and_tokenizer("out/otpo-lora")  # adapter: the reference is its base
stats = pair_token_stats(policy, reference, tokenizer, examples, reg=1.0, normalization="min")
result = evaluate("out/otpo-lora", "../shared/data/ultrafeedback", split="test", max_samples=200)
```
"""

import argparse
import json
import logging
import math
import statistics
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from trl.data_utils import _tokenize, common_prefix_length, is_conversational, maybe_extract_prompt
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import add_fused_lm_head

from .data import DEFAULT_CHAT_TEMPLATE, load_preference_dataset, looks_like_local_path
from .ot_weights import ot_token_weights
from .otpo_config import OT_FIELDS, OTPOConfig, ot_kwargs
from .otpo_trainer import capture_last_hidden, predicting_states


logger = logging.getLogger(__name__)

WEIGHTINGS = ("uniform", "ot")  # DPO's weight 1 per completion token; OTPO's OT weights
_OT_FIELDS = tuple(f for f in fields(OTPOConfig) if f.name in OT_FIELDS)
OT_DEFAULTS = {f.name.removeprefix("ot_"): f.default for f in _OT_FIELDS}  # as keyword arguments of ot_token_weights
DEFAULT_MAX_LENGTH = next(f.default for f in fields(OTPOConfig) if f.name == "max_length")  # TRL's: 1024


# ------------------------------------------------------------------ command-line options shared by the scripts


def add_ot_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--ot_reg`, `--ot_reg_m`, ... with the types, defaults, choices and help of [`OTPOConfig`]'s fields."""
    group = parser.add_argument_group("OT token weights (the `ot_*` fields of OTPOConfig)")
    for f in _OT_FIELDS:
        group.add_argument(
            f"--{f.name}", type=type(f.default), default=f.default, choices=f.metadata.get("choices"),
            help=f"{f.metadata['help']} Default: {f.default}.",
        )  # fmt: skip


def resolve_device(device: str = "auto") -> torch.device:
    """`"auto"`: the GPU if there is one, else the CPU; anything else is passed to `torch.device`."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)


# ------------------------------------------------------------------ models


def resolve_model_path(name_or_path: str, what: str, hint: str = "") -> str:
    """`name_or_path` as given if it is a local folder or may be a Hub id; a clear error for a missing path."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{what} {name_or_path!r} is a file; expected a model or adapter folder.")
        return str(path)
    parent_exists = path.parent != Path(".") and path.parent.is_dir()
    if looks_like_local_path(name_or_path) or parent_exists:
        raise FileNotFoundError(f"{what} {name_or_path!r}: no such folder (relative to {Path.cwd()}).{hint}")
    return name_or_path


def writable_dir(path: str | Path, what: str) -> Path:
    """Create the folder `path` if needed; a `ValueError` naming `what` if it is a file or cannot be written to."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file; it must be a folder (or not exist yet).")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ValueError(f"{what} {path} cannot be written to: {err.strerror or err}.") from err
    return path


def _from_pretrained(loader, name_or_path: str, what: str, **kwargs):
    try:
        return loader.from_pretrained(name_or_path, **kwargs)
    except OSError as err:
        if Path(name_or_path).expanduser().exists():
            raise
        raise FileNotFoundError(
            f"{what} {name_or_path!r} is not a local folder (relative to {Path.cwd()}) and could not be loaded as a "
            f"Hub id: {err}"
        ) from err


def _load_causal_lm(name_or_path: str, dtype, device: torch.device, what: str) -> PreTrainedModel:
    model = _from_pretrained(AutoModelForCausalLM, name_or_path, what, dtype=dtype)
    # Per-token log-probs without (B, T, V) logits, as DPOTrainer computes them; generation is left unchanged.
    add_fused_lm_head(model)
    return model.to(device).eval()


def load_model_and_tokenizer(
    path: str, ref: str | None = None, dtype: str | torch.dtype = "auto", device: str | torch.device = "auto"
) -> tuple[torch.nn.Module, torch.nn.Module | None, PreTrainedTokenizerBase]:
    """Load a policy, its reference and the tokenizer, in eval mode on `device`.

    Args:
        path: a model folder or Hub id, or a PEFT adapter folder (one with `adapter_config.json`).
        ref: the reference model (folder or Hub id). For an adapter it is also the base the adapter is loaded on,
            instead of the `base_model_name_or_path` of its `adapter_config.json`.
        dtype: `"auto"` (the checkpoint's), `"float32"`, `"bfloat16"`, ... or a `torch.dtype`.
        device: `"auto"` (CUDA if available, else CPU), `"cpu"`, `"cuda:1"`, ...

    Returns:
        `(policy, reference, tokenizer)`. The reference is a separate model when `ref` is given for a full model;
        the policy itself for an adapter (a `PeftModel`, whose reference forward runs under `disable_adapter()`, i.e.
        the base, as DPOTrainer does with LoRA); `None` for a full model without `ref`: the policy is then its own
        reference and every implicit reward and margin is 0 (a warning says so). The tokenizer has a pad token
        (EOS if it had none) and a chat template (the ChatML-style default if it had none), as in `scripts/train.py`.

    Raises:
        FileNotFoundError: `path`, `ref` or the adapter's base is neither a local folder nor a loadable Hub id.
    """
    device = resolve_device(device) if isinstance(device, str) else device
    dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    path = resolve_model_path(path, "Model")
    ref = None if ref is None else resolve_model_path(ref, "Reference model")
    is_adapter = (Path(path) / "adapter_config.json").exists()

    if is_adapter:
        from peft import PeftConfig, PeftModel

        base = ref or PeftConfig.from_pretrained(path).base_model_name_or_path
        if base is None:
            raise ValueError(f"The adapter {path} names no base model (`base_model_name_or_path`); pass `ref`.")
        if ref is None:
            hint = " Pass `ref` (`--ref`) to load the adapter on a base found elsewhere."
            base = resolve_model_path(base, f"The adapter {path} has base model", hint)
        logger.info(f"Loading the adapter {path} on its base {base}; the reference is the base (adapter disabled).")
        try:
            base_model = _load_causal_lm(base, dtype, device, "Base model")
        except FileNotFoundError as err:
            if ref is not None:
                raise
            raise FileNotFoundError(
                f"{err}\nThe adapter {path} records this base (`base_model_name_or_path` in adapter_config.json; a "
                "relative path is relative to where it was trained). Pass `ref` (`--ref`) with the base's folder or Hub "
                "id to load it from elsewhere."
            ) from err
        # The fused head goes on the base before PEFT wraps it (TRL's order); LoRA layers are found at call time.
        policy = PeftModel.from_pretrained(base_model, path).to(device).eval()
        reference = policy
    else:
        policy = _load_causal_lm(path, dtype, device, "Model")
        reference = None if ref is None else _load_causal_lm(ref, dtype, device, "Reference model")
        if reference is None:
            logger.warning(
                "No reference model: the policy is its own reference, so every implicit reward and margin (uniform "
                "and OT) is 0. Pass the model it was trained from as `ref` (`--ref`)."
            )

    has_tokenizer = (Path(path) / "tokenizer_config.json").exists() or not is_adapter
    tokenizer_path = path if has_tokenizer else (ref or base)
    tokenizer = _from_pretrained(AutoTokenizer, tokenizer_path, "Tokenizer")
    if tokenizer.chat_template is None:
        logger.info("The tokenizer has no chat template; using the default ChatML-style one.")
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return policy, reference, tokenizer


def _causal_lm(model: torch.nn.Module) -> PreTrainedModel:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# ------------------------------------------------------------------ tokenisation, as DPOTrainer does it


def tokenize_pair(example: dict, tokenizer: PreTrainedTokenizerBase) -> dict[str, list[int]]:
    """Tokenise one preference pair as TRL 1.16's `DPOTrainer._prepare_dataset` does.

    The prompt is extracted if implicit (shared leading turns); standard (text) completions get EOS appended;
    conversational ones go through the chat template, the prompt with the generation prompt. The completion starts
    where the tokenised prompt and prompt + completion diverge (TRL's `common_prefix_length`). Truncation to
    `max_length` is left to `DataCollatorForPreference`, as in training.

    Returns:
        dict with `prompt_ids`, `chosen_ids`, `rejected_ids` (lists of token ids).
    """
    example = maybe_extract_prompt(dict(example))
    prompt, chosen, rejected = example["prompt"], example["chosen"], example["rejected"]
    if is_conversational(example):
        prompt_ids = _tokenize(tokenizer, prompt, add_generation_prompt=True)["input_ids"]
        chosen_ids = _tokenize(tokenizer, prompt + chosen)["input_ids"]
        rejected_ids = _tokenize(tokenizer, prompt + rejected)["input_ids"]
    else:
        eos = tokenizer.eos_token
        chosen, rejected = (c if c.endswith(eos) else c + eos for c in (chosen, rejected))
        prompt_ids = _tokenize(tokenizer, prompt)["input_ids"]
        chosen_ids = _tokenize(tokenizer, prompt + chosen)["input_ids"]
        rejected_ids = _tokenize(tokenizer, prompt + rejected)["input_ids"]
    prompt_len = min(common_prefix_length(prompt_ids, chosen_ids), common_prefix_length(prompt_ids, rejected_ids))
    return {"prompt_ids": prompt_ids[:prompt_len], "chosen_ids": chosen_ids[prompt_len:],
            "rejected_ids": rejected_ids[prompt_len:]}  # fmt: skip


def tokenize_prompt(prompt: str | list[dict], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of a prompt to generate from: the chat template with its generation prompt, or plain text."""
    if isinstance(prompt, list):
        return _tokenize(tokenizer, prompt, add_generation_prompt=True)["input_ids"]
    return _tokenize(tokenizer, prompt)["input_ids"]


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


def _left_align(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For mask (N, T): the index (N, L) of each row's True positions in order, L = most Trues, and its validity."""
    lengths = mask.sum(1)
    width = int(lengths.max()) if mask.numel() else 0
    order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, :width]
    valid = torch.arange(width, device=mask.device) < lengths[:, None]
    return order, valid


def _fused_logps(model, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """(N, T-1) log-prob of token t+1 at position t; TRL's fused head (0 where the label is -100)."""
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                fused_lm_head=True, use_cache=False)  # fmt: skip
    return out.log_probs[:, -(labels.size(1) - 1) :]  # prompt-learning PEFT prepends virtual positions


@torch.no_grad()
def pair_token_stats(
    policy: torch.nn.Module,
    reference: torch.nn.Module | None,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[dict],
    *,
    max_length: int | None = DEFAULT_MAX_LENGTH,
    **ot_options,
) -> PairStats:
    """One forward of [chosen; rejected] through the policy (and the reference): per-token log-probs and OT weights.

    Args:
        policy, reference: as returned by [`load_model_and_tokenizer`] (`reference` None: the policy's own log-probs;
            `reference is policy`: the PeftModel with its adapter disabled).
        tokenizer: the policy's tokenizer.
        examples: B preference pairs in TRL's format (standard or conversational, explicit or implicit prompt).
        max_length: truncate prompt + completion to this many tokens, keeping the start (TRL's default, 1024).
        **ot_options: keyword arguments of [`ot_token_weights`] (`reg`, `reg_m`, `cost`, `normalization`,
            `solver`, `max_iter`, `tol`); see [`ot_kwargs`].

    Returns:
        [`PairStats`], on the policy's device.
    """
    collator = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=max_length)
    inputs = {k: v.to(_device(policy)) for k, v in collator([tokenize_pair(e, tokenizer) for e in examples]).items()}
    completion_mask = inputs["completion_mask"]
    labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
    seq_len = completion_mask.size(1) - 1

    # The hidden state at position t predicts token t + 1, as in OTPOTrainer.
    with capture_last_hidden(_causal_lm(policy).base_model) as box:
        logps = _fused_logps(policy, inputs, labels)
    hidden = predicting_states(box["hidden"], seq_len)
    if reference is None:
        ref_logps = logps
    elif reference is policy:
        with policy.disable_adapter():
            ref_logps = _fused_logps(policy, inputs, labels)
    else:
        ref_logps = _fused_logps(reference, inputs, labels)  # loaded on the policy's device

    token_ids, shift_mask = inputs["input_ids"][:, 1:], completion_mask[:, 1:].bool()
    sides = {}
    for side, rows in zip(("chosen", "rejected"), torch.arange(len(token_ids), device=logps.device).chunk(2)):
        index, valid = _left_align(shift_mask[rows])
        take = lambda x: x[rows].gather(1, index)  # noqa: E731
        sides[side] = {
            "ids": take(token_ids).masked_fill(~valid, tokenizer.pad_token_id),
            "mask": valid,
            "logps": take(logps).float() * valid,
            "ref_logps": take(ref_logps).float() * valid,
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
    )


# ------------------------------------------------------------------ implicit rewards


def implicit_rewards(stats: PairStats, beta: float, weighting: str = "ot") -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's implicit rewards `beta * sum_t w_t (log pi(y_t) - log pi_ref(y_t))` of each pair's two completions.

    Args:
        stats: from [`pair_token_stats`].
        beta: DPO's beta.
        weighting: `"uniform"` (w = 1 on every completion token: DPO) or `"ot"` (the OT weights: OTPO).

    Returns:
        `(chosen_rewards, rejected_rewards)`, each (B,) float32.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"`weighting` must be one of {list(WEIGHTINGS)}, got {weighting!r}.")
    rewards = []
    for side in ("chosen", "rejected"):
        mask = getattr(stats, f"{side}_mask")
        weights = mask.float() if weighting == "uniform" else getattr(stats, f"{side}_weights")
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
    """Implicit-reward accuracy and margins of `examples` under uniform (DPO) and OT (OTPO) token weights.

    Pairs whose prompt alone fills `max_length` are skipped, as DPOTrainer drops them (counted in `n_skipped`).

    Returns:
        dict with `n_pairs`, `n_skipped`, `uniform` and `ot` (each [`preference_metrics`]), and `pairs`: one dict
        per scored pair (`index` in `examples`, `margin_uniform`, `margin_ot`, `chosen_tokens`, `rejected_tokens`).
    """
    lengths = {}
    for i, example in enumerate(examples):
        ids = tokenize_pair(example, tokenizer)
        if max_length is None or len(ids["prompt_ids"]) < max_length:
            lengths[i] = len(ids["prompt_ids"]) + max(len(ids["chosen_ids"]), len(ids["rejected_ids"]))
    order = sorted(lengths, key=lengths.get, reverse=True)  # similar lengths together: less padding
    rewards = {w: ([], []) for w in WEIGHTINGS}
    pairs = []
    for start in tqdm(range(0, len(order), batch_size), desc="Scoring pairs", disable=not progress):
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
        for k, i in enumerate(indices):
            pairs.append({"index": i, "margin_uniform": margins["uniform"][k], "margin_ot": margins["ot"][k],
                          "chosen_tokens": int(stats.chosen_mask[k].sum()),
                          "rejected_tokens": int(stats.rejected_mask[k].sum())})  # fmt: skip
    pairs.sort(key=lambda p: p["index"])
    result = {"n_pairs": len(order), "n_skipped": len(examples) - len(order)}
    for weighting, (chosen, rejected) in rewards.items():
        result[weighting] = preference_metrics(torch.cat(chosen or [torch.zeros(0)]),
                                               torch.cat(rejected or [torch.zeros(0)]))  # fmt: skip
    result["pairs"] = pairs
    return result


# ------------------------------------------------------------------ greedy generation


def _eos_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    eos = getattr(_causal_lm(model).generation_config, "eos_token_id", None)
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
        progress: show a tqdm bar.

    Returns:
        One dict per prompt, in order: `index`, `response` (text, special tokens removed), `length` (new tokens up to
        and including the first EOS), `hit_budget` (no EOS within `max_new_tokens`).
    """
    eos_ids = _eos_ids(model, tokenizer)
    prompt_ids = [tokenize_prompt(p, tokenizer) for p in prompts]
    if max_prompt_length is not None:
        prompt_ids = [ids[-max_prompt_length:] for ids in prompt_ids]
    device, pad_id = _device(model), tokenizer.pad_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompt_ids[i]), reverse=True)  # the largest batch first
    records = {}
    for start in tqdm(range(0, len(order), batch_size), desc="Generating", disable=not progress):
        indices = order[start : start + batch_size]
        width = max(len(prompt_ids[i]) for i in indices)
        input_ids = torch.tensor([[pad_id] * (width - len(prompt_ids[i])) + prompt_ids[i] for i in indices])
        attention_mask = torch.tensor([[0] * (width - len(prompt_ids[i])) + [1] * len(prompt_ids[i]) for i in indices])
        output = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad_id, eos_token_id=eos_ids,
        )  # fmt: skip
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
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = True,
    **ot_options,
) -> dict[str, Any]:
    """Evaluate one model: implicit-reward preference accuracy and margins (uniform and OT weights) on the first
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
        progress: show tqdm bars.
        **ot_options: keyword arguments of [`ot_token_weights`] (see [`ot_kwargs`]).

    Returns:
        JSON-serialisable dict: `model`, `reference` (a path, `"base (adapter disabled)"` or `None`), `data`, `split`,
        `beta`, `ot` (the options used), `preference` ([`score_preferences`]'s result without `pairs`), `pairs`,
        `generation` ([`generation_metrics`], or None), `generations` (the records of [`generate_responses`], each
        with its `prompt`), `seconds`.
    """
    started = time.perf_counter()
    ot_options = {**OT_DEFAULTS, **ot_options}
    wanted = None if max_samples is None else max(max_samples, num_generations, 1)  # 1: the data are still checked
    dataset = load_preference_dataset(data, split, max_samples=wanted)  # before the model: bad data fails fast
    policy, reference, tokenizer = load_model_and_tokenizer(model_path, ref=ref, dtype=dtype, device=device)
    examples = [maybe_extract_prompt(dict(e)) for e in dataset]

    scored = score_preferences(
        policy, reference, tokenizer, examples[:max_samples], beta=beta, batch_size=batch_size,
        max_length=max_length, progress=progress, **ot_options,
    )  # fmt: skip
    prompts = [e["prompt"] for e in examples[:num_generations]]
    generations = generate_responses(
        policy, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
        max_prompt_length=max_length, progress=progress,
    )  # fmt: skip
    for record, prompt in zip(generations, prompts):
        record["prompt"] = prompt
    return {
        "model": model_path,
        "reference": ref if ref is not None else "base (adapter disabled)" if reference is policy else None,
        "data": data,
        "split": split,
        "beta": beta,
        "max_length": max_length,
        "ot": ot_options,
        "preference": {k: v for k, v in scored.items() if k != "pairs"},
        "pairs": scored["pairs"],
        "generation": generation_metrics(generations, max_new_tokens) if generations else None,
        "generations": generations,
        "seconds": time.perf_counter() - started,
    }


def format_markdown(result: dict[str, Any]) -> str:
    """A Markdown report of one [`evaluate`] result: the preference table (uniform vs OT) and the generation one."""
    pref = result["preference"]
    reference = result["reference"] or "none: the policy is its own reference, so every margin is 0"
    lines = [
        f"# Evaluation of `{result['model']}`",
        "",
        f"Data: `{result['data']}` [{result['split']}], {pref['n_pairs']} pairs"
        + (f" ({pref['n_skipped']} skipped: prompt longer than max_length)" if pref["n_skipped"] else "")
        + f"; reference: {reference}; beta = {result['beta']}.",
        "OT: " + ", ".join(f"{k}={v}" for k, v in result["ot"].items()) + ".",
        "",
        "| token weights | accuracy | mean margin | mean chosen reward | mean rejected reward |",
        "|---|---:|---:|---:|---:|",
    ]
    for weighting, label in (("uniform", "uniform (DPO)"), ("ot", "OT (OTPO)")):
        m = pref[weighting]
        lines.append(f"| {label} | {m['accuracy']:.3f} | {m['margin_mean']:.4f} | {m['chosen_reward_mean']:.4f} | "
                     f"{m['rejected_reward_mean']:.4f} |")  # fmt: skip
    lines += ["", "Accuracy: share of pairs whose chosen reward is strictly larger (ties count as wrong, as in TRL)."]
    gen = result["generation"]
    if gen is not None:
        lines += [
            "",
            f"Greedy generation, {gen['n']} prompts, budget {gen['max_new_tokens']} new tokens:",
            "",
            "| mean length | median length | share hitting the budget |",
            "|---:|---:|---:|",
            f"| {gen['length_mean']:.1f} | {gen['length_median']:.1f} | {gen['hit_budget_share']:.3f} |",
        ]
    return "\n".join(lines) + "\n"


def _finite_or_none(value):
    """`value` with every NaN or infinite float (a mean over no pairs) as None: JSON has no NaN, only null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def write_report(result: dict[str, Any], output_dir: str | Path) -> dict[str, Path]:
    """Write `eval.json` (all but the per-pair and per-response records; a metric over no pairs is null),
    `eval.md` and `generations.jsonl`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: output_dir / name for name in ("eval.json", "eval.md", "generations.jsonl")}
    summary = _finite_or_none({k: v for k, v in result.items() if k not in ("pairs", "generations")})
    paths["eval.json"].write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    paths["eval.md"].write_text(format_markdown(result))
    with paths["generations.jsonl"].open("w") as f:
        for record in result["generations"]:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return paths


__all__ = [
    "PairStats",
    "add_ot_arguments",
    "evaluate",
    "format_markdown",
    "generate_responses",
    "generation_metrics",
    "implicit_rewards",
    "inline_example",
    "load_model_and_tokenizer",
    "ot_kwargs",
    "pair_token_stats",
    "preference_metrics",
    "score_preferences",
    "tokenize_pair",
    "write_report",
]
