"""What a run does with its `output_dir`: train afresh, resume, evaluate only, save, report it finished, or stop.

[`plan_run`] decides from values (the folder, the settings, the fingerprints, the resume and overwrite flags) and
writes nothing; [`check_output_dir`] holds the checks on the folder that run before its lock creates it. An explicit
checkpoint is planned by `otpo_trl.runs.resume`; the plan ([`RunPlan`]) is applied by `otpo_trl.runs.start.start_run`
when training starts, and what `--overwrite_output_dir` removes is in `otpo_trl.runs.outputs`. The rules are stated in
docs/training.md ("The run directory").
"""

import logging
import os
import uuid
from pathlib import Path

from .checkpoints import complete_checkpoints, trainer_state
from .outputs import clearing, not_run_entries, run_entries
from .record import (
    CHECKPOINT_NAME,
    RUN_FILE,
    data_changes,
    describe_changes,
    input_changes,
    read_run_record,
    settings_changes,
)
from .resume import final_save, note_versions, plan_resume, reached_the_end
from .start import RunPlan


logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"  # HF Trainer's, the last file of a checkpoint it saves


def _check_no_one_elses(out: Path) -> None:
    """Refuse a new run in a folder that holds no run but other files (a user's models, data, notes): its weights,
    checkpoints and logs would be mixed with them."""
    others = not_run_entries(out)
    if others:
        raise ValueError(
            f"{out} holds files that no run wrote ({', '.join(p.name for p in others[:6])}"
            f"{f' and {len(others) - 6} more' if len(others) > 6 else ''}): a run would write its weights, "
            f"checkpoints and logs among them. Use a new or empty `--output_dir` (e.g. {out / '<run-name>'}), or "
            "add `--overwrite_output_dir` to train there anyway (they are left where they are)."
        )


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


def _changes(old: dict, settings: dict, data: dict | None, inputs: dict | None, where: Path) -> dict:
    """How a recorded run differs from these arguments: settings, data and inputs, as `settings_changes` entries."""
    return (
        settings_changes(old["settings"], settings)
        | data_changes(old.get("data"), data, where)
        | input_changes(old.get("inputs"), inputs)
    )


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
    if not overwrite_output_dir and mode != "last" and not run_entries(out):
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
    used = run_entries(out)
    new_record = {"run_id": uuid.uuid4().hex, "status": "started", "settings": settings}
    new_record |= {k: v for k, v in (("data", data), ("inputs", inputs), ("versions", versions)) if v is not None}
    how = (
        f"To go on, use a new `--output_dir`; or continue that run with these arguments from one of its checkpoints, "
        f"`--resume_from_checkpoint {out}/checkpoint-<step>`; or replace it with `--overwrite_output_dir` (which "
        "deletes its checkpoints, results and weights when the new run starts training)."
    )

    if mode not in ("auto", "never", "last"):
        return plan_resume(
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
        # A record of an older version has no `evaluated`: its run was evaluated if it finished beside its results
        # (written once an evaluation completes), so that `--do_eval true` never skips one that did not run.
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
    kept = note_versions(record, kept, versions, str(checkpoint))
    if reached_the_end(state, settings):
        return final_save(checkpoint, state, kept)
    logger.info(f"Checkpoint detected in {out}: resuming training from {checkpoint}.")
    return RunPlan("train", str(checkpoint), record=kept)


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
