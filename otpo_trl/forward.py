"""Model helpers below the trainer and the evaluation code: TRL 1.16's fused forward and the last-layer hidden states.

`OTPOTrainer` (training) and `otpo_trl.inspection` (evaluation) both use these; neither imports the other for them.
"""

import contextlib

import torch
from accelerate.utils import is_peft_model


REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")  # precomputed reference values in a batch, not model inputs


def unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The causal LM inside a PeftModel (`get_base_model()`), or `model` itself if it is not one."""
    return model.get_base_model() if is_peft_model(model) else model


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer under a causal LM's head (`base_model`, e.g. `LlamaModel`), through a PeftModel if any: the
    module whose output is the last-layer hidden states."""
    return unwrap_peft(model).base_model


def last_hidden_state(output) -> torch.Tensor:
    """The detached last-layer hidden states of a backbone's forward `output` (a `ModelOutput` or a tuple)."""
    return (output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]).detach()


@contextlib.contextmanager
def capture_last_hidden(module: torch.nn.Module):
    """Yield a dict whose `"hidden"` holds the detached `last_hidden_state` of `module`'s next forward (a backbone)."""
    box = {}

    def hook(module, args, output):
        box["hidden"] = last_hidden_state(output)

    handle = module.register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


def predicting_states(hidden: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The hidden states (N, seq_len, H) aligned with the shifted labels: the state at position t-1 predicts token t.

    `hidden` is (N, P + T, H) with `T = seq_len + 1` the input length (P virtual positions of prompt-learning PEFT)."""
    return hidden[:, -seq_len - 1 : -1]


def fused_forward(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], capture_hidden: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fused-LM-head forward of a collated [chosen; rejected] batch, as TRL 1.16's `DPOTrainer` calls the models.

    Training makes this call through TRL (the trainer's hooks then capture and weight); `concatenated_forward` and the
    analysis code (`otpo_trl.inspection.pair_token_stats`) make it here.

    Args:
        model: a causal LM with TRL's fused head (`trl.trainer.utils.add_fused_lm_head`), or a PeftModel on one.
        inputs: a batch of `DataCollatorForPreference`: `input_ids`, `attention_mask`, `completion_mask`, each (N, T)
            (precomputed reference values are not passed to the model).
        capture_hidden: also return the last-layer hidden states.

    Returns:
        `(log_probs, hidden)`: log_probs (N, T-1), the log-prob of token t+1 at position t (0 outside completions);
        hidden (N, T-1, H), the detached last-layer state at position t (the one predicting token t+1), or None.
    """
    model_kwargs = {k: v for k, v in inputs.items() if k not in ("completion_mask", *REF_KEYS)}
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    seq_len = labels.size(1) - 1
    capture = capture_last_hidden(backbone(model)) if capture_hidden else contextlib.nullcontext({})
    with capture as box:
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True, use_cache=False)
    hidden = predicting_states(box["hidden"], seq_len) if capture_hidden else None
    return outputs.log_probs[:, -seq_len:], hidden  # prompt-learning PEFT prepends virtual positions


__all__ = [
    "REF_KEYS",
    "backbone",
    "capture_last_hidden",
    "fused_forward",
    "last_hidden_state",
    "predicting_states",
    "unwrap_peft",
]
