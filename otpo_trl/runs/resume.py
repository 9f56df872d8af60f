"""Resuming from a checkpoint: the plan for an explicit `--resume_from_checkpoint <checkpoint>` ([`plan_resume`],
checked against the record the checkpoint carries, not the folder's), and what a resumed run that has reached its last
step does ([`reached_the_end`], [`final_save`]). [`note_versions`] records the package versions that changed since the
checkpoint was saved. The rules are stated in docs/training.md ("The run directory").
"""

import logging
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
from .outputs import clearing
from .record import (
    RUN_FILE,
    SHAPE_ARGS,
    data_changes,
    describe_changes,
    input_changes,
    settings_changes,
    version_changes,
)
from .start import RunPlan


logger = logging.getLogger(__name__)


def reached_the_end(state: dict, settings: dict) -> bool:
    """Whether the trainer state `state` is where training with `settings` ends (`max_steps`, else the epochs)."""
    if settings["max_steps"] > 0:
        return state["global_step"] >= settings["max_steps"]
    return state.get("epoch", 0) >= settings["num_train_epochs"] - 1e-6


def note_versions(old: dict, record: dict, versions: dict | None, where: str) -> dict:
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


def final_save(checkpoint: Path, state: dict, record: dict) -> RunPlan:
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


def plan_resume(
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
    if reached_the_end(state, settings):
        ends = (
            f"{checkpoint} is at step {state['global_step']}, where training with these arguments ends (max_steps "
            f"{settings['max_steps']}, num_train_epochs {settings['num_train_epochs']}): nothing to train. To train "
            "it further, raise `--max_steps` (or `--num_train_epochs`)"
        )
        if same_run and record.get("status") in ("finished", "trained"):
            return RunPlan("finished", message=f"{ends}.")
        if not same_run or changes:  # the run would write nothing: an exit 0 that did nothing
            raise ValueError(f"`--resume_from_checkpoint` {ends}; its trained weights are in {checkpoint}.")
        return final_save(checkpoint, state, note_versions(own, kept, new_record.get("versions"), str(checkpoint)))
    if changes:
        logger.warning(f"Resuming {checkpoint} with other arguments than its run's: {describe_changes(changes)}.")
        history = [*kept.get("resumed_with_changes", []), {"checkpoint": str(checkpoint), "changes": changes}]
        kept["resumed_with_changes"] = history
    if own is not None:
        kept = note_versions(own, kept, new_record.get("versions"), str(checkpoint))
    clear = overwrite and bool(used)
    if clear:
        clearing(out, record)  # what cannot be moved aside fails now, not when training starts
    return RunPlan("train", str(checkpoint), clear=clear, record=kept)
