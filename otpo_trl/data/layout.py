"""The preference layouts: what a row may hold, where a conversational pair's prompt ends, and the mapping to TRL's
preference format.

[`validate_columns`] and [`validate_rows`] check a split before anything else: a bad value, rows that mix two layouts,
or a conversational pair whose prompt is ambiguous is refused, naming the row and the column. [`detect_layout`] names
the layout of a row; [`to_preference_format`] maps the split to TRL's format, giving conversational pairs an explicit
prompt (the turns that `chosen` and `rejected` share, see [`shared_prompt_length`]; or the given prompt, with any repeat
of it removed from the completions). The rules are stated in docs/training.md ("Data").
"""

import logging

from datasets import Dataset
from trl.data_utils import is_conversational


logger = logging.getLogger(__package__)  # "otpo_trl.data", the one logger of the data package

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")
REQUIRED_COLUMNS = ("chosen", "rejected")
# The chat roles TRL 1.16 knows (`trl.data_utils`: system, user, assistant, tool).
CHAT_ROLES = ("system", "user", "assistant", "tool")
# Roles of other conventions (ShareGPT, Anthropic HH), named in the error with the role to use instead.
_ROLE_HINTS = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "ai": "assistant"}


def validate_columns(column_names, name: str = "dataset") -> None:
    """Raise a `ValueError` naming the columns found and the ones expected unless `chosen` and `rejected` are there.

    Args:
        column_names: the data set's column names.
        name: how to call the data set in the message (e.g. its path and split).
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in column_names]
    if missing:
        raise ValueError(
            f"{name} is not a preference data set: it has columns {sorted(column_names)}, but needs "
            f"{list(REQUIRED_COLUMNS)} (optionally with 'prompt'), missing {missing}. Expected TRL's preference "
            "format (standard or conversational, explicit or implicit prompt) or an UltraFeedback layout "
            "(trl-lib/ultrafeedback_binarized, HuggingFaceH4/ultrafeedback_binarized)."
        )


def _message_problem(message) -> str | None:
    """What is wrong with one chat message, or None."""
    if not isinstance(message, dict):
        return f"expected a {{'role': ..., 'content': ...}} dict, got {type(message).__name__} {message!r:.60}"
    role = message.get("role")
    if role is None:
        if "from" in message and "value" in message:
            return "has 'from'/'value' keys (ShareGPT); TRL needs 'role' and 'content'"
        return f"has no 'role' (keys: {sorted(message)})"
    if role not in CHAT_ROLES:
        hint = f"; use {_ROLE_HINTS[role]!r}" if role in _ROLE_HINTS else ""
        return f"has role {role!r}, not one of {list(CHAT_ROLES)}{hint}"
    content = message.get("content")
    if content is None and not message.get("tool_calls"):
        return f"(role {role!r}) has no 'content'"
    if content is not None and not isinstance(content, str):
        return f"(role {role!r}) has a {type(content).__name__} 'content'; expected text"
    return None


def is_empty(value) -> bool:
    """None, blank text or an empty message list."""
    if isinstance(value, str):
        return not value.strip()
    return value is None or (isinstance(value, list) and not value)


_KINDS = {"text": "text", "messages": "a list of messages"}


def _value_kind(value, where: str) -> str | None:
    """'text', 'messages', or None for an empty value (None, blank text, no messages: see [`drop_empty_pairs`])."""
    if value is None or (isinstance(value, (str, list)) and is_empty(value)):
        return None
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        for k, message in enumerate(value):
            problem = _message_problem(message)
            if problem is not None:
                raise ValueError(f"{where}, message {k} {problem}.")
        return "messages"
    raise ValueError(f"{where}: expected text or a list of messages, got {type(value).__name__} {value!r:.60}.")


# Turns that open a conversation and that the model never writes: a completion that starts with one holds (part of) a
# prompt.
_PROMPT_ROLES = ("system", "user")


def same_turn(a: dict, b: dict) -> bool:
    """Whether two chat messages are the same turn: equal on every key that either sets. Arrow gives each message of a
    column every key found in that column (`tool_calls: None` beside `role` and `content`), so the same turn can come
    with other None keys in `chosen` than in `rejected`; TRL 1.16's `extract_prompt` compares the dicts as they are."""
    return {k: v for k, v in a.items() if v is not None} == {k: v for k, v in b.items() if v is not None}


def shared_prompt_length(chosen: list, rejected: list) -> int:
    """The number of leading turns of `chosen` and `rejected` that form their implicit prompt, by TRL 1.16's
    `extract_prompt` rule (the turns they share, and when one side opens the other, all but the last of the shorter)
    with turns compared by [`same_turn`]."""
    shared = 0
    for c, r in zip(chosen, rejected):
        if not same_turn(c, r):
            return shared
        shared += 1
    return max(shared - 1, 0)


