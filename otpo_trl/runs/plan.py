"""What a run does with its `output_dir`: train afresh, resume, evaluate only, report it finished, or stop; then,
once training starts, clear what `--overwrite_output_dir` replaces and keep the run record up to date.

[`plan_run`] decides from values (the folder, the settings, the fingerprints, the resume and overwrite flags) and
writes nothing; [`start_run`] applies the plan when training starts (after the model, the reference and any checkpoint
have loaded), and the [`RunRecorder`] it returns keeps `run_args.json` current. The rules are stated in
docs/training.md ("The run directory").
"""

import fnmatch
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from .checkpoints import (
    checkpoint_problems,
    checkpoint_record,
    complete_checkpoints,
    not_a_checkpoint_error,
    saved_weights_only,
    trainer_state,
    weights_only_error,
)
from .files import write_json
from .lock import HOLDER_FILE, LOCK_FILE
from .record import (
    CHECKPOINT_NAME,
    RUN_FILE,
    SHAPE_ARGS,
    data_changes,
    describe_changes,
    input_changes,
    read_run_record,
    settings_changes,
    version_changes,
)


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
TRAINER_STATE = "trainer_state.json"  # HF Trainer's, the last file of a checkpoint it saves
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


def _run_entries(folder: Path) -> list[Path]:
    """The entries of `folder` that a run writes (`RUN_WRITES`), by name; [] when it does not exist."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if any(fnmatch.fnmatchcase(p.name, w) for w in RUN_WRITES))


def _not_run_entries(folder: Path) -> list[Path]:
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


def _check_no_one_elses(out: Path) -> None:
    """Refuse a new run in a folder that holds no run but other files (a user's models, data, notes): its weights,
    checkpoints and logs would be mixed with them."""
    others = _not_run_entries(out)
    if others:
        raise ValueError(
            f"{out} holds files that no run wrote ({', '.join(p.name for p in others[:6])}"
            f"{f' and {len(others) - 6} more' if len(others) > 6 else ''}): a run would write its weights, "
            f"checkpoints and logs among them. Use a new or empty `--output_dir` (e.g. {out / '<run-name>'}), or "
            "add `--overwrite_output_dir` to train there anyway (they are left where they are)."
        )


def _top_names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} - {RUN_FILE, *LOCK_FILES}


@dataclass
class RunPlan:
    """What to do with `output_dir`.

    Attributes:
        action: "train" (from `checkpoint`, or afresh when None), "save" (`checkpoint` is the run's last step but
            its final save did not complete: load it, train no step, and save), "evaluate" (the run is
            trained: run its final evaluation only) or "finished" (nothing to do: `message` says why).
        checkpoint: the checkpoint to resume from.
        message: why there is nothing to train, for "finished", "save" and "evaluate".
        clear: `--overwrite_output_dir`: clear the previous run's outputs when training starts ([`start_run`]).
        record: the run record to write when training starts (for "evaluate": the run's record).
        lock: the lock of `output_dir` held for this run (`otpo_trl.runs.RunLock`), set by the command that holds it.
    """

    action: str
    checkpoint: str | None = None
    message: str = ""
    clear: bool = False
    record: dict = field(default_factory=dict)
    lock: object = field(default=None, repr=False, compare=False)

    def release(self) -> None:
        """Give back the lock of `output_dir`, if this plan holds it."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None


# The arguments that name an input of the run: `output_dir` must neither be one nor hold one nor lie inside one.
INPUT_ARGS = {"model_name_or_path": "the model", "dataset_name": "the data", "chat_template": "the chat template"}


def _relation(folder: Path, other: Path) -> str | None:
    """How `folder` stands to `other` ("is", "holds", "lies inside"), symbolic links resolved; None when apart."""
    folder, other = folder.expanduser().resolve(), other.expanduser().resolve()
    if folder == other:
        return "is"
    if folder in other.parents:
        return "holds"
    if other in folder.parents:
        return "lies inside"
    return None


def check_apart_from_inputs(output_dir: str | Path, settings: dict) -> None:
    """Raise a `ValueError` if `output_dir` is, holds or lies inside a local input of the run (model, data, chat
    template; the paths of `settings`, as `run_settings` makes them): the run saves its weights and checkpoints there,
    and `--overwrite_output_dir` clears them, so the input would be overwritten or deleted."""
    for key, what in INPUT_ARGS.items():
        value = settings.get(key)
        if not isinstance(value, str) or not os.path.exists(value):
            continue
        relation = _relation(Path(output_dir), Path(value))
        if relation is not None:
            raise ValueError(
                f"`output_dir` {output_dir} {relation} {what} of the run (`{key}` {value}): the run saves its weights "
                "and checkpoints there, and overwriting deletes them, which would destroy an input of the run. Nothing "
                "was changed. Use an `--output_dir` outside the model, data and chat template folders (e.g. "
                "out/<run-name>)."
            )


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
    entries = [p for p in _run_entries(home) if p.name != RUN_FILE]
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


class RunRecorder:
    """Keeps the run record of `output_dir` current while the run goes on (main process only): its status, what it
    wrote (`outputs`: the top-level entries of `output_dir` that were not there when it started or are listed already),
    and the record each checkpoint carries. Every write is atomic."""

    def __init__(self, output_dir: str | Path, record: dict):
        self.output_dir = Path(output_dir).expanduser()
        self.record = dict(record)
        self._not_ours = _top_names(self.output_dir) - set(self.record.get("outputs", []))

    def write(self, **changes) -> None:
        """Update the record with `changes` and the entries written since, and write it."""
        self.record |= changes
        listed = set(self.record.get("outputs", [])) | (_top_names(self.output_dir) - self._not_ours)
        self.record["outputs"] = sorted(listed)
        write_json(self.output_dir / RUN_FILE, self.record)

    def will_write(self, name: str) -> None:
        """List the entry `name` among the outputs before it is written (a checkpoint cut short is still the run's)."""
        if name not in self.record.get("outputs", []):
            self.write(outputs=[*self.record.get("outputs", []), name])

    def saved_checkpoint(self, checkpoint: str | Path, global_step: int) -> None:
        """The checkpoint is saved: it carries the run record (at its step), written after HF Trainer's files."""
        self.write()
        write_json(Path(checkpoint) / RUN_FILE, {**self.record, "global_step": global_step})


def start_run(plan: RunPlan, output_dir: str | Path) -> RunRecorder:
    """When training starts, on the main process: clear the previous run if `plan.clear`, and write the run record
    (the first write of the run's own; a run that fails before this point has changed nothing)."""
    out = Path(output_dir).expanduser()
    if plan.clear:
        clear_previous_run(out)
    recorder = RunRecorder(out, plan.record)
    recorder.write()
    return recorder


def _reached_the_end(state: dict, settings: dict) -> bool:
    if settings["max_steps"] > 0:
        return state["global_step"] >= settings["max_steps"]
    return state.get("epoch", 0) >= settings["num_train_epochs"] - 1e-6


def _changes(old: dict, settings: dict, data: dict | None, inputs: dict | None, where: Path) -> dict:
    """How a recorded run differs from these arguments: settings, data and inputs, as `settings_changes` entries."""
    return (
        settings_changes(old["settings"], settings)
        | data_changes(old.get("data"), data, where)
        | input_changes(old.get("inputs"), inputs)
    )


def _note_versions(old: dict, record: dict, versions: dict | None, where: str) -> dict:
    """`record` with the package versions that changed since `old` appended to `version_changes`, with a warning."""
    changed = version_changes(old.get("versions"), versions) if versions is not None else {}
    if not changed:
        return record
    logger.warning(
        f"Resuming {where} under other package versions than it was trained with ({describe_changes(changed)}): "
        "recorded in run_args.json under `version_changes`; if its metrics move, this is a cause to rule out."
    )
    return {**record, "version_changes": [*record.get("version_changes", []), {"at": where, "changes": changed}]}


def _describe_run(record: dict | None, used: list[Path]) -> str:
    if record is None:
        return f"files of a run without {RUN_FILE} ({', '.join(p.name for p in used[:6])})"
    if record.get("status") in ("finished", "trained"):
        return f"a run trained to step {record.get('global_step')}"
    return "a run that has not finished"


def _resume_mode(requested) -> str:
    """`--resume_from_checkpoint` as "auto" (unset), "last" (true), "never" (false) or the checkpoint's path."""
    if requested is None:
        return "auto"
    modes = {"true": "last", "yes": "last", "false": "never", "no": "never", "none": "never"}
    return modes.get(str(requested).lower(), str(requested))


def _nothing_to_resume(output_dir, requested) -> str:
    return (
        f"`--resume_from_checkpoint {requested}` resumes the run in `output_dir` from its last checkpoint, but "
        f"there is nothing to resume: {output_dir}"
    )


_START_INSTEAD = " Check the path of `--output_dir`; to start a new run, leave `--resume_from_checkpoint` unset."


def check_output_dir(
    output_dir: str | Path, settings: dict, resume_from_checkpoint=None, overwrite_output_dir: bool = False
) -> None:
    """The checks on `output_dir` that need not its lock, run before the lock creates it: it is apart from the run's
    inputs ([`check_apart_from_inputs`]) and from the checkpoint it resumes, not a file, exists if a resume of it is
    asked for, is not cleared by `--overwrite_output_dir` while a checkpoint in it is resumed, is not and does not lie
    inside any run's checkpoint ([`_checkpoint_around`]), and, unless
    `--overwrite_output_dir`, does not hold a user's files without a run ([`_check_no_one_elses`]: what another run
    writes there meanwhile is never a user's).

    Raises:
        ValueError: naming the problem and the fix.
    """
    check_apart_from_inputs(output_dir, settings)
    out = Path(output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"`output_dir` {out} is a file; it must be a folder (or not exist yet).")
    requested = resume_from_checkpoint
    mode = _resume_mode(requested)
    if mode == "last" and not overwrite_output_dir and not out.exists():
        raise ValueError(
            f"{_nothing_to_resume(output_dir, requested)} does not exist (relative to {Path.cwd()}).{_START_INSTEAD}"
        )
    relation = _relation(out, Path(requested)) if mode not in ("auto", "never", "last") else None
    if relation in ("is", "lies inside"):
        raise ValueError(
            f"`output_dir` {out} {relation} the checkpoint it resumes, {requested}: the run would save its weights and "
            "checkpoints into that checkpoint (and `--overwrite_output_dir` would delete it). Nothing was changed. "
            f"Use the checkpoint's run folder ({Path(requested).expanduser().parent}) or a new folder as `--output_dir`."
        )
    if overwrite_output_dir and (mode == "last" or relation == "holds"):
        raise ValueError(
            "`--overwrite_output_dir` deletes the checkpoints in `output_dir`: it cannot be combined with "
            f"`--resume_from_checkpoint {requested}`"
            + (", which lies inside it" if relation == "holds" else "")
            + ". To continue that run, leave `--overwrite_output_dir` out; to replace it with a new run, leave "
            "`--resume_from_checkpoint` out."
        )
    checkpoint = _checkpoint_around(out)
    if checkpoint is not None:
        relation = "is" if checkpoint == out.expanduser().resolve() else "lies inside"
        raise ValueError(
            f"`output_dir` {out} {relation} {checkpoint}, a checkpoint of the run in {checkpoint.parent}: a run there "
            "would write over that checkpoint (or be deleted with it when its run is overwritten). Nothing was "
            f"changed. To continue that run, use `--output_dir {checkpoint.parent}` (its last complete checkpoint "
            f"is found), or `--resume_from_checkpoint {checkpoint}` with a new `--output_dir`; otherwise use a "
            "folder outside it."
        )
    if not overwrite_output_dir and mode != "last" and not _run_entries(out):
        _check_no_one_elses(out)  # before the lock, which would leave its file among them


def _checkpoint_around(out: Path) -> Path | None:
    """The checkpoint folder that `out` is or lies inside (symbolic links resolved), or None: a `checkpoint-<step>`
    folder that holds a trainer state or a run record (HF Trainer's save, the run's record)."""
    out = out.expanduser().resolve()
    for folder in (out, *out.parents):
        if CHECKPOINT_NAME.match(folder.name) and any((folder / n).is_file() for n in (TRAINER_STATE, RUN_FILE)):
            return folder
    return None


def plan_run(
    output_dir: str | Path,
    settings: dict,
    *,
    resume_from_checkpoint: str | bool | None = None,
    overwrite_output_dir: bool = False,
    data: dict | None = None,
    inputs: dict | None = None,
    versions: dict | None = None,
    do_eval: bool = False,
) -> RunPlan:
    """Decide, from what `output_dir` holds and the run's values, what the run does. Nothing is written.

    Args:
        output_dir: the run directory.
        settings: the run's arguments, as `run_settings` gives them; its `max_steps` and `num_train_epochs` say
            where training ends.
        resume_from_checkpoint: as the flag: None (resume the same run if there is one), true / "last", false /
            "never", or the path of a checkpoint folder.
        overwrite_output_dir: clear the previous run's outputs when training starts (the plan's `clear`) instead of
            refusing a different run.
        data: the fingerprint of the training data (`otpo_trl.data.data_fingerprint`); None: not compared.
        inputs: the fingerprints of the model, reference, tokenizer and chat template (`input_fingerprints`); None:
            not compared.
        versions: the package versions (`package_versions`); None: not compared.
        do_eval: whether the run evaluates at the end (a trained run whose final evaluation did not complete runs it).

    Raises:
        ValueError: the run must not go on; the message says why and how to go on.
    """
    check_output_dir(output_dir, settings, resume_from_checkpoint, overwrite_output_dir)
    requested = resume_from_checkpoint
    mode = _resume_mode(requested)
    out = Path(output_dir).expanduser()
    record = read_run_record(out)
    used = _run_entries(out)
    new_record = {"run_id": uuid.uuid4().hex, "status": "started", "settings": settings}
    new_record |= {k: v for k, v in (("data", data), ("inputs", inputs), ("versions", versions)) if v is not None}
    how = (
        f"To go on, use a new `--output_dir`; or continue that run with these arguments from one of its checkpoints, "
        f"`--resume_from_checkpoint {out}/checkpoint-<step>`; or replace it with `--overwrite_output_dir` (which "
        "deletes its checkpoints, results and weights when the new run starts training)."
    )

    if mode not in ("auto", "never", "last"):
        return _plan_resume(
            Path(requested).expanduser(), requested, out, record, used, new_record, overwrite_output_dir
        )
    if overwrite_output_dir:
        if used:
            clearing(out, record)  # what cannot be moved aside fails now, not when training starts
        return RunPlan("train", clear=bool(used), record=new_record)
    if not used:
        if mode == "last":
            raise ValueError(
                f"{_nothing_to_resume(output_dir, requested)} holds no run (no checkpoint, no {RUN_FILE}).{_START_INSTEAD}"
            )
        return RunPlan("train", record=new_record)
    if mode == "never":
        raise ValueError(
            f"`--resume_from_checkpoint false`, but {out} holds an earlier run ({', '.join(p.name for p in used[:6])}): "
            "starting afresh there would leave its checkpoints for a later run to resume from, mixing two runs. Add "
            "`--overwrite_output_dir` to replace it, or use a new `--output_dir`."
        )
    if record is None:
        raise ValueError(
            f"{out} holds checkpoints, results or model files ({', '.join(p.name for p in used[:6])}) but no "
            f"{RUN_FILE}: the arguments of that run are unknown, so it is not resumed automatically (nor overwritten). "
            f"{how}"
        )
    changed_inputs = input_changes(record.get("inputs"), new_record.get("inputs"))
    if changed_inputs:  # no checkpoint of that run goes on from other inputs: the resume `how` offers would be refused
        raise ValueError(
            f"{out} holds a run trained from other inputs than these ({describe_changes(changed_inputs)}): its "
            "checkpoints go on only with the model, reference, tokenizer and chat template they were trained with. "
            f"To go on with it, give it those, unchanged (the paths its {RUN_FILE} records); or use a new "
            "`--output_dir`; or replace it with `--overwrite_output_dir` (which deletes its checkpoints, results and "
            "weights when the new run starts training)."
        )
    changes = _changes(record, settings, data, new_record.get("inputs"), out / RUN_FILE)
    if changes:
        raise ValueError(f"{out} holds a run with other arguments ({describe_changes(changes)}). {how}")

    status = record.get("status")
    if status in ("finished", "trained"):
        evaluated = record.get("evaluated", status == "finished" and (out / "eval_results.json").exists())
        step = record.get("global_step")
        if do_eval and not evaluated:
            why = "its final evaluation did not complete" if status == "trained" else "it was not evaluated"
            return RunPlan(
                "evaluate",
                record=record,
                message=f"{out} holds this run, trained to step {step}, but {why}: evaluating it (no training).",
            )
        note = (
            " Its final evaluation did not complete: add `--do_eval true` to run it."
            if status == "trained" and not evaluated
            else ""
        )
        return RunPlan(
            "finished",
            message=(
                f"{out} holds this run, finished at step {step}: nothing to train.{note} To train it again, add "
                "`--overwrite_output_dir` or use a new `--output_dir`."
            ),
        )

    kept = {**new_record, "run_id": record.get("run_id") or new_record["run_id"]}
    kept |= {
        k: record[k] for k in ("outputs", "resumed_from", "resumed_with_changes", "version_changes") if k in record
    }
    checkpoint = _last_checkpoint_of_this_run(out, record, settings, data, new_record.get("inputs"))
    if checkpoint is None:
        if mode == "last":
            raise ValueError(f"`--resume_from_checkpoint true`: {out} holds no complete checkpoint of this run.")
        logger.info(f"{out} holds this run but no complete checkpoint: training from the start.")
        return RunPlan("train", record=kept)
    state = trainer_state(checkpoint)
    kept = _note_versions(record, kept, versions, str(checkpoint))
    if _reached_the_end(state, settings):
        return _final_save(checkpoint, state, kept)
    logger.info(f"Checkpoint detected in {out}: resuming training from {checkpoint}.")
    return RunPlan("train", str(checkpoint), record=kept)


def _final_save(checkpoint: Path, state: dict, record: dict) -> RunPlan:
    """The plan of a run whose last checkpoint is at its last step but whose final save did not complete (a kill or
    Ctrl-C during the save of the model): load that checkpoint, train no step, then save, evaluate and finish as a run
    does."""
    return RunPlan(
        "save",
        str(checkpoint),
        record=record,
        message=(
            f"{checkpoint} is at step {state['global_step']}, the last of this run, but the run's final save did not "
            "complete: saving the trained model from it (no training)."
        ),
    )


def _last_checkpoint_of_this_run(out: Path, record: dict, settings, data, inputs) -> Path | None:
    """The last complete checkpoint of `out` saved by the run of `record` under these arguments, or the one it was
    last continued from with new arguments; a later one saved under other arguments (the branch a continuation left
    behind) is skipped with a warning."""
    history = record.get("resumed_with_changes", [])
    continued_from = Path(history[-1]["checkpoint"]).expanduser().resolve() if history else None
    for checkpoint in complete_checkpoints(out):
        own = read_run_record(checkpoint)
        if own is None or checkpoint.resolve() == continued_from:
            return checkpoint  # one saved by an older version carries no record: its folder's matched
        changes = {} if own.get("run_id") != record.get("run_id") else _changes(own, settings, data, inputs, out)
        if own.get("run_id") == record.get("run_id") and not changes:
            return checkpoint
        why = describe_changes(changes) if changes else "another run's"
        logger.warning(
            f"Skipping {checkpoint}: it was saved under other arguments ({why}); looking for an earlier one."
        )
    return None


def _plan_resume(
    checkpoint: Path, requested, out: Path, record: dict | None, used: list[Path], new_record: dict, overwrite: bool
) -> RunPlan:
    """The plan for an explicit `--resume_from_checkpoint <checkpoint>`: checked against the record the checkpoint
    carries, not the folder's."""
    if not checkpoint.is_dir():
        raise ValueError(
            f"`--resume_from_checkpoint {requested}`: no such checkpoint folder (relative to {Path.cwd()})."
        )
    error = not_a_checkpoint_error(checkpoint, requested)
    if error is not None:
        raise error
    problems = checkpoint_problems(checkpoint)
    if saved_weights_only(problems):
        raise weights_only_error(checkpoint)
    if problems:
        siblings = complete_checkpoints(checkpoint.parent)
        raise ValueError(
            f"`--resume_from_checkpoint {requested}` is incomplete (no {', '.join(problems)}): its save was cut "
            f"short. Complete checkpoints beside it: {[p.name for p in reversed(siblings)] or 'none'}."
        )
    own = checkpoint_record(checkpoint)
    if record is None or own is None:
        same_run = False
    elif record.get("run_id") is not None or own.get("run_id") is not None:
        same_run = record.get("run_id") == own.get("run_id")
    else:  # both written by an older version, without run ids
        same_run = checkpoint.resolve().parent == out.resolve()
    same_run = same_run and not overwrite
    if used and not same_run and not overwrite:
        raise ValueError(
            f"`--resume_from_checkpoint {requested}` is a checkpoint of another run than the one in {out} "
            f"({_describe_run(record, used)}): continuing it there would mix the two runs' checkpoints and weights. "
            f"To continue it, use a new `--output_dir` (or its own run's, {checkpoint.parent}); to replace the run in "
            f"{out}, add `--overwrite_output_dir`."
        )
    changes = {}
    if own is None:
        logger.warning(
            f"{checkpoint} carries no run record, nor does its folder: its arguments and inputs cannot be checked "
            "against these (they are recorded from now on)."
        )
    else:
        inputs = new_record.get("inputs")
        changed_inputs = input_changes(own.get("inputs"), inputs)
        if changed_inputs:
            raise ValueError(
                f"`--resume_from_checkpoint {requested}` was trained from other inputs than these "
                f"({describe_changes(changed_inputs)}): a checkpoint goes on with the model, reference, tokenizer and "
                "chat template it was trained with. Resume it with those (the `model_name_or_path` and `chat_template` "
                f"its {RUN_FILE} records, unchanged), or train afresh from these in a new `--output_dir`."
            )
        settings = new_record["settings"]
        shapes = {k: v for k, v in settings_changes(own["settings"], settings).items() if k in SHAPE_ARGS}
        if shapes:
            raise ValueError(
                f"`--resume_from_checkpoint {requested}` holds weights of other shapes than these arguments make "
                f"({describe_changes(shapes)}): it cannot be loaded with them. Resume it with the values it was "
                "trained with, or train afresh in a new `--output_dir`."
            )
        changes = settings_changes(own["settings"], settings) | data_changes(
            own.get("data"), new_record.get("data"), checkpoint / RUN_FILE
        )
    kept = dict(new_record)
    if same_run:
        kept["run_id"] = record.get("run_id") or kept["run_id"]
        kept |= {
            k: record[k] for k in ("outputs", "resumed_from", "resumed_with_changes", "version_changes") if k in record
        }
    elif own is not None:
        kept["resumed_from"] = {"checkpoint": str(checkpoint.resolve()), "run_id": own.get("run_id")}
    state = trainer_state(checkpoint)
    settings = new_record["settings"]
    if _reached_the_end(state, settings):
        ends = (
            f"{checkpoint} is at step {state['global_step']}, where training with these arguments ends (max_steps "
            f"{settings['max_steps']}, num_train_epochs {settings['num_train_epochs']}): nothing to train. To train "
            "it further, raise `--max_steps` (or `--num_train_epochs`)"
        )
        if same_run and record.get("status") in ("finished", "trained"):
            return RunPlan("finished", message=f"{ends}.")
        if not same_run or changes:  # the run would write nothing: an exit 0 that did nothing
            raise ValueError(f"`--resume_from_checkpoint` {ends}; its trained weights are in {checkpoint}.")
        return _final_save(checkpoint, state, _note_versions(own, kept, new_record.get("versions"), str(checkpoint)))
    if changes:
        logger.warning(f"Resuming {checkpoint} with other arguments than its run's: {describe_changes(changes)}.")
        history = [*kept.get("resumed_with_changes", []), {"checkpoint": str(checkpoint), "changes": changes}]
        kept["resumed_with_changes"] = history
    if own is not None:
        kept = _note_versions(own, kept, new_record.get("versions"), str(checkpoint))
    clear = overwrite and bool(used)
    if clear:
        clearing(out, record)  # what cannot be moved aside fails now, not when training starts
    return RunPlan("train", str(checkpoint), clear=clear, record=kept)
