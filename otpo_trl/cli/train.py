"""Train a model with OTPO (or the plain DPO baseline) from a YAML recipe: the stages of `scripts/train.py`.

```bash
accelerate launch --config_file configs/accelerate/single_gpu.yaml scripts/train.py --config configs/quickstart.yaml
accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml scripts/train.py \
    --config configs/llama-3-8b-instruct/otpo_full.yaml --output_dir out/my-run --learning_rate 1.0e-6
```

The recipe gives the defaults and command-line flags override them; the arguments and their checks are in
`otpo_trl.cli.arguments`. `trainer: dpo` runs TRL's `DPOTrainer` on the same settings (the `ot_*` keys are then
unused). What a run does with its `output_dir` (the lock, resume, save or evaluate only, finished, refused,
overwrite) is stated once, in docs/training.md ("The run directory"), and done by `otpo_trl.runs`. The workarounds for
upstream libraries are in `otpo_trl.cli.upstream`.

[`main`] runs the stages: logging; the checks, the data and tokenizer, the lock of `output_dir` and its plan, all before
the model loads ([`prepare_run`]; an existing `output_dir` is locked before the data load); the model and the trainer
([`make_trainer`]); training, resumed from the plan's checkpoint, which starts the run directory
(`otpo_trl.runs.RunDirectoryCallback`); saving the model and its card; evaluation; the run record marked finished; the
end of the processes.
"""

import logging
import os
import sys
from dataclasses import fields
from pathlib import Path

import datasets
import torch
import transformers
from accelerate.utils import broadcast_object_list
from transformers import AutoTokenizer, TrainerState
from transformers.trainer import TRAINER_STATE_NAME
from trl import DPOConfig, DPOTrainer, ModelConfig, get_peft_config, get_quantization_config

from ..data import data_fingerprint, load_preference_dataset, split_off_eval
from ..loading import check_not_adapter, from_pretrained, resolve_model_path, setup_tokenizer
from ..model_card import CheckpointCardCallback
from ..otpo_config import OTPOConfig
from ..otpo_trainer import OTPOTrainer
from ..runs import (
    RunDirectoryCallback,
    RunLock,
    RunPlan,
    RunRecorder,
    check_output_dir,
    input_fingerprints,
    package_versions,
    plan_run,
    run_settings,
    start_run,
)
from ..tokenization import tokenize_pair
from .arguments import ScriptArguments, parse_args
from .preflight import check_before_writing
from .upstream import (
    DEPRECATED_TRAINING_ARGS,
    end_processes,
    fix_local_model_card,
    keep_tensorboard_logs_with_run,
)


logger = logging.getLogger("otpo_trl.cli.train")  # by name: `otpo-trl train` runs this module as `__main__`

TRAINERS = {"otpo": OTPOTrainer, "dpo": DPOTrainer}  # the classes of `trainer`'s choices (`arguments.TRAINER_NAMES`)


class InputError(ValueError):
    """Bad input, found before any model is loaded: the script prints its message without a traceback."""


