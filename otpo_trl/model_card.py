"""The model card (`README.md`) that `OTPOTrainer.create_model_card` saves: a card that can be published as it is.

It names the base model by its Hub id when it has one (a Hub model, or a local folder whose own card says that it is a
Hub model in another format: `base_model_relation: quantized`, as `otpo-trl prepare-model` writes), else by the local
folder's name, never by a path of this machine; takes the license from the base model's own card when one can be read
(its folder's README.md, the Hub cache, or the Hub); fills "Training procedure" from the trainer's settings and state
(method, `ot_*`, beta, loss, data, steps, precision, LoRA or full); shows how to load the result with code that runs as
written (the Hub ids, or the folders relative to the directory the run was started from); and cites OTPO and TRL.

Checkpoint folders get no card ([`CheckpointCardCallback`]): a checkpoint is for resuming; the run's card is at the top
of `output_dir`. A LoRA adapter's `adapter_config.json` keeps PEFT's `base_model_name_or_path`, the base model's folder
on the training machine (so that the adapter loads from any directory there); the card says to load the base by
its Hub id or folder instead.
"""

import enum
import functools
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .otpo_config import OT_FIELDS


# docstyle-ignore
TRL_CITATION = """\
@software{vonwerra2020trl,
  title   = {{TRL: Transformers Reinforcement Learning}},
  author  = {von Werra, Leandro and Belkada, Younes and Tunstall, Lewis and Beeching, Edward and Thrush, Tristan and Lambert, Nathan and Huang, Shengyi and Rasul, Kashif and Gallouédec, Quentin},
  license = {Apache-2.0},
  url     = {https://github.com/huggingface/trl},
  year    = {2020}
}"""
_LICENSE_KEYS = ("license", "license_name", "license_link")


def is_local(name_or_path: str | None) -> bool:
    """Whether `name_or_path` names something on this machine (a folder or file) rather than a Hub repository."""
    return bool(name_or_path) and os.path.exists(os.path.expanduser(name_or_path))


def public_name(name_or_path: str | None) -> str | None:
    """`name_or_path` as a card may show it: a Hub id as it is, a local folder or file by its name only."""
    if not name_or_path:
        return None
    if is_local(name_or_path):
        return Path(os.path.expanduser(name_or_path)).resolve().name
    return name_or_path


def _card_data(name_or_path: str) -> dict:
    """The metadata of a base model's card: its folder's README.md, else the Hub cache, else the Hub (not at all
    with `HF_HUB_OFFLINE=1`); raises when there is none."""
    if is_local(name_or_path):
        readme = Path(os.path.expanduser(name_or_path)) / "README.md"
        if not readme.is_file():
            raise FileNotFoundError(readme)
        return ModelCard.load(readme).data.to_dict()
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name_or_path, "README.md")
    return ModelCard.load(cached if isinstance(cached, str) else name_or_path).data.to_dict()


@functools.lru_cache(maxsize=16)
def base_model_license(name_or_path: str | None) -> tuple[tuple[str, str], ...]:
    """The `license` (and `license_name`, `license_link`) of the base model's card, as `(key, value)` pairs; empty
    when no card can be read. Looked up once per process."""
    if not name_or_path:
        return ()
    try:
        data = _card_data(name_or_path)
    except Exception:  # no card, offline, private or gated repository: the card says that the license is unknown
        return ()
    return tuple((key, str(data.get(key))) for key in _LICENSE_KEYS if data.get(key))


def hub_id(name_or_path: str | None) -> str | None:
    """The Hub id of a base model: `name_or_path` itself when it is not local; for a local folder, the `base_model`
    of its card when the card says the folder is that model in another format (`base_model_relation: quantized`,
    as `otpo-trl prepare-model` writes); else None (a local model of unknown origin)."""
    if not name_or_path:
        return None
    if not is_local(name_or_path):
        return name_or_path
    try:
        data = _card_data(name_or_path)
    except Exception:  # no card, or an unreadable one: the origin is unknown
        return None
    base = data.get("base_model")
    base = base[0] if isinstance(base, list) and len(base) == 1 else base
    return base if data.get("base_model_relation") == "quantized" and isinstance(base, str) else None


