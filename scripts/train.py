"""Train a model with OTPO (or the plain DPO baseline) from a YAML recipe.

```bash
accelerate launch --config_file configs/accelerate/single_gpu.yaml scripts/train.py --config configs/quickstart.yaml
accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml scripts/train.py \
    --config configs/llama-3-8b-instruct/otpo_full.yaml --output_dir out/my-run --learning_rate 1.0e-6
```

The recipe gives the defaults and command-line flags override them. Arguments are those of `ScriptArguments` below,
[`OTPOConfig`] (every `trl.DPOConfig` / `transformers.TrainingArguments` field plus the `ot_*` ones) and
`trl.ModelConfig` (model, dtype, attention, LoRA). A key that none of them knows, in the recipe or on the command
line, is an error. `trainer: dpo` runs TRL's `DPOTrainer` on the same settings (the `ot_*` keys are then unused).

The run directory cannot lie: `output_dir/run_args.json` records the arguments that decide what is trained. A run
into an `output_dir` that holds the same run resumes it from its last complete checkpoint, or says that it has
finished; a different run there stops before any model is loaded, saying how to go on: a new `output_dir`,
`--resume_from_checkpoint <checkpoint>` (continue that run with the new arguments), or `--overwrite_output_dir` (delete
its checkpoints and results first). `--resume_from_checkpoint false` in a used `output_dir` needs
`--overwrite_output_dir`, so that no stale checkpoint is left for a later run to resume from.
"""

import difflib
import json
import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path

import datasets
import torch
import transformers
import yaml
from transformers import AutoTokenizer
from transformers.integrations import TensorBoardCallback
from trl import DPOConfig, DPOTrainer, ModelConfig, TrlParser, get_peft_config, get_quantization_config

from otpo_trl import OTPOConfig, OTPOTrainer
from otpo_trl.analysis import resolve_model_path, tokenize_pair, writable_dir
from otpo_trl.data import DEFAULT_CHAT_TEMPLATE, load_preference_dataset, split_off_eval


logger = logging.getLogger(__name__)

TRAINERS = {"otpo": OTPOTrainer, "dpo": DPOTrainer}


@dataclass
class ScriptArguments:
    """Arguments of this script that are not the trainer's or the model's."""

    trainer: str = field(
        default="otpo",
        metadata={
            "help": "'otpo' trains with OTPOTrainer; 'dpo' runs TRL's DPOTrainer on the same recipe (the ot_* keys "
            "are then unused), as a baseline.",
            "choices": list(TRAINERS),
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub data set id (e.g. trl-lib/ultrafeedback_binarized) or a local .jsonl / .json / .parquet "
            "file, a folder of <split>.<ext> files or a save_to_disk folder. Relative paths are relative to the "
            "current directory."
        },
    )
    dataset_config: str | None = field(
        default=None,
        metadata={"help": "Configuration name of the Hub data set, if it has several."},
    )
    dataset_train_split: str = field(
        default="train",
        metadata={"help": "Split to train on ('train_prefs' for HuggingFaceH4/ultrafeedback_binarized)."},
    )
    dataset_test_split: str = field(
        default="test",
        metadata={
            "help": "Split to evaluate on ('test_prefs' for HuggingFaceH4/ultrafeedback_binarized); loaded only when "
            "evaluating (do_eval, or an eval_strategy other than 'no')."
        },
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={"help": "Train on at most this many pairs (the first ones, after dropping ties and identical)."},
    )
    max_eval_samples: int | None = field(
        default=None,
        metadata={"help": "Evaluate on at most this many pairs (the first ones, after dropping ties and identical)."},
    )
    eval_split_size: float | None = field(
        default=None,
        metadata={
            "help": "Hold out pairs of the training split for evaluation: a share (0 < x < 1) or a number of pairs, "
            "drawn with `seed`, after dropping ties and identical pairs. Required to evaluate on a single data file "
            "(one file is one split); when set, `dataset_test_split` is not used."
        },
    )
    drop_ties: bool = field(
        default=False,
        metadata={"help": "Drop pairs whose chosen and rejected scores are equal (score_chosen == score_rejected)."},
    )
    drop_identical: bool = field(
        default=False,
        metadata={"help": "Drop pairs whose chosen equals rejected."},
    )
    chat_template: str | None = field(
        default=None,
        metadata={
            "help": "Jinja chat template, or a path to a file holding one, to use instead of the tokenizer's. When "
            "unset, the tokenizer's own template is used, or a ChatML-style default if it has none."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Delete the checkpoints, results and saved model of the run in `output_dir` before training "
            "afresh. Without it, a run with other arguments (or `--resume_from_checkpoint false`) is refused there."
        },
    )

    def __post_init__(self):
        # A recipe's values bypass argparse's `choices` and types: check them here, before anything is loaded.
        if self.trainer not in TRAINERS:
            raise ValueError(f"`trainer` must be one of {list(TRAINERS)}, got {self.trainer!r}.")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"`{name}` must be an int >= 1 (or unset, for all pairs), got {value!r}.")
        size = self.eval_split_size
        if size is not None and not (0 < size < 1 or (size >= 1 and size == int(size))):
            raise ValueError(f"`eval_split_size` must be a share in (0, 1) or a whole number of pairs, got {size!r}.")


