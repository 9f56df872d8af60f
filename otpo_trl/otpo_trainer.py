"""OTPOTrainer: TRL's DPOTrainer with optimal-transport token weights.

The seam (mirrors TRL 1.16's `DPOTrainer._compute_loss`): TRL calls the model's fused LM head
(`model(..., labels=..., fused_lm_head=True)`) first for the policy and then for the reference, and sums the returned
per-token `log_probs`. We wrap that fused forward so that, inside `compute_loss`, the policy call also captures the
last-layer hidden states, solves the OT problem once per batch, and both calls return *weighted* per-token log-probs.
Everything downstream (every `loss_type` and their mixtures, LD, f-divergences, MoE aux loss, metrics) is TRL's own
code, run on OTPO's weighted sums. `tests/test_trainer.py` tests this seam.
"""

import contextlib
import textwrap
import types
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import is_peft_model
from datasets.fingerprint import Hasher
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback
from transformers.utils import logging
from trl import DPOConfig, DPOTrainer

from .ot_weights import ot_token_weights
from .otpo_config import OTPOConfig


logger = logging.get_logger(__name__)

_REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


@dataclass
class _OTBatch:
    """State shared by the policy and the reference forward of one `compute_loss` call."""

    inputs: dict[str, Any]
    shift_mask: torch.Tensor  # (2B, T-1) bool, the completion tokens of [chosen; rejected]
    weights: torch.Tensor | None = None  # (2B, T-1) float, set by the policy forward


@contextlib.contextmanager
def capture_last_hidden(backbone: torch.nn.Module):
    """Yield a dict whose `"hidden"` holds the detached `last_hidden_state` of `backbone`'s next forward."""
    box = {}

    def hook(module, args, output):
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        box["hidden"] = hidden.detach()

    handle = backbone.register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


