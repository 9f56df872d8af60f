"""Loading: models and tokenizers by the one rule for "Hub id or local path" (`otpo_trl.local_paths`), the tokenizer
setup, and models for analysis.

`scripts/train.py` (through `otpo_trl.cli.train`) and the analysis tools load through here, so that a model path is
checked, and a tokenizer set up, the same way everywhere.

```python
policy, reference, tokenizer = load_model_and_tokenizer("out/otpo-lora")  # adapter: the reference is its base
```
"""

import json
import logging
import re
from pathlib import Path

import huggingface_hub
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from trl.trainer.utils import add_fused_lm_head

from .local_paths import HUB_PAGES, looks_like_local_path, read_chat_template, resolve_model_path


logger = logging.getLogger(__name__)

# For tokenizers without a chat template (base models): ChatML markers as plain text, every turn closed by EOS so
# that completions teach the model to stop.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def check_not_adapter(name_or_path: str, what: str) -> None:
    """Raise a `ValueError` if the local folder `name_or_path` is a PEFT adapter (has `adapter_config.json`), where a
    model is expected (`scripts/train.py` trains from a model: DPOTrainer cannot take an adapter's folder)."""
    path = Path(name_or_path).expanduser()
    if not (path / "adapter_config.json").is_file():
        return
    try:
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        base = None
    resume = (
        f" To continue the run it belongs to, pass `--resume_from_checkpoint {name_or_path}` instead."
        if re.fullmatch(r"checkpoint-\d+", path.name)
        else ""
    )
    raise ValueError(
        f"{what} {name_or_path} is a PEFT adapter (it has adapter_config.json), not a model. Pass its base model "
        f"as {what} ({base or 'its base_model_name_or_path'}), with `use_peft: true` to train a new adapter on it; "
        "to train on from this adapter's weights, merge it into its base first (peft's `merge_and_unload()`, then "
        f"`save_pretrained`) and pass the merged folder.{resume}"
    )


