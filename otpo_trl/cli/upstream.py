"""Workarounds for transformers, TRL, accelerate and torch that the training CLI needs, each in one function.

Each docstring names the versions it was written against (transformers 5.24, TRL 1.16, accelerate 1.15, torch 2.13,
deepspeed 0.19) and when the function can go. The CLI calls them from `arguments` (the launch and the parser) and from
`train` (the trainer, the model card, the exit); nothing here imports either.
"""

import logging
import os
import re
import sys
from pathlib import Path

import torch
from transformers.integrations import TensorBoardCallback

from ..model_card import base_model_license, is_local, public_name
from ..otpo_trainer import OTPOTrainer


logger = logging.getLogger(__name__)


def _launched(variable: str) -> bool:
    return os.environ.get(variable, "").lower() == "true"


# ---------------------------------------------------------------------------------------------- accelerate


def launch_defaults() -> dict:
    """Defaults for a run of several processes without a GPU: `ddp_backend: gloo` under DeepSpeed, else `use_cpu`.

    Targets accelerate 1.x (1.15): without them it picks no backend: under DeepSpeed it counts one process and
    DeepSpeed stops on the batch size; under DDP (even with `ddp_backend: gloo`) the model is not wrapped, so each
    process trains alone. The recipe and the command line override these. FSDP is left alone: accelerate refuses it
    without a GPU. Delete when `accelerate launch --num_processes N` on a machine without a GPU starts N processes
    that train together with no flag set.
    """
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, NPU, ...
    has_device = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or has_device or _launched("ACCELERATE_USE_FSDP"):
        return {}
    return {"ddp_backend": "gloo"} if _launched("ACCELERATE_USE_DEEPSPEED") else {"use_cpu": True}


def check_launch() -> None:
    """Stop when `accelerate launch --cpu` dropped what its config asks for (DeepSpeed, FSDP, several processes).

    Targets accelerate 1.x (1.15): with `--cpu` it starts one plain process whatever the config says and passes on
    only `ACCELERATE_USE_CPU=True`, so the launcher's command line is the one place where the config still shows.
    Delete when `accelerate launch --cpu` either honours the config's distributed setup or refuses it itself.
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


# ------------------------------------------------------------------------------------------ TRL's parser and configs


def split_config_flag(argv: list[str]) -> list[str]:
    """`argv` with `--config=<path>` split into `--config <path>`.

    Targets TRL 1.16: `TrlParser.parse_args_and_config` looks for the word `--config` only, so with `=` the recipe
    would be dropped without a word. Delete when TrlParser reads `--config=<path>`.
    """
    out = []
    for arg in argv:
        out += ["--config", arg.split("=", 1)[1]] if arg.startswith("--config=") else [arg]
    return out


def lora_target_modules(targets):
    """`lora_target_modules` as PEFT should read it: a lone module name (`"q_proj"`) as a one-element list.

    Targets TRL 1.16: `ModelConfig.__post_init__` turns a one-element list into its string, which PEFT reads as a
    regular expression over the full module names (`"q_proj"` then matches none); a YAML scalar gives the same string.
    `"all-linear"` and anything that is not a plain name are left as they are. Delete when `ModelConfig` keeps a
    one-element list.
    """
    if isinstance(targets, str) and targets != "all-linear" and re.fullmatch(r"\w+", targets):
        return [targets]
    return targets


# transformers 5.x (5.24): `gradient_checkpointing*` are deprecated aliases that mirror `activation_checkpointing*`;
# passing both to a new config warns. Copying a config leaves them out. Delete when transformers 6 removes them.
DEPRECATED_TRAINING_ARGS = frozenset({"gradient_checkpointing", "gradient_checkpointing_kwargs"})


# ---------------------------------------------------------------------------------------------- transformers' Trainer


def keep_tensorboard_logs_with_run(trainer, output_dir: str) -> None:
    """Point the trainer's TensorBoard callback, if any and unset, at `<output_dir>/runs`.

    Targets transformers 5.x (5.24): `TrainingArguments` has no `logging_dir`; without TENSORBOARD_LOGGING_DIR the
    callback picks a folder itself, not the `<output_dir>/runs` that the run directory lists among a run's outputs
    (so that `--overwrite_output_dir` deletes the logs with the run). Delete when the callback's own folder is
    `<output_dir>/runs`, or TrainingArguments takes the folder again.
    """
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = os.path.join(output_dir, "runs")
            logged = (
                "loss, rewards, ot/* and the ot/token_weights histogram"
                if isinstance(trainer, OTPOTrainer)
                else "loss, rewards"
            )
            logger.info(f"TensorBoard logs ({logged}): {callback.logging_dir}")


def fix_local_model_card(card: Path, model_name_or_path: str, output_dir: str) -> None:
    """Make TRL's own model card (`trainer: dpo`) publishable like OTPO's: no path of this machine, a real license.

    Targets TRL 1.16's `create_model_card`: a local base model appears as "None" (`[None](https://huggingface.co/None)`,
    `model="None"`) or as the absolute path the run records, and the metadata says `licence: license`. Here a local
    base is named by its folder's name, the quick start loads `output_dir`, and the metadata line becomes the base's
    license (from its card), or goes when none is known. Nothing is done unless `card` exists. Delete when TRL's card
    names local models and their license.
    """
    if not card.exists():
        return
    text = card.read_text()
    licence = "".join(f"{key}: {value}\n" for key, value in base_model_license(model_name_or_path))
    text = text.replace("licence: license\n", licence, 1)
    if is_local(model_name_or_path):
        name = public_name(model_name_or_path)
        for shown in ("[None](https://huggingface.co/None)", str(Path(model_name_or_path).expanduser().resolve())):
            text = text.replace(f"`{shown}`", f"`{name}`").replace(shown, f"`{name}`")
        text = text.replace('model="None"', f'model="{output_dir}"')
    card.write_text(text)


def end_processes(trainer) -> None:
    """The end of a run, once everything is saved: every process waits for the others, the trainer ends (finishing
    the trackers and destroying the process group), and a gloo process leaves without finalizing Python.

    Targets torch 2.13 (seen with gloo on 2 CPU processes, under DDP and DeepSpeed 0.19) and transformers >= 5.18
    (`Trainer.end`; older versions have none, and nothing is ended). A rank that destroys its process group while
    another still writes the model card can abort at exit, hence the wait. After the group is gone a gloo worker thread
    may still be releasing the last collective's tensors: if Python finalizes meanwhile, the thread cannot take the GIL
    and the process aborts (SIGABRT, "terminate called without an active exception"), hence `os._exit(0)`. Delete the
    exit when a gloo run of `tests/test_distributed.py` exits cleanly without it.
    """
    trainer.accelerator.wait_for_everyone()
    gloo = torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo"
    if hasattr(trainer, "end"):
        trainer.end()
    if gloo:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
