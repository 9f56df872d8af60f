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

If `output_dir` already holds a checkpoint, training resumes from the last one (and says so);
`--resume_from_checkpoint <path>` picks one, `--resume_from_checkpoint false` starts afresh.
"""

import difflib
import logging
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import datasets
import transformers
from transformers import AutoTokenizer
from transformers.integrations import TensorBoardCallback
from transformers.trainer_utils import get_last_checkpoint
from trl import DPOConfig, DPOTrainer, ModelConfig, TrlParser, get_peft_config, get_quantization_config

from otpo_trl import OTPOConfig, OTPOTrainer
from otpo_trl.analysis import resolve_model_path
from otpo_trl.data import DEFAULT_CHAT_TEMPLATE, load_preference_dataset


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


def make_parser() -> TrlParser:
    """The script's parser: `ScriptArguments`, `OTPOConfig`, `ModelConfig`; `--config <yaml>` gives defaults."""
    # No abbreviations: `--learning_rat` must be an error, not `--learning_rate`.
    return TrlParser((ScriptArguments, OTPOConfig, ModelConfig), allow_abbrev=False)


def _unknown_keys(strings: list[str]) -> list[str]:
    return [s[2:].split("=", 1)[0] for s in strings if s.startswith("--")] or strings


def parse_args(argv: list[str] | None = None) -> tuple[ScriptArguments, OTPOConfig, ModelConfig]:
    """Parse `argv` (default: `sys.argv[1:]`) and the recipe given by `--config`.

    Raises:
        ValueError: a key in the recipe or on the command line matches no argument (the message names it and the
            closest known ones), or a value fails a check of `OTPOConfig` / `ModelConfig` (the message names the
            field). An argument of the wrong type or outside its choices exits through argparse, naming it.
    """
    parser = make_parser()
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


def find_checkpoint(training_args: OTPOConfig) -> str | bool | None:
    """The checkpoint to resume from: `resume_from_checkpoint` if given (a path; "true": the last one in `output_dir`,
    as in HF Trainer; "false": none), else the last one in `output_dir`, if any."""
    requested = training_args.resume_from_checkpoint
    if requested is not None:
        flag = str(requested).lower()
        return True if flag in ("true", "yes") else None if flag in ("false", "no", "none") else requested
    if os.path.isdir(training_args.output_dir):
        last = get_last_checkpoint(training_args.output_dir)
        if last is not None:
            logger.info(f"Checkpoint detected in {training_args.output_dir}: resuming training from {last}.")
            return last
    return None


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
    checkpoint = find_checkpoint(training_args)

    ###############
    # Load datasets (before the model: a bad data set fails fast)
    ###############
    if script_args.dataset_name is None:
        raise ValueError("`dataset_name` is required: a Hub data set id or a local file or folder.")
    data_kwargs = {
        "config": script_args.dataset_config,
        "drop_ties": script_args.drop_ties,
        "drop_identical": script_args.drop_identical,
    }
    with training_args.main_process_first(desc="loading the data set"):
        train_dataset = load_preference_dataset(
            script_args.dataset_name,
            script_args.dataset_train_split,
            max_samples=script_args.max_train_samples,
            **data_kwargs,
        )
        eval_dataset = None
        if training_args.do_eval:
            eval_dataset = load_preference_dataset(
                script_args.dataset_name,
                script_args.dataset_test_split,
                max_samples=script_args.max_eval_samples,
                **data_kwargs,
            )
    logger.info(
        f"Training on {len(train_dataset)} pairs"
        + (f", evaluating on {len(eval_dataset)}." if eval_dataset is not None else "; no evaluation.")
    )

    ################
    # Load tokenizer
    ################
    if model_args.model_name_or_path is None:
        raise ValueError("`model_name_or_path` is required: a Hub model id or a local folder.")
    resolve_model_path(model_args.model_name_or_path, "`model_name_or_path`")  # a missing folder fails here, clearly
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
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
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
    if hasattr(trainer, "end"):  # transformers >= 5.18: finish the trackers and destroy the process group
        trainer.end()


if __name__ == "__main__":
    try:
        arguments = parse_args()
    except ValueError as err:
        sys.exit(f"error: {err}")
    try:
        main(*arguments)
    except FileNotFoundError as err:  # a missing model or data path: the message says which
        sys.exit(f"error: {err}")
