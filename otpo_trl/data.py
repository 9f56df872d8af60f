"""Preference data for the scripts: load a split, map it to TRL's preference format, drop unusable pairs.

Accepted inputs (each example is one preference pair):

- TRL's preference format: `chosen` and `rejected`, with or without an explicit `prompt`, all plain text
  ("standard", kept as it is) or all message lists ("conversational"). `trl-lib/ultrafeedback_binarized` is
  conversational with an implicit prompt (the user turn opens both `chosen` and `rejected`).
- `HuggingFaceH4/ultrafeedback_binarized` (splits `train_prefs` / `test_prefs`) and layouts like it: a text `prompt`
  next to message-list `chosen` / `rejected` that repeat it as their first user turn, plus `messages`, `prompt_id`,
  `score_*` columns. TRL would take the text prompt as explicit and train on the user turn as part of the completion.

Conversational pairs leave here with an explicit prompt that holds every turn before the answers: the leading turns
that `chosen` and `rejected` share when the prompt is implicit (or text, as in H4), and the `prompt` itself when it is
given, with any repeat of it removed from the completions (see [`to_preference_format`]); pairs where that is
ambiguous are refused by [`validate_rows`], naming the row. The rules are stated in docs/training.md ("Data").

Only `prompt`, `chosen` and `rejected` are kept; scores are read before that by [`drop_score_ties`]. Every row is
checked before any of this (see [`validate_rows`]): a bad value fails naming its row and column.

[`data_fingerprint`] is a cheap fingerprint of what a split is loaded from, for the run record of `scripts/train.py`.
"""

import hashlib
import json
import logging
import re
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from trl.data_utils import is_conversational

from .local_paths import DATA_FILE_BUILDERS, looks_like_data_path


logger = logging.getLogger(__name__)

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")
REQUIRED_COLUMNS = ("chosen", "rejected")
# The chat roles TRL 1.16 knows (`trl.data_utils`: system, user, assistant, tool).
CHAT_ROLES = ("system", "user", "assistant", "tool")
# Roles of other conventions (ShareGPT, Anthropic HH), named in the error with the role to use instead.
_ROLE_HINTS = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "ai": "assistant"}
# (chosen score, rejected score) column names: TRL / H4 UltraFeedback, then Argilla's cleaned UltraFeedback.
SCORE_COLUMNS = (("score_chosen", "score_rejected"), ("chosen-rating", "rejected-rating"))


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


_KINDS = {"text": "text", "messages": "a list of messages"}


def _value_kind(value, where: str) -> str | None:
    """'text', 'messages', or None for an empty value (None, blank text, no messages: see [`drop_empty_pairs`])."""
    if value is None or (isinstance(value, (str, list)) and _is_empty(value)):
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


def _is_empty(value) -> bool:
    """None, blank text or an empty message list."""
    if isinstance(value, str):
        return not value.strip()
    return value is None or (isinstance(value, list) and not value)


def drop_empty_pairs(dataset: Dataset, name: str = "dataset") -> Dataset:
    """Drop pairs whose `chosen` or `rejected` is missing or empty (None, blank text, no messages), with a logged
    count; raise a `ValueError` naming the column if it is empty in every row, or if no pair is left."""
    if len(dataset) == 0:
        raise ValueError(f"{name} has no rows.")
    empty = {c: [_is_empty(v) for v in dataset[c]] for c in REQUIRED_COLUMNS}
    all_empty = [c for c, flags in empty.items() if all(flags)]
    if all_empty:
        raise ValueError(f"{name}: column(s) {all_empty} are empty in every one of its {len(dataset)} rows.")
    keep = [i for i, flags in enumerate(zip(*empty.values(), strict=True)) if not any(flags)]
    if not keep:
        raise ValueError(f"{name}: every one of its {len(dataset)} pairs has an empty 'chosen' or 'rejected'.")
    if len(keep) < len(dataset):
        counts = ", ".join(f"{sum(flags)} with an empty '{c}'" for c, flags in empty.items() if any(flags))
        logger.warning(f"Dropped {len(dataset) - len(keep)} of {len(dataset)} pairs of {name}: {counts}.")
        dataset = dataset.select(keep)
    return dataset


def _holds_no_rows(file: Path) -> bool:
    """An empty file, blank text, or a .json holding an empty list (datasets fails on these with StopIteration)."""
    if file.stat().st_size > 1024 or file.suffix == ".parquet":
        return False
    text = file.read_text(errors="replace").strip()
    return not text or (file.suffix == ".json" and text.replace(" ", "") in ("[]", "{}"))