def setup_logging(training_args: OTPOConfig) -> None:
    """Log to stdout; this script and otpo_trl say what they do (INFO) on the main process, transformers and datasets
    keep the level of `log_level`."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    own_level = logging.INFO if training_args.should_log and training_args.log_level == "passive" else log_level
    logging.getLogger("otpo_trl").setLevel(own_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


def check_inputs(script_args: ScriptArguments, training_args: OTPOConfig, model_args: ModelConfig) -> None:
    """The model and the data are given, the model is not an adapter; warn about bf16 on the CPU and about
    `save_only_model` checkpoints, which cannot be resumed."""
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


def lock_output_dir(training_args: OTPOConfig) -> RunLock | None:
    """Take the lock of `output_dir` for this run (creating the folder), or raise the `ValueError` that names the
    process holding it. In a launch of several processes, the main process (global rank 0) takes it for all of them and
    tells the others whether it could: every rank of a refused run stops with the same message, none waits for the
    others. Returns the lock on the main process, None on the others."""
    lock, refusal = None, None
    if training_args.process_index == 0:
        try:
            lock = RunLock(training_args.output_dir).acquire()
        except (ValueError, OSError) as err:
            refusal = str(err)
    if training_args.world_size > 1:
        refusal = broadcast_object_list([refusal])[0]
    if refusal is not None:
        raise ValueError(refusal)
    return lock


def plan_output_dir(script_args: ScriptArguments, training_args: OTPOConfig, model_args: ModelConfig) -> RunPlan:
    """What to do with `output_dir` (train afresh, resume, save or evaluate only, finished, or a `ValueError`), from
    the settings and the fingerprints of the data and inputs (`otpo_trl.runs.plan_run`). Nothing is written."""
    with training_args.main_process_first(desc="fingerprinting the data set and the model"):
        # Recorded in run_args.json beside the settings: resuming on other data or inputs is refused.
        data = data_fingerprint(script_args.dataset_name, script_args.dataset_train_split, script_args.dataset_config)
        inputs = input_fingerprints(
            model_args.model_name_or_path, model_args.model_revision, script_args.chat_template
        )
    return plan_run(
        training_args.output_dir,
        run_settings(script_args, training_args, model_args),
        resume_from_checkpoint=training_args.resume_from_checkpoint,
        overwrite_output_dir=script_args.overwrite_output_dir,
        data=data,
        inputs=inputs,
        versions=package_versions(),
        do_eval=training_args.do_eval,
    )


def _check_enough_pairs(dataset, name: str, training_args: OTPOConfig, tokenizer=None) -> None:
    """Fail when `dataset` cannot fill one batch: fewer pairs than a global batch with `dataloader_drop_last` (else
    one), or, with a `tokenizer`, fewer whose prompt is shorter than `max_length` (TRL drops the others)."""
    drop_last = training_args.dataloader_drop_last  # transformers drops the last short batch of both dataloaders
    per_device = getattr(training_args, f"per_device_{name}_batch_size")  # `name` is "train" or "eval"
    batch = per_device * training_args.world_size if drop_last else 1
    why = (
        f"one batch (per_device_{name}_batch_size {per_device} x {training_args.world_size} process(es), with "
        "dataloader_drop_last)"
        if drop_last
        else "one pair"
    )
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


def load_data(script_args: ScriptArguments, training_args: OTPOConfig):
    """The training pairs and the evaluation pairs (None unless evaluating), filtered, cut and checked to fill one
    batch: a held-out share of the training split with `eval_split_size`, else the test split."""
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
    return train_dataset, eval_dataset


def load_tokenizer(script_args: ScriptArguments, training_args: OTPOConfig, model_args: ModelConfig):
    """The model's tokenizer with the chat template set up; a local `model_name_or_path` is made absolute in place."""
    resolve_model_path(model_args.model_name_or_path, "`model_name_or_path`")  # a missing folder fails here, clearly
    if os.path.isdir(os.path.expanduser(model_args.model_name_or_path)):
        # A saved adapter records its base as given here: absolute, it loads from any directory.
        model_args.model_name_or_path = os.path.abspath(os.path.expanduser(model_args.model_name_or_path))
    tokenizer = from_pretrained(  # a name that is neither a folder nor on the (reachable) Hub: one clear message
        AutoTokenizer,
        model_args.model_name_or_path,
        "`model_name_or_path`",
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
    )
    setup_tokenizer(tokenizer, script_args.chat_template)
    return tokenizer


def output_dir_is_new(training_args: OTPOConfig) -> bool:
    """Whether `output_dir` does not exist yet, as the main process sees it (told to the others in a launch of
    several processes, so that every rank takes the stages of [`prepare_run`] in the same order)."""
    new = not os.path.lexists(os.path.expanduser(training_args.output_dir))
    if training_args.world_size > 1:
        new = broadcast_object_list([new])[0]
    return new


