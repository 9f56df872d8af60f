"""Look at preference pairs through a model: per-token log-probs, OT weights and plans, implicit rewards.

The library behind `otpo-trl plot-weights` and `otpo-trl spread`, and the per-batch step of the scoring in
[`otpo_trl.evaluation`]. Pairs are tokenised as TRL 1.16's `DPOTrainer` does (`otpo_trl.tokenization`) and batched by
its `DataCollatorForPreference`; per-token log-probs and the policy's last hidden states come from the same fused
forward as in training (`otpo_trl.forward.fused_forward`), and the OT weights from [`ot_token_weights`]. So the numbers
here are the ones the trainer computes, without a trainer.

```python
policy, reference, tokenizer = load_model_and_tokenizer("out/otpo-lora")  # adapter: the reference is its base
stats = pair_token_stats(policy, reference, tokenizer, [inline_example("Hi?", "Hello!", "Go away.")], reg=1.0)
dpo_chosen, dpo_rejected = implicit_rewards(stats, beta=0.1, weighting="unweighted")
logps_only = pair_token_stats(policy, None, tokenizer, examples, token_weights=False)  # no OT problem solved
```
"""

import math
from dataclasses import dataclass, fields

import torch
from transformers import PreTrainedTokenizerBase
from trl.trainer.dpo_trainer import DataCollatorForPreference

from .forward import fused_forward
from .ot import ot_token_weights
from .otpo_config import OTPOConfig
from .tokenization import tokenize_pair


# How the per-token log-prob differences are summed into a completion's implicit reward (`implicit_rewards`):
# "unweighted" is DPO's plain sum (w = 1 on every completion token, no normalisation); "ot" weighs each token by its OT
# weight, as OTPO's loss does. Not `ot_weighting` (`ot_token_weights`' "ot" / "uniform"), which says how OTPO's weights
# are made.
REWARD_WEIGHTINGS = ("unweighted", "ot")
DEFAULT_MAX_LENGTH = next(f.default for f in fields(OTPOConfig) if f.name == "max_length")  # TRL's: 1024


def inline_example(prompt: str, chosen: str, rejected: str) -> dict[str, list[dict]]:
    """A conversational preference pair: one user turn, and one assistant turn on each side."""
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


# ------------------------------------------------------------------ per-token statistics of preference pairs


@dataclass
class PairStats:
    """Per-token statistics of B preference pairs, completion tokens only.

    Each side is left-aligned: position k of row i is the k-th completion token of pair i; past the completion's end
    the masks are False, ids the pad id and every value 0. Log-probs are of the token given everything before it.

    Attributes:
        chosen_ids, rejected_ids: (B, Lc), (B, Lr) long, the completion tokens.
        chosen_mask, rejected_mask: (B, Lc), (B, Lr) bool, True at the tokens.
        chosen_logps, rejected_logps: (B, Lc), (B, Lr) float32, the policy's per-token log-probs.
        ref_chosen_logps, ref_rejected_logps: the reference's; equal to the policy's when `has_reference` is False.
        chosen_weights, rejected_weights: (B, Lc), (B, Lr) float32, the OT weights, from the policy's last hidden
            state at the position predicting each token, as [`OTPOTrainer`] computes them; None when
            [`pair_token_stats`] was asked for none (`token_weights=False`).
        plan: (B, Lc, Lr) float32, the transport plan between the chosen and the rejected tokens; None with the
            weights.
        chosen_tokens, rejected_tokens: B lists of the tokens as text (each token decoded alone).
        has_reference: False when the policy is its own reference (all margins 0).
        chosen_hidden, rejected_hidden: (B, Lc, H), (B, Lr, H), the policy's last hidden states the weights are
            computed from (left-aligned like the ids; rows past a completion's end are arbitrary); None unless
            [`pair_token_stats`] was asked for them (`return_hidden`), e.g. to compute weights for other OT settings
            without another forward.
    """

    chosen_ids: torch.Tensor
    rejected_ids: torch.Tensor
    chosen_mask: torch.Tensor
    rejected_mask: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    chosen_weights: torch.Tensor | None
    rejected_weights: torch.Tensor | None
    plan: torch.Tensor | None
    chosen_tokens: list[list[str]]
    rejected_tokens: list[list[str]]
    has_reference: bool
    chosen_hidden: torch.Tensor | None = None
    rejected_hidden: torch.Tensor | None = None


def _left_align(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For mask (N, T): the index (N, L) of each row's True positions in order, L = most Trues, and its validity."""
    lengths = mask.sum(1)
    width = int(lengths.max()) if mask.numel() else 0
    order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, :width]
    valid = torch.arange(width, device=mask.device) < lengths[:, None]
    return order, valid


