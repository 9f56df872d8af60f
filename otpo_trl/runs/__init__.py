"""The run directory of the training command, as a library: the record (`run_args.json`), the checkpoints, the plan
(what a run does with a used `output_dir`), the lock (one writer per `output_dir`) and the callback that applies them
while HF Trainer trains. The training command (`otpo_trl.cli.train`), the tools that read a run (`evaluate`) and the
studies use it; nothing here imports the command line.

The rules are stated once, in docs/training.md ("The run directory"); what each message means is in
docs/troubleshooting.md.

- `record`: the settings, fingerprints and versions a run records, and the readers the tools use.
- `checkpoints`: which checkpoints are complete, which record they carry.
- `plan`: [`plan_run`] (decides what a run does with its `output_dir`, writes nothing), [`check_output_dir`].
- `resume`: the plan for an explicit `--resume_from_checkpoint <checkpoint>`, and the end of a resumed run.
- `outputs`: what a run writes ([`RUN_WRITES`]), and [`clear_previous_run`] (what `--overwrite_output_dir` removes).
- `start`: [`RunPlan`]; [`start_run`] and [`RunRecorder`] (write, once training starts).
- `lock`: [`RunLock`].
- `callback`: [`RunDirectoryCallback`], [`continue_schedule`].
- `files`: [`writable_dir`], [`write_json`] (atomic), [`default_mode`].
"""

from .callback import RunDirectoryCallback, continue_schedule
from .checkpoints import (
    checkpoint_folders,
    checkpoint_problems,
    checkpoint_record,
    complete_checkpoints,
    saved_weights_only,
    trainer_state,
)
from .files import default_mode, writable_dir, write_json
from .lock import HOLDER_FILE, LOCK_FILE, OutputDirInUse, RunLock
from .outputs import RUN_WRITES, clear_previous_run
from .plan import check_apart_from_inputs, check_output_dir, plan_run
from .record import (
    NOT_TRAINING_ARGS,
    RUN_FILE,
    describe_changes,
    finished_run_changes,
    input_fingerprints,
    package_versions,
    read_run_record,
    run_record_of,
    run_settings,
    settings_changes,
)
from .start import RunPlan, RunRecorder, start_run


__all__ = [
    "HOLDER_FILE",
    "LOCK_FILE",
    "NOT_TRAINING_ARGS",
    "RUN_FILE",
    "RUN_WRITES",
    "OutputDirInUse",
    "RunDirectoryCallback",
    "RunLock",
    "RunPlan",
    "RunRecorder",
    "check_apart_from_inputs",
    "check_output_dir",
    "default_mode",
    "checkpoint_folders",
    "checkpoint_problems",
    "checkpoint_record",
    "clear_previous_run",
    "complete_checkpoints",
    "continue_schedule",
    "describe_changes",
    "finished_run_changes",
    "input_fingerprints",
    "package_versions",
    "plan_run",
    "read_run_record",
    "run_record_of",
    "run_settings",
    "saved_weights_only",
    "settings_changes",
    "start_run",
    "trainer_state",
    "writable_dir",
    "write_json",
]