def setup_tokenizer(tokenizer: PreTrainedTokenizerBase, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """Set up `tokenizer` in place for preference data, as training and analysis use it, and return it.

    The chat template is `chat_template` (a Jinja template, or the path of a file holding one: see
    [`read_chat_template`], a `ValueError` for anything else) if given, else the tokenizer's own, else
    [`DEFAULT_CHAT_TEMPLATE`]; the pad token is EOS if it has none.
    """
    if chat_template is not None:
        tokenizer.chat_template = read_chat_template(chat_template)
    elif tokenizer.chat_template is None:
        logger.info("The tokenizer has no chat template; using the default ChatML-style one.")
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_device(device: str = "auto") -> torch.device:
    """`"auto"`: the GPU if there is one, else the CPU; anything else is passed to `torch.device`."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)


def from_pretrained(loader, name_or_path: str, what: str, **kwargs):
    """`loader.from_pretrained(name_or_path, **kwargs)`; a name that is no local folder and that the Hub cannot give
    raises one `FileNotFoundError` that says both (offline: that the Hub cannot be reached)."""
    try:
        return loader.from_pretrained(name_or_path, **kwargs)
    except OSError as err:
        if Path(name_or_path).expanduser().exists():
            raise
        text = str(err)
        offline = huggingface_hub.constants.HF_HUB_OFFLINE or "connect" in text or "offline" in text.lower()
        if offline:
            why = "and the Hub cannot be reached (offline) to look it up as a model id, nor is it in the local cache"
        else:
            why = f"and the Hub could not give it as a model id ({text.strip().splitlines()[0][:200]})"
        raise FileNotFoundError(
            f"{what} {name_or_path!r}: no local folder of that name (relative to {Path.cwd()}), {why}. Check the name "
            "or path."
        ) from err


def _load_causal_lm(name_or_path: str, dtype, device: torch.device, what: str) -> PreTrainedModel:
    model = from_pretrained(AutoModelForCausalLM, name_or_path, what, dtype=dtype)
    # Per-token log-probs without (B, T, V) logits, as DPOTrainer computes them; generation is left unchanged.
    add_fused_lm_head(model)
    return model.to(device).eval()


def load_model_and_tokenizer(
    path: str, ref: str | None = None, dtype: str | torch.dtype = "auto", device: str | torch.device = "auto"
) -> tuple[torch.nn.Module, torch.nn.Module | None, PreTrainedTokenizerBase]:
    """Load a policy, its reference and the tokenizer, in eval mode on `device`.

    Args:
        path: a model folder or Hub id, or a PEFT adapter folder (one with `adapter_config.json`).
        ref: the reference model (folder or Hub id). For an adapter it is also the base the adapter is loaded on,
            instead of the `base_model_name_or_path` of its `adapter_config.json`.
        dtype: `"auto"` (the checkpoint's), `"float32"`, `"bfloat16"`, ... or a `torch.dtype`.
        device: `"auto"` (CUDA if available, else CPU), `"cpu"`, `"cuda:1"`, ...

    Returns:
        `(policy, reference, tokenizer)`. The reference is a separate model when `ref` is given for a full model;
        the policy itself for an adapter (a `PeftModel`, whose reference forward runs under `disable_adapter()`, i.e.
        the base, as DPOTrainer does with LoRA); `None` for a full model without `ref`: the policy is then its own
        reference and every implicit reward and margin is 0 (a warning says so). The tokenizer has a pad token
        (EOS if it had none) and a chat template (the ChatML-style default if it had none), as in `scripts/train.py`.

    Raises:
        FileNotFoundError: `path`, `ref` or the adapter's base is neither a local folder nor a loadable Hub id.
    """
    device = resolve_device(device) if isinstance(device, str) else device
    dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    path = resolve_model_path(path, "Model")
    ref = None if ref is None else resolve_model_path(ref, "Reference model")
    is_adapter = (Path(path) / "adapter_config.json").exists()

    if is_adapter:
        from peft import PeftConfig, PeftModel

        base = ref or PeftConfig.from_pretrained(path).base_model_name_or_path
        if base is None:
            raise ValueError(f"The adapter {path} names no base model (`base_model_name_or_path`); pass `ref`.")
        # Where the recorded base is found neither locally nor on the Hub, say where it comes from and what to do.
        hint = (
            f" The adapter {path} records this base (`base_model_name_or_path` in adapter_config.json; a relative "
            "path is relative to where it was trained). Pass `ref` (`--ref`) with the base's folder or Hub id to load "
            "it from elsewhere."
        )
        if ref is None:
            base = resolve_model_path(base, f"The adapter {path} has base model", hint)
        logger.info(f"Loading the adapter {path} on its base {base}; the reference is the base (adapter disabled).")
        try:
            base_model = _load_causal_lm(base, dtype, device, "Base model")
        except FileNotFoundError as err:
            if ref is not None:
                raise
            raise FileNotFoundError(f"{err}{hint}") from err
        # The fused head goes on the base before PEFT wraps it (TRL's order); LoRA layers are found at call time.
        policy = PeftModel.from_pretrained(base_model, path).to(device).eval()
        reference = policy
    else:
        policy = _load_causal_lm(path, dtype, device, "Model")
        reference = None if ref is None else _load_causal_lm(ref, dtype, device, "Reference model")
        if reference is None:
            logger.warning(
                "No reference model: the policy is its own reference, so every implicit reward and margin (unweighted "
                "and OT) is 0. Pass the model it was trained from as `ref` (`--ref`)."
            )

    has_tokenizer = (Path(path) / "tokenizer_config.json").exists() or not is_adapter
    tokenizer_path = path if has_tokenizer else (ref or base)
    tokenizer = setup_tokenizer(from_pretrained(AutoTokenizer, tokenizer_path, "Tokenizer"))
    return policy, reference, tokenizer


__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "HUB_PAGES",
    "check_not_adapter",
    "from_pretrained",
    "load_model_and_tokenizer",
    "looks_like_local_path",
    "read_chat_template",
    "resolve_device",
    "resolve_model_path",
    "setup_tokenizer",
]
