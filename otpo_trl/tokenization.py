"""Tokenisation of preference pairs and prompts as TRL 1.16's `DPOTrainer` does it, for code outside the trainer.

Below both training (`otpo_trl.cli.train` counts the pairs `DataCollatorForPreference` would keep) and evaluation
(`otpo_trl.inspection` and `otpo_trl.evaluation` score and generate from the tokens the trainer would see).
"""

import json
from typing import Any

from transformers import PreTrainedTokenizerBase
from trl.data_utils import _tokenize, common_prefix_length, is_conversational, maybe_extract_prompt


def template_kwargs(example: dict) -> dict[str, Any]:
    """The chat-template arguments of a conversational example, as TRL 1.16's `DPOTrainer` passes them: `tools` (its
    `tools` column, a list or a JSON string of one; None if absent) and the entries of its `chat_template_kwargs`."""
    tools = example.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    extra = example.get("chat_template_kwargs") or {}
    if not isinstance(extra, dict):
        raise ValueError(
            f"`chat_template_kwargs` must be a mapping of template arguments, got {type(extra).__name__}."
        )
    return {"tools": tools, **extra}


def tokenize_pair(example: dict, tokenizer: PreTrainedTokenizerBase) -> dict[str, list[int]]:
    """Tokenise one preference pair as TRL 1.16's `DPOTrainer._prepare_dataset` does.

    The prompt is extracted if implicit (shared leading turns); standard (text) completions get EOS appended;
    conversational ones go through the chat template, the prompt with the generation prompt, with the example's
    `tools` (a list, or a JSON string of one) and `chat_template_kwargs` columns if it has them ([`template_kwargs`]).
    The completion starts where the tokenised prompt and prompt + completion diverge (TRL's `common_prefix_length`).
    Truncation to `max_length` is left to `DataCollatorForPreference`, as in training.

    Returns:
        dict with `prompt_ids`, `chosen_ids`, `rejected_ids` (lists of token ids).
    """
    example = maybe_extract_prompt(dict(example))
    prompt, chosen, rejected = example["prompt"], example["chosen"], example["rejected"]
    if is_conversational(example):
        kwargs = template_kwargs(example)
        prompt_ids = _tokenize(tokenizer, prompt, add_generation_prompt=True, **kwargs)["input_ids"]
        chosen_ids = _tokenize(tokenizer, prompt + chosen, **kwargs)["input_ids"]
        rejected_ids = _tokenize(tokenizer, prompt + rejected, **kwargs)["input_ids"]
    else:
        eos = tokenizer.eos_token
        chosen, rejected = (c if c.endswith(eos) else c + eos for c in (chosen, rejected))
        prompt_ids = _tokenize(tokenizer, prompt)["input_ids"]
        chosen_ids = _tokenize(tokenizer, prompt + chosen)["input_ids"]
        rejected_ids = _tokenize(tokenizer, prompt + rejected)["input_ids"]
    prompt_len = min(common_prefix_length(prompt_ids, chosen_ids), common_prefix_length(prompt_ids, rejected_ids))
    return {
        "prompt_ids": prompt_ids[:prompt_len],
        "chosen_ids": chosen_ids[prompt_len:],
        "rejected_ids": rejected_ids[prompt_len:],
    }


def tokenize_prompt(prompt: str | list[dict], tokenizer: PreTrainedTokenizerBase, **kwargs) -> list[int]:
    """Token ids of a prompt to generate from: the chat template with its generation prompt (and `kwargs`, e.g.
    [`template_kwargs`]), or plain text."""
    if isinstance(prompt, list):
        return _tokenize(tokenizer, prompt, add_generation_prompt=True, **kwargs)["input_ids"]
    return _tokenize(tokenizer, prompt)["input_ids"]


__all__ = ["template_kwargs", "tokenize_pair", "tokenize_prompt"]