def make_parser() -> TrlParser:
    """The script's parser: `ScriptArguments`, `OTPOConfig`, `ModelConfig`; `--config <yaml>` gives defaults."""
    # No abbreviations: `--learning_rat` must be an error, not `--learning_rate`.
    return TrlParser((ScriptArguments, OTPOConfig, ModelConfig), allow_abbrev=False)


def _unknown_keys(strings: list[str]) -> list[str]:
    return [s[2:].split("=", 1)[0] for s in strings if s.startswith("--")] or strings


def _launched(variable: str) -> bool:
    return os.environ.get(variable, "").lower() == "true"


def launch_defaults() -> dict:
    """Defaults for a run of several processes without a GPU: `ddp_backend: gloo` under DeepSpeed, else `use_cpu`.

    Without them accelerate 1.x picks no backend: under DeepSpeed it counts one process and DeepSpeed stops on the
    batch size; under DDP (even with `ddp_backend: gloo`) the model is not wrapped, so each process trains alone.
    The recipe and the command line override these. FSDP is left alone: accelerate refuses it without a GPU.
    """
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, NPU, ...
    has_device = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or has_device or _launched("ACCELERATE_USE_FSDP"):
        return {}
    return {"ddp_backend": "gloo"} if _launched("ACCELERATE_USE_DEEPSPEED") else {"use_cpu": True}


def check_launch() -> None:
    """Stop when `accelerate launch --cpu` dropped what its config asks for (DeepSpeed, FSDP, several processes).

    With `--cpu`, accelerate 1.x starts one plain process whatever the config says and passes on only
    `ACCELERATE_USE_CPU=True`: the launcher's command line is the one place where the config still shows.
    """
    if not _launched("ACCELERATE_USE_CPU") or "WORLD_SIZE" in os.environ:
        return
    try:
        import psutil  # an accelerate dependency
        from accelerate.commands.config.config_args import load_config_from_file
        from accelerate.commands.launch import launch_command_parser

        command = psutil.Process().parent().cmdline()
        launch, _ = launch_command_parser().parse_known_args(command[command.index("launch") + 1 :])
        config = load_config_from_file(launch.config_file) if launch.cpu and launch.config_file else None
    except (Exception, SystemExit):  # not `accelerate launch --cpu --config_file ...`, or unreadable: no check
        return
    if config is None:
        return
    kind = getattr(config.distributed_type, "value", config.distributed_type)
    asked = kind if kind in ("DEEPSPEED", "FSDP") else None
    processes = launch.num_processes or config.num_processes or 1
    if asked is None and processes > 1 and launch.mpirun_hostfile is None:
        asked = f"{processes} processes"
    if asked is not None:
        raise ValueError(
            f"`accelerate launch --cpu` with {launch.config_file} ({asked}) would run one plain process: accelerate "
            "drops the config's distributed setup under `--cpu`. Remove `--cpu`; without a GPU this script sets "
            "`ddp_backend: gloo` (DeepSpeed) or `use_cpu: true` (DDP) itself. FSDP needs a GPU."
        )