def _json_problem(file: Path) -> str | None:
    """Where the JSON (Lines) file `file` is not valid JSON ("line 3 ..."), or None."""
    text = file.read_text(errors="replace")
    if file.suffix == ".json":
        try:
            json.loads(text)
            return None
        except ValueError as err:
            whole = f"line {err.lineno}, column {err.colno}: {err.msg}"
        first = next((line for line in text.splitlines() if line.strip()), "")
        try:
            json.loads(first)  # a .json file of JSON Lines: check it line by line
        except ValueError:
            return whole
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                json.loads(line)
            except ValueError as err:
                return f"line {number} is not valid JSON ({err.msg}, column {err.colno}): {line[:80]!r}"
    return None


def _load_data_files(files: list[Path]) -> Dataset:
    if all(_holds_no_rows(f) for f in files):
        raise ValueError(f"{', '.join(map(str, files))}: no rows (the file is empty).")
    builder = DATA_FILE_BUILDERS[files[0].suffix]
    try:
        return load_dataset(builder, data_files=[str(f) for f in files], split="train")
    except Exception as err:  # pyarrow's chained errors do not name the line: find it
        if builder != "json":
            raise
        for file in files:
            problem = _json_problem(file)
            if problem is not None:
                raise ValueError(
                    f"{file}: {problem}. A line cut short (an interrupted write or download) or a broken row: fix or "
                    "delete that line."
                ) from err
        raise


# A shard of a split, as the Hub names them: `train-00000-of-00003`.
_SHARD = re.compile(r"(?P<split>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})")


def _is_split_file(stem: str, split: str) -> bool:
    shard = _SHARD.fullmatch(stem)
    return stem == split or (shard is not None and shard["split"] == split)


def _looks_like_split_file(stem: str, split: str) -> bool:
    """A name that starts with the split's and goes on with a character that no split name has there: a copy or a
    backup (`train-backup`, `train (1)`, `train.old`). A letter, digit or `_` would make another split (`train_prefs`)."""
    rest = stem[len(split) :]
    return stem.startswith(split) and bool(rest) and not (rest[0].isalnum() or rest[0] == "_")


def _split_files_at(where: Path, split: str) -> list[Path]:
    """The files of `split` directly in `where`, checked: see [`split_files`]."""
    if not where.is_dir():
        return []
    candidates = sorted(p for p in where.iterdir() if p.suffix in DATA_FILE_BUILDERS and p.is_file())
    files = [p for p in candidates if _is_split_file(p.stem, split)]
    lookalikes = [p.name for p in candidates if p not in files and _looks_like_split_file(p.stem, split)]
    if lookalikes:
        raise ValueError(
            f"{where}: {lookalikes} look like files of split {split!r} but are not named `{split}.<ext>` or, for "
            f"shards, `{split}-NNNNN-of-NNNNN.<ext>`, so it is not clear which files hold the split. Rename, move or "
            "delete them (a copy or backup belongs outside the data folder)."
        )
    kinds = {"a single file" if p.stem == split else "shards" for p in files}
    if len({p.suffix for p in files}) > 1 or len(kinds) > 1:
        what = "formats" if len({p.suffix for p in files}) > 1 else "forms (a single file and shards)"
        raise ValueError(
            f"{where} holds split {split!r} in two {what}: {[p.name for p in files]}. Only one can be read: keep one "
            "and move the others out of the folder."
        )
    shards = [_SHARD.fullmatch(p.stem) for p in files if p.stem != split]
    if shards:
        counts = {int(m["count"]) for m in shards}
        missing = sorted(set(range(max(counts))) - {int(m["index"]) for m in shards})
        if len(counts) > 1 or missing:
            missing_names = [f"{split}-{i:05d}-of-{max(counts):05d}{files[0].suffix}" for i in missing[:5]]
            why = f"missing {missing_names}" if missing else f"they count to different totals {sorted(counts)}"
            raise ValueError(f"{where}: the shards of split {split!r} are incomplete: {why}.")
    return files


def split_files(folder: str | Path, split: str) -> list[Path]:
    """The data files of `split` in the data folder `folder`, as [`load_raw_split`] reads them: `<split>.<ext>` or
    the shards `<split>-NNNNN-of-NNNNN.<ext>` at the folder's own level or, when it has none, in its `data/` subfolder
    (the Hub's layout). Other subfolders are not read. Empty if there are none.

    Raises:
        ValueError: another file looks like the split's (`train-backup.jsonl`, `train (1).jsonl`), the split is there
            in two formats (`train.jsonl` and `train.parquet`) or as both a file and shards, or a shard is missing;
            the message names the files.
    """
    folder = Path(folder)
    for where in (folder, folder / "data"):
        files = _split_files_at(where, split)
        if files:
            return files
    return []


def _data_files_below(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix in DATA_FILE_BUILDERS and p.is_file())


def _split_names(files: list[Path]) -> list[str]:
    return sorted({f.stem.split("-")[0] for f in files})