def load_inputs(script_args: ScriptArguments, training_args: OTPOConfig, model_args: ModelConfig):
    """The data and the tokenizer, checked to fill one batch with pairs whose prompt fits `max_length` (the trainer
    drops the rest): `(train_dataset, eval_dataset, tokenizer)`. Nothing is written."""
    train_dataset, eval_dataset = load_data(script_args, training_args)  # before the model: bad data fail fast
    tokenizer = load_tokenizer(script_args, training_args, model_args)
    _check_enough_pairs(train_dataset, "train", training_args, tokenizer)
    if eval_dataset is not None:
        _check_enough_pairs(eval_dataset, "eval", training_args, tokenizer)
    return train_dataset, eval_dataset, tokenizer


def prepare_run(script_args: ScriptArguments, training_args: OTPOConfig, model_args: ModelConfig):
    """Everything before the model: the checks, the lock of `output_dir`, its plan, the data and the tokenizer.

    Nothing is written before every check has passed: a new `output_dir` is created (with its lock) only after the
    data and the tokenizer are loaded and checked, so a refused run leaves nothing behind; an existing one is locked
    and planned first, so that a run in use or finished is named before any data loads. The run record is written,
    and what `--overwrite_output_dir` replaces cleared, when training starts (`otpo_trl.runs.RunDirectoryCallback`).

    Returns:
        `(plan, train_dataset, eval_dataset, tokenizer)`; only the plan when it is "finished" (the rest None). The
        plan holds the lock of `output_dir` (`plan.release()` gives it back; so does the end of the process).
    """
    check_before_writing(script_args, training_args, model_args)  # every check that can fail on the arguments
    check_inputs(script_args, training_args, model_args)
    check_output_dir(
        training_args.output_dir,
        run_settings(script_args, training_args, model_args),
        training_args.resume_from_checkpoint,
        script_args.overwrite_output_dir,
    )
    inputs = load_inputs(script_args, training_args, model_args) if output_dir_is_new(training_args) else None
    lock = lock_output_dir(training_args)  # the run's first write: a second run into output_dir stops here
    try:
        plan = plan_output_dir(script_args, training_args, model_args)  # a run that must not go on stops here
        plan.lock = lock
        if plan.action == "finished":
            return plan, None, None, None
        if inputs is None:
            inputs = load_inputs(script_args, training_args, model_args)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return (plan, *inputs)


def to_dpo_config(args: OTPOConfig) -> DPOConfig:
    """The same settings as a plain `DPOConfig`, for the `trainer: dpo` baseline (the `ot_*` fields dropped)."""
    names = [f.name for f in fields(DPOConfig) if f.init and f.name not in DEPRECATED_TRAINING_ARGS]
    return DPOConfig(**{name: getattr(args, name) for name in names})


def make_trainer(
    script_args: ScriptArguments,
    training_args: OTPOConfig,
    model_args: ModelConfig,
    train_dataset,
    eval_dataset,
    tokenizer,
):
    """The trainer of `script_args.trainer`, which loads the model (and the reference, from the same path, or with
    LoRA the model with its adapter disabled); a warning for the pairs it drops."""
    quantization_config = get_quantization_config(model_args)
    model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}
    peft_config = get_peft_config(model_args)  # None unless use_peft
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
    if script_args.trainer == "dpo":  # OTPOTrainer adds it itself: checkpoints carry no card (otpo_trl.model_card)
        trainer.add_callback(CheckpointCardCallback())
    keep_tensorboard_logs_with_run(trainer, training_args.output_dir)
    for name, loaded, prepared in (
        ("train", train_dataset, trainer.train_dataset),
        ("eval", eval_dataset, trainer.eval_dataset),
    ):
        if loaded is not None and len(prepared) < len(loaded):
            logger.warning(
                f"{len(loaded) - len(prepared)} of {len(loaded)} {name} pairs were dropped by the trainer: "
                f"their prompt alone fills max_length ({training_args.max_length} tokens)."
            )
    return trainer


