"""The start of a run: the plan it carries out ([`RunPlan`], which `otpo_trl.runs.plan.plan_run` decides), and
[`start_run`], which applies it when training starts (after the model, the reference and any checkpoint have loaded):
it clears the previous run if the plan says so, then writes the run record, which the [`RunRecorder`] it returns keeps
current. Nothing is written before [`start_run`].
"""

from dataclasses import dataclass, field
from pathlib import Path

from .files import write_json
from .outputs import clear_previous_run, top_names
from .record import RUN_FILE


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


class RunRecorder:
    """Keeps the run record of `output_dir` current while the run goes on (main process only): its status, what it
    wrote (`outputs`: the top-level entries of `output_dir` that were not there when it started or are listed already),
    and the record each checkpoint carries. Every write is atomic."""

    def __init__(self, output_dir: str | Path, record: dict):
        self.output_dir = Path(output_dir).expanduser()
        self.record = dict(record)
        self._not_ours = top_names(self.output_dir) - set(self.record.get("outputs", []))

    def write(self, **changes) -> None:
        """Update the record with `changes` and the entries written since, and write it."""
        self.record |= changes
        listed = set(self.record.get("outputs", [])) | (top_names(self.output_dir) - self._not_ours)
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