def repeats_prompt(prompt: list, completion: list) -> bool:
    """True when the message list `completion` opens with all the turns of the message list `prompt` and goes on."""
    return 0 < len(prompt) < len(completion) and all(same_turn(p, c) for p, c in zip(prompt, completion))


def _turn(message: dict) -> str:
    return f"{message.get('role')} turn {str(message.get('content'))[:40]!r}"


def _conversation_problem(prompt, chosen: list, rejected: list) -> str | None:
    """What is wrong with where the prompt of one conversational pair ends, or None (see [`validate_rows`])."""
    if isinstance(prompt, list):  # an explicit conversational prompt
        if not prompt:
            return "'prompt' is an empty list of messages; every pair needs the turns it answers"
        chosen_repeats, rejected_repeats = repeats_prompt(prompt, chosen), repeats_prompt(prompt, rejected)
        if chosen_repeats and rejected_repeats:
            return None  # the repeat is moved to the prompt by `to_preference_format`
        if chosen_repeats or rejected_repeats:
            repeating, other = ("chosen", "rejected") if chosen_repeats else ("rejected", "chosen")
            first = (chosen if other == "chosen" else rejected)[0]
            return (
                f"'{repeating}' repeats the prompt's {len(prompt)} turn(s) before its answer but '{other}' does not "
                f"(it starts with the {_turn(first)}): give both completions the same way, with the prompt's turns or "
                "without them"
            )
        for column, completion in (("chosen", chosen), ("rejected", rejected)):
            if completion[0].get("role") in _PROMPT_ROLES:
                return (
                    f"'{column}' starts with the {_turn(completion[0])}, which does not repeat the prompt: completions "
                    "hold the turns that answer the prompt. If 'chosen' and 'rejected' hold whole conversations, "
                    "leave out 'prompt': their shared leading turns are then the prompt"
                )
        return None
    # An implicit prompt (or the text prompt of the HuggingFaceH4 layout, replaced by the shared turns): the leading
    # turns that chosen and rejected share, which must end where the answers begin.
    length = shared_prompt_length(chosen, rejected)
    c, r = chosen[length], rejected[length]
    if not same_turn(c, r) and (c.get("role") in _PROMPT_ROLES or r.get("role") in _PROMPT_ROLES):
        where = "from their first turn" if length == 0 else f"after {length} shared turn(s)"
        return (
            f"'chosen' and 'rejected' differ {where} ('chosen' has the {_turn(c)}, 'rejected' the {_turn(r)}): "
            "their implicit prompts differ, so the pair has no prompt that both answer. Give both the same prompt "
            "turns, or the prompt in a 'prompt' column"
        )
    if length == 0:
        return (
            f"'chosen' and 'rejected' share no leading turn before their answers ('chosen' starts with the {_turn(c)}, "
            f"'rejected' with the {_turn(r)}), so the pair has no prompt. Open both with the prompt's turns, or give "
            "them in a 'prompt' column"
        )
    return None


def validate_rows(dataset: Dataset, name: str = "dataset") -> None:
    """Check the `prompt`, `chosen` and `rejected` value of every row, and that all rows share one layout.

    A value is text, a list of chat messages (`{"role": ..., "content": text}` dicts with a role from `CHAT_ROLES`),
    or empty (None, blank, no messages: dropped later by [`drop_empty_pairs`]). `chosen` and `rejected` are of one
    kind in every row; `prompt`, when there is one, is present in every row and of one kind (text prompt with message
    completions is the HuggingFaceH4 layout; a message prompt with text completions is an error).

    In conversational pairs the prompt must end where the answers begin. With a `prompt` of messages, `chosen` and
    `rejected` either both repeat all of its turns before their answer (the repeat is then moved to the prompt by
    [`to_preference_format`]) or neither does, and neither starts with a user or system turn of its own. Without one
    (or with the text prompt of the HuggingFaceH4 layout) the prompt is the leading turns they share (see
    [`shared_prompt_length`]), which must hold at least one turn and must not stop before a user or system turn: that
    would mean two different prompts, and train one of them as an answer.

    Raises:
        ValueError: naming the row (counting from 0, as `dataset[i]`), the column and the problem.
    """
    columns = [c for c in PREFERENCE_COLUMNS if c in dataset.column_names]
    values = {c: list(dataset[c]) for c in columns}
    first = {}  # column (the completions share one entry) -> (kind, row) of its first non-empty value
    for i in range(len(dataset)):
        kinds = {c: _value_kind(values[c][i], f"{name}: row {i}, column '{c}'") for c in columns}
        if "prompt" in kinds and values["prompt"][i] is None:
            other = next((j for j, v in enumerate(values["prompt"]) if v is not None), None)
            if other is not None:
                raise ValueError(
                    f"{name}: row {i} has no 'prompt' but row {other} has one: the rows mix two layouts (an explicit "
                    "'prompt' column, and the prompt as the first turns of 'chosen' and 'rejected'). Convert them to "
                    "one layout."
                )
            raise ValueError(f"{name}: row {i} has no 'prompt' (the column exists, so every row needs one).")
        if None not in (kinds["chosen"], kinds["rejected"]) and kinds["chosen"] != kinds["rejected"]:
            raise ValueError(
                f"{name}: row {i}: 'chosen' is {_KINDS[kinds['chosen']]} but 'rejected' is {_KINDS[kinds['rejected']]}."
            )
        for column, key in (("prompt", "prompt"), ("chosen", "completions"), ("rejected", "completions")):
            kind = kinds.get(column)
            if kind is None:
                continue
            seen, row = first.setdefault(key, (kind, i))
            if kind != seen:
                raise ValueError(
                    f"{name}: row {i}, column '{column}' is {_KINDS[kind]} but row {row} is {_KINDS[seen]}: every row must use one "
                    "layout (all text, or all lists of messages)."
                )
        if kinds["chosen"] == kinds["rejected"] == "messages":
            prompt = values["prompt"][i] if "prompt" in values else None
            problem = _conversation_problem(prompt, values["chosen"][i], values["rejected"][i])
            if problem is not None:
                raise ValueError(f"{name}: row {i}: {problem}.")
    if first.get("prompt", ("",))[0] == "messages" and first.get("completions", ("",))[0] == "text":
        raise ValueError(
            f"{name}: 'prompt' is a list of messages but the completions are text (row {first['completions'][1]}); "
            "use text for all three, or messages for all three."
        )