def _load_local_split(path: Path, split: str) -> Dataset:
    if path.is_file():
        if path.suffix not in DATA_FILE_BUILDERS:
            raise ValueError(f"{path}: unsupported file type; use one of {sorted(DATA_FILE_BUILDERS)}.")
        # A single file is a single split: it is returned for whichever split is asked.
        return _load_data_files([path])
    hint = (
        "set `dataset_train_split` (and `dataset_test_split`) to the split's name, e.g. `--dataset_train_split "
        "train_prefs --dataset_test_split test_prefs` for HuggingFaceH4/ultrafeedback_binarized"
    )
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():  # `save_to_disk` output
        saved = load_from_disk(str(path))
        if isinstance(saved, DatasetDict):
            if split not in saved:
                raise ValueError(f"{path} has splits {list(saved)}, not {split!r}: {hint}.")
            return saved[split]
        return saved
    # A folder of data files, one split per `<split>.<ext>` (or shards `<split>-NNNNN-of-NNNNN.<ext>`), or under `data/`.
    files = split_files(path, split)
    below = _data_files_below(path)
    if files:
        ignored = [
            str(p.relative_to(path)) for p in below if p.parent != files[0].parent and p.stem.split("-")[0] == split
        ]
        if ignored:
            logger.warning(
                f"{path}: read {len(files)} file(s) of split {split!r} from {files[0].parent}; ignored the ones in "
                f"other subfolders ({', '.join(ignored[:5])}{', ...' if len(ignored) > 5 else ''}): a data folder is "
                "read at its own level (or its data/ subfolder) only. To train on another, point `dataset_name` at it."
            )
        return _load_data_files(files)
    level = [p for p in below if p.parent in (path, path / "data")]
    found = [str(p.relative_to(path)) for p in below]
    splits = f"; its split(s): {_split_names(level)}: {hint}" if level else ""
    deeper = (
        " (subfolders other than data/ are not read: point `dataset_name` at one to use it)" if below != level else ""
    )
    raise FileNotFoundError(
        f"No data file for split {split!r} in {path}: expected `{split}.jsonl`, `{split}.json` or `{split}.parquet` "
        f"(or shards `{split}-NNNNN-of-NNNNN.<ext>`) in it or in its data/ subfolder; found {found[:10]}{deeper}{splits}."
    )


_MIB = 1 << 20


def file_fingerprint(file: str | Path) -> dict:
    """A cheap fingerprint of `file`: its size, modification time (ns) and the SHA-256 of its first and last MiB (all
    of it up to 2 MiB)."""
    file = Path(file)
    stat = file.stat()
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        digest.update(handle.read(_MIB))
        if stat.st_size > 2 * _MIB:
            handle.seek(-_MIB, 2)
        digest.update(handle.read(_MIB))
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}


