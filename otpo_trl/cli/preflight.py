"""The checks of a training run's arguments that can fail, run before any file is written and before any model loads.

[`check_before_writing`] is the first thing `otpo_trl.cli.train.prepare_run` does, so that nothing a user made (a
previous run in `output_dir` included) is touched by a run that would stop later on its arguments. The rule and the
messages are stated in docs/training.md ("Checked before anything is written") and docs/troubleshooting.md.

Each check asks the library that would fail later, with its own rule: PEFT's module matching for
`lora_target_modules` (on the model built from its config on the meta device: no weights are read), transformers'
checks of `attn_implementation` (on the same skeleton), of the optimizer, of the quantisation backend and of the
trackers of `report_to`.
"""

import contextlib
import copy
import difflib
import importlib.metadata

import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from peft.tuners.tuners_utils import check_target_module_exists
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, modeling_utils
from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations
from trl import ModelConfig, get_peft_config, get_quantization_config

from ..loading import check_not_adapter, from_pretrained
from ..local_paths import check_local_paths
from ..otpo_config import OTPOConfig
from .arguments import ScriptArguments


# The pip package of each tracker of `report_to` (transformers 5's names), where it is not the tracker's own name.
TRACKER_PACKAGES = {
    "azure_ml": "azureml-core",
    "comet_ml": "comet-ml",
    "dagshub": "dagshub mlflow",
    "flyte": "flytekit flytekitplugins-deck-standard",
}
# transformers' default optimizers (plain torch): the only ones checked without the model's skeleton.
DEFAULT_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")


def check_before_writing(script_args: ScriptArguments, training_args: OTPOConfig, model_args: ModelConfig) -> None:
    """Run every check that can fail on the arguments alone, before any file is touched and any model loads.

    The evaluation split is not the training split; the trackers of `report_to` are installed; the quantisation
    backend of `load_in_4bit` / `load_in_8bit` is usable; local model and data paths exist (a missing one fails
    before any Hub call, naming the command that makes it); and, on the model built from its config on the meta
    device (no weights), `attn_implementation` is available, `optim` can be built, and every `lora_target_modules`
    entry matches a module as PEFT matches them. A missing `model_name_or_path` or `dataset_name` is left to the
    caller's own message.

    Raises:
        ValueError: naming the key, its value and the fix.
        FileNotFoundError: a local model or data path that does not exist, with where it comes from.
    """
    check_eval_split(script_args, training_args)
    check_trackers(training_args)
    check_quantization(model_args)
    check_local_inputs(script_args, model_args)
    if model_args.model_name_or_path is None:
        return
    needs_model = (
        model_args.use_peft
        or model_args.attn_implementation is not None
        or getattr(training_args.optim, "value", training_args.optim) not in DEFAULT_OPTIMIZERS
    )
    skeleton = model_skeleton(model_args, training_args) if needs_model else None
    check_optimizer(training_args, skeleton)
    if model_args.use_peft:
        check_lora_targets(model_args, skeleton)


def _sentence(err: Exception) -> str:
    """An upstream error's message as a sentence of ours (upstream messages do not always end in a full stop)."""
    text = str(err).strip()
    return text if text.endswith((".", "!", "?")) else f"{text}."


def check_eval_split(script_args: ScriptArguments, training_args: OTPOConfig) -> None:
    """Evaluating on the training split would score the pairs the model was trained on: refused, as for one file."""
    evaluating = training_args.do_eval and script_args.eval_split_size is None
    if evaluating and script_args.dataset_test_split == script_args.dataset_train_split:
        split = script_args.dataset_train_split
        raise ValueError(
            f"`dataset_test_split` is the training split {split!r} (`dataset_train_split`): evaluating (do_eval) on it "
            "would score training pairs. Name another split (`--dataset_test_split test`), or set `eval_split_size` "
            "(a share such as 0.1, or a number of pairs) to hold out pairs of the training split."
        )


