"""The `checkpoint-<step>` folders of a run: which are complete, which record they carry, what step they reached.

HF Trainer writes a checkpoint's weights, then its optimizer, scheduler and RNG states, and `trainer_state.json`
last; the training command then adds the run record (`run_args.json`), so a checkpoint knows the run it came from.
The rules are stated in docs/training.md ("The run directory").
"""

import json
import logging
from pathlib import Path

from .record import CHECKPOINT_NAME, RUN_FILE, read_run_record


logger = logging.getLogger(__name__)


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """The `checkpoint-<step>` folders of `output_dir`, by step."""
    found = [p for p in Path(output_dir).iterdir() if CHECKPOINT_NAME.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.match(p.name)[1]))


def _nonempty(path: Path) -> bool:
    return path.is_dir() or path.stat().st_size > 0


def checkpoint_problems(path: str | Path) -> list[str]:
    """What the checkpoint folder `path` lacks for a resume; empty when it is complete.

    A save cut short (a kill, a full disk) lacks at least `trainer_state.json`, written last. Weights:
    `model*.safetensors`, `adapter_model.*`, `pytorch_model*` (FSDP: a `pytorch_model_fsdp_*` folder) or a DeepSpeed
    `global_step*` folder, which also holds the optimizer; else `optimizer.pt` / `.bin` or FSDP's `optimizer_*`. A
    checkpoint that lacks only the optimizer state was saved with `save_only_model` (see [`saved_weights_only`]).
    """
    path = Path(path)
    entries = [p for p in path.iterdir() if _nonempty(p)]
    names = [p.name for p in entries]
    deepspeed = any(n.startswith("global_step") for n in names)
    missing = []
    try:
        trainer_state(path)
    except ValueError:
        missing.append("trainer_state.json")
    if not deepspeed and not any(n.startswith(("model", "adapter_model", "pytorch_model")) for n in names):
        missing.append("model weights")
    if not (deepspeed or any(n.startswith("optimizer") for n in names)):
        missing.append("optimizer state")
    return missing


def trainer_state(checkpoint: str | Path) -> dict:
    """The checkpoint's `trainer_state.json`; a `ValueError` when it is missing, cut short or has no `global_step`."""
    file = Path(checkpoint) / "trainer_state.json"
    try:
        state = json.loads(file.read_text())
        state["global_step"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{file} is missing or cut short ({err!r}).") from err
    return state


def saved_weights_only(problems: list[str]) -> bool:
    """Whether `checkpoint_problems` describe a `save_only_model` checkpoint: complete (its trainer state, written
    last, is there) but without optimizer and scheduler state."""
    return problems == ["optimizer state"]


def weights_only_error(checkpoint: Path) -> ValueError:
    """The refusal to resume from a `save_only_model` checkpoint (HF Trainer would restart the learning-rate schedule
    with a fresh optimizer, and call it a resume)."""
    return ValueError(
        f"{checkpoint} was saved with `save_only_model` (model weights and trainer state, no optimizer or "
        "learning-rate scheduler state): resuming from it would restart the schedule with a fresh optimizer, which is "
        "not the interrupted run, so it is not resumed. To go on, train afresh in a new `--output_dir` (or delete "
        "this run with `--overwrite_output_dir`); to be able to resume a run, leave `save_only_model` off."
    )


def not_a_checkpoint_error(path: Path, requested) -> ValueError | None:
    """The refusal of a `--resume_from_checkpoint` folder that is no checkpoint: a run's folder (it holds
    `checkpoint-<step>` folders or a run record and is not named like a checkpoint), or a saved model. None for a
    folder named `checkpoint-<step>`."""
    if CHECKPOINT_NAME.match(path.name):
        return None
    inside = [p.name for p in checkpoint_folders(path)]
    if inside or (path / RUN_FILE).is_file():
        ways = (
            f"pass one of its checkpoints, `--resume_from_checkpoint {path}/{inside[-1]}` (its checkpoints: "
            f"{', '.join(inside)})"
            if inside
            else "it holds no checkpoint to resume (it was trained with `save_strategy: no`)"
        )
        return ValueError(
            f"`--resume_from_checkpoint {requested}` is a run's folder, not one of its checkpoints: {ways}; or, to "
            f"resume that run where it stopped, run it again with `--output_dir {path}` (its last complete checkpoint "
            "is found)."
        )
    return ValueError(
        f"`--resume_from_checkpoint {requested}` is not a checkpoint folder (`checkpoint-<step>`, saved during "
        "training with its optimizer state): to train a saved model further, pass it as `--model_name_or_path` in a "
        "new `--output_dir`."
    )


def checkpoint_record(checkpoint: str | Path) -> dict | None:
    """The record of the run that saved `checkpoint`: the one it carries or, for a checkpoint saved by an older
    version, its folder's (with a warning); None when neither has one."""
    checkpoint = Path(checkpoint)
    record = read_run_record(checkpoint)
    if record is None and CHECKPOINT_NAME.match(checkpoint.name):
        record = read_run_record(checkpoint.parent)
        if record is not None:
            logger.warning(
                f"{checkpoint} carries no run record (it was saved by an older version): it is checked against its "
                f"folder's, {checkpoint.parent / RUN_FILE}."
            )
    return record


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """The checkpoints of `output_dir` with nothing missing, last first; incomplete ones are skipped with a warning.

    Raises:
        ValueError: the last one that is not cut short was saved with `save_only_model` (see [`weights_only_error`]).
    """
    complete = []
    for checkpoint in reversed(checkpoint_folders(output_dir)):
        problems = checkpoint_problems(checkpoint)
        if not problems:
            complete.append(checkpoint)
        elif saved_weights_only(problems):
            if not complete:
                raise weights_only_error(checkpoint)
        elif not complete:
            logger.warning(
                f"Skipping the incomplete checkpoint {checkpoint} (no {', '.join(problems)}: its save was cut short, "
                "e.g. by a kill or a full disk); looking for an earlier one."
            )
    return complete
