"""The run record, `run_args.json`: what a run trains (its settings), what it trains from (fingerprints of its inputs
and data), with which packages (their versions), what it wrote (its outputs) and how far it got (its status).

The rules it serves are stated in docs/training.md ("The run directory"). Tools read it through [`read_run_record`]
and [`run_record_of`]; the studies compare it with [`finished_run_changes`].
"""

import hashlib
import json
import logging
import os
import re
from dataclasses import fields
from datetime import datetime
from enum import Enum
from importlib import metadata
from pathlib import Path

from ..data import file_fingerprint


logger = logging.getLogger(__name__)

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
        "ot_memory_budget",  # how the OT step fits the machine's memory; the weights do not depend on it
    }
)
# The settings that decide the shapes of the trained weights: a checkpoint saved under other values cannot be loaded.
SHAPE_ARGS = (
    "use_peft",
    "lora_r",
    "lora_target_modules",
    "lora_target_parameters",
    "lora_modules_to_save",
    "use_dora",
)
# The packages whose versions are recorded: a resume under other versions warns and records them.
VERSIONED = ("otpo-trl", "trl", "transformers", "peft", "torch")
# The inputs a resume depends on besides the data, as [`input_fingerprints`] names them.
INPUTS = ("model", "reference", "tokenizer", "chat_template")
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
# Files of a model folder that belong to its tokenizer (the rest, docs aside, to the model: weights, config, code).
_TOKENIZER_FILE = re.compile(r"^(tokenizer|special_tokens_map|added_tokens|vocab|merges|spiece|sentencepiece)")
_CHAT_TEMPLATE_FILE = re.compile(r"^chat_template\.")
_NOT_AN_INPUT = re.compile(r"^(\.|README|LICENSE|USE_POLICY|NOTICE)|\.(md|txt)$")
# A file at most this long is hashed whole by `file_fingerprint` (its first and last MiB), so its modification time
# says nothing more than its hash.
_HASHED_WHOLE = 2 << 20


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


def describe_changes(changes: dict, limit: int = 8) -> str:
    """`changes` ([`settings_changes`]) in one line, `key: old -> new, ...`: the first `limit`, then a count of the
    rest."""
    text = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changes.items())[:limit])
    return text + (f" and {len(changes) - limit} more" if len(changes) > limit else "")