@torch.no_grad()
def pair_token_stats(
    policy: torch.nn.Module,
    reference: torch.nn.Module | None,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[dict],
    *,
    max_length: int | None = DEFAULT_MAX_LENGTH,
    token_weights: bool = True,
    return_hidden: bool = False,
    **ot_options,
) -> PairStats:
    """One forward of [chosen; rejected] through the policy (and the reference): per-token log-probs and OT weights.

    Args:
        policy, reference: as returned by [`load_model_and_tokenizer`] (`reference` None: the policy's own log-probs;
            `reference is policy`: the PeftModel with its adapter disabled).
        tokenizer: the policy's tokenizer.
        examples: B preference pairs in TRL's format (standard or conversational, explicit or implicit prompt).
        max_length: truncate prompt + completion to this many tokens, keeping the start (TRL's default, 1024).
        token_weights: compute the OT weights and plan (one [`ot_token_weights`] call). False: no OT problem is
            solved, and `chosen_weights`, `rejected_weights` and `plan` are None (for the log-probs or the hidden
            states alone).
        return_hidden: also keep the policy's hidden states in the result (`chosen_hidden`, `rejected_hidden`), so
            that [`ot_token_weights`] can be called on them again with other settings.
        **ot_options: keyword arguments of [`ot_token_weights`] (`reg`, `reg_m`, `cost`, `cost_scale`,
            `normalization`, `weighting`, `solver`, `max_iter`, `tol`; see [`ot_kwargs`]); only with
            `token_weights=True`.

    Returns:
        [`PairStats`], on the policy's device.
    """
    if ot_options and not token_weights:
        raise ValueError(
            f"OT options ({', '.join(ot_options)}) were given with `token_weights=False`: no OT is solved."
        )
    collator = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=max_length)
    device = next(policy.parameters()).device
    inputs = {k: v.to(device) for k, v in collator([tokenize_pair(e, tokenizer) for e in examples]).items()}
    # The hidden state at position t predicts token t + 1, as in OTPOTrainer.
    logps, hidden = fused_forward(policy, inputs, capture_hidden=token_weights or return_hidden)
    if reference is None:
        ref_logps = logps
    elif reference is policy:
        with policy.disable_adapter():
            ref_logps, _ = fused_forward(policy, inputs)
    else:
        ref_logps, _ = fused_forward(reference, inputs)  # loaded on the policy's device

    token_ids, shift_mask = inputs["input_ids"][:, 1:], inputs["completion_mask"][:, 1:].bool()
    sides = {}
    for side, rows in zip(("chosen", "rejected"), torch.arange(len(token_ids), device=logps.device).chunk(2)):
        index, valid = _left_align(shift_mask[rows])
        sides[side] = {
            "ids": token_ids[rows].gather(1, index).masked_fill(~valid, tokenizer.pad_token_id),
            "mask": valid,
            "logps": logps[rows].gather(1, index).float() * valid,
            "ref_logps": ref_logps[rows].gather(1, index).float() * valid,
            "hidden": None
            if hidden is None
            else hidden[rows][torch.arange(len(rows), device=index.device)[:, None], index],
        }
    chosen, rejected = sides["chosen"], sides["rejected"]
    chosen_w = rejected_w = plan = None
    if token_weights:
        chosen_w, rejected_w, info = ot_token_weights(
            chosen["hidden"], rejected["hidden"], chosen["mask"], rejected["mask"], return_info=True, **ot_options
        )
        plan = info.plan

    def decode(ids, mask):
        return [[tokenizer.decode([t]) for t in row[m].tolist()] for row, m in zip(ids, mask)]

    return PairStats(
        chosen_ids=chosen["ids"],
        rejected_ids=rejected["ids"],
        chosen_mask=chosen["mask"],
        rejected_mask=rejected["mask"],
        chosen_logps=chosen["logps"],
        rejected_logps=rejected["logps"],
        ref_chosen_logps=chosen["ref_logps"],
        ref_rejected_logps=rejected["ref_logps"],
        chosen_weights=chosen_w,
        rejected_weights=rejected_w,
        plan=plan,
        chosen_tokens=decode(chosen["ids"], chosen["mask"]),
        rejected_tokens=decode(rejected["ids"], rejected["mask"]),
        has_reference=reference is not None,
        chosen_hidden=chosen["hidden"] if return_hidden else None,
        rejected_hidden=rejected["hidden"] if return_hidden else None,
    )


# ------------------------------------------------------------------ implicit rewards


def implicit_rewards(stats: PairStats, beta: float, weighting: str = "ot") -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's implicit rewards `beta * sum_t w_t (log pi(y_t) - log pi_ref(y_t))` of each pair's two completions.

    Args:
        stats: from [`pair_token_stats`].
        beta: DPO's beta.
        weighting: one of [`REWARD_WEIGHTINGS`]: `"unweighted"` (w = 1 on every completion token, no normalisation:
            DPO's plain sum) or `"ot"` (the OT weights of `stats`: OTPO; `stats` made with `token_weights=True`).

    Returns:
        `(chosen_rewards, rejected_rewards)`, each (B,) float32.
    """
    if weighting not in REWARD_WEIGHTINGS:
        raise ValueError(f"`weighting` must be one of {list(REWARD_WEIGHTINGS)}, got {weighting!r}.")
    if weighting == "ot" and stats.chosen_weights is None:
        raise ValueError("`weighting='ot'` needs OT weights: these stats were made with `token_weights=False`.")
    rewards = []
    for side in ("chosen", "rejected"):
        mask = getattr(stats, f"{side}_mask")
        weights = mask.float() if weighting == "unweighted" else getattr(stats, f"{side}_weights")
        delta = getattr(stats, f"{side}_logps") - getattr(stats, f"ref_{side}_logps")
        rewards.append(beta * (weights * delta * mask).sum(1))
    return rewards[0], rewards[1]


def preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """Accuracy and mean margin of (N,) implicit rewards, as TRL logs `rewards/accuracies` and `rewards/margins`.

    A pair is correct when its chosen reward is strictly larger: ties (margin exactly 0, e.g. without a reference)
    count as not correct, as in TRL.
    """
    margins = (chosen_rewards - rejected_rewards).double()
    empty = margins.numel() == 0
    return {
        "accuracy": math.nan if empty else (margins > 0).double().mean().item(),
        "margin_mean": math.nan if empty else margins.mean().item(),
        "chosen_reward_mean": math.nan if empty else chosen_rewards.double().mean().item(),
        "rejected_reward_mean": math.nan if empty else rejected_rewards.double().mean().item(),
    }


__all__ = [
    "DEFAULT_MAX_LENGTH",
    "REWARD_WEIGHTINGS",
    "PairStats",
    "implicit_rewards",
    "inline_example",
    "pair_token_stats",
    "preference_metrics",
]