def install_command(package: str) -> str:
    """`pip install "otpo-trl[<extra>]"` when an extra of the installed otpo-trl brings `package`, else `pip install
    <package>`."""
    try:
        metadata = importlib.metadata.metadata("otpo-trl")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout without installing it
        return f"pip install {package}"
    for line in metadata.get_all("Requires-Dist") or []:
        requirement = Requirement(line)
        if requirement.marker is None or canonicalize_name(requirement.name) != canonicalize_name(package):
            continue
        for extra in metadata.get_all("Provides-Extra") or []:
            if requirement.marker.evaluate({"extra": extra}):
                return f'pip install "otpo-trl[{extra}]"'
    return f"pip install {package}"


def check_trackers(training_args: OTPOConfig) -> None:
    """Every tracker of `report_to` is one transformers knows, and installed (transformers' own availability check;
    its callback would otherwise fail after the model has loaded)."""
    report_to = training_args.report_to or []
    unknown = [name for name in report_to if name not in INTEGRATION_TO_CALLBACK]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(INTEGRATION_TO_CALLBACK), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"`report_to` names {unknown[0]!r}{hint}, which is no tracker transformers knows: use some of "
            f"{list(INTEGRATION_TO_CALLBACK)}, `all` (every installed one) or `none`."
        )
    available = get_available_reporting_integrations()
    missing = [name for name in report_to if name not in available]
    if missing:
        commands = "; ".join(f"`{install_command(TRACKER_PACKAGES.get(name, name))}` for {name}" for name in missing)
        others = [name for name in report_to if name not in missing]
        instead = f"`--report_to {' '.join(others)}`" if others else "`--report_to none` (`report_to: none`)"
        raise ValueError(
            f"`report_to` names {missing}, which {'is' if len(missing) == 1 else 'are'} not installed: {commands}. "
            f"Or train without {'it' if len(missing) == 1 else 'them'}: {instead}."
        )


def check_quantization(model_args: ModelConfig) -> None:
    """`load_in_4bit` / `load_in_8bit`: the bitsandbytes backend is installed and usable (transformers' own check,
    which would otherwise fail when the model loads)."""
    quantization_config = get_quantization_config(model_args)
    if quantization_config is None:
        return
    from transformers.quantizers import AutoHfQuantizer

    key = "load_in_4bit" if model_args.load_in_4bit else "load_in_8bit"
    try:
        AutoHfQuantizer.from_config(quantization_config).validate_environment()
    except (ImportError, RuntimeError, ValueError) as err:
        raise ValueError(
            f"`{key}` is true, but {_sentence(err)} Install it (`pip install bitsandbytes`; 4-bit and 8-bit "
            f"loading runs on a GPU), or set `{key}: false` (`--{key} false`)."
        ) from err


def check_local_inputs(script_args: ScriptArguments, model_args: ModelConfig) -> None:
    """A model or data path that cannot be a Hub id and does not exist fails now, before any Hub call, saying where
    it comes from (`otpo_trl.local_paths.check_local_paths`, a `FileNotFoundError`); a model folder that is an
    adapter is refused (`otpo_trl.loading.check_not_adapter`)."""
    try:
        check_local_paths(model_args.model_name_or_path, script_args.dataset_name)
    except NotADirectoryError as err:
        raise ValueError(str(err)) from err
    if model_args.model_name_or_path is not None:
        check_not_adapter(model_args.model_name_or_path, "`model_name_or_path`")


def _outside_zero3():
    """A context in which `from_config` builds a plain model under a ZeRO-3 launch.

    Targets transformers 5.x (5.25): once the TrainingArguments name a ZeRO-3 DeepSpeed config, `from_config` builds the
    model inside `deepspeed.zero.Init`, which partitions every parameter across the processes; `set_zero3_state` marks
    such a context as already open, so the meta-device skeleton stays a plain module on each process. Delete when
    `from_config` takes a flag to skip `zero.Init`.
    """
    set_zero3_state = getattr(modeling_utils, "set_zero3_state", None)
    return set_zero3_state() if set_zero3_state is not None else contextlib.nullcontext()