def shown_path(path: str) -> tuple[str, bool]:
    """`(text, runs)`: a local folder as code in a card may load it: relative to the current directory when inside it
    (`runs`: the code runs as written from there), else by its name only (`runs` False). Never absolute."""
    folder = Path(os.path.expanduser(path)).resolve()
    try:
        return folder.relative_to(Path.cwd().resolve()).as_posix() or ".", True
    except ValueError:
        return folder.name, False


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _value(value) -> str:
    if isinstance(value, enum.Enum):  # TrainingArguments' SchedulerType, OptimizerNames: their YAML value
        value = value.value
    if isinstance(value, (list, tuple, set)):
        return ", ".join(str(v) for v in (sorted(value) if isinstance(value, set) else value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _loading_snippet(model_id: str, base: str, adapter: bool) -> str:
    """Code that loads the model (`model_id`: a Hub id or a folder) and answers one question; for an adapter, the base
    (`base`: a Hub id or a folder) first."""
    if adapter:
        return f"""\
```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "{model_id}")  # model.merge_and_unload() merges the adapter
tokenizer = AutoTokenizer.from_pretrained("{model_id}")

messages = [{{"role": "user", "content": "What is the capital of France?"}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
output = model.generate(**inputs, max_new_tokens=128)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
```"""
    return f"""\
```python
from transformers import pipeline

generator = pipeline("text-generation", model="{model_id}")
messages = [{{"role": "user", "content": "What is the capital of France?"}}]
print(generator(messages, max_new_tokens=128, return_full_text=False)[0]["generated_text"])
```"""


def training_procedure(trainer, dataset_name: str | None) -> list[tuple[str, str]]:
    """The rows of the card's "Training procedure" table: `(setting, value)`, from `trainer.args` and its state."""
    args, state = trainer.args, trainer.state
    rows = [("Method", f"{trainer._name} ({type(trainer).__name__}): DPO with optimal-transport token weights")]
    losses = args.loss_type if isinstance(args.loss_type, list) else [args.loss_type]
    loss = _value(losses)
    if args.loss_weights:
        loss += f" (weights {_value(args.loss_weights)})"
    rows += [("Loss", f"`loss_type` {loss}, `beta` {_value(args.beta)}")]
    rows += [("OT settings", ", ".join(f"`{name}` {_value(getattr(args, name))}" for name in OT_FIELDS))]
    if dataset_name:
        shown = public_name(dataset_name)
        data = (
            f"`{shown}` (a local data set)"
            if is_local(dataset_name)
            else f"[{shown}](https://huggingface.co/datasets/{shown})"
        )
    else:  # not given to create_model_card
        data = None
    pairs = (
        len(trainer.train_dataset)
        if trainer.train_dataset is not None and hasattr(trainer.train_dataset, "__len__")
        else None
    )
    counted = f"{pairs} training pairs" if pairs is not None else None
    rows += [("Data", ", ".join(filter(None, [data, counted])) or "not recorded")]
    batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    rows += [
        (
            "Steps",
            f"{state.global_step} of {state.max_steps} (epoch {_value(round(state.epoch or 0.0, 3))}), "
            f"{batch} pairs a step ({args.per_device_train_batch_size} per device x {args.gradient_accumulation_steps}"
            f" accumulation x {args.world_size} process(es))",
        ),
        (
            "Optimisation",
            f"learning rate {_value(args.learning_rate)}, `{_value(args.lr_scheduler_type)}` schedule, "
            f"{args.warmup_steps} warm-up steps, `{_value(args.optim)}`, seed {args.seed}",
        ),
        ("Max length", str(args.max_length)),
    ]
    dtype = next(iter(trainer.model.parameters())).dtype if any(True for _ in trainer.model.parameters()) else None
    autocast = "bf16 autocast" if args.bf16 else "fp16 autocast" if args.fp16 else "no autocast (fp32 compute)"
    rows += [("Precision", f"weights {str(dtype).removeprefix('torch.')}, {autocast}")]
    peft_config = getattr(trainer.model, "peft_config", None)
    if peft_config:
        config = next(iter(peft_config.values()))
        kind = getattr(config.peft_type, "value", config.peft_type)
        if kind == "LORA":
            tuned = (
                f"LoRA adapter: r {config.r}, alpha {config.lora_alpha}, dropout {_value(config.lora_dropout)}, "
                f"modules {_value(config.target_modules)}"
            )
        else:
            tuned = f"{kind} adapter"
        reference = "the base model with the adapter disabled" if trainer.ref_model is None else "a separate model"
    else:
        tuned, reference = "full fine-tuning", "a frozen copy of the initial model"
    if args.precompute_ref_log_probs:
        reference += " (log-probabilities precomputed before training)"
    rows += [("Fine-tuning", tuned), ("Reference model", reference)]
    last = next((h for h in reversed(state.log_history) if "loss" in h and "rewards/accuracies" in h), None)
    if last is not None:
        values = ", ".join(
            f"{key} {_value(round(last[key], 4))}"
            for key in ("loss", "rewards/accuracies", "rewards/margins")
            if key in last
        )
        rows += [(f"Last training log (step {last.get('step', state.global_step)})", values)]
    return rows


def default_model_name(trainer) -> str:
    """The card's `model_name` when none is given: the Hub repository's name when pushing, else the base model's name
    and the method (`SmolLM2-135M-Instruct-OTPO`)."""
    hub_model_id = getattr(trainer, "hub_model_id", None) or trainer.args.hub_model_id
    if hub_model_id:
        return hub_model_id.split("/")[-1]
    from trl.trainer.utils import get_config_model_id

    base_path = get_config_model_id(trainer.model.config)
    base = (hub_id(base_path) or public_name(base_path) or "model").split("/")[-1]
    return f"{base}-{trainer._name}"


def otpo_model_card(
    trainer,
    model_name: str | None = None,
    dataset_name: str | None = None,
    tags: str | list[str] | None = None,
    license: str | None = None,
    folder: str | None = None,
) -> ModelCard:
    """The model card of `trainer`'s model (an `OTPOTrainer`), trained on `dataset_name` (a Hub id or a local path),
    for the model saved in `folder` (default: `output_dir`).

    `model_name` defaults to [`default_model_name`]; TRL 1.16's `_save_checkpoint` passes the name of `output_dir`,
    which is taken as no name given (it is TRL's default). `tags` are added to the trainer's `_tag_names` (and
    `hf_jobs` in a Hugging Face job, as TRL does); `license` replaces the one read from the base model's card."""
    from trl.trainer.utils import get_comet_experiment_url, get_config_model_id, get_trackio_space_url

    args = trainer.args
    folder = str(folder or args.output_dir)
    if model_name is None or model_name == Path(str(args.output_dir)).name:
        model_name = default_model_name(trainer)
    tags = [tags] if isinstance(tags, str) else list(tags or [])
    tags = list(dict.fromkeys([*tags, *trainer._tag_names, *(["hf_jobs"] if "JOB_ID" in os.environ else [])]))
    base_path = get_config_model_id(trainer.model.config)
    base_id = hub_id(base_path)
    adapter = bool(getattr(trainer.model, "peft_config", None))
    pushed_to = getattr(trainer, "hub_model_id", None) or args.hub_model_id
    model_id, model_loads = (pushed_to, True) if pushed_to else shown_path(folder)
    if base_id or not base_path:
        base, base_loads = base_id or "the base model", bool(base_id)
    else:
        base, base_loads = shown_path(base_path)
    license_info = {"license": license} if license else dict(base_model_license(base_path))

    card_data = ModelCardData(
        base_model=base_id,
        datasets=[dataset_name] if dataset_name and not is_local(dataset_name) else None,
        library_name="peft" if adapter else "transformers",
        model_name=model_name,
        pipeline_tag="text-generation",
        tags=["generated_from_trainer", *tags, *(["lora"] if adapter else [])],
        **license_info,
    )

    if base_id:
        base_text = f"[{base_id}](https://huggingface.co/{base_id})"
        if is_local(base_path):
            base_text += f" (its local copy `{public_name(base_path)}`)"
    else:
        base_text = f"`{public_name(base_path) or base}` (a local model folder)"
    what = "a LoRA adapter for" if adapter else "a fine-tuned version of"
    license_text = (
        f"License: `{license_info['license']}`" + ("." if license else ", that of the base model.")
        if "license" in license_info
        else "License: not recorded. The base model's license applies: set `license:` in this card's metadata "
        "before publishing it."
    )
    lines = [
        f"# Model Card for {model_name}",
        "",
        f"This model is {what} {base_text}, trained with {trainer._name}, a method introduced in "
        f"[{trainer._paper['title']}](https://huggingface.co/papers/{trainer._paper['id']}), using "
        "otpo-trl on [TRL](https://github.com/huggingface/trl).",
        "",
        license_text,
        "",
        "## Quick start",
        "",
        _loading_snippet(model_id, base, adapter),
        "",
    ]
    needed = [("this model", model_loads)] + ([("the base model", base_loads)] if adapter else [])
    unresolved = [what for what, loads in needed if not loads]
    if unresolved:
        lines += [f"Give the folder (or Hub id) of {' and '.join(unresolved)} where the code names it.", ""]
    if adapter and is_local(base_path):
        lines += [
            "`adapter_config.json` records the base model as the folder it was trained from on the training machine: "
            "load the base as above rather than with `AutoPeftModelForCausalLM`.",
            "",
        ]
    lines += ["## Training procedure", ""]
    links = [
        ("Weights & Biases", _wandb_url()),
        ("Trackio", get_trackio_space_url()),
        ("Comet", get_comet_experiment_url()),
    ]
    lines += [f"Logged to [{name}]({url})." for name, url in links if url]
    lines += ["| Setting | Value |", "| --- | --- |"]
    lines += [f"| {key} | {value.replace('|', '/')} |" for key, value in training_procedure(trainer, dataset_name)]
    lines += ["", "### Framework versions", ""]
    for label, package in (
        ("otpo-trl", "otpo-trl"),
        ("TRL", "trl"),
        ("Transformers", "transformers"),
        ("PyTorch", "torch"),
        ("Datasets", "datasets"),
        ("Tokenizers", "tokenizers"),
        ("PEFT", "peft"),
        ("POT", "POT"),
    ):
        if (package != "peft" or adapter) and _version(package):
            lines.append(f"- {label}: {_version(package)}")
    lines += ["", "## Citations", "", f"Cite {trainer._name} as:", "", "```bibtex", trainer._paper["citation"], "```"]
    lines += ["", "Cite TRL as:", "", "```bibtex", TRL_CITATION, "```", ""]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines))


def save_model_card(trainer, folder: str | None = None, **kwargs) -> None:
    """Save [`otpo_model_card`]`(trainer, folder=folder, **kwargs)` as `<folder>/README.md` (default: `output_dir`),
    on the main process only: the body of `OTPOTrainer.create_model_card` and `save_model`."""
    if trainer.is_world_process_zero():
        folder = str(folder or trainer.args.output_dir)
        otpo_model_card(trainer, folder=folder, **kwargs).save(os.path.join(folder, "README.md"))


class CheckpointCardCallback(TrainerCallback):
    """Leaves checkpoint folders without a card: removes the README.md that PEFT's `save_pretrained` (peft 0.18+)
    writes into each checkpoint of an adapter, a template that names the base model by its path on this machine. The
    run's card is the one at the top of `output_dir`."""

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        readme = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / "README.md"
        if readme.is_file() and ModelCard.load(readme).data.get("library_name") == "peft":
            readme.unlink()  # PEFT's template, written by this save: this run's own file


def _wandb_url() -> str | None:
    from transformers import is_wandb_available

    if not is_wandb_available():
        return None
    import wandb

    return wandb.run.url if wandb.run is not None else None
