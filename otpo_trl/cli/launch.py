"""`otpo-trl train`: train from a recipe through `accelerate launch`, as `trl dpo` does.

```bash
otpo-trl train --config quickstart                                   # a shipped recipe, one process
otpo-trl train --config llama-3-8b-instruct/otpo_full --accelerate_config deepspeed_zero3 --num_processes 8
otpo-trl train --config my_recipe.yaml --learning_rate 1.0e-6       # a recipe file; flags override it
```

The command starts `accelerate launch [launch options] -m otpo_trl.cli.train [training arguments]`, the same
training as `scripts/train.py` (`otpo_trl.cli.train`). A flag the training script knows goes to it; one that only
`accelerate launch` knows (`--num_processes`, `--main_process_port`, `--cpu`, ...) goes to the launcher.

Names, as in TRL's CLI: `--config` takes a recipe file, or the name of a recipe shipped in the package
(`otpo_trl/recipes`, `configs/` in a checkout), with or without `.yaml` (`configs/<name>` also finds the shipped one);
`--accelerate_config` takes a file or a shipped name (`single_gpu`, `ddp`, `deepspeed_zero3`, `fsdp`), and defaults to
`single_gpu` (`ddp` with `--num_processes` > 1). A file given by path wins over a shipped name.
"""

import argparse
import difflib
import importlib.resources
import os
import subprocess
import sys
from pathlib import Path


RECIPES = importlib.resources.files("otpo_trl") / "recipes"
TRAINING_MODULE = "otpo_trl.cli.train"
# Options that would replace the training module `accelerate launch` runs.
_REFUSED = ("-m", "--module", "--no_python", "--no-python")

HELP = """\
Train with OTPO (or `trainer: dpo`) from a YAML recipe, through `accelerate launch`.

  otpo-trl train --config quickstart
  otpo-trl train --config llama-3-8b-instruct/otpo_full --accelerate_config deepspeed_zero3 --num_processes 8

Launcher options (the rest is the training script's, listed below; flags override the recipe):
  --config <recipe>          a YAML file, or a shipped recipe by name, with or without .yaml:
                               {recipes}
  --accelerate_config <c>    an accelerate config file, or a shipped one by name: {accelerate_configs}
                             (default: single_gpu; ddp with --num_processes > 1)
  --num_processes N          processes (GPUs) to start; overrides the accelerate config
  other `accelerate launch` options (--main_process_port, --cpu, --num_cpu_threads_per_process, ...) pass through
  to the launcher. Without a GPU and OMP_NUM_THREADS, the processes share every core of this machine.

Paths inside a recipe (quickstart's `models/SmolLM2-135M-Instruct`, `../shared/data/ultrafeedback`, `out/quickstart`)
are relative to the current directory, not to the recipe: run from a checkout, or override them
(`--model_name_or_path`, `--dataset_name`, `--output_dir`).
"""


def _shipped(folder, exclude: str | None = None) -> dict[str, Path]:
    """{name without .yaml: file} for the YAML files under `folder` of the package's recipes."""
    root = Path(str(folder))
    return {
        path.relative_to(root).with_suffix("").as_posix(): path
        for path in sorted(root.rglob("*.yaml"))
        if exclude is None or exclude not in path.relative_to(root).parts
    }


def shipped_recipes() -> dict[str, Path]:
    """The training recipes shipped in the package, by name (`quickstart`, `llama-3-8b-instruct/otpo_full`, ...)."""
    return _shipped(RECIPES, exclude="accelerate")


def shipped_accelerate_configs() -> dict[str, Path]:
    """The accelerate configs shipped in the package, by name (`single_gpu`, `ddp`, `deepspeed_zero3`, `fsdp`)."""
    return _shipped(RECIPES / "accelerate")