def check_config_file(argv: list[str]) -> None:
    """Raise a `ValueError` unless the `--config` file of `argv` (if any) can be read as a YAML mapping; a syntax error
    names its line and column."""
    if "--config" not in argv:  # TrlParser reads only `--config <path>`
        return
    index = argv.index("--config") + 1
    if index == len(argv):
        raise ValueError("`--config` needs the path of a YAML recipe.")
    path = Path(argv[index])
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "no such file"
        raise ValueError(f"`--config {path}`: {what} (relative to {Path.cwd()}); expected a YAML recipe.")
    try:
        recipe = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ValueError(f"`--config {path}` cannot be read: {err.strerror or err}.") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or err
        raise ValueError(f"`--config {path}` is not valid YAML{where}: {problem}.") from err
    if not isinstance(recipe, dict):
        raise ValueError(f"`--config {path}` must hold a YAML mapping (key: value lines), not {type(recipe).__name__}")


def parse_args(argv: list[str] | None = None) -> tuple[ScriptArguments, OTPOConfig, ModelConfig]:
    """Parse `argv` (default: `sys.argv[1:]`) and the recipe given by `--config`.

    Raises:
        ValueError: the recipe cannot be read or is not YAML (the message names the line), a key in the recipe or on
            the command line matches no argument (the message names it and the closest known ones), or a value fails
            a check of `ScriptArguments` / `OTPOConfig` / `ModelConfig` (the message names the field). An argument of
            the wrong type or outside its choices on the command line exits through argparse, naming it.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    check_config_file(argv)
    check_launch()
    parser = make_parser()
    parser.set_defaults(**launch_defaults())  # before parsing: the arguments set up the processes
    # A value that fails a check raises here; OTPOConfig's messages name the field (and the flag to set for bf16).
    *parsed, from_config, from_command_line = parser.parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    known = [action.dest for action in parser._actions]
    errors = []
    for where, strings in (("the recipe", from_config), ("the command line", from_command_line)):
        for key in _unknown_keys(strings):
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.75)
            hint = f" (did you mean {', '.join(f'`{c}`' for c in close)}?)" if close else ""
            errors.append(f"`{key}` in {where}{hint}")
    if errors:
        raise ValueError(f"Unknown argument(s): {'; '.join(errors)}. See `scripts/train.py --help`.")
    return tuple(parsed)


def to_dpo_config(args: OTPOConfig) -> DPOConfig:
    """The same settings as a plain `DPOConfig`, for the `trainer: dpo` baseline (the `ot_*` fields dropped)."""
    # `gradient_checkpointing*` are deprecated aliases that mirror `activation_checkpointing*`; passing both warns.
    aliases = {"gradient_checkpointing", "gradient_checkpointing_kwargs"}
    return DPOConfig(**{f.name: getattr(args, f.name) for f in fields(DPOConfig) if f.init and f.name not in aliases})


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


def run_settings(script_args: ScriptArguments, training_args: OTPOConfig, model_args: ModelConfig) -> dict:
    """The arguments that decide what a run trains, as JSON values: all but `NOT_TRAINING_ARGS` (and the `ot_*` ones
    for `trainer: dpo`, which does not use them), plus the number of processes (`world_size`); local data, model and
    template paths made absolute."""
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


def _differences(old: dict, new: dict) -> dict:
    unset = "<unset>"
    return {k: [old.get(k, unset), new.get(k, unset)] for k in sorted({*old, *new}) if old.get(k) != new.get(k)}


def _describe(changes: dict, limit: int = 8) -> str:
    text = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changes.items())[:limit])
    return text + (f" and {len(changes) - limit} more" if len(changes) > limit else "")


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """The `checkpoint-<step>` folders of `output_dir`, by step."""
    found = [p for p in Path(output_dir).iterdir() if _CHECKPOINT.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(_CHECKPOINT.match(p.name)[1]))


def _nonempty(path: Path) -> bool:
    return path.is_dir() or path.stat().st_size > 0


def checkpoint_problems(path: str | Path, save_only_model: bool = False) -> list[str]:
    """What the checkpoint folder `path` lacks for a resume; empty when it is complete.

    HF Trainer writes the weights, then the optimizer, scheduler and RNG states, and `trainer_state.json` last, so a
    save cut short (a kill, a full disk) lacks at least `trainer_state.json`. Weights: `model*.safetensors`,
    `adapter_model.*`, `pytorch_model*` (FSDP: a `pytorch_model_fsdp_*` folder) or a DeepSpeed `global_step*` folder,
    which also holds the optimizer; else `optimizer.pt` / `.bin` or FSDP's `optimizer_*` (unless `save_only_model`).
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
    if not (save_only_model or deepspeed or any(n.startswith("optimizer") for n in names)):
        missing.append("optimizer state")
    return missing


