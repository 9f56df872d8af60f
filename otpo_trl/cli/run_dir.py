"""The run directory of `scripts/train.py`: it cannot lie. This docstring is where its rules are stated.

The rules:

- `output_dir/run_args.json` records the arguments that decide what is trained ([`run_settings`]: all but where and
  how a run logs, saves, evaluates and launches, `NOT_TRAINING_ARGS`; the number of processes included), under its
  own key `data` a fingerprint of the training data (`otpo_trl.data.data_fingerprint`: size, modification time and a
  hash of the first and last MiB of each local file; `datasets`' fingerprint for Hub data), and whether the run
  finished.
- `output_dir` may not be, hold or lie inside a local input of the run (the model, the data, the chat template): such
  a run is refused whatever the flags, before anything is written or deleted.
- The same run again resumes from its last complete checkpoint (an incomplete one, cut short by a kill or a full disk,
  is skipped with a warning naming it) or, if it finished, says so and trains nothing. Checkpoints saved with
  `save_only_model` (no optimizer or scheduler state) are not resumed. `--resume_from_checkpoint true` with nothing
  to resume is an error.
- A different run there (other arguments, or the same on changed data) stops before any model is loaded, listing the
  differences and how to go on: a new `output_dir`; `--resume_from_checkpoint <output_dir>/checkpoint-<step>`, which
  continues that run with the new arguments (recorded in `run_args.json` under `resumed_with_changes`); or
  `--overwrite_output_dir`, which deletes its checkpoints, results and weights first.
- `--resume_from_checkpoint false` in a used `output_dir` needs `--overwrite_output_dir`, so that no stale checkpoint
  is left for a later run to resume from.

The code: [`plan_run`] decides from values (the folder, the settings, the data fingerprint, the resume and overwrite
flags) whether a run trains afresh, resumes, has finished, or must stop, and returns a [`RunPlan`];
[`apply_run_plan`] then clears and records, and [`mark_finished`] closes it. [`finished_run_changes`] (built on
[`settings_changes`]) and [`describe_changes`] tell whether a recorded run matches given settings, for the studies
that reuse finished runs; [`run_record_of`] finds the record of the run that saved a model, for the evaluation to
follow its settings.
Nothing here imports the command line that calls it.
"""

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field, fields
from datetime import datetime
from enum import Enum
from pathlib import Path


logger = logging.getLogger(__name__)