def data_fingerprint(name_or_path: str, split: str = "train", config: str | None = None) -> dict:
    """A cheap fingerprint of what [`load_raw_split`] loads `split` of `name_or_path` from, to tell whether the data
    changed between two runs.

    Returns:
        For local data `{"files": {absolute path: file_fingerprint}}` over the files read (the file; the split's files
        in a folder; every file of a `save_to_disk` folder); for a Hub data set `{"hub": name, "config": ...,
        "split": ..., "fingerprint": ...}`, with `datasets`' fingerprint of the loaded split (from the cache when
        there is one).
    """
    path = Path(name_or_path).expanduser()
    if not path.exists():
        if looks_like_data_path(name_or_path):
            raise FileNotFoundError(f"No such data file or folder: {name_or_path} (relative to {Path.cwd()}).")
        dataset = load_raw_split(name_or_path, split, config)
        return {"hub": name_or_path, "config": config, "split": split, "fingerprint": dataset._fingerprint}
    if path.is_file():
        files = [path]
    elif (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        files = split_files(path, split)
    return {"files": {str(f.resolve()): file_fingerprint(f) for f in files}}


def load_raw_split(name_or_path: str, split: str = "train", config: str | None = None) -> Dataset:
    """Load one split as stored, without any mapping.

    Args:
        name_or_path: a Hub data set id, or a local `.jsonl` / `.json` / `.parquet` file, a folder holding
            `<split>.<ext>` files (at its own level or in its `data/` subfolder, see [`split_files`]), or a folder
            written by `save_to_disk`. Relative paths are relative to the current directory.
        split: the split to load (ignored for a single file, which is one split).
        config: the Hub data set's configuration name, if it has several.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return _load_local_split(path, split)
    if looks_like_data_path(name_or_path):
        raise FileNotFoundError(f"No such data file or folder: {name_or_path} (relative to {Path.cwd()}).")
    return load_dataset(name_or_path, name=config, split=split)


def _score_columns(column_names) -> tuple[str, str] | None:
    return next((pair for pair in SCORE_COLUMNS if all(c in column_names for c in pair)), None)


def drop_score_ties(dataset: Dataset) -> Dataset:
    """Drop pairs whose chosen and rejected completions have the same score; log how many were dropped.

    A data set without score columns (see `SCORE_COLUMNS`) is returned unchanged, with a warning.
    """
    columns = _score_columns(dataset.column_names)
    if columns is None:
        logger.warning(f"drop_ties: no score columns {list(SCORE_COLUMNS)} in the data set; no pair was dropped.")
        return dataset

    def keep(chosen_scores, rejected_scores):
        return [c is None or c != r for c, r in zip(chosen_scores, rejected_scores)]

    kept = dataset.filter(keep, input_columns=list(columns), batched=True, desc="Dropping score ties")
    logger.info(f"Dropped {len(dataset) - len(kept)} of {len(dataset)} pairs with tied scores ({columns[0]}).")
    return kept


def drop_identical_pairs(dataset: Dataset) -> Dataset:
    """Drop pairs whose chosen and rejected are equal (no preference to learn); log how many were dropped."""

    def keep(chosen, rejected):
        return [c != r for c, r in zip(chosen, rejected)]

    kept = dataset.filter(keep, input_columns=["chosen", "rejected"], batched=True, desc="Dropping identical pairs")
    logger.info(f"Dropped {len(dataset) - len(kept)} of {len(dataset)} pairs whose chosen equals rejected.")
    return kept


def split_off_eval(dataset: Dataset, size: float, seed: int = 42) -> tuple[Dataset, Dataset]:
    """Hold out pairs of `dataset` for evaluation: `(train, eval)`, disjoint, drawn at random with `seed`.

    Args:
        dataset: the pairs to split.
        size: a share of the pairs (0 < size < 1, rounded, at least 1) or a number of pairs (size >= 1).
        seed: seed of the shuffle, so that a resumed run holds out the same pairs.
    """
    if size <= 0 or (size >= 1 and size != int(size)):
        raise ValueError(f"`eval_split_size` must be a share in (0, 1) or a whole number of pairs, got {size}.")
    count = max(1, round(size * len(dataset))) if size < 1 else int(size)
    if count >= len(dataset):
        raise ValueError(
            f"`eval_split_size` {size} holds out {count} of {len(dataset)} pairs: none would be left to train on."
        )
    split = dataset.train_test_split(test_size=count, shuffle=True, seed=seed)
    logger.info(f"Held out {count} of {len(dataset)} pairs for evaluation (eval_split_size={size}, seed {seed}).")
    return split["train"], split["test"]


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


def load_preference_dataset(
    name_or_path: str,
    split: str = "train",
    config: str | None = None,
    max_samples: int | None = None,
    drop_ties: bool = False,
    drop_identical: bool = False,
) -> Dataset:
    """Load one split of a preference data set in TRL's preference format.

    Steps: load (see [`load_raw_split`]) → check the columns (see [`validate_columns`]) and every row (see
    [`validate_rows`]) → drop pairs with an empty side (see [`drop_empty_pairs`]) → drop tied / identical pairs if
    asked → keep the first `max_samples` pairs → map to TRL's format (see [`to_preference_format`]).

    Args:
        name_or_path: a Hub data set id or a local file / folder.
        split: the split to load, e.g. `"train"` or `"train_prefs"` (HuggingFaceH4/ultrafeedback_binarized).
        config: the Hub data set's configuration name, if it has several.
        max_samples: keep at most this many pairs (the first ones, after filtering).
        drop_ties: drop pairs whose chosen and rejected scores are equal.
        drop_identical: drop pairs whose chosen equals rejected.

    Returns:
        `Dataset` with columns `chosen`, `rejected` and, for an explicit prompt, `prompt`.

    Raises:
        ValueError: a row is malformed (see [`validate_rows`]), or no pair is left, or `max_samples` < 1.
    """
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 (or unset, for all pairs), got {max_samples}.")
    name = f"{name_or_path} [{split}]"
    dataset = load_raw_split(name_or_path, split, config)
    validate_columns(dataset.column_names, name=name)
    logger.info(f"Loaded {len(dataset)} pairs from {name}.")
    validate_rows(dataset, name=name)
    dataset = drop_empty_pairs(dataset, name=name)
    loaded = len(dataset)
    if drop_ties:
        dataset = drop_score_ties(dataset)
    if drop_identical:
        dataset = drop_identical_pairs(dataset)
    if len(dataset) == 0:
        filters = " and ".join(f for f, on in (("drop_ties", drop_ties), ("drop_identical", drop_identical)) if on)
        raise ValueError(f"{name}: {filters} removed all {loaded} pairs; nothing is left to train or evaluate on.")
    if max_samples is not None and max_samples < len(dataset):
        dataset = dataset.select(range(max_samples))
    return to_preference_format(dataset)
