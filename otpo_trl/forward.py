"""Model helpers below the trainer and the evaluation code: TRL 1.16's fused forward, the last-layer hidden states,
and token weights on the fused forward's per-token log-probs.

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


@contextlib.contextmanager
def capture_log_probs(model: torch.nn.Module):
    """Yield a dict whose `"log_probs"` holds the per-token log-probs (N, P+T-1) of `model`'s latest fused forward
    inside (`outputs.log_probs` of TRL 1.16's fused head)."""
    box = {}
    handle = model.register_forward_hook(lambda module, args, outputs: box.update(log_probs=outputs.log_probs))
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


def token_weight_problems(weights, mask: torch.Tensor, allow_negative: bool = False) -> str | None:
    """What is wrong with token weights, or None if nothing is (one host sync when the shape is right).

    Args:
        weights: should be a (2B, T-1) tensor, the weights of [chosen; rejected]; values where `mask` is False are not
            read.
        mask: (2B, T-1) bool, True at the completion tokens.
        allow_negative: whether weights < 0 are accepted (they reverse that token's preference).

    Returns:
        None when `weights` has `mask`'s shape and every weight at the completion tokens is finite (and >= 0 unless
        `allow_negative`); otherwise what is wrong: the type or shape, or the counts of NaN, infinite and negative
        weights at the completion tokens and where the first of them is.
    """
    if not isinstance(weights, torch.Tensor) or weights.shape != mask.shape:
        got = (
            f"shape {tuple(weights.shape)}" if isinstance(weights, torch.Tensor) else f"type {type(weights).__name__}"
        )
        return f"{got} where the masks' shape is {tuple(mask.shape)}"
    weights = weights.detach().masked_fill(~mask, 0)
    bad = ~weights.isfinite() if allow_negative else ~weights.isfinite() | (weights < 0)
    if not bad.any():
        return None
    kinds = {"NaN": weights.isnan(), "infinite": weights.isinf(), "negative": (weights < 0) & (not allow_negative)}
    counts = ", ".join(f"{int(where.sum())} {kind}" for kind, where in kinds.items() if where.any())
    row, pos = (int(i) for i in bad.nonzero()[0])
    side, pair = ("chosen", "rejected")[row // (len(mask) // 2)], row % (len(mask) // 2)
    return (
        f"{counts} among the {int(mask.sum())} completion tokens (the first: the {side} completion of pair {pair}, "
        f"position {pos}, weight {weights[row, pos].item()})"
    )


def weight_log_probs(outputs, weights: torch.Tensor) -> None:
    """Multiply the last `T-1` positions of a fused forward's `outputs.log_probs` (N, P+T-1) by `weights` (N, T-1),
    finite everywhere (0 outside the completions, where the log-probs are 0 too), in place of the output field.
    Prompt-learning PEFT prepends P virtual positions (label -100), which keep weight 1. WPO reads `log_probs -
    log_sum_sq_probs`: the latter is shifted alike, so WPO still sees unweighted probabilities."""
    log_probs = outputs.log_probs
    full = torch.ones_like(log_probs, dtype=weights.dtype)
    full[:, -weights.size(1) :] = weights
    weighted = log_probs * full.to(log_probs.dtype)
    if outputs.log_sum_sq_probs is not None:
        outputs.log_sum_sq_probs = outputs.log_sum_sq_probs + (weighted - log_probs).detach()
    outputs.log_probs = weighted


def sum_log_probs(per_token: torch.Tensor, mask: torch.Tensor, ld_alpha: float | None = None) -> torch.Tensor:
    """(2B,) sums of (2B, T-1) per-token log-probs of [chosen; rejected] over their completion tokens `mask`, as
    TRL 1.16's `DPOTrainer` sums them: with `ld_alpha` (LD-DPO), the tokens past the shorter completion of each pair
    count `ld_alpha` times."""
    per_token = per_token * mask
    if ld_alpha is None:
        return per_token.sum(dim=1)
    position = mask.cumsum(dim=1)
    shared = torch.minimum(*mask.sum(dim=1).chunk(2)).repeat(2).unsqueeze(1)
    return (per_token * (position <= shared)).sum(dim=1) + ld_alpha * (per_token * (position > shared)).sum(dim=1)


__all__ = [
    "REF_KEYS",
    "backbone",
    "capture_last_hidden",
    "capture_log_probs",
    "fused_forward",
    "last_hidden_state",
    "predicting_states",
    "sum_log_probs",
    "token_weight_problems",
    "unwrap_peft",
    "weight_log_probs",
]
