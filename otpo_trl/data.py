"""Preference data for the scripts: load a split, map it to TRL's preference format, drop unusable pairs.

Accepted inputs (each example is one preference pair):

- TRL's preference format, kept as it is: `chosen` and `rejected`, with or without an explicit `prompt`, all plain
  text ("standard") or all message lists ("conversational"). `trl-lib/ultrafeedback_binarized` is conversational with
  an implicit prompt (the user turn opens both `chosen` and `rejected`).
- `HuggingFaceH4/ultrafeedback_binarized` (splits `train_prefs` / `test_prefs`) and layouts like it: a text `prompt`
  next to message-list `chosen` / `rejected` that repeat it as their first user turn, plus `messages`, `prompt_id`,
  `score_*` columns. TRL would take the text prompt as explicit and train on the user turn as part of the completion,
  so the shared leading turns become the (conversational) `prompt` and the rest the completions.

Only `prompt`, `chosen` and `rejected` are kept; scores are read before that by [`drop_score_ties`]. Every row is
checked before any of this (see [`validate_rows`]): a bad value fails naming its row and column.

[`data_fingerprint`] is a cheap fingerprint of what a split is loaded from, for the run record of `scripts/train.py`.
"""

import hashlib
import json
import logging
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from trl.data_utils import extract_prompt, is_conversational

from .loading import looks_like_local_path


logger = logging.getLogger(__name__)

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")
REQUIRED_COLUMNS = ("chosen", "rejected")
# The chat roles TRL 1.16 knows (`trl.data_utils`: system, user, assistant, tool).
CHAT_ROLES = ("system", "user", "assistant", "tool")
# Roles of other conventions (ShareGPT, Anthropic HH), named in the error with the role to use instead.
_ROLE_HINTS = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "ai": "assistant"}
# (chosen score, rejected score) column names: TRL / H4 UltraFeedback, then Argilla's cleaned UltraFeedback.
SCORE_COLUMNS = (("score_chosen", "score_rejected"), ("chosen-rating", "rejected-rating"))
# Local file extension -> `datasets` builder.
DATA_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


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


def validate_rows(dataset: Dataset, name: str = "dataset") -> None:
    """Check the `prompt`, `chosen` and `rejected` value of every row, and that all rows share one layout.

    A value is text, a list of chat messages (`{"role": ..., "content": text}` dicts with a role from `CHAT_ROLES`),
    or empty (None, blank, no messages: dropped later by [`drop_empty_pairs`]). `chosen` and `rejected` are of one
    kind in every row; `prompt`, when there is one, is present in every row and of one kind (text prompt with message
    completions is the HuggingFaceH4 layout; a message prompt with text completions is an error).

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


def _looks_like_path(name_or_path: str) -> bool:
    return looks_like_local_path(name_or_path) or Path(name_or_path).suffix in DATA_FILE_BUILDERS


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


def split_files(folder: str | Path, split: str) -> list[Path]:
    """The data files of `split` in the data folder `folder`, as [`load_raw_split`] reads them: `<split>.<ext>` or
    shards `<split>-*.<ext>` at the folder's own level or, when it has none, in its `data/` subfolder (the Hub's
    layout). Other subfolders are not read. Empty if there are none."""
    folder = Path(folder)
    for where in (folder, folder / "data"):
        for suffix in DATA_FILE_BUILDERS:
            files = sorted({*where.glob(f"{split}{suffix}"), *where.glob(f"{split}-*{suffix}")})
            files = [f for f in files if f.is_file()]
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
    # A folder of data files, one split per `<split>.<ext>` (or shards `<split>-*.<ext>`), or under `data/`.
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
        f"(or shards `{split}-*.<ext>`) in it or in its data/ subfolder; found {found[:10]}{deeper}{splits}."
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
        if _looks_like_path(name_or_path):
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
    if _looks_like_path(name_or_path):
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


def _split_shared_prompt(example: dict) -> dict:
    return extract_prompt({"chosen": example["chosen"], "rejected": example["rejected"]})


def to_preference_format(dataset: Dataset) -> Dataset:
    """Map `dataset` to TRL's preference format and keep only its `prompt`, `chosen` and `rejected` columns.

    TRL formats pass through unchanged. For the H4 layout, the leading turns that `chosen` and `rejected` share become
    the `prompt` (explicit, conversational) and the remaining turns the completions, as TRL's `extract_prompt` does.
    """
    validate_columns(dataset.column_names)
    layout = detect_layout(dataset[0]) if len(dataset) else "standard"
    if layout == "prompt_in_completions":
        dataset = dataset.map(_split_shared_prompt, remove_columns=dataset.column_names, desc="Extracting prompts")
    else:
        dataset = dataset.select_columns([c for c in PREFERENCE_COLUMNS if c in dataset.column_names])
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