def read_run_record(folder: str | Path) -> dict | None:
    """The run record (`run_args.json`) in `folder` (a run's folder, or one of its checkpoints); None when there is
    none.

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
        raise ValueError(
            f"{file} is not a run record of the training command ({err!r}); delete it or use another folder."
        ) from err
    return record


def run_record_of(model_path: str | Path) -> tuple[Path, dict] | None:
    """The record of the training run that saved the model (or adapter) folder `model_path`, for a tool that evaluates
    it: `(file, record)` from `<model_path>/run_args.json` (a run's folder, or a checkpoint, which carries its run's
    record) or, for a `checkpoint-<step>` folder saved by an older version, its run's `<model_path>/../run_args.json`;
    None when there is none (a Hub id, a model this package did not train).

    Raises:
        ValueError: the file is there but is not a run record (not JSON, or no `settings` mapping).
    """
    path = Path(model_path).expanduser()
    for folder in (path, *([path.parent] if CHECKPOINT_NAME.match(path.name) else [])):
        record = read_run_record(folder)
        if record is not None:
            return folder / RUN_FILE, record
    return None


def finished_run_changes(run_dir: str | Path, settings: dict) -> dict:
    """How the run recorded in `run_dir` differs from `settings` ([`run_settings`] of the arguments a study would
    train it with): [`settings_changes`] of the `settings` that `run_args.json` records (none when it records none)
    and `settings`. Empty when the run there is the one these arguments would train."""
    record = Path(run_dir) / RUN_FILE
    old = json.loads(record.read_text()).get("settings", {}) if record.exists() else {}
    return settings_changes(old, settings)


def package_versions() -> dict:
    """The installed versions of `VERSIONED` (None for one that is not installed)."""
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _folder_files(folder: Path) -> dict[str, dict[str, dict]]:
    """The files of the local model folder `folder`, each `file_fingerprint`ed under its name, in three groups:
    "model" (weights, config, code), "tokenizer" and "chat_template" (a `chat_template.*` file). Docs are left out."""
    groups = {"model": {}, "tokenizer": {}, "chat_template": {}}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or _NOT_AN_INPUT.search(path.name):
            continue
        group = (
            "chat_template"
            if _CHAT_TEMPLATE_FILE.match(path.name)
            else "tokenizer"
            if _TOKENIZER_FILE.match(path.name)
            else "model"
        )
        groups[group][path.name] = file_fingerprint(path)
    return groups


def input_fingerprints(model_name_or_path: str, revision: str | None = None, chat_template: str | None = None) -> dict:
    """Fingerprints of what a run trains from besides its data, to tell whether a resume would train on other inputs.

    Args:
        model_name_or_path: a local model folder, or a Hub model id.
        revision: the Hub revision (`model_revision`); None for the default branch.
        chat_template: the `chat_template` argument: the path of a template file, a template, or None (the model's).

    Returns:
        `{"model", "reference", "tokenizer", "chat_template"}`. For a local folder, the model is its config, weights
        and code and the tokenizer its tokenizer files, each `{"files": {name: file_fingerprint}}` (by name, not path,
        so that a moved folder is the same model); the reference is the model's fingerprint (the training command
        loads the reference from the same path). For a Hub id, each is `{"hub": id, "revision": revision}` (the Hub is
        not asked). The chat template is the given file's fingerprint, the given template's SHA-256, or else the
        model folder's `chat_template.*` files (empty: the template in `tokenizer_config.json`, a tokenizer file).
    """
    path = Path(model_name_or_path).expanduser()
    if path.is_dir():
        groups = _folder_files(path)
        model, tokenizer = {"files": groups["model"]}, {"files": groups["tokenizer"]}
        template = {"files": groups["chat_template"]}
    else:
        model = tokenizer = template = {"hub": model_name_or_path, "revision": revision or "main"}
    if chat_template is not None:
        file = Path(chat_template).expanduser()
        if file.is_file():
            template = {"file": file_fingerprint(file)}
        else:
            template = {"sha256": hashlib.sha256(chat_template.encode()).hexdigest()}
    return {"model": model, "reference": model, "tokenizer": tokenizer, "chat_template": template}


def same_file(old: dict | None, new: dict | None) -> bool:
    """Whether two `file_fingerprint`s are of the same content: the same size and hash, and for a file longer than
    what the hash covers (2 MiB), the same modification time."""
    if old is None or new is None:
        return old == new
    if old.get("size") != new.get("size") or old.get("sha256") != new.get("sha256"):
        return False
    return old["size"] <= _HASHED_WHOLE or old.get("mtime_ns") == new.get("mtime_ns")


def _when(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9).isoformat(sep=" ", timespec="seconds")


def _summary(entry: dict | None) -> str:
    if entry is None:
        return "<none>"
    if "size" in entry:
        return f"{entry['size']} bytes, modified {_when(entry['mtime_ns'])}, sha256 {entry['sha256'][:12]}"
    if "revision" in entry:
        return f"{entry['hub']} at revision {entry['revision']}"
    return ", ".join(f"{k} {v}" for k, v in entry.items())


def _file_changes(what: str, old: dict, new: dict) -> dict:
    changes = {}
    for name in sorted({*old, *new}):
        if not same_file(old.get(name), new.get(name)):
            changes[f"{what} {name}"] = [_summary(old.get(name)), _summary(new.get(name))]
    return changes


def input_changes(old: dict | None, new: dict | None) -> dict:
    """How the inputs of [`input_fingerprints`] differ, as [`settings_changes`] entries naming each input and file
    (`"model model.safetensors": [old, new]`, `"chat_template": [...]`); {} when they match or `old` is None (a
    record of an older version)."""
    if old is None or new is None:
        return {}
    changes = {}
    for what in INPUTS:
        a, b = old.get(what), new.get(what)
        if a is not None and b is not None and "files" in a and "files" in b:
            changes |= _file_changes(what, a["files"], b["files"])
        elif "file" in (a or {}) and "file" in (b or {}):
            changes |= _file_changes(what, {"file": a["file"]}, {"file": b["file"]})
        elif a != b:
            changes[what] = [_summary(a), _summary(b)]
    return changes


def data_changes(old: dict | None, new: dict | None, where: Path) -> dict:
    """The data whose fingerprint (`otpo_trl.data.data_fingerprint`) changed, as [`settings_changes`] entries
    ("data <file>": [old, new]); {} when unchanged or unknown (a record of an older version has no fingerprint: a
    warning says that the data could not be checked)."""
    if new is None:
        return {}
    if old is None:
        logger.warning(
            f"{where} has no fingerprint of the data (it was written by an older version): the data could "
            "not be checked against the run's. If it changed, this resume trains on the new data."
        )
        return {}
    changes = _file_changes("data", old.get("files", {}), new.get("files", {}))
    rest_old = {k: v for k, v in old.items() if k != "files"}
    rest_new = {k: v for k, v in new.items() if k != "files"}
    if rest_old != rest_new:
        changes["data"] = [_summary(rest_old or None), _summary(rest_new or None)]
    return changes


def version_changes(old: dict | None, new: dict) -> dict:
    """The packages of `VERSIONED` whose recorded version differs from `new`'s: `{name: [old, new]}`; {} for a record
    without versions (an older one)."""
    if old is None:
        return {}
    return {name: [old.get(name), new.get(name)] for name in VERSIONED if old.get(name) != new.get(name)}
