"""Command-line options shared by the analysis tools (`scripts/evaluate.py`, `scripts/plot_weights.py`)."""

import argparse
from dataclasses import fields

from ..analysis import DEFAULT_MAX_LENGTH
from ..otpo_config import OT_FIELDS, OTPOConfig, checked_value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--model`, `--ref`, `--device` and `--dtype`, the arguments of
    [`otpo_trl.loading.load_model_and_tokenizer`]."""
    parser.add_argument("--model", required=True, help="Model folder or Hub id, or a PEFT adapter folder.")
    parser.add_argument(
        "--ref", help="Reference model; for an adapter, the base to load it on (default: its base_model_name_or_path)."
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])


def add_max_length_argument(parser: argparse.ArgumentParser) -> None:
    """Add `--max_length`, the truncation of prompt + completion, with TRL's default as in training."""
    parser.add_argument(
        "--max_length", type=int, default=DEFAULT_MAX_LENGTH,
        help=f"Truncate prompt + completion to this many tokens, as in training. Default: {DEFAULT_MAX_LENGTH}.",
    )  # fmt: skip


def add_ot_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--ot_reg`, `--ot_reg_m`, ... with the types, defaults, choices and help of [`OTPOConfig`]'s fields; read
    them back with [`otpo_trl.otpo_config.ot_kwargs`]."""
    group = parser.add_argument_group("OT token weights (the `ot_*` fields of OTPOConfig)")
    for f in fields(OTPOConfig):
        if f.name in OT_FIELDS:
            group.add_argument(
                f"--{f.name}", type=type(f.default), default=f.default, choices=f.metadata.get("choices"),
                help=f"{f.metadata['help']} Default: {f.default}.",
            )  # fmt: skip


def check_ot_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check the `--ot_*` options (and `--beta`) as [`OTPOConfig`] checks its fields, storing the checked values; a
    bad value exits with the option's name, before any model loads."""
    names = [*OT_FIELDS, *(["beta"] if hasattr(args, "beta") else [])]
    try:
        for name in names:
            setattr(args, name, checked_value(name, getattr(args, name), f"--{name}"))
    except ValueError as err:
        parser.error(str(err))
