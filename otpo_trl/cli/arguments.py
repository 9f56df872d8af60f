"""The arguments of `scripts/train.py`: [`ScriptArguments`], the parser, and the checks of the arguments and launch.

[`parse_args`] reads the recipe given by `--config` (the defaults) and the command line (which overrides them) into
`ScriptArguments`, [`OTPOConfig`] (every `trl.DPOConfig` / `transformers.TrainingArguments` field plus the `ot_*` ones)
and `trl.ModelConfig` (model, dtype, attention, LoRA). A key that none of them knows, in the recipe or on the command
line, is an error naming the closest known ones; so is a value that fails a field's check or choices. Nothing here
reads the data or the model: those checks are `otpo_trl.cli.train`'s.
"""

import difflib
import importlib.util
import logging
import os
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import trl
import yaml
from trl import ModelConfig, TrlParser

from ..loading import read_chat_template
from ..otpo_config import OT_FIELDS, OTPOConfig
from .upstream import check_launch, launch_defaults, lora_target_modules, split_config_flag


logger = logging.getLogger(__name__)

# The trainers `trainer` chooses between (`train.TRAINERS` maps them to their classes).
TRAINER_NAMES = ("otpo", "dpo")


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
            "choices": list(TRAINER_NAMES),
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
        if self.trainer not in TRAINER_NAMES:
            raise ValueError(f"`trainer` must be one of {list(TRAINER_NAMES)}, got {self.trainer!r}.")
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


# Set by `otpo-trl train` (`otpo_trl.cli.launch`) for the processes it starts, which run this module through
# `accelerate launch -m`: how the user started the training, for the messages that point to its `--help`.
COMMAND_ENV = "OTPO_TRL_COMMAND"


def command_name() -> str:
    """How the training was started, as the user would type it again: `otpo-trl train` (from [`COMMAND_ENV`]), the
    script's path as given (`scripts/train.py`), or `python -m otpo_trl.cli.train`; `otpo-trl train` otherwise (called
    from Python)."""
    if os.environ.get(COMMAND_ENV):
        return os.environ[COMMAND_ENV]
    script = Path(sys.argv[0] if sys.argv else "")
    if script.name == "train.py":
        in_package = script.parent.name == "cli" and script.parent.parent.name == "otpo_trl"
        return "python -m otpo_trl.cli.train" if in_package else sys.argv[0]
    return "otpo-trl train"


# A negative number argparse takes for an option (it knows only `-1` and `-0.5`): `-1e-6`, `-.5E3`, `-inf`.
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


def normalize_argv(argv: list[str]) -> list[str]:
    """`argv` as the parser reads it: `--config=<path>` split in two ([`upstream.split_config_flag`]), and a negative
    number after a flag joined to it (`--ot_tol -1e-6` -> `--ot_tol=-1e-6`), so that it is parsed, then checked, as a
    value."""
    out = []
    for arg in split_config_flag(argv):
        if out and _NEGATIVE_NUMBER.match(arg) and out[-1].startswith("--") and "=" not in out[-1]:
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
    duplicate = _duplicate_key(yaml.compose(path.read_text(), Loader=yaml.SafeLoader))
    if duplicate is not None:
        key, first, second = duplicate
        raise ValueError(
            f"`--config {path}` sets `{key}` twice, at lines {first} and {second}; YAML would keep the last without a "
            "word. Keep one."
        )


def _duplicate_key(node) -> tuple[str, int, int] | None:
    """The first key set twice in one mapping of the YAML node tree `node`: (key, first line, second line)."""
    if isinstance(node, yaml.MappingNode):
        seen = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            if name is not None and name in seen:
                return name, seen[name], key.start_mark.line + 1
            seen.setdefault(name, key.start_mark.line + 1)
            found = _duplicate_key(value)
            if found is not None:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            found = _duplicate_key(item)
            if found is not None:
                return found
    return None


def _unknown_keys(strings: list[str]) -> list[str]:
    return [s[2:].split("=", 1)[0] for s in strings if s.startswith("--")] or strings


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
        raise ValueError(f"Unknown argument(s): {'; '.join(errors)}. See `{command_name()} --help`.")
    check_parsed(*parsed)
    flags = [arg[2:].split("=", 1)[0] for arg in argv if arg.startswith("--")]
    warn_unused_ot_flags(parsed[0], [key for key in flags if key in OT_FIELDS])
    return tuple(parsed)


def warn_unused_ot_flags(script_args: ScriptArguments, given: list[str]) -> None:
    """Warn that `trainer: dpo` ignores the `ot_*` flags `given` on the command line. A recipe's own `ot_*` keys are
    not warned about: the DPO baselines carry their OTPO twin's keys on purpose."""
    if script_args.trainer == "dpo" and given:
        logger.warning(
            f"trainer 'dpo' ignores {', '.join(f'--{key}' for key in given)}: the `ot_*` settings are OTPO's. Use "
            "`--trainer otpo` to train with them."
        )


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
    model_args.lora_target_modules = lora_target_modules(model_args.lora_target_modules)
    # transformers trains `max_steps` steps when it is > 0, else `num_train_epochs` epochs: zero of either trains
    # nothing, and the run would save the untouched model as finished.
    if training_args.max_steps == 0:
        raise ValueError(
            "`max_steps` is 0: no step would run. Set a number of steps, or -1 to train `num_train_epochs`."
        )
    if training_args.max_steps < 0 and training_args.num_train_epochs <= 0:
        raise ValueError(
            f"`num_train_epochs` is {training_args.num_train_epochs} (and `max_steps` unset): no step would run. Set a "
            "number of epochs > 0 (a share such as 0.5 is fine), or `max_steps`."
        )
    if training_args.use_liger_kernel and importlib.util.find_spec("liger_kernel") is None:
        raise ValueError(
            "`use_liger_kernel` is true, but the liger-kernel package is not installed: `pip install liger-kernel` "
            "(it needs a GPU), or set `use_liger_kernel: false`."
        )