def evaluate_trained_run(trainer, plan: RunPlan, training_args, eval_dataset) -> None:
    """The final evaluation of a run that trained but was not evaluated (`plan.action` "evaluate"): load its saved
    model (or adapter) from `output_dir` into the trainer's policy, evaluate, save the metrics, and mark the run
    finished. The reference stays the one the trainer built (the model, or the adapter disabled), as in training."""
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        raise InputError(
            f"{training_args.output_dir} holds this run, trained but not evaluated; its final evaluation is not re-run "
            f"under DeepSpeed or FSDP. Evaluate the saved model with `otpo-trl evaluate --model "
            f"{training_args.output_dir}`, or run this command again in one plain process (no DeepSpeed or FSDP)."
        )
    logger.info(plan.message)
    # HF Trainer's (transformers 5.25) loader of a resumed checkpoint's weights: it reads a saved model's
    # model.safetensors or an adapter's adapter_model.safetensors into trainer.model, as the final save wrote them.
    trainer._load_from_checkpoint(training_args.output_dir)
    evaluate_and_record(trainer, training_args, eval_dataset, RunRecorder(training_args.output_dir, plan.record))


def load_last_checkpoint(trainer, plan: RunPlan, training_args) -> RunRecorder | None:
    """The stage that stands for training in a run stopped in its final save (`plan.action` "save"): load the weights
    and trainer state of its last checkpoint, at the run's last step, into the trainer, and start the run directory
    (main process: its recorder; None on the others). No step is trained: HF Trainer's resume would train one more
    when the last step ends mid-epoch."""
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        raise InputError(
            f"{training_args.output_dir} holds this run, trained, but its final save did not complete; that save is "
            "not re-done under DeepSpeed or FSDP. Run this command again in one plain process (no DeepSpeed or "
            f"FSDP), or use the trained weights in {plan.checkpoint}."
        )
    logger.info(plan.message)
    # HF Trainer's (transformers 5.25) loader of a resumed checkpoint's weights (model or adapter), as in a resume.
    trainer._load_from_checkpoint(plan.checkpoint)
    trainer.state = TrainerState.load_from_json(os.path.join(plan.checkpoint, TRAINER_STATE_NAME))
    return start_run(plan, training_args.output_dir) if training_args.should_save else None


def evaluate_and_record(trainer, training_args, eval_dataset, recorder: RunRecorder | None) -> None:
    """Evaluate, save the metrics, and only then mark the run finished in its record (main process)."""
    logger.info("*** Evaluate ***")
    metrics = trainer.evaluate()
    metrics["eval_samples"] = len(eval_dataset)
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    if recorder is not None and training_args.should_save:
        recorder.write(status="finished", evaluated=True)


def main(script_args: ScriptArguments, training_args: OTPOConfig, model_args: ModelConfig) -> None:
    """Train, save and evaluate the run the arguments describe ([`parse_args`]); bad input raises [`InputError`]
    before any model loads, a run into an `output_dir` another process writes to stops at once, a finished run says
    so and trains nothing, a run stopped in its final save saves from its last checkpoint, and a trained run whose
    final evaluation did not complete is evaluated only."""
    ###############
    # Setup logging
    ###############
    setup_logging(training_args)
    # The ~150-line dump of every argument is for --log_level debug; what decides the run is in output_dir/run_args.json.
    logger.debug(f"Script arguments: {script_args}")
    logger.debug(f"Model arguments: {model_args}")
    logger.debug(f"Training arguments: {training_args}")

    #########################################################################
    # Checks, the lock and plan of output_dir, data and tokenizer (no model)
    #########################################################################
    try:
        plan, train_dataset, eval_dataset, tokenizer = prepare_run(script_args, training_args, model_args)
    except ValueError as err:
        raise InputError(str(err)) from err
    try:
        if plan.action == "finished":
            logger.info(plan.message)
            return
        run(plan, script_args, training_args, model_args, train_dataset, eval_dataset, tokenizer)
    finally:
        plan.release()