def last_complete_checkpoint(output_dir: str | Path, save_only_model: bool = False) -> Path | None:
    """The last checkpoint of `output_dir` with nothing missing; incomplete later ones are skipped with a warning."""
    for checkpoint in reversed(checkpoint_folders(output_dir)):
        problems = checkpoint_problems(checkpoint, save_only_model)
        if not problems:
            return checkpoint
        logger.warning(
            f"Skipping the incomplete checkpoint {checkpoint} (no {', '.join(problems)}: its save was cut short, "
            "e.g. by a kill or a full disk); looking for an earlier one."
        )
    return None


def _reached_the_end(state: dict, training_args: OTPOConfig) -> bool:
    if training_args.max_steps > 0:
        return state["global_step"] >= training_args.max_steps
    return state.get("epoch", 0) >= training_args.num_train_epochs - 1e-6


@dataclass
class RunPlan:
    """What to do with `output_dir`: `action` "train" (from `checkpoint`, or afresh when None) or "finished" (nothing
    to train: `message` says why); `clear`: delete the previous run's outputs first; `record`: the new run_args.json."""

    action: str
    checkpoint: str | None = None
    message: str = ""
    clear: bool = False
    record: dict = field(default_factory=dict)


def plan_run(script_args: ScriptArguments, training_args: OTPOConfig, settings: dict) -> RunPlan:
    """Decide, from what `output_dir` holds and the arguments, whether to train afresh, resume, or stop.

    Nothing is written but `output_dir` itself (created, to check that it is writable): [`apply_run_plan`] does the
    rest, once the data have been checked.

    Raises:
        ValueError: `output_dir` is a file or read-only; it holds a different run, a run without a record, or (with
            `--resume_from_checkpoint false`) any run, and `--overwrite_output_dir` is not given; the requested
            checkpoint is missing or incomplete. The message says how to go on.
    """
    out = writable_dir(training_args.output_dir, "`output_dir`")
    save_only_model = training_args.save_only_model
    record = None
    if (out / RUN_FILE).exists():
        try:
            record = json.loads((out / RUN_FILE).read_text())
            record["settings"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{out / RUN_FILE} is not a run record ({err}); delete it or use a new `output_dir`.")
    checkpoints = checkpoint_folders(out)
    used = [p.name for p in checkpoints] + [n for n in RUN_OUTPUTS if n != RUN_FILE and (out / n).exists()]
    history = (record or {}).get("resumed_with_changes", [])
    new_record = {"status": "started", "settings": settings}
    requested = training_args.resume_from_checkpoint
    mode = "auto" if requested is None else str(requested).lower()
    mode = {"true": "last", "yes": "last", "false": "never", "no": "never", "none": "never"}.get(mode, mode)
    how = (
        f"To go on, use a new `--output_dir`; or continue that run with these arguments from one of its checkpoints, "
        f"`--resume_from_checkpoint {out}/checkpoint-<step>`; or delete its checkpoints and results and start afresh "
        "with `--overwrite_output_dir`."
    )

    clear = script_args.overwrite_output_dir and bool(used)
    if script_args.overwrite_output_dir:
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
        problems = checkpoint_problems(checkpoint, save_only_model)
        if problems:
            siblings = checkpoint_folders(checkpoint.parent)
            complete = [p.name for p in siblings if not checkpoint_problems(p, save_only_model)]
            raise ValueError(
                f"`--resume_from_checkpoint {requested}` is incomplete (no {', '.join(problems)}): its save was cut "
                f"short. Complete checkpoints beside it: {complete or 'none'}."
            )
        changes = _differences(record["settings"], settings) if record is not None else {}
        if changes:
            logger.warning(f"Resuming {checkpoint} with other arguments than its run's: {_describe(changes)}.")
            history = [*history, {"checkpoint": str(checkpoint), "changes": changes}]
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        if _reached_the_end(state, training_args):
            return RunPlan("finished", message=(
                f"{checkpoint} is at step {state['global_step']}, where training with these arguments ends "
                f"(max_steps {training_args.max_steps}, num_train_epochs {training_args.num_train_epochs}): nothing "
                "to train. Raise max_steps (or num_train_epochs) to train further."
            ))  # fmt: skip
        kept = {**new_record, "resumed_with_changes": history} if history else new_record
        return RunPlan("train", str(checkpoint), clear=clear, record=kept)

    if not used:
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
    changes = _differences(record["settings"], settings)
    if changes:
        raise ValueError(f"{out} holds a run with other arguments ({_describe(changes)}). {how}")
    if record.get("status") == "finished":
        return RunPlan("finished", message=(
            f"{out} holds this run, finished at step {record.get('global_step')}: nothing to train. To train it "
            "again, add `--overwrite_output_dir` or use a new `--output_dir`."
        ))  # fmt: skip
    checkpoint = last_complete_checkpoint(out, save_only_model)
    kept = {**new_record, "resumed_with_changes": history} if history else new_record
    if checkpoint is None:
        if mode == "last":
            raise ValueError(f"`--resume_from_checkpoint true`: {out} holds no complete checkpoint.")
        logger.info(f"{out} holds this run but no complete checkpoint: training from the start.")
        return RunPlan("train", record=kept)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    if _reached_the_end(state, training_args):
        return RunPlan("finished", message=(
            f"{checkpoint} is at step {state['global_step']}, the last of this run, but the run's final save did not "
            f"finish: the trained weights are in {checkpoint}. Nothing to train."
        ))  # fmt: skip
    logger.info(f"Checkpoint detected in {out}: resuming training from {checkpoint}.")
    return RunPlan("train", str(checkpoint), record=kept)


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


def _check_enough_pairs(dataset, name: str, training_args: OTPOConfig, tokenizer=None) -> None:
    """Fail when `dataset` cannot fill one batch: fewer pairs than a global batch with `dataloader_drop_last` (else
    one), or, with a `tokenizer`, fewer whose prompt is shorter than `max_length` (TRL drops the others)."""
    drop_last = training_args.dataloader_drop_last and name == "train"
    batch = training_args.per_device_train_batch_size * training_args.world_size if drop_last else 1
    why = (
        f"one batch (per_device_train_batch_size {training_args.per_device_train_batch_size} x "
        f"{training_args.world_size} process(es), with dataloader_drop_last)" if drop_last else "one pair"
    )  # fmt: skip
    if len(dataset) < batch:
        raise ValueError(
            f"Only {len(dataset)} {name} pair(s) are left after loading and filtering, fewer than {why}: no step "
            "would run. Use more pairs, a smaller batch or `dataloader_drop_last: false`."
        )
    max_length = training_args.max_length
    if tokenizer is None or max_length is None or training_args.truncation_mode != "keep_start":
        return
    kept = 0  # DPOTrainer drops pairs whose prompt alone fills max_length; count until there are enough
    for example in dataset:
        kept += len(tokenize_pair(example, tokenizer)["prompt_ids"]) < max_length
        if kept >= batch:
            return
    raise ValueError(
        f"{len(dataset) - kept} of the {len(dataset)} {name} pairs have a prompt of at least max_length "
        f"({max_length}) tokens, which the trainer drops; {kept} remain, fewer than {why}. Raise `max_length` or use "
        "pairs with shorter prompts."
    )


class InputError(ValueError):
    """Bad input, found before any model is loaded: the script prints its message without a traceback."""


def prepare_run(script_args: ScriptArguments, training_args: OTPOConfig, model_args: ModelConfig):
    """Everything before the model: the run directory's plan, the data, the tokenizer, and their checks.

    Returns:
        `(plan, train_dataset, eval_dataset, tokenizer)`; only the plan when it is "finished" (the rest None). The run
        record is written (and, with `--overwrite_output_dir`, the previous run deleted) only once all checks passed.
    """
    if script_args.dataset_name is None:
        raise ValueError("`dataset_name` is required: a Hub data set id or a local file or folder.")
    if model_args.model_name_or_path is None:
        raise ValueError("`model_name_or_path` is required: a Hub model id or a local folder.")
    if training_args.bf16 and training_args.use_cpu:
        logger.warning("bf16 on the CPU runs about 15x slower than fp32 there: set `bf16: false` for speed.")

    ###############
    # The run directory (before the data and the model: a run that must not go on stops here)
    ###############
    plan = plan_run(script_args, training_args, run_settings(script_args, training_args, model_args))
    if plan.action == "finished":
        return plan, None, None, None

    ###############
    # Load datasets (before the model: a bad data set fails fast)
    ###############
    data_kwargs = {
        "config": script_args.dataset_config,
        "drop_ties": script_args.drop_ties,
        "drop_identical": script_args.drop_identical,
    }
    held_out = script_args.eval_split_size
    if training_args.do_eval and held_out is None and os.path.isfile(os.path.expanduser(script_args.dataset_name)):
        raise ValueError(
            f"`dataset_name` {script_args.dataset_name} is a single file, so a single split: evaluating (do_eval) on "
            "it would score training pairs. Set `eval_split_size` (a share such as 0.1, or a number of pairs) to hold "
            "out pairs for evaluation, or give a folder with one file per split (train.jsonl, test.jsonl)."
        )
    with training_args.main_process_first(desc="loading the data set"):
        train_dataset = load_preference_dataset(
            script_args.dataset_name,
            script_args.dataset_train_split,
            max_samples=script_args.max_train_samples if held_out is None else None,
            **data_kwargs,
        )
        eval_dataset = None
        if held_out is not None:
            train_dataset, eval_dataset = split_off_eval(train_dataset, held_out, seed=training_args.seed)
            if script_args.max_train_samples is not None:
                train_dataset = train_dataset.select(range(min(script_args.max_train_samples, len(train_dataset))))
            if script_args.max_eval_samples is not None:
                eval_dataset = eval_dataset.select(range(min(script_args.max_eval_samples, len(eval_dataset))))
            eval_dataset = eval_dataset if training_args.do_eval else None
        elif training_args.do_eval:
            eval_dataset = load_preference_dataset(
                script_args.dataset_name,
                script_args.dataset_test_split,
                max_samples=script_args.max_eval_samples,
                **data_kwargs,
            )
    _check_enough_pairs(train_dataset, "train", training_args)
    logger.info(
        f"Training on {len(train_dataset)} pairs"
        + (f", evaluating on {len(eval_dataset)}." if eval_dataset is not None else "; no evaluation.")
    )

    ################
    # Load tokenizer
    ################
    resolve_model_path(model_args.model_name_or_path, "`model_name_or_path`")  # a missing folder fails here, clearly
    if os.path.isdir(os.path.expanduser(model_args.model_name_or_path)):
        # A saved adapter records its base as given here: absolute, it loads from any directory.
        model_args.model_name_or_path = os.path.abspath(os.path.expanduser(model_args.model_name_or_path))
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
    )
    if script_args.chat_template is not None:
        template = script_args.chat_template
        tokenizer.chat_template = Path(template).read_text() if os.path.isfile(template) else template
    elif tokenizer.chat_template is None:
        logger.info("The tokenizer has no chat template; using the default ChatML-style one.")
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The last checks before the model loads: enough pairs whose prompt fits max_length (the trainer drops the rest).
    _check_enough_pairs(train_dataset, "train", training_args, tokenizer)
    if eval_dataset is not None:
        _check_enough_pairs(eval_dataset, "eval", training_args, tokenizer)
    if training_args.should_save:
        apply_run_plan(plan, training_args.output_dir)
    return plan, train_dataset, eval_dataset, tokenizer