def writable_dir(path: str | Path, what: str) -> Path:
    """Create the folder `path` if needed; a `ValueError` naming `what` if it is a file or cannot be written to."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file; it must be a folder (or not exist yet).")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ValueError(f"{what} {path} cannot be written to: {err.strerror or err}.") from err
    return path


RUN_FILE = "run_args.json"
# Arguments that say where and how a run is logged, saved, evaluated or launched, not what it trains: a run that
# differs from the one recorded in output_dir only in these continues it. Every other argument is compared.
NOT_TRAINING_ARGS = frozenset(
    {
        # output_dir and resuming
        *("output_dir", "overwrite_output_dir", "resume_from_checkpoint", "ignore_data_skip"),
        *("restore_callback_states_from_checkpoint", "save_strategy", "save_steps", "save_total_limit"),
        *("save_on_each_node", "save_only_model", "enable_jit_checkpoint"),
        # logging and the Hub
        *("logging_strategy", "logging_steps", "logging_first_step", "logging_nan_inf_filter", "log_on_each_node"),
        *("log_level", "log_level_replica", "disable_tqdm", "report_to", "run_name", "project", "trackio_space_id"),
        *("trackio_bucket_id", "trackio_static_space_id", "include_num_input_tokens_seen", "skip_memory_metrics"),
        *("debug", "push_to_hub", "hub_token", "hub_private_repo", "hub_model_id", "hub_strategy", "hub_always_push"),
        "hub_revision",
        # TRL's script arguments that do not change what is trained (streaming is refused; DDP's ignored buffers)
        *("dataset_streaming", "ignore_bias_buffers"),
        # evaluation
        *("do_train", "do_eval", "do_predict", "eval_strategy", "eval_steps", "eval_delay", "eval_on_start"),
        *("per_device_eval_batch_size", "prediction_loss_only", "eval_do_concat_batches", "eval_use_gather_object"),
        *("eval_accumulation_steps", "include_for_metrics", "batch_eval_metrics", "load_best_model_at_end"),
        *("metric_for_best_model", "greater_is_better", "bf16_full_eval", "fp16_full_eval", "dataset_test_split"),
        "max_eval_samples",
        # the machine and the launch (the number of processes is compared, as `world_size`)
        *("use_cpu", "local_rank", "ddp_find_unused_parameters", "ddp_bucket_cap_mb", "ddp_broadcast_buffers"),
        *("ddp_static_graph", "ddp_backend", "ddp_timeout", "dataloader_num_workers", "dataloader_pin_memory"),
        *("dataloader_persistent_workers", "dataloader_prefetch_factor", "dataloader_multiprocessing_context"),
        *("torch_empty_cache_steps", "dataset_num_proc", "precompute_ref_batch_size", "deepspeed", "fsdp"),
        *("fsdp_config", "accelerator_config", "parallelism_config"),
    }
)
# What a run leaves at the top of output_dir besides its checkpoint-<step> folders: a folder holding any of these (or
# a checkpoint) is "used". `--overwrite_output_dir` deletes them, with the `model-*.safetensors` shards; the tokenizer,
# config and model card are rewritten by the new run's save.
RUN_OUTPUTS = (
    *(RUN_FILE, "trainer_state.json", "all_results.json", "train_results.json", "eval_results.json", "runs"),
    *("training_args.bin", "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"),
    *("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"),
)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _jsonable(value):
    return value.value if isinstance(value, Enum) else str(value)


def run_settings(script_args, training_args, model_args) -> dict:
    """The arguments that decide what a run trains, as JSON values: all but `NOT_TRAINING_ARGS` (and the `ot_*` ones
    for `trainer: dpo`, which does not use them), plus the number of processes (`world_size`); local data, model and
    template paths made absolute.

    Args:
        script_args, training_args, model_args: the three dataclasses the training CLI parses (its script arguments,
            with `trainer`; an `OTPOConfig` or `DPOConfig`, with `world_size`; a `trl.ModelConfig`). Every init field
            is read by name, so this module needs none of their classes.
    """
    settings = {"world_size": training_args.world_size}
    for args in (script_args, model_args, training_args):
        settings |= {f.name: getattr(args, f.name) for f in fields(args) if f.init and f.name not in NOT_TRAINING_ARGS}
    if script_args.trainer == "dpo":
        settings = {k: v for k, v in settings.items() if not k.startswith("ot_")}
    for key in ("dataset_name", "model_name_or_path", "chat_template"):
        value = settings.get(key)
        if isinstance(value, str) and os.path.exists(os.path.expanduser(value)):
            settings[key] = os.path.abspath(os.path.expanduser(value))
    return json.loads(json.dumps(settings, default=_jsonable))


def settings_changes(old: dict, new: dict) -> dict:
    """The settings that differ between `old` (say a run record's) and `new`, by key: `{key: [old, new]}`, sorted, with
    "<unset>" for a key that one side lacks; empty when they match. Compare [`run_settings`] with a recorded one to
    tell whether a finished run is the one these arguments would train."""
    unset = "<unset>"
    return {k: [old.get(k, unset), new.get(k, unset)] for k in sorted({*old, *new}) if old.get(k) != new.get(k)}


def read_run_record(folder: str | Path) -> dict | None:
    """The run record (`run_args.json`) in `folder`; None when there is none.

    Raises:
        ValueError: the file is there but is not a run record (not JSON, or no `settings` mapping).
    """
    file = Path(folder).expanduser() / RUN_FILE
    if not file.is_file():
        return None
    try:
        record = json.loads(file.read_text())
        if not isinstance(record["settings"], dict):
            raise TypeError("`settings` is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{file} is not a run record of the training command ({err!r}).") from err
    return record


def finished_run_changes(run_dir: str | Path, settings: dict) -> dict:
    """How the run recorded in `run_dir` differs from `settings` ([`run_settings`] of the arguments a study would
    train it with): [`settings_changes`] of the `settings` that `run_args.json` records (none when it records none)
    and `settings`. Empty when the run there is the one these arguments would train."""
    record = Path(run_dir) / RUN_FILE
    old = json.loads(record.read_text()).get("settings", {}) if record.exists() else {}
    return settings_changes(old, settings)


def describe_changes(changes: dict, limit: int = 8) -> str:
    """`changes` ([`settings_changes`]) in one line, `key: old -> new, ...`: the first `limit`, then a count of the
    rest."""
    text = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changes.items())[:limit])
    return text + (f" and {len(changes) - limit} more" if len(changes) > limit else "")


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """The `checkpoint-<step>` folders of `output_dir`, by step."""
    found = [p for p in Path(output_dir).iterdir() if _CHECKPOINT.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(_CHECKPOINT.match(p.name)[1]))


def _nonempty(path: Path) -> bool:
    return path.is_dir() or path.stat().st_size > 0


def checkpoint_problems(path: str | Path) -> list[str]:
    """What the checkpoint folder `path` lacks for a resume; empty when it is complete.

    HF Trainer writes the weights, then the optimizer, scheduler and RNG states, and `trainer_state.json` last, so a
    save cut short (a kill, a full disk) lacks at least `trainer_state.json`. Weights: `model*.safetensors`,
    `adapter_model.*`, `pytorch_model*` (FSDP: a `pytorch_model_fsdp_*` folder) or a DeepSpeed `global_step*` folder,
    which also holds the optimizer; else `optimizer.pt` / `.bin` or FSDP's `optimizer_*`. A checkpoint that lacks only
    the optimizer state was saved with `save_only_model` (see [`saved_weights_only`]).
    """
    path = Path(path)
    entries = [p for p in path.iterdir() if _nonempty(p)]
    names = [p.name for p in entries]
    deepspeed = any(n.startswith("global_step") for n in names)
    missing = []
    try:
        json.loads((path / "trainer_state.json").read_text())["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        missing.append("trainer_state.json")
    if not deepspeed and not any(n.startswith(("model", "adapter_model", "pytorch_model")) for n in names):
        missing.append("model weights")
    if not (deepspeed or any(n.startswith("optimizer") for n in names)):
        missing.append("optimizer state")
    return missing


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


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The last checkpoint of `output_dir` with nothing missing; incomplete later ones are skipped with a warning.

    Raises:
        ValueError: the last one that is not cut short was saved with `save_only_model` (see [`weights_only_error`]).
    """
    for checkpoint in reversed(checkpoint_folders(output_dir)):
        problems = checkpoint_problems(checkpoint)
        if not problems:
            return checkpoint
        if saved_weights_only(problems):
            raise weights_only_error(checkpoint)
        logger.warning(
            f"Skipping the incomplete checkpoint {checkpoint} (no {', '.join(problems)}: its save was cut short, "
            "e.g. by a kill or a full disk); looking for an earlier one."
        )
    return None


def _reached_the_end(state: dict, settings: dict) -> bool:
    if settings["max_steps"] > 0:
        return state["global_step"] >= settings["max_steps"]
    return state.get("epoch", 0) >= settings["num_train_epochs"] - 1e-6


@dataclass
class RunPlan:
    """What to do with `output_dir`: `action` "train" (from `checkpoint`, or afresh when None) or "finished" (nothing
    to train: `message` says why); `clear`: delete the previous run's outputs first; `record`: the new run_args.json."""

    action: str
    checkpoint: str | None = None
    message: str = ""
    clear: bool = False
    record: dict = field(default_factory=dict)


# The arguments that name an input of the run: `output_dir` must neither be one nor hold one nor lie inside one.
INPUT_ARGS = {"model_name_or_path": "the model", "dataset_name": "the data", "chat_template": "the chat template"}


def check_apart_from_inputs(output_dir: str | Path, settings: dict) -> None:
    """Raise a `ValueError` if `output_dir` is, holds or lies inside a local input of the run (model, data, chat
    template; the paths of `settings`, as [`run_settings`] makes them): the run saves its weights and checkpoints there,
    and `--overwrite_output_dir` deletes them, so the input would be overwritten or deleted. Symbolic links resolved."""
    out = Path(output_dir).expanduser().resolve()
    for key, what in INPUT_ARGS.items():
        value = settings.get(key)
        if not isinstance(value, str) or not os.path.exists(value):
            continue
        path = Path(value).resolve()
        if out == path:
            relation = "is"
        elif out in path.parents:
            relation = "holds"
        elif path in out.parents:
            relation = "lies inside"
        else:
            continue
        raise ValueError(
            f"`output_dir` {output_dir} {relation} {what} of the run (`{key}` {value}): the run saves its weights and "
            "checkpoints there, and overwriting deletes them, which would destroy an input of the run. Nothing was "
            f"changed. Use an `--output_dir` outside the model, data and chat template folders (e.g. out/<run-name>)."
        )


def _when(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9).isoformat(sep=" ", timespec="seconds")


def _summary(entry: dict | None) -> str:
    if entry is None:
        return "<none>"
    if "size" in entry:
        return f"{entry['size']} bytes, modified {_when(entry['mtime_ns'])}, sha256 {entry['sha256'][:12]}"
    return f"fingerprint {entry.get('fingerprint')}"


def _data_changes(old: dict | None, new: dict | None, where: Path) -> dict:
    """The data whose fingerprint changed, as [`settings_changes`] entries ("data <file>": [old, new]); {} when
    unchanged or unknown (a record of an older version has no fingerprint: a warning says that the data could not be
    checked)."""
    if new is None:
        return {}
    if old is None:
        logger.warning(
            f"{where / RUN_FILE} has no fingerprint of the data (it was written by an older version): the data could "
            "not be checked against the run's. If it changed, this resume trains on the new data."
        )
        return {}
    changes = {}
    for name in sorted({*old.get("files", {}), *new.get("files", {})}):
        a, b = old.get("files", {}).get(name), new.get("files", {}).get(name)
        if a != b:
            changes[f"data {name}"] = [_summary(a), _summary(b)]
    rest_old = {k: v for k, v in old.items() if k != "files"}
    rest_new = {k: v for k, v in new.items() if k != "files"}
    if rest_old != rest_new:
        changes["data"] = [_summary(rest_old or None), _summary(rest_new or None)]
    return changes


def plan_run(
    output_dir: str | Path,
    settings: dict,
    *,
    resume_from_checkpoint: str | bool | None = None,
    overwrite_output_dir: bool = False,
    data: dict | None = None,
) -> RunPlan:
    """Decide, from what `output_dir` holds and the run's values, whether to train afresh, resume, or stop.

    Nothing is written but `output_dir` itself (created, to check that it is writable): [`apply_run_plan`] does the
    rest, once the data have been checked.

    Args:
        output_dir: the run directory.
        settings: the run's arguments, as [`run_settings`] gives them; its `max_steps` and `num_train_epochs` say
            where training ends.
        resume_from_checkpoint: as the flag: None (resume the same run if there is one), true / "last", false /
            "never", or the path of a checkpoint folder.
        overwrite_output_dir: delete the previous run's outputs (the plan's `clear`) instead of refusing a different
            run.
        data: the fingerprint of the training data (`otpo_trl.data.data_fingerprint`), recorded under `data` and
            compared on resume like the settings; None: not recorded, not compared.

    Raises:
        ValueError: `output_dir` is, holds or lies inside an input of the run; it is a file or read-only; it holds a
            different run (or the same on other data), a run without a record, or (with `--resume_from_checkpoint
            false`) any run, and `--overwrite_output_dir` is not given; `--resume_from_checkpoint true` finds nothing
            to resume; the requested checkpoint is missing, incomplete or saved with `save_only_model`. The message
            says how to go on.
    """
    check_apart_from_inputs(output_dir, settings)  # before anything is created or deleted
    requested = resume_from_checkpoint
    mode = "auto" if requested is None else str(requested).lower()
    mode = {"true": "last", "yes": "last", "false": "never", "no": "never", "none": "never"}.get(mode, mode)
    nothing_to_resume = (
        f"`--resume_from_checkpoint {requested}` resumes the run in `output_dir` from its last checkpoint, but "
        f"there is nothing to resume: {output_dir}"
    )
    fix = " Check the path of `--output_dir`; to start a new run, leave `--resume_from_checkpoint` unset."
    if mode == "last" and not overwrite_output_dir and not Path(output_dir).expanduser().exists():
        raise ValueError(f"{nothing_to_resume} does not exist (relative to {Path.cwd()}).{fix}")
    out = writable_dir(output_dir, "`output_dir`")
    record = None
    if (out / RUN_FILE).exists():
        try:
            record = json.loads((out / RUN_FILE).read_text())
            record["settings"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"{out / RUN_FILE} is not a run record ({err}); delete it or use a new `output_dir`."
            ) from err
    checkpoints = checkpoint_folders(out)
    used = [p.name for p in checkpoints] + [n for n in RUN_OUTPUTS if n != RUN_FILE and (out / n).exists()]
    history = (record or {}).get("resumed_with_changes", [])
    new_record = {"status": "started", "settings": settings, **({"data": data} if data is not None else {})}
    how = (
        f"To go on, use a new `--output_dir`; or continue that run with these arguments from one of its checkpoints, "
        f"`--resume_from_checkpoint {out}/checkpoint-<step>`; or delete its checkpoints and results and start afresh "
        "with `--overwrite_output_dir`."
    )

    clear = overwrite_output_dir and bool(used)
    if overwrite_output_dir:
        inside = mode not in ("auto", "never", "last") and out.resolve() in Path(requested).resolve().parents
        if mode == "last" or inside:
            raise ValueError(
                "`--overwrite_output_dir` deletes the checkpoints in `output_dir`: it cannot be combined with "
                f"`--resume_from_checkpoint {requested}`."
            )
        if mode in ("auto", "never"):
            return RunPlan("train", clear=clear, record=new_record)
        record, history = None, []  # an outside checkpoint into a cleared output_dir: a new run from there

    if mode not in ("auto", "never", "last"):  # an explicit checkpoint
        checkpoint = Path(requested).expanduser()
        if not checkpoint.is_dir():
            where = f"relative to {Path.cwd()}"
            raise ValueError(f"`--resume_from_checkpoint {requested}`: no such checkpoint folder ({where}).")
        problems = checkpoint_problems(checkpoint)
        if saved_weights_only(problems):
            raise weights_only_error(checkpoint)
        if problems:
            siblings = checkpoint_folders(checkpoint.parent)
            complete = [p.name for p in siblings if not checkpoint_problems(p)]
            raise ValueError(
                f"`--resume_from_checkpoint {requested}` is incomplete (no {', '.join(problems)}): its save was cut "
                f"short. Complete checkpoints beside it: {complete or 'none'}."
            )
        changes = {}
        if record is not None:
            changes = settings_changes(record["settings"], settings) | _data_changes(record.get("data"), data, out)
        if changes:
            logger.warning(f"Resuming {checkpoint} with other arguments than its run's: {describe_changes(changes)}.")
            history = [*history, {"checkpoint": str(checkpoint), "changes": changes}]
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        if _reached_the_end(state, settings):
            return RunPlan(
                "finished",
                message=(
                    f"{checkpoint} is at step {state['global_step']}, where training with these arguments ends "
                    f"(max_steps {settings['max_steps']}, num_train_epochs {settings['num_train_epochs']}): nothing "
                    "to train. Raise max_steps (or num_train_epochs) to train further."
                ),
            )
        kept = {**new_record, "resumed_with_changes": history} if history else new_record
        return RunPlan("train", str(checkpoint), clear=clear, record=kept)

    if not used:
        if mode == "last":
            raise ValueError(f"{nothing_to_resume} holds no run (no checkpoint, no {RUN_FILE}).{fix}")
        return RunPlan("train", record=new_record)
    if mode == "never":
        raise ValueError(
            f"`--resume_from_checkpoint false`, but {out} holds an earlier run ({', '.join(used[:6])}): starting "
            "afresh there would leave its checkpoints for a later run to resume from, mixing two runs. Add "
            "`--overwrite_output_dir` to delete them first, or use a new `--output_dir`."
        )
    if record is None:
        raise ValueError(
            f"{out} holds checkpoints or results ({', '.join(used[:6])}) but no {RUN_FILE}: the arguments of that "
            f"run are unknown, so it is not resumed automatically. {how}"
        )
    changes = settings_changes(record["settings"], settings) | _data_changes(record.get("data"), data, out)
    if changes:
        raise ValueError(f"{out} holds a run with other arguments ({describe_changes(changes)}). {how}")
    if record.get("status") == "finished":
        return RunPlan(
            "finished",
            message=(
                f"{out} holds this run, finished at step {record.get('global_step')}: nothing to train. To train it "
                "again, add `--overwrite_output_dir` or use a new `--output_dir`."
            ),
        )
    checkpoint = last_complete_checkpoint(out)
    kept = {**new_record, "resumed_with_changes": history} if history else new_record
    if checkpoint is None:
        if mode == "last":
            raise ValueError(f"`--resume_from_checkpoint true`: {out} holds no complete checkpoint.")
        logger.info(f"{out} holds this run but no complete checkpoint: training from the start.")
        return RunPlan("train", record=kept)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    if _reached_the_end(state, settings):
        return RunPlan(
            "finished",
            message=(
                f"{checkpoint} is at step {state['global_step']}, the last of this run, but the run's final save did not "
                f"finish: the trained weights are in {checkpoint}. Nothing to train."
            ),
        )
    logger.info(f"Checkpoint detected in {out}: resuming training from {checkpoint}.")
    return RunPlan("train", str(checkpoint), record=kept)


def run_record_of(model_path: str | Path) -> tuple[Path, dict] | None:
    """The record of the training run that saved the model (or adapter) folder `model_path`, for a tool that evaluates
    it: `(file, record)` from `<model_path>/run_args.json` or, for a `checkpoint-<step>` folder, its run's
    `<model_path>/../run_args.json`; None when there is none (a Hub id, a model this package did not train).

    Raises:
        ValueError: the file is there but is not a run record (not JSON, or no `settings` mapping).
    """
    path = Path(model_path).expanduser()
    for folder in (path, *([path.parent] if _CHECKPOINT.match(path.name) else [])):
        record = read_run_record(folder)
        if record is not None:
            return folder / RUN_FILE, record
    return None


def _write_record(output_dir: str | Path, record: dict) -> None:
    path = Path(output_dir) / RUN_FILE
    path.with_suffix(".tmp").write_text(json.dumps(record, indent=2) + "\n")
    os.replace(path.with_suffix(".tmp"), path)  # atomic: a kill leaves the old record or the new one


def apply_run_plan(plan: RunPlan, output_dir: str | Path) -> None:
    """On the main process: delete the previous run's outputs if `plan.clear`, and write the new run record."""
    out = Path(output_dir).expanduser()
    if plan.clear:
        doomed = checkpoint_folders(out) + [out / n for n in RUN_OUTPUTS] + list(out.glob("model-*.safetensors"))
        doomed = [p for p in doomed if p.exists()]
        for path in doomed:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        logger.info(f"--overwrite_output_dir: deleted {', '.join(p.name for p in doomed)} from {out}.")
    _write_record(out, plan.record)


def mark_finished(output_dir: str | Path, global_step: int) -> None:
    """Record in run_args.json that the run finished (trained and saved): a later identical run does not step again."""
    record = json.loads((Path(output_dir) / RUN_FILE).read_text())
    _write_record(output_dir, {**record, "status": "finished", "global_step": global_step})