def run(plan: RunPlan, script_args, training_args, model_args, train_dataset, eval_dataset, tokenizer) -> None:
    """The stages of [`main`] after the plan, while the lock of `output_dir` is held."""
    #######################
    # Model and the trainer
    #######################
    trainer = make_trainer(script_args, training_args, model_args, train_dataset, eval_dataset, tokenizer)
    training_args = trainer.args  # a DPOConfig for `trainer: dpo`
    train_dataset, eval_dataset = trainer.train_dataset, trainer.eval_dataset
    if plan.action == "evaluate":
        evaluate_trained_run(trainer, plan, training_args, eval_dataset)
        end_processes(trainer)
        return

    ###########################################################################
    # Training loop (resumed as the plan says; the run directory starts here)
    ###########################################################################
    if plan.action == "save":
        recorder = load_last_checkpoint(trainer, plan, training_args)
    else:
        run_directory = RunDirectoryCallback(plan, training_args.output_dir)
        run_directory.insert_into(trainer)
        logger.info(f"*** Train with {type(trainer).__name__} ***")
        train_result = trainer.train(resume_from_checkpoint=plan.checkpoint)
        recorder = run_directory.recorder  # None but on the main process
        metrics = train_result.metrics
        metrics["train_samples"] = len(train_dataset)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
    trainer.save_state()

    ###############################
    # Save model (or adapter), card
    ###############################
    logger.info("*** Save model ***")
    trainer.model.config.use_cache = True  # restore the KV cache for inference
    trainer.save_model(training_args.output_dir)  # on every process: FSDP and ZeRO-3 gather the weights
    is_local_data = os.path.exists(os.path.expanduser(script_args.dataset_name))
    trainer.create_model_card(  # only on the main process
        model_name=Path(training_args.output_dir).name,
        # OTPO's card names a local data set by its folder's name only; TRL's (trainer: dpo) would link it as a Hub id
        dataset_name=None if is_local_data and script_args.trainer == "dpo" else script_args.dataset_name,
        tags=["dpo", script_args.trainer],
    )
    if trainer.accelerator.is_main_process and script_args.trainer == "dpo":  # TRL's card; OTPO writes its own
        card = Path(training_args.output_dir) / "README.md"
        fix_local_model_card(card, model_args.model_name_or_path, training_args.output_dir)
    if recorder is not None:
        # Finished only once evaluated, when it evaluates: a run stopped in its final evaluation is evaluated again.
        done = {"status": "trained"} if eval_dataset is not None else {"status": "finished", "evaluated": False}
        recorder.write(global_step=trainer.state.global_step, **done)
    logger.info(f"Model, tokenizer, metrics, state and model card saved to {training_args.output_dir}.")

    ##########
    # Evaluate
    ##########
    if eval_dataset is not None:
        evaluate_and_record(trainer, training_args, eval_dataset, recorder)

    if training_args.push_to_hub:
        logger.info("*** Push to the Hub ***")
        trainer.push_to_hub(dataset_name=None if is_local_data else script_args.dataset_name)

    end_processes(trainer)  # on every process, once everything is saved


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
    except KeyboardInterrupt:  # Ctrl-C: what it leaves is resumable, which the user needs to know, not a traceback
        print(
            f"\ninterrupted: the run in {arguments[1].output_dir} stopped. Run the same command again to go on from "
            "its last complete checkpoint (or to finish its final save or evaluation).",
            file=sys.stderr,
        )
        sys.exit(130)  # the shell's status of a process ended by SIGINT


if __name__ == "__main__":
    cli()
