"""Where a split's rows come from, and the fingerprint of what was read.

[`load_raw_split`] loads one split as stored, from the Hub or from a local `.jsonl` / `.json` / `.parquet` file, a data
folder (see [`split_files`]: `<split>.<ext>` or its shards, at the folder's own level or in its `data/` subfolder) or a
`save_to_disk` folder. A folder in which it is not clear which files hold the split is refused, naming the files; a
JSON file that cannot be read fails naming its line. [`data_fingerprint`] (over [`file_fingerprint`]) is a cheap
fingerprint of what a split is loaded from, for the run record of `scripts/train.py`.
"""

import hashlib
import json
import logging
import re
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from ..local_paths import DATA_FILE_BUILDERS, looks_like_data_path


logger = logging.getLogger(__package__)  # "otpo_trl.data", the one logger of the data package


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