def main(script_args: ScriptArguments, training_args: OTPOConfig, model_args: ModelConfig) -> None:
    ###############
    # Setup logging
    ###############
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    # This script and otpo_trl say what they do (INFO) on the main process; transformers keeps its own level.
    log_level = training_args.get_process_log_level()
    own_level = logging.INFO if training_args.should_log and training_args.log_level == "passive" else log_level
    for name in (__name__, "otpo_trl"):
        logging.getLogger(name).setLevel(own_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()

    logger.info(f"Script arguments: {script_args}")
    logger.info(f"Model arguments: {model_args}")
    logger.info(f"Training arguments: {training_args}")
    try:
        plan, train_dataset, eval_dataset, tokenizer = prepare_run(script_args, training_args, model_args)
    except ValueError as err:
        raise InputError(str(err)) from err
    if plan.action == "finished":
        logger.info(plan.message)
        return

    #######################
    # Model and LoRA config (the trainer loads the model, and the reference from the same path)
    #######################
    quantization_config = get_quantization_config(model_args)
    model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}
    peft_config = get_peft_config(model_args)  # None unless use_peft

    #########################
    # Instantiate the trainer
    #########################
    if script_args.trainer == "dpo":
        training_args = to_dpo_config(training_args)
    trainer = TRAINERS[script_args.trainer](
        model=model_args.model_name_or_path,
        ref_model=None,  # a copy of the model, or with LoRA the model with its adapter disabled
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        quantization_config=quantization_config,
    )

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            # transformers 5.x has no `logging_dir` argument: without TENSORBOARD_LOGGING_DIR, TensorBoard would write
            # to ./runs of the caller. Keep the logs with the run.
            callback.logging_dir = os.path.join(training_args.output_dir, "runs")
            logger.info(
                f"TensorBoard logs (loss, rewards, ot/* and the ot/token_weights histogram): {callback.logging_dir}"
            )

    for name, loaded, prepared in (
        ("train", train_dataset, trainer.train_dataset),
        ("eval", eval_dataset, trainer.eval_dataset),
    ):
        if loaded is not None and len(prepared) < len(loaded):
            logger.warning(
                f"{len(loaded) - len(prepared)} of {len(loaded)} {name} pairs were dropped by the trainer: "
                f"their prompt alone fills max_length ({training_args.max_length} tokens)."
            )
    train_dataset, eval_dataset = trainer.train_dataset, trainer.eval_dataset

    ###############
    # Training loop
    ###############
    logger.info(f"*** Train with {type(trainer).__name__} ***")
    train_result = trainer.train(resume_from_checkpoint=plan.checkpoint)
    metrics = train_result.metrics
    metrics["train_samples"] = len(train_dataset)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()

    ##################################
    # Save model (or adapter) and card
    ##################################
    logger.info("*** Save model ***")
    trainer.model.config.use_cache = True  # restore the KV cache for inference
    trainer.save_model(training_args.output_dir)  # on every process: FSDP and ZeRO-3 gather the weights
    is_local_data = os.path.exists(os.path.expanduser(script_args.dataset_name))
    trainer.create_model_card(  # only on the main process
        model_name=Path(training_args.output_dir).name,
        dataset_name=None if is_local_data else script_args.dataset_name,
        tags=["dpo", script_args.trainer],
    )
    card = Path(training_args.output_dir) / "README.md"
    if trainer.accelerator.is_main_process and card.exists() and os.path.isdir(model_args.model_name_or_path):
        # TRL's card links the base model and the quick-start model as Hub ids, "None" for local folders.
        text = card.read_text().replace("[None](https://huggingface.co/None)", f"`{model_args.model_name_or_path}`")
        card.write_text(text.replace('model="None"', f'model="{training_args.output_dir}"'))
    if training_args.should_save:
        mark_finished(training_args.output_dir, trainer.state.global_step)
    logger.info(f"Model, tokenizer, metrics, state and model card saved to {training_args.output_dir}.")

    ##########
    # Evaluate
    ##########
    if eval_dataset is not None:
        logger.info("*** Evaluate ***")
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(eval_dataset)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    if training_args.push_to_hub:
        logger.info("*** Push to the Hub ***")
        trainer.push_to_hub(dataset_name=None if is_local_data else script_args.dataset_name)

    # Every process reaches this point before the group goes: a rank that destroys its process group while another
    # still writes the model card can abort at exit (seen with gloo on 2 CPU processes).
    trainer.accelerator.wait_for_everyone()
    gloo = torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo"
    if hasattr(trainer, "end"):  # transformers >= 5.18: finish the trackers and destroy the process group
        trainer.end()
    if gloo:
        # Everything is saved, but a gloo worker thread may still be releasing the last collective's tensors: if Python
        # finalizes meanwhile, the thread cannot take the GIL and the process aborts (SIGABRT, "terminate called
        # without an active exception"; torch 2.13, seen under DeepSpeed on 2 CPU processes). Leave without finalizing.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    try:
        arguments = parse_args()
    except ValueError as err:
        sys.exit(f"error: {err}")
    try:
        main(*arguments)
    except (FileNotFoundError, InputError) as err:  # a missing path, bad input: the message says which
        sys.exit(f"error: {err}")
