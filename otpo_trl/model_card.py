"""The model card (`README.md`) that `OTPOTrainer.create_model_card` saves: a card that can be published as it is.

It names the base model as the user gave it (a Hub id, or a local folder's name, never a path of this machine), takes
the license from the base model's own card when one can be read (its folder's README.md, the Hub cache, or the Hub),
fills "Training procedure" from the trainer's settings and state (method, `ot_*`, beta, loss, data, steps, precision,
LoRA or full), shows how to load the result (transformers, or peft for an adapter), and cites OTPO and TRL.
"""

import enum
import functools
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

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


@functools.lru_cache(maxsize=16)
def base_model_license(name_or_path: str | None) -> tuple[tuple[str, str], ...]:
    """The `license` (and `license_name`, `license_link`) of the base model's card, as `(key, value)` pairs; empty
    when no card can be read. Looked up once per process: the Hub is asked only for a Hub id whose card is not cached,
    and not at all with `HF_HUB_OFFLINE=1`."""
    if not name_or_path:
        return ()
    try:
        if is_local(name_or_path):
            readme = Path(os.path.expanduser(name_or_path)) / "README.md"
            if not readme.is_file():
                return ()
            data = ModelCard.load(readme).data
        else:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name_or_path, "README.md")
            data = ModelCard.load(cached if isinstance(cached, str) else name_or_path).data
    except Exception:  # no card, offline, private or gated repository: the card says that the license is unknown
        return ()
    return tuple((key, str(data.get(key))) for key in _LICENSE_KEYS if data.get(key))


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
    if adapter:
        return f"""\
```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{base}")  # the base model (its Hub id or local folder)
model = PeftModel.from_pretrained(base, "{model_id}")  # this adapter (model.merge_and_unload() merges it)
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


def otpo_model_card(
    trainer,
    model_name: str | None = None,
    dataset_name: str | None = None,
    tags: str | list[str] | None = None,
    license: str | None = None,
) -> ModelCard:
    """The model card of `trainer`'s model (an `OTPOTrainer`), trained on `dataset_name` (a Hub id or a local path).

    `model_name` defaults to the name of `output_dir`; `tags` are added to the trainer's `_tag_names` (and `hf_jobs`
    in a Hugging Face job, as TRL does); `license` replaces the one read from the base model's card."""
    from trl.trainer.utils import get_comet_experiment_url, get_config_model_id, get_trackio_space_url

    args = trainer.args
    tags = [tags] if isinstance(tags, str) else list(tags or [])
    tags = list(dict.fromkeys([*tags, *trainer._tag_names, *(["hf_jobs"] if "JOB_ID" in os.environ else [])]))
    base_path = get_config_model_id(trainer.model.config)
    base = public_name(base_path) or "the base model"
    adapter = bool(getattr(trainer.model, "peft_config", None))
    hub_id = getattr(trainer, "hub_model_id", None) or args.hub_model_id
    output_dir = str(args.output_dir)
    model_id = hub_id or (output_dir if not os.path.isabs(output_dir) else Path(output_dir).name)
    model_name = model_name or Path(output_dir).name
    license_info = {"license": license} if license else dict(base_model_license(base_path))

    card_data = ModelCardData(
        base_model=None if is_local(base_path) or not base_path else base_path,
        datasets=[dataset_name] if dataset_name and not is_local(dataset_name) else None,
        library_name="peft" if adapter else "transformers",
        model_name=model_name,
        pipeline_tag="text-generation",
        tags=["generated_from_trainer", *tags, *(["lora"] if adapter else [])],
        **license_info,
    )

    if is_local(base_path):
        base_text = f"`{base}` (a local model folder)"
    else:
        base_text = f"[{base}](https://huggingface.co/{base})"
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
    if adapter and is_local(base_path):
        lines += [
            "`adapter_config.json` records the base model as the folder it was trained from on the training machine: "
            "load the base yourself, as above, rather than with `AutoPeftModelForCausalLM`.",
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


def _wandb_url() -> str | None:
    from transformers import is_wandb_available

    if not is_wandb_available():
        return None
    import wandb

    return wandb.run.url if wandb.run is not None else None
