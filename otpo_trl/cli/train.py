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
import importlib.util
import logging
import os
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import datasets
import torch
import transformers
import trl
import yaml
from transformers import AutoTokenizer
from transformers.integrations import TensorBoardCallback
from trl import DPOConfig, DPOTrainer, ModelConfig, TrlParser, get_peft_config, get_quantization_config

from ..data import data_fingerprint, load_preference_dataset, split_off_eval
from ..loading import check_not_adapter, load_pretrained, read_chat_template, resolve_model_path, setup_tokenizer
from ..otpo_config import OTPOConfig
from ..otpo_trainer import OTPOTrainer
from ..tokenization import tokenize_pair
from .run_dir import apply_run_plan, mark_finished, plan_run, run_settings


logger = logging.getLogger(__name__)

TRAINERS = {"otpo": OTPOTrainer, "dpo": DPOTrainer}


@dataclass
class ScriptArguments(trl.ScriptArguments):
    """Arguments of this script that are not the trainer's or the model's: TRL's (`dataset_name`, `dataset_config`,
    `dataset_train_split`, `dataset_test_split`, `dataset_streaming`, `ignore_bias_buffers`) and ours below.

    `dataset_name` is a Hub data set id (e.g. trl-lib/ultrafeedback_binarized) or a local .jsonl / .json / .parquet
    file, a folder of <split>.<ext> files or a save_to_disk folder (relative to the current directory). The splits:
    'train_prefs' / 'test_prefs' for HuggingFaceH4/ultrafeedback_binarized; the test split is loaded only when
    evaluating (do_eval, or an eval_strategy other than 'no'). `dataset_streaming` is not supported (an error).
    `ignore_bias_buffers` makes DDP skip the model's boolean buffers, as in TRL's `dpo` script.
    """

    trainer: str = field(
        default="otpo",
        metadata={
            "help": "'otpo' trains with OTPOTrainer; 'dpo' runs TRL's DPOTrainer on the same recipe (the ot_* keys "
            "are then unused), as a baseline.",
            "choices": list(TRAINERS),
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
        if self.dataset_streaming:
            raise ValueError(
                "`dataset_streaming` is not supported: the data set is loaded, filtered and checked whole."
            )
        if self.trainer not in TRAINERS:
            raise ValueError(f"`trainer` must be one of {list(TRAINERS)}, got {self.trainer!r}.")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"`{name}` must be an int >= 1 (or unset, for all pairs), got {value!r}.")
        size = self.eval_split_size
        if size is not None and not (0 < size < 1 or (size >= 1 and size == int(size))):
            raise ValueError(f"`eval_split_size` must be a share in (0, 1) or a whole number of pairs, got {size!r}.")
        if self.chat_template is not None:
            read_chat_template(self.chat_template)  # a mistyped path is an error, not the template's text


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


# A negative number argparse takes for an option (it knows only `-1` and `-0.5`): `-1e-6`, `-.5E3`, `-inf`.
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


def normalize_argv(argv: list[str]) -> list[str]:
    """`argv` as the parser reads it: `--config=<path>` split in two (TrlParser reads only `--config <path>`: with `=`
    the recipe would be dropped), and a negative number after a flag joined to it (`--ot_tol -1e-6` ->
    `--ot_tol=-1e-6`), so that it is parsed, then checked, as a value."""
    out = []
    for arg in argv:
        if arg.startswith("--config="):
            out += ["--config", arg.split("=", 1)[1]]
        elif out and _NEGATIVE_NUMBER.match(arg) and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


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
    argv = normalize_argv(sys.argv[1:] if argv is None else list(argv))
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
    check_parsed(*parsed)
    return tuple(parsed)


def check_parsed(script_args: ScriptArguments, training_args: OTPOConfig, model_args: ModelConfig) -> None:
    """What the dataclasses leave unchecked, in place: a recipe's value outside a field's choices (YAML bypasses
    argparse's), a lone LoRA target module (a one-element list), `use_liger_kernel` without its package."""
    for args in (script_args, training_args, model_args):
        for f in fields(args):
            choices, value = f.metadata.get("choices"), getattr(args, f.name, None)
            values = value if isinstance(value, list) else [value]
            if choices and value is not None and all(isinstance(v, str) for v in values):
                wrong = [v for v in values if v not in choices]
                if wrong:
                    close = difflib.get_close_matches(wrong[0], list(choices), n=1, cutoff=0.5)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise ValueError(f"`{f.name}` must be one of {list(choices)}, got {wrong[0]!r}{hint}.")
    targets = model_args.lora_target_modules
    # TRL's ModelConfig turns a one-element list into its string, which PEFT reads as a regex over the full module
    # names ("q_proj" matches none); a YAML scalar gives the same string. A plain name is a one-element list.
    if isinstance(targets, str) and targets != "all-linear" and re.fullmatch(r"\w+", targets):
        model_args.lora_target_modules = [targets]
    if training_args.use_liger_kernel and importlib.util.find_spec("liger_kernel") is None:
        raise ValueError(
            "`use_liger_kernel` is true, but the liger-kernel package is not installed: `pip install liger-kernel` "
            "(it needs a GPU), or set `use_liger_kernel: false`."
        )


def to_dpo_config(args: OTPOConfig) -> DPOConfig:
    """The same settings as a plain `DPOConfig`, for the `trainer: dpo` baseline (the `ot_*` fields dropped)."""
    # `gradient_checkpointing*` are deprecated aliases that mirror `activation_checkpointing*`; passing both warns.
    aliases = {"gradient_checkpointing", "gradient_checkpointing_kwargs"}
    return DPOConfig(**{f.name: getattr(args, f.name) for f in fields(DPOConfig) if f.init and f.name not in aliases})


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
        logger.warning(
            "bf16 autocast on the CPU: fast on CPUs with bf16 instructions (AVX512-BF16, AMX), much slower than fp32 "
            "on others; if steps are slow, set `bf16: false`."
        )

    check_not_adapter(model_args.model_name_or_path, "`model_name_or_path`")
    if training_args.save_only_model and training_args.save_strategy != "no":
        logger.warning(
            "save_only_model: the checkpoints hold no optimizer or learning-rate scheduler state, so a run interrupted "
            "later cannot be resumed from them (it is refused, not resumed with a fresh optimizer)."
        )

    ###############
    # The run directory (before the data and the model: a run that must not go on stops here)
    ###############
    with training_args.main_process_first(desc="fingerprinting the data set"):
        # Recorded in run_args.json beside the settings: resuming on changed data is refused like changed arguments.
        data = data_fingerprint(script_args.dataset_name, script_args.dataset_train_split, script_args.dataset_config)
    plan = plan_run(script_args, training_args, run_settings(script_args, training_args, model_args), data)
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
    tokenizer = load_pretrained(  # a name that is neither a folder nor on the (reachable) Hub: one clear message
        AutoTokenizer,
        model_args.model_name_or_path,
        "`model_name_or_path`",
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
    )
    setup_tokenizer(tokenizer, script_args.chat_template)
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
    logging.getLogger("otpo_trl").setLevel(own_level)
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
    if script_args.ignore_bias_buffers:  # as TRL 1.16's dpo script: DDP skips the model's boolean buffers
        trainer.model._ddp_params_and_buffers_to_ignore = [
            name for name, buffer in trainer.model.named_buffers() if buffer.dtype == torch.bool
        ]

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


def cli(argv: list[str] | None = None) -> None:
    """`scripts/train.py`: parse `argv` (default: `sys.argv[1:]`) and train; bad input exits with its message."""
    try:
        arguments = parse_args(argv)
    except ValueError as err:
        sys.exit(f"error: {err}")
    try:
        main(*arguments)
    except (FileNotFoundError, InputError) as err:  # a missing path, bad input: the message says which
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    cli()