def model_skeleton(model_args: ModelConfig, training_args: OTPOConfig) -> torch.nn.Module:
    """The model built from its config on the meta device (no weights read or allocated), with the requested
    `attn_implementation`: transformers checks at this point that the backend is installed and supported."""
    config = from_pretrained(
        AutoConfig,
        model_args.model_name_or_path,
        "`model_name_or_path`",
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
    )
    attn_implementation = model_args.attn_implementation
    try:
        with torch.device("meta"), _outside_zero3():
            return AutoModelForCausalLM.from_config(
                config, attn_implementation=attn_implementation, trust_remote_code=training_args.trust_remote_code
            )
    except (ImportError, ValueError, RuntimeError) as err:
        if attn_implementation is None:
            raise
        raise ValueError(
            f"`attn_implementation` {attn_implementation!r} cannot be used here: {_sentence(err)} Install what it "
            "needs (`flash_attention_2`: `pip install flash-attn`, on a GPU), or set `attn_implementation: sdpa` "
            "(`--attn_implementation sdpa`; the default)."
        ) from err


def check_optimizer(training_args: OTPOConfig, skeleton: torch.nn.Module | None) -> None:
    """`optim` can be built: transformers' own choice of the optimizer class, which imports its package."""
    optim = getattr(training_args.optim, "value", training_args.optim)  # an `OptimizerNames` after __post_init__
    if optim in DEFAULT_OPTIMIZERS:
        return
    try:
        Trainer.get_optimizer_cls_and_kwargs(training_args, skeleton)
    except (ImportError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"`optim` {optim!r} cannot be used here: {_sentence(err)} Install what it needs, or leave `optim` at its "
            "default (`adamw_torch_fused`)."
        ) from err


def check_lora_targets(model_args: ModelConfig, skeleton: torch.nn.Module) -> None:
    """Every entry of `lora_target_modules` matches a module of the model, by PEFT's rule (a name matches a module
    whose full name is it or ends with `.<name>`; a single string is a regular expression over the full names).

    PEFT stops only when no entry matches (after the model has loaded); an entry of a list that matches nothing, a typo
    beside correct names, would be left out silently. Both are refused here, naming the closest module names.
    """
    targets = model_args.lora_target_modules
    if targets is None or targets == "all-linear":
        return
    names = [name for name, _ in skeleton.named_modules() if name]
    peft_config = get_peft_config(model_args)
    peft_config.exclude_modules = peft_config.modules_to_save = None  # matching only
    entries = [targets] if isinstance(targets, str) else list(targets)
    unmatched = []
    for entry in entries:
        single = copy.copy(peft_config)
        single.target_modules = entry if isinstance(targets, str) else {entry}
        if not any(check_target_module_exists(single, name) for name in names):
            unmatched.append(entry)
    if not unmatched:
        return
    # The names a target can end with: the modules that hold weights (the projections, embeddings, norms, the head).
    leaves = sorted({name.rsplit(".", 1)[-1] for name, m in skeleton.named_modules() if list(m.parameters(False))})
    close = {entry: difflib.get_close_matches(entry, leaves, n=3, cutoff=0.5) for entry in unmatched}
    hints = "; ".join(
        f"{entry!r}" + (f" (closest: {', '.join(map(repr, c))})" if c else "") for entry, c in close.items()
    )
    consequence = (
        "stop after loading the model"
        if len(unmatched) == len(entries)
        else f"leave {'it' if len(unmatched) == 1 else 'them'} out without a word"
    )
    kind = "regular expression" if isinstance(targets, str) else "name" if len(unmatched) == 1 else "names"
    raise ValueError(
        f"`lora_target_modules`: the {kind} {hints} {'match' if kind == 'names' else 'matches'} no module of "
        f"{model_args.model_name_or_path} (PEFT would "
        f"{consequence}). "
        f"Its module names: {leaves}. Fix the name(s), or use `all-linear`."
    )