def _resolve(value: str, shipped: dict[str, Path], what: str, flag: str) -> str:
    """`value` if it is a file, else the shipped file of that name (`.yaml` and a leading `configs/` optional)."""
    if Path(value).expanduser().is_file():
        return value
    name = value.removesuffix(".yaml")
    name = name.removeprefix("configs/accelerate/" if what == "accelerate config" else "configs/")
    if name in shipped:
        return str(shipped[name])
    close = difflib.get_close_matches(name, list(shipped), n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ValueError(
        f"`{flag} {value}`: neither a file (relative to {Path.cwd()}) nor a shipped {what}{hint}. "
        f"Shipped: {', '.join(shipped)}."
    )


def resolve_recipe(value: str) -> str:
    """The recipe file for `--config <value>`: a path as given, else a shipped recipe's file."""
    return _resolve(value, shipped_recipes(), "recipe", "--config")


def resolve_accelerate_config(value: str) -> str:
    """The accelerate config file for `--accelerate_config <value>`: a path as given, else a shipped config's file."""
    return _resolve(value, shipped_accelerate_configs(), "accelerate config", "--accelerate_config")


def _takes_value(action: argparse.Action) -> int:
    return 0 if action.nargs == 0 else action.nargs if isinstance(action.nargs, int) else 1


def split_argv(
    argv: list[str], training_options: set[str], launch_actions: dict[str, argparse.Action]
) -> tuple[list[str], list[str]]:
    """`(launch_args, training_args)`: the flags that only `accelerate launch` knows (with their values), and the
    rest in their order. `--accelerate_config` and `--config` stay in `launch_args` / `training_args` unresolved."""
    launch, training = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        key = arg.split("=", 1)[0]
        if key == "--accelerate_config" or (
            key.startswith("-") and key not in training_options and key in launch_actions
        ):
            if key in _REFUSED:
                raise ValueError(f"`{key}`: `otpo-trl train` runs {TRAINING_MODULE} itself.")
            count = 1 if key == "--accelerate_config" else _takes_value(launch_actions[key])
            count = 0 if "=" in arg else count
            if len(argv) < i + 1 + count:
                raise ValueError(f"`{key}` needs a value.")
            launch += argv[i : i + 1 + count]
            i += 1 + count
        else:
            training.append(arg)
            i += 1
    return launch, training


def _pop_value(args: list[str], flag: str) -> tuple[list[str], str | None]:
    """`args` without `flag <value>` / `flag=<value>`, and the value (None if absent)."""
    for i, arg in enumerate(args):
        if arg == flag:
            return args[:i] + args[i + 2 :], args[i + 1]
        if arg.startswith(f"{flag}="):
            return args[:i] + args[i + 1 :], arg.split("=", 1)[1]
    return args, None


def _resolve_config_flag(training: list[str]) -> list[str]:
    """`training` with the value of `--config` (or `--config=`) replaced by the recipe's file."""
    out = list(training)
    for i, arg in enumerate(out):
        if arg == "--config":
            if i + 1 == len(out):
                raise ValueError("`--config` needs a recipe: a YAML file or a shipped name.")
            out[i + 1] = resolve_recipe(out[i + 1])
            return out
        if arg.startswith("--config="):
            out[i] = f"--config={resolve_recipe(arg.split('=', 1)[1])}"
            return out
    raise ValueError(
        f"`--config` is required: a recipe file or a shipped name ({', '.join(shipped_recipes())}). "
        "See `otpo-trl train --help`."
    )


def _has_accelerator() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, NPU, ...
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def check_local_paths_early(argv: list[str]) -> None:
    """Fail at once, before accelerate and torch are imported, when the local model, data or chat template path that
    the recipe (overridden by `argv`'s flags) names does not exist: the rule and the messages of
    `otpo_trl.local_paths`, which the training script applies again with everything else (`cli.preflight`). A flag
    this cannot read here (an unknown recipe, a value it cannot parse) is left to the full checks."""
    import yaml

    from ..local_paths import check_local_paths, read_chat_template

    _, recipe = _pop_value(argv, "--config")
    try:
        values = yaml.safe_load(Path(resolve_recipe(recipe)).read_text()) if recipe else {}
    except (ValueError, OSError, yaml.YAMLError):  # said by the full checks, with their own message
        return
    values = values if isinstance(values, dict) else {}
    for key in ("model_name_or_path", "dataset_name", "chat_template"):
        flag = _pop_value(argv, f"--{key}")[1]
        values[key] = flag if flag is not None else values.get(key)
    model, data, template = (values[key] for key in ("model_name_or_path", "dataset_name", "chat_template"))
    check_local_paths(model if isinstance(model, str) else None, data if isinstance(data, str) else None)
    if isinstance(template, str):
        read_chat_template(template)


def check_thread_env() -> None:
    """`OMP_NUM_THREADS`, where set, must be a positive whole number: accelerate reads it with `int()` and would stop
    with a bare traceback on an empty or other value (accelerate 1.x, `get_int_from_env`)."""
    value = os.environ.get("OMP_NUM_THREADS")
    if value is not None and not (value.strip().isdigit() and int(value) > 0):
        raise ValueError(
            f"OMP_NUM_THREADS={value!r} is not a positive whole number: unset it (`unset OMP_NUM_THREADS`, and each "
            "process gets its share of the cores) or give the threads per process (say `OMP_NUM_THREADS=2`)."
        )


def launch_args_for(argv: list[str]):
    """The parsed `accelerate launch` arguments that run `otpo_trl.cli.train` with `argv`'s training arguments."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    from .arguments import make_parser

    launch_parser = launch_command_parser()
    training_options = set(make_parser()._option_string_actions)
    launch, training = split_argv(argv, training_options, launch_parser._option_string_actions)
    training = _resolve_config_flag(training)

    launch, name = _pop_value(launch, "--accelerate_config")
    args = launch_parser.parse_args(launch + ["--module", TRAINING_MODULE, *training])
    if args.config_file is None:
        default = "ddp" if (args.num_processes or 1) > 1 else "single_gpu"
        args.config_file = resolve_accelerate_config(name or default)
    elif name is not None:
        raise ValueError("Give `--accelerate_config` or accelerate's `--config_file`, not both.")

    # accelerate gives each process 1 thread on a machine without GPU unless told otherwise (it counts cores only
    # under `use_cpu`): share the cores, as `make quickstart` does.
    if args.num_cpu_threads_per_process is None and "OMP_NUM_THREADS" not in os.environ and not _has_accelerator():
        processes = args.num_processes or load_config_from_file(args.config_file).num_processes or 1
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        args.num_cpu_threads_per_process = max(1, cores // processes)
    return args


def print_help() -> None:
    from .arguments import make_parser

    parser = make_parser()
    parser.prog = "otpo-trl train"
    parser.usage = (
        "otpo-trl train --config <recipe> [--accelerate_config <name or path>] [--num_processes N] "
        "[accelerate launch options] [training arguments]"
    )
    parser.description = HELP.format(
        recipes="\n                               ".join(shipped_recipes()),
        accelerate_configs=", ".join(shipped_accelerate_configs()),
    )

    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    parser.formatter_class = Formatter
    parser.print_help()


def cli(argv: list[str] | None = None) -> None:
    """`otpo-trl train`: parse `argv` (default: `sys.argv[1:]`) and start `accelerate launch`; bad input exits with its
    message, a failed training with its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print_help()
        return
    try:
        check_thread_env()
        check_local_paths_early(argv)
        args = launch_args_for(argv)
    except (ValueError, OSError) as err:  # OSError: a path missing, or a file for a folder
        sys.exit(f"error: {err}")

    from accelerate.commands.launch import launch_command
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from .arguments import COMMAND_ENV

    os.environ[COMMAND_ENV] = "otpo-trl train"  # the processes' messages name the command the user ran

    try:
        launch_command(args)
    except subprocess.CalledProcessError as err:  # one process: it printed its error
        sys.exit(err.returncode)
    except ChildFailedError as err:  # several processes: torch's summary of which failed
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    cli()