def predicting_states(hidden: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The hidden states (N, seq_len, H) aligned with the shifted labels: the state at position t-1 predicts token t.

    `hidden` is (N, P + T, H) with `T = seq_len + 1` the input length (P virtual positions of prompt-learning PEFT)."""
    return hidden[:, -seq_len - 1 : -1]


class OTWeightHistogramCallback(TrainerCallback):
    """Writes a histogram of the OT token weights (completion tokens of the last training batch) to TensorBoard at
    every logging step, beside the `ot/*` scalars. Added by `OTPOTrainer` when `report_to` includes tensorboard."""

    def __init__(self, trainer: "OTPOTrainer"):
        self.trainer = trainer

    def on_log(self, args, state, control, logs=None, **kwargs):
        weights = self.trainer._ot_last_weights
        if weights is None or "loss" not in (logs or {}):  # training logs only
            return
        for callback in self.trainer.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
                callback.tb_writer.add_histogram("ot/token_weights", weights, state.global_step)


class OTPOTrainer(DPOTrainer):
    """
    Trainer for Optimal-Transport token-weighted preference optimisation (OTPO).

    A drop-in replacement for [`~trl.DPOTrainer`]: same constructor, same data formats, same `loss_type`s. For each
    preference pair, the policy's (detached) last-layer hidden states of the chosen and rejected completion tokens
    define an unbalanced OT problem (see [`ot_token_weights`]); the plan's marginals weight the per-token log-probs of
    both the policy and the reference before TRL sums them into the DPO loss.

    Notes:
        - WPO (`use_weighting=True`) keeps weighting pairs by the policy's *unweighted* sequence probability.
        - The `sft` loss term averages the OT-weighted chosen log-probs.
        - `precompute_ref_log_probs=True` stores per-token reference log-probs (width `max_length`), since the
          weights depend on the current policy and can only be applied at train time.
    """

    _tag_names = ["trl", "otpo"]
    _name = "OTPO"
    _paper = {
        "title": "Optimal Transport-Based Token Weighting scheme for Enhanced Preference Optimization",
        "id": "2505.18720",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @inproceedings{li2025otpo,
                title        = {{Optimal Transport-Based Token Weighting scheme for Enhanced Preference Optimization}},
                author       = {Meng Li and Guangda Huzhang and Haibo Zhang and Xiting Wang and Anxiang Zeng},
                year         = 2025,
                booktitle    = {Proceedings of the 63rd Annual Meeting of the Association for Computational Linguistics (Volume 1: Long Papers)},
                pages        = {21311--21334},
                eprint       = {arXiv:2505.18720},
            }"""),
    }

    def __init__(self, model, ref_model=None, args: OTPOConfig | None = None, *pargs, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = OTPOConfig(f"{name.split('/')[-1]}-OTPO")
        elif not isinstance(args, OTPOConfig):
            if not isinstance(args, DPOConfig):
                raise TypeError(f"`args` must be an `OTPOConfig`, got {type(args).__name__}.")
            raise TypeError(
                "`args` is a `DPOConfig`; OTPOTrainer needs an `OTPOConfig` (same fields plus the `ot_*` ones): "
                "replace `DPOConfig(...)` with `OTPOConfig(...)`."
            )
        if args.precompute_ref_log_probs and args.max_length is None:
            raise ValueError(
                "`precompute_ref_log_probs=True` needs `max_length`: OTPO stores per-token reference log-probs "
                "(the OT weights are only known at train time), padded to `max_length`."
            )
        self._ot_batch: _OTBatch | None = None
        self._ref_per_token: dict | None = None  # set while precomputing reference log-probs
        self._ot_wrapped = False
        self._ot_warned_fallback = False
        self._ot_last_weights: torch.Tensor | None = None  # (n_tokens,) of the last training batch, for TensorBoard
        self._ot_histogram = False
        super().__init__(model, ref_model, args, *pargs, **kwargs)
        self._install_ot_forward()
        self._ot_histogram = "tensorboard" in (self.args.report_to or [])
        if self._ot_histogram:
            self.add_callback(OTWeightHistogramCallback(self))

    # ------------------------------------------------------------------ the seam with TRL's fused forward

    def _install_ot_forward(self) -> None:
        """Wrap the fused forwards TRL 1.16 installs (in `DPOTrainer.__init__`, before precomputing reference
        log-probs) as an instance `forward` on the unwrapped causal LM (the PEFT base model) and on the reference."""
        if self._ot_wrapped:
            return
        self._ot_wrapped = True
        self._wrap_fused_forward(self.model.get_base_model() if is_peft_model(self.model) else self.model)
        if self.ref_model is not None:
            self._wrap_fused_forward(self.accelerator.unwrap_model(self.ref_model))

    def _wrap_fused_forward(self, module: torch.nn.Module) -> None:
        fused_forward = module.forward
        trainer = self

        def forward(self, *args, fused_lm_head=False, **kwargs):
            batch = trainer._ot_batch
            if fused_lm_head and trainer._ref_per_token is not None:
                outputs = fused_forward(*args, fused_lm_head=True, **kwargs)
                trainer._ref_per_token["log_probs"] = outputs.log_probs
                return outputs
            if not fused_lm_head or batch is None:
                return fused_forward(*args, fused_lm_head=fused_lm_head, **kwargs)
            if batch.weights is None:  # TRL runs the policy first: this call sets the batch's weights
                with capture_last_hidden(self.base_model) as box:
                    outputs = fused_forward(*args, fused_lm_head=True, **kwargs)
                seq_len = batch.shift_mask.size(1)
                batch.weights = trainer._compute_ot_weights(
                    predicting_states(box["hidden"], seq_len), batch.shift_mask
                )
                if trainer.precompute_ref_logps:
                    trainer._weight_precomputed_ref(batch)
            else:
                outputs = fused_forward(*args, fused_lm_head=True, **kwargs)
            trainer._apply_weights(outputs, batch.weights)
            return outputs

        module.forward = types.MethodType(forward, module)

    def concatenated_forward(self, model, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One forward of the concatenated [chosen; rejected] batch through TRL's fused LM head (no full logits).

        Args:
            model: the policy (possibly wrapped by accelerate / PEFT).
            inputs: a collated batch: `input_ids`, `attention_mask`, `completion_mask`, each (2B, T).

        Returns:
            dict with `per_token_logps` (2B, T-1), unweighted log-prob of token t+1; `completion_mask` (2B, T-1) bool,
            the completion tokens among them; `hidden_states` (2B, T-1, H), detached last-layer state at position t,
            the one predicting token t+1 (only the last layer is kept).
        """
        model_kwargs = {k: v for k, v in inputs.items() if k not in ("completion_mask", *_REF_KEYS)}
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        unwrapped = self.accelerator.unwrap_model(model)
        causal_lm = unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped
        with capture_last_hidden(causal_lm.base_model) as box:
            outputs = model(**model_kwargs, labels=labels, fused_lm_head=True, use_cache=False)
        seq_len = inputs["completion_mask"].size(1) - 1
        return {
            "per_token_logps": outputs.log_probs[:, -seq_len:],
            "completion_mask": inputs["completion_mask"][:, 1:].bool(),
            "hidden_states": predicting_states(box["hidden"], seq_len),
        }

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        shift_mask = inputs["completion_mask"][:, 1:].bool()
        self._ot_batch = _OTBatch(inputs=inputs, shift_mask=shift_mask)
        try:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self._ot_batch = None

    @staticmethod
    def _apply_weights(outputs, weights: torch.Tensor) -> None:
        """Multiply the last `T-1` positions of `outputs.log_probs` (2B, P+T-1) by `weights` (2B, T-1) in place of
        the output field. Prompt-learning PEFT prepends P virtual positions; those keep weight 1 (their label is -100).
        """
        log_probs = outputs.log_probs
        full = torch.ones_like(log_probs, dtype=weights.dtype)
        full[:, -weights.size(1) :] = weights
        weighted = log_probs * full.to(log_probs.dtype)
        if outputs.log_sum_sq_probs is not None:
            # WPO reads `log_probs - log_sum_sq_probs`: shift the latter so WPO still sees unweighted probabilities.
            outputs.log_sum_sq_probs = outputs.log_sum_sq_probs + (weighted - log_probs).detach()
        outputs.log_probs = weighted

    # ------------------------------------------------------------------ OT weights and their metrics

    def _compute_ot_weights(self, hidden: torch.Tensor, shift_mask: torch.Tensor) -> torch.Tensor:
        """hidden (2B, T-1, H): the state predicting each token of [chosen; rejected]; returns weights (2B, T-1)."""
        args = self.args
        chosen_hidden, rejected_hidden = hidden.chunk(2, dim=0)
        chosen_mask, rejected_mask = shift_mask.chunk(2, dim=0)
        with warnings.catch_warnings():  # a fallback is logged once below and counted in `ot/fallbacks`
            warnings.filterwarnings("ignore", message="OT weights: ", category=UserWarning)
            chosen_w, rejected_w, info = ot_token_weights(
                chosen_hidden,
                rejected_hidden,
                chosen_mask,
                rejected_mask,
                reg=args.ot_reg,
                reg_m=args.ot_reg_m,
                cost=args.ot_cost,
                normalization=args.ot_normalization,
                solver=args.ot_solver,
                max_iter=args.ot_max_iter,
                tol=args.ot_tol,
                return_info=True,
                return_plan=False,
            )
        weights = torch.cat([chosen_w, rejected_w], dim=0)
        self._log_ot_metrics(weights, shift_mask, info)
        if self._ot_histogram and self.model.training:
            self._ot_last_weights = weights[shift_mask].cpu()
        return weights

    def _log_ot_metrics(self, weights: torch.Tensor, mask: torch.Tensor, info) -> None:
        mode = "train" if self.model.training else "eval"
        lengths = mask.sum(dim=1)
        has_tokens = lengths > 0
        p = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-12)
        entropy = -(p * p.clamp_min(1e-30).log()).sum(dim=1)
        # Entropy normalised by log(length): 1 for uniform weights, lower as the weights concentrate.
        norm_entropy = torch.where(lengths > 1, entropy / lengths.clamp_min(2).log(), torch.ones_like(entropy))
        stats = torch.stack(
            [
                info.plan_mass.float().mean(),
                weights.max(),
                norm_entropy[has_tokens].mean() if has_tokens.any() else weights.new_tensor(1.0),
                info.fallback.float().sum(),
            ]
        ).float()
        stats = self.accelerator.gather_for_metrics(stats.unsqueeze(0)).view(-1, 4)
        metrics = self._metrics[mode]
        metrics["ot/plan_mass"].append(stats[:, 0].mean().item())
        metrics["ot/weight_max"].append(stats[:, 1].max().item())
        metrics["ot/weight_entropy"].append(stats[:, 2].mean().item())
        metrics["ot/fallbacks"].append(stats[:, 3].sum().item())
        metrics["ot/solver_iters"].append(float(info.n_iter))
        if stats[:, 3].sum() > 0 and not self._ot_warned_fallback:
            self._ot_warned_fallback = True
            logger.warning(
                "Non-finite hidden states or OT costs in a preference pair: that pair falls back to uniform token "
                "weights. The count is logged as `ot/fallbacks`. (Shown once.)"
            )

    # ------------------------------------------------------------------ precomputed (per-token) reference log-probs

    def compute_ref_log_probs(self, model, inputs):
        """Per-token reference log-probs of one padded batch, (B, max_length) each for chosen and rejected.

        TRL 1.16 returns the summed log-probs here; OTPO keeps them per token (zero-padded to a fixed width so TRL's
        `_precompute_ref_logps` can concatenate batches) and weights them at train time.
        """
        self._install_ot_forward()
        self._ref_per_token = {}
        try:
            super().compute_ref_log_probs(model, inputs)  # TRL's adapter, no-grad and autocast handling
            log_probs = self._ref_per_token["log_probs"]
        finally:
            self._ref_per_token = None
        seq_len = inputs["completion_mask"].size(1) - 1
        per_token = log_probs[:, -seq_len:].float()
        per_token = torch.nn.functional.pad(per_token, (0, self.args.max_length - seq_len))
        return per_token.chunk(2, dim=0)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        self._install_ot_forward()  # TRL calls this at the end of its __init__, before ours resumes
        # Per-token values are stored under TRL's column names: keep their cache apart from DPOTrainer's sums.
        if self._precompute_model_hash is not None and not getattr(self, "_otpo_hash_tagged", False):
            self._precompute_model_hash = Hasher.hash(
                (self._precompute_model_hash, "otpo-per-token", self.args.max_length)
            )
            self._otpo_hash_tagged = True
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def _weight_precomputed_ref(self, batch: _OTBatch) -> None:
        """Replace the batch's per-token reference log-probs (B, max_length) by their OT-weighted sums (B,), which
        TRL 1.16's `_compute_loss` reads after the policy forward."""
        inputs, mask = batch.inputs, batch.shift_mask
        seq_len = mask.size(1)
        ref = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]], dim=0)
        if ref.dim() != 2 or ref.size(1) < seq_len:
            raise ValueError(
                f"Precomputed reference log-probs have shape {tuple(ref.shape)}; OTPO needs per-token values of width "
                f">= {seq_len}. Were they computed by DPOTrainer? Recompute them with OTPOTrainer."
            )
        ref = ref[:, :seq_len].to(batch.weights.device) * batch.weights * mask
        if self.ld_alpha is None:
            ref_logps = ref.sum(dim=1)
        else:  # LD-DPO, as in TRL 1.16: tokens past the shorter completion count ld_alpha times
            pos = mask.cumsum(dim=1)
            shared = torch.minimum(*mask.sum(dim=1).chunk(2)).repeat(2).unsqueeze(1)
            ref_logps = (ref * (pos <= shared)).sum(dim=1) + self.ld_alpha * (ref * (pos > shared)).sum(dim=1)
        inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = ref_logps.chunk(2, dim=0)


__all__ = ["OTPOTrainer", "OTWeightHistogramCallback", "capture_last_hidden", "predicting_states"]
