"""What a run writes in its `output_dir`, and how `--overwrite_output_dir` removes it.

A folder is "used" when it holds an entry a run writes ([`RUN_WRITES`], by name). When a run that overwrites one starts
training, [`clear_previous_run`] deletes what the previous run's record lists as its own outputs, holding only what a
run writes ([`RUN_WRITES_INSIDE`]), and moves every other such entry aside, to a sibling folder: a file this run cannot
tell from a user's is never deleted. [`clearing`] says beforehand what that will do, so that what cannot be moved fails
before anything is written. The rules are stated in docs/training.md ("The run directory").
"""

import fnmatch
import logging
import os
import shutil
from datetime import datetime
from pathlib import Path

from .lock import HOLDER_FILE, LOCK_FILE
from .record import RUN_FILE, read_run_record


logger = logging.getLogger(__name__)

# What a run writes at the top of output_dir (fnmatch patterns): its record, checkpoints, TensorBoard logs, state and
# results, and the model's save (weights, config, tokenizer, card). A folder holding any of them is "used": a new run
# would overwrite them, so it is refused there, and `--overwrite_output_dir` clears them.
RUN_WRITES = (
    *(RUN_FILE, "checkpoint-*", "runs", "trainer_state.json", "*_results.json", "training_args.bin"),
    *("*.safetensors", "*.bin", "*.index.json", "config.json", "generation_config.json", "adapter_config.json"),
    *("README.md", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template.*", "vocab.*"),
    *("merges.txt", "spiece.model"),
)
# The lock's files: a run's, but never its output (a folder holding only them is unused).
LOCK_FILES = (LOCK_FILE, HOLDER_FILE)
# What a run writes inside the folders it lists (its checkpoints, TensorBoard's `runs`), by file name: HF Trainer's
# states, DeepSpeed's and FSDP's shards, TensorBoard's event files, the record's temporary file. A listed folder that
# holds any other file (a user's evaluation saved into a checkpoint), or a symbolic link, is moved aside, not deleted.
RUN_WRITES_INSIDE = (
    *RUN_WRITES,
    *("optimizer*", "scheduler*", "scaler.pt", "rng_state*", "latest", "zero_to_fp32.py", "*.pt"),
    *("*.distcp", ".metadata", "events.out.tfevents.*", f".{RUN_FILE}.*.tmp"),
)


def run_entries(folder: Path) -> list[Path]:
    """The entries of `folder` that a run writes (`RUN_WRITES`), by name; [] when it does not exist."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if any(fnmatch.fnmatchcase(p.name, w) for w in RUN_WRITES))


def not_run_entries(folder: Path) -> list[Path]:
    """The entries of `folder` that no run writes (nor its lock), hidden ones aside: a user's; [] when it does not
    exist."""
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.name not in LOCK_FILES
        and not p.name.startswith(".")
        and not any(fnmatch.fnmatchcase(p.name, w) for w in RUN_WRITES)
    )


def top_names(folder: Path) -> set[str]:
    """The names at the top of `folder` but the run record and the lock's files: what a run may list as its outputs."""
    return {p.name for p in folder.iterdir()} - {RUN_FILE, *LOCK_FILES}


def _aside_folder(out: Path) -> Path:
    """A new sibling of `out` to move entries to: `<name>.replaced-<date>-<time>[-<n>]`."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    aside, n = out.parent / f"{out.name}.replaced-{stamp}", 1
    while aside.exists():
        n += 1
        aside = out.parent / f"{out.name}.replaced-{stamp}-{n}"
    return aside


def _only_run_files(folder: Path) -> bool:
    """Whether everything under `folder` is a file of a kind a run writes there (`RUN_WRITES_INSIDE`), with no symbolic
    link: what a listed folder must hold to be deleted rather than moved aside."""
    for root, dirs, files in os.walk(folder):
        root = Path(root)
        if any((root / name).is_symlink() for name in [*dirs, *files]):
            return False
        if not all(any(fnmatch.fnmatchcase(name, w) for w in RUN_WRITES_INSIDE) for name in files):
            return False
    return True


def _is_own(path: Path) -> bool:
    """Whether a listed entry can be deleted: a plain file, or a folder of run files only ([`_only_run_files`]); a
    symbolic link (never followed: its target is not the run's) or a folder holding anything else is not."""
    if path.is_symlink():
        return False
    return _only_run_files(path) if path.is_dir() else True


def clearing(out: Path, record: dict | None) -> tuple[list[Path], list[Path]]:
    """What `--overwrite_output_dir` does to `out`: `(delete, move)`, as paths in the folder `out` resolves to.
    Deleted: the previous run's record (moved with the rest if it lists no outputs), then the entries it lists as its
    outputs that hold only what a run writes (see [`_is_own`]). Moved aside ([`clear_previous_run`]): any
    other entry that a run writes, not listed (a record of an older version lists none, a folder without a record has
    none) or holding something else, which this run cannot tell from the user's.

    Raises:
        ValueError: entries must be moved but the parent folder of `out` (symbolic links resolved) is not writable or
            on another file system.
    """
    listed = set((record or {}).get("outputs", []))
    home = out.expanduser().resolve()  # a linked output_dir: its entries move beside the folder they are in
    entries = [p for p in run_entries(home) if p.name != RUN_FILE]
    delete = [p for p in entries if p.name in listed and _is_own(p)]
    move = [p for p in entries if p not in delete]
    if record is not None and "outputs" in record:
        # First: a clearing cut short (a kill) must not leave a record that calls the rest a finished run.
        delete.insert(0, home / RUN_FILE)
    elif record is not None:  # a record that lists no outputs (an older version's) goes with the files it describes
        move.append(home / RUN_FILE)
    if move:
        parent = home.parent
        if not os.access(parent, os.W_OK) or os.stat(parent).st_dev != os.stat(home).st_dev:
            raise ValueError(
                f"`--overwrite_output_dir`: {out} holds {', '.join(p.name for p in move[:6])}, which no run record "
                f"lists as a run's own output, so they would be moved aside, to {parent}, rather than deleted; but "
                "that folder is not writable or on another file system. Move them yourself, or use a new "
                "`--output_dir`."
            )
    return delete, move


def clear_previous_run(out: Path) -> None:
    """`--overwrite_output_dir`, when training starts: delete what the previous run's record lists as its outputs and
    move every other entry a run writes to a sibling `<output_dir>.replaced-<date>-<time>` (see [`clearing`])."""
    delete, move = clearing(out, read_run_record(out))
    if delete and delete[0].name == RUN_FILE:  # before anything moves: a kill then leaves no stale record
        delete.pop(0).unlink()  # the previous run's record, which lists its outputs
        logger.info(f"--overwrite_output_dir: deleted the previous run's record, {out / RUN_FILE}.")
    if move:
        aside = _aside_folder(out.expanduser().resolve())
        aside.mkdir()
        for path in move:
            path.rename(aside / path.name)
        logger.warning(
            f"--overwrite_output_dir: moved {', '.join(p.name for p in move)} from {out} to {aside}: no run record "
            "lists them as a run's own output, or they hold files a run does not write, so they are kept there "
            "(delete that folder yourself if you do not need it)."
        )
    for path in delete:
        # The previous run's own outputs, as its record listed them, holding only what a run writes ([`_is_own`]).
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    if delete:
        logger.info(
            f"--overwrite_output_dir: deleted the previous run's {', '.join(p.name for p in delete)} from {out}."
        )
