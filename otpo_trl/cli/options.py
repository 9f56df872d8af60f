"""Command-line options shared by the analysis tools (`scripts/evaluate.py`, `scripts/plot_weights.py`)."""

import argparse
from dataclasses import fields

from transformers.hf_argparser import string_to_bool

from ..inspection import DEFAULT_MAX_LENGTH
from ..otpo_config import OT_FIELDS, OTPOConfig, checked_value
from ..runs import NOT_TRAINING_ARGS


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--model`, `--ref`, `--device` and `--dtype`, the arguments of
    [`otpo_trl.loading.load_model_and_tokenizer`]."""
    parser.add_argument("--model", required=True, help="Model folder or Hub id, or a PEFT adapter folder.")
    parser.add_argument(
        "--ref", help="Reference model; for an adapter, the base to load it on (default: its base_model_name_or_path)."
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])


# An argparse `type` for a true/false option, as TRL's parser reads one (`--drop_ties`, `--drop_ties false`).
boolean = string_to_bool

# How a default that follows the evaluated run is stated in --help (`run_defaults=True` below; the tool's help says
# where the run's values are read from).
RUN_DEFAULT = "the evaluated run's, else"


def add_max_length_argument(parser: argparse.ArgumentParser, run_defaults: bool = False) -> None:
    """Add `--max_length`, the truncation of prompt + completion, with TRL's default; with `run_defaults`, its default
    is None, for the caller to take from the evaluated run ([`settings_from_run`]) and else TRL's."""
    default = f"{RUN_DEFAULT} {DEFAULT_MAX_LENGTH} (TRL's)" if run_defaults else f"{DEFAULT_MAX_LENGTH} (TRL's)"
    parser.add_argument(
        "--max_length",
        type=int,
        default=None if run_defaults else DEFAULT_MAX_LENGTH,
        help=f"Truncate prompt + completion to this many tokens (training's `max_length`). Default: {default}.",
    )


def add_ot_arguments(parser: argparse.ArgumentParser, run_defaults: bool = False) -> None:
    """Add `--ot_reg`, `--ot_reg_m`, ... with the types, defaults, choices and help of [`OTPOConfig`]'s fields; read
    them back with [`otpo_trl.otpo_config.ot_kwargs`]. With `run_defaults`, the defaults are None, for the caller to
    take from the evaluated run ([`settings_from_run`]) and else OTPOConfig's."""
    group = parser.add_argument_group("OT token weights (the `ot_*` fields of OTPOConfig)")
    for f in fields(OTPOConfig):
        if f.name in OT_FIELDS:
            from_run = run_defaults and f.name not in NOT_TRAINING_ARGS  # not ot_memory_budget: the machine's
            default = f"{RUN_DEFAULT} {f.default}" if from_run else f.default
            group.add_argument(
                f"--{f.name}",
                type=type(f.default),
                default=None if from_run else f.default,
                choices=f.metadata.get("choices"),
                help=f"{f.metadata['help']} Default: {default}.",
            )


def settings_from_run(args: argparse.Namespace, defaults: dict, settings: dict | None) -> tuple[dict, dict]:
    """Fill in each option of `defaults` (name -> its default without a run) that `args` leaves None: the run's value
    when its recorded `settings` (a run record's, or None without one) have the name, else the default.

    Returns:
        `(from_run, given)`: the options taken from the run, and those given on the command line, name -> value.
    """
    from_run, given = {}, {}
    for name, default in defaults.items():
        if getattr(args, name) is not None:
            given[name] = getattr(args, name)
        elif settings is not None and name in settings:
            from_run[name] = settings[name]
            setattr(args, name, settings[name])
        else:
            setattr(args, name, default)
    return from_run, given


def check_ot_arguments(
    parser: argparse.ArgumentParser, args: argparse.Namespace, labels: dict[str, str] | None = None
) -> None:
    """Check the `--ot_*` options (and `--beta`) as [`OTPOConfig`] checks its fields, storing the checked values; a
    bad value exits with the option's name (or its label in `labels`, e.g. where a run's value came from), before any
    model loads."""
    names = [*OT_FIELDS, *(["beta"] if hasattr(args, "beta") else [])]
    try:
        for name in names:
            label = (labels or {}).get(name, f"--{name}")
            setattr(args, name, checked_value(name, getattr(args, name), label))
    except ValueError as err:
        parser.error(str(err))