def detect_layout(example: dict) -> str:
    """Name the layout of one example.

    Returns:
        `"standard"` or `"conversational"` (TRL's preference format, explicit or implicit prompt, kept as is), or
        `"prompt_in_completions"` (a `prompt` whose type differs from the completions', as in
        HuggingFaceH4/ultrafeedback_binarized: mapped by [`to_preference_format`]).
    """
    chosen_conversational = is_conversational({"chosen": example["chosen"]})
    if "prompt" in example and is_conversational({"prompt": example["prompt"]}) != chosen_conversational:
        return "prompt_in_completions"
    return "conversational" if chosen_conversational else "standard"


def split_shared_prompt(example: dict) -> dict:
    """`{"prompt", "chosen", "rejected"}` of a conversational pair whose prompt is the leading turns that its `chosen`
    and `rejected` share (see [`shared_prompt_length`])."""
    chosen, rejected = example["chosen"], example["rejected"]
    length = shared_prompt_length(chosen, rejected)
    return {"prompt": chosen[:length], "chosen": chosen[length:], "rejected": rejected[length:]}


def _drop_repeated_prompt(example: dict) -> dict:
    prompt, chosen, rejected = example["prompt"], example["chosen"], example["rejected"]
    start = len(prompt) if repeats_prompt(prompt, chosen) and repeats_prompt(prompt, rejected) else 0
    return {"chosen": chosen[start:], "rejected": rejected[start:]}


def to_preference_format(dataset: Dataset) -> Dataset:
    """Map `dataset` to TRL's preference format and keep only its `prompt`, `chosen` and `rejected` columns.

    Standard (text) pairs pass through unchanged. Conversational pairs get an explicit `prompt`: without one (TRL's
    implicit prompt) or with a text one (the H4 layout), the leading turns that `chosen` and `rejected` share
    (see [`split_shared_prompt`], TRL's `extract_prompt` rule); with one whose turns the completions repeat
    (`prompt: [user Q]`, `chosen: [user Q, assistant A]`), the repeat is removed from the completions, with an info
    line counting the pairs. Either way the prompt's turns are trained as the prompt, never as part of an answer.
    [`validate_rows`] refuses the pairs where this is ambiguous.
    """
    validate_columns(dataset.column_names)
    layout = detect_layout(dataset[0]) if len(dataset) else "standard"
    implicit = "prompt" not in dataset.column_names or layout == "prompt_in_completions"
    if layout != "standard" and implicit:
        dataset = dataset.map(split_shared_prompt, remove_columns=dataset.column_names, desc="Extracting prompts")
        dataset = dataset.select_columns(list(PREFERENCE_COLUMNS))
    else:
        dataset = dataset.select_columns([c for c in PREFERENCE_COLUMNS if c in dataset.column_names])
    if layout == "conversational" and not implicit:
        repeated = sum(
            repeats_prompt(p, c) and repeats_prompt(p, r)
            for p, c, r in zip(dataset["prompt"], dataset["chosen"], dataset["rejected"])
        )
        if repeated:
            logger.info(
                f"{repeated} of {len(dataset)} pairs repeat their prompt's turns at the start of 'chosen' and "
                "'rejected': those turns are trained as the prompt, not as part of the answer."
            )
            dataset = dataset.map(_drop_repeated_prompt, desc="Removing repeated prompt turns")
    logger.info(f"Preference layout: {layout}; columns kept: {dataset.column_names}.")
    return dataset
