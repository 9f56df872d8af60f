"""OTPOTrainer: TRL's DPOTrainer with optimal-transport token weights.

The seam, in one place: TRL 1.16's `DPOTrainer._compute_loss` runs the policy and then the reference through the
models' fused LM head (`model(..., labels=..., fused_lm_head=True)`) and sums the returned per-token `log_probs`.
`OTPOTrainer` sets one `_OTStep` per batch (`_ot_step`, a context manager) and registers forward hooks on its policy
and reference models. The hook of the policy call captures the last-layer hidden states, computes the token weights
(`compute_token_weights`, OT by default) and weights the policy's per-token log-probs; the hook of the reference call
weights the reference's with the same weights. Everything downstream (every `loss_type` and their mixtures, LD,
f-divergences, MoE aux loss, metrics) is TRL's own code, run on OTPO's weighted sums. Hooks, not a patched `forward`:
the models' `forward` (and so `generate`) stay TRL's, and several trainers may share a model.
"""

import contextlib
import math
import textwrap
import warnings
import weakref
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from datasets.fingerprint import Hasher
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.utils import logging
from trl import DPOConfig, DPOTrainer

from .forward import backbone, fused_forward, last_hidden_state, predicting_states
from .model_card import CheckpointCardCallback, save_model_card
from .ot import ot_token_weights
from .otpo_config import OTPOConfig, ot_kwargs


logger = logging.get_logger(__name__)


@dataclass
class _OTStep:
    """The state of one batch, shared by its fused forwards: set by `OTPOTrainer._ot_step`, read by the hooks."""

    trainer: "OTPOTrainer"
    inputs: dict[str, Any]  # the collated batch; precomputed per-token reference values are replaced by weighted sums
    shift_mask: torch.Tensor  # (2B, T-1) bool: the completion tokens of [chosen; rejected], aligned with log_probs
    reference_only: bool = False  # precomputing reference log-probs: every fused call is the reference
    role: str | None = None  # of the fused call in progress: "policy" or "reference"
    hidden: torch.Tensor | None = None  # (2B, P+T, H) detached last-layer states of the policy call
    weights: torch.Tensor | None = None  # (2B, T-1) token weights, set by the policy call
    policy_log_probs: torch.Tensor | None = None  # (2B, P+T-1) the policy's unweighted per-token log-probs
    ref_log_probs: torch.Tensor | None = None  # (2B, P+T-1) unweighted, kept by a `reference_only` call


# The batch in progress (None outside `compute_loss` / `compute_ref_log_probs`): a context variable, not a trainer
# field, so that hooks of several trainers on a shared model act only for the trainer whose batch it is.
_ACTIVE_STEP: ContextVar[_OTStep | None] = ContextVar("otpo_active_step", default=None)


def _call_weakly(method):
    """A hook calling `method` (a bound method) through a weak reference; a no-op once its object is gone."""
    ref = weakref.WeakMethod(method)

    def hook(*args, **kwargs):
        bound = ref()
        return None if bound is None else bound(*args, **kwargs)

    return hook


def _remove_hooks(handles) -> None:
    for handle in handles:
        handle.remove()


def console_logs(logs: dict[str, Any], max_iter: int) -> dict[str, Any]:
    """The logs as the console shows them: `ot/fallbacks` only when a pair fell back, `ot/solver_iters` only when the
    solver stopped at `ot_max_iter` (it did not converge). Every key still reaches the loggers and `log_history`."""
    quiet = {}
    for key, value in logs.items():
        if key.endswith("ot/fallbacks") and value == 0:
            continue
        if key.endswith("ot/solver_iters") and value < max_iter:
            continue
        quiet[key] = value
    return quiet


class _ConsoleLogs:
    """Prints [`console_logs`] of the logs (the training arguments are OTPOConfig's: `ot_max_iter`)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return super().on_log(args, state, control, logs=console_logs(logs or {}, args.ot_max_iter), **kwargs)


class OTPOProgressCallback(_ConsoleLogs, ProgressCallback):
    """transformers' `ProgressCallback`, printing [`console_logs`]."""


class OTPOPrinterCallback(_ConsoleLogs, PrinterCallback):
    """transformers' `PrinterCallback` (with `disable_tqdm`), printing [`console_logs`]."""


_CONSOLE_CALLBACKS = {ProgressCallback: OTPOProgressCallback, PrinterCallback: OTPOPrinterCallback}


def _quiet_console_logs(trainer: "OTPOTrainer") -> None:
    """Swap transformers' console callback for its OTPO version, which prints [`console_logs`]: OTPO's per-step line
    then has the length of DPOTrainer's plus three `ot/*` values. Targets transformers 5.24's callbacks, which print
    every logged key."""
    for callback in list(trainer.callback_handler.callbacks):
        if type(callback) in _CONSOLE_CALLBACKS:
            trainer.callback_handler.remove_callback(callback)
            trainer.callback_handler.add_callback(_CONSOLE_CALLBACKS[type(callback)]())


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
    both the policy and the reference before TRL sums them into the DPO loss. Another token weighting: subclass and
    override [`compute_token_weights`].

    Notes:
        - WPO (`use_weighting=True`) keeps weighting pairs by the policy's *unweighted* sequence probability.
        - The `sft` loss term averages the OT-weighted chosen log-probs.
        - `precompute_ref_log_probs=True` stores per-token reference log-probs (width `max_length`, rounded up to
          `pad_to_multiple_of`), since the weights depend on the current policy and can only be applied at train time.

    What this relies on in TRL 1.16 (`trl>=1.16,<1.17`, checked by `tests/test_trainer.py`):
        - `DPOTrainer._compute_loss` calls the policy, then (unless precomputed) the reference, each once per batch as
          `model(..., labels=..., fused_lm_head=True)`, and sums `outputs.log_probs[:, -(T-1):]` (with `ld_alpha`,
          shared and tail parts); with PEFT and no `ref_model`, the reference is the policy under TRL's
          `use_adapter` (adapters disabled, or the adapter named "ref" active). A reference call without a policy
          call before it is an error here, not a silent unweighted loss.
        - WPO reads `outputs.log_sum_sq_probs` (`FusedCausalLMOutput`); `_metrics[mode]` collects the logged metrics.
        - `DPOTrainer.__init__` calls `_precompute_ref_logps` → `compute_ref_log_probs` (before our `__init__`
          resumes), and `_compute_loss` reads `inputs["ref_chosen_logps"]` / `["ref_rejected_logps"]` after the policy
          call; `self._precompute_model_hash` keys the cache of those values.
    """

    _tag_names = ["trl", "dpo", "otpo"]
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
            # DPOConfig's default bf16 fails without a bf16-capable GPU (unless use_cpu); fp32 runs well on any CPU.
            bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            if not bf16:
                logger.info("No bf16-capable GPU: the default OTPOConfig trains in fp32 (bf16=False).")
            args = OTPOConfig(f"{name.split('/')[-1]}-OTPO", bf16=bf16)
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
        self._ot_hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._ot_policy: torch.nn.Module | None = None  # the unwrapped policy (a PeftModel with PEFT), hooked
        self._ot_reference: torch.nn.Module | None = None  # the unwrapped reference model, if any, hooked
        self._ot_warned_fallback = False
        self._ot_hash_tagged = False
        self._ot_last_weights: torch.Tensor | None = None  # (n_tokens,) of the last training batch, for TensorBoard
        self._ot_histogram = False
        self._ot_eval_prefix: str | None = None  # `metric_key_prefix` of the evaluation in progress, for `log`
        super().__init__(model, ref_model, args, *pargs, **kwargs)
        self._install_ot_hooks()
        self._ot_histogram = "tensorboard" in (self.args.report_to or [])
        if self._ot_histogram:
            self.add_callback(OTWeightHistogramCallback(self))
        self.add_callback(CheckpointCardCallback())  # the run's card is at the top of output_dir only
        _quiet_console_logs(self)

    # ------------------------------------------------------------------ the seam with TRL's fused forwards

    def _install_ot_hooks(self) -> None:
        """Hook the policy, its backbone and the reference (once; TRL's `__init__` may need them before ours runs)."""
        if self._ot_hooks:
            return
        self._ot_policy = self.accelerator.unwrap_model(self.model)
        modules = [self._ot_policy]
        if self.ref_model is not None:
            self._ot_reference = self.accelerator.unwrap_model(self.ref_model)
            modules.append(self._ot_reference)
        # The hooks hold the trainer weakly and go with it: a model outliving its trainer (a sweep, a policy handed to
        # the next trainer) neither keeps the trainer's optimizer state alive nor runs its hooks.
        for module in modules:
            pre, post = _call_weakly(self._ot_pre_forward), _call_weakly(self._ot_post_forward)
            self._ot_hooks.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            self._ot_hooks.append(module.register_forward_hook(post, with_kwargs=True))
        self._ot_hooks.append(backbone(self._ot_policy).register_forward_hook(_call_weakly(self._ot_capture_hidden)))
        weakref.finalize(self, _remove_hooks, list(self._ot_hooks))

    @contextlib.contextmanager
    def _ot_step(self, inputs: dict[str, Any], reference_only: bool = False):
        """Make `inputs` the batch of the fused forwards run inside; yields its `_OTStep`."""
        step = _OTStep(self, inputs, inputs["completion_mask"][:, 1:].bool(), reference_only)
        token = _ACTIVE_STEP.set(step)
        try:
            yield step
        finally:
            _ACTIVE_STEP.reset(token)

    def _my_step(self, kwargs: dict[str, Any]) -> _OTStep | None:
        step = _ACTIVE_STEP.get()
        return step if step is not None and step.trainer is self and kwargs.get("fused_lm_head") else None

    def _ot_pre_forward(self, module, args, kwargs):
        """Decide, before a fused forward of this trainer's batch, whether it is the policy's or the reference's."""
        step = self._my_step(kwargs)
        if step is None:
            return
        if step.reference_only or module is self._ot_reference:
            step.role = "reference"
        elif getattr(module, "_adapters_disabled", False) or getattr(module, "active_adapter", None) == "ref":
            step.role = "reference"  # PEFT: TRL's `use_adapter` runs the reference on the policy's backbone
        else:
            step.role = "policy"

    def _ot_capture_hidden(self, module, args, output):
        step = _ACTIVE_STEP.get()
        if step is not None and step.trainer is self and step.role == "policy":
            step.hidden = last_hidden_state(output)

    def _ot_post_forward(self, module, args, kwargs, outputs):
        """Weight the per-token log-probs of a fused forward of this trainer's batch (see the module docstring)."""
        step = self._my_step(kwargs)
        if step is None or step.role is None:
            return None
        role, step.role = step.role, None
        if step.reference_only:
            step.ref_log_probs = outputs.log_probs
            return None
        if role == "policy":
            seq_len = step.shift_mask.size(1)
            hidden = predicting_states(step.hidden, seq_len)
            step.weights = self.compute_token_weights(*hidden.chunk(2), *step.shift_mask.chunk(2))
            step.policy_log_probs = outputs.log_probs
            if self.precompute_ref_logps:
                self._weight_precomputed_ref(step)
        elif step.weights is None:
            raise RuntimeError(
                "OTPOTrainer: a reference forward ran before the policy forward of its batch, so there are no token "
                "weights for it. OTPOTrainer relies on TRL 1.16's order (policy first); check the installed TRL."
            )
        self._apply_weights(outputs, step.weights)
        return outputs

    def concatenated_forward(self, model, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The policy's forward of a concatenated [chosen; rejected] batch, through the same hooks as training.

        Training does not call this method: TRL 1.16's `_compute_loss` makes the policy call itself, and routing it
        through here would mean copying that method (~250 lines: every loss type, LD, f-divergences, metrics) or
        calling the (DDP / DeepSpeed-wrapped) policy twice per batch. So the work of a training step is in the hooks
        (`_ot_post_forward` → `compute_token_weights`), and this method runs the same forward through the same hooks
        to inspect what a training step sees.

        Args:
            model: the policy (possibly wrapped by accelerate / PEFT).
            inputs: a collated batch: `input_ids`, `attention_mask`, `completion_mask`, each (2B, T).

        Returns:
            dict with `per_token_logps` (2B, T-1), unweighted log-prob of token t+1; `weights` (2B, T-1), the token
            weights; `completion_mask` (2B, T-1) bool, the completion tokens among them; `hidden_states`
            (2B, T-1, H), the detached last-layer state at position t, the one predicting token t+1.
        """
        with self._ot_step(inputs) as step:
            fused_forward(model, inputs)  # the hooks capture, weight and keep what is returned below
        seq_len = step.shift_mask.size(1)
        return {
            "per_token_logps": step.policy_log_probs[:, -seq_len:],
            "weights": step.weights,
            "completion_mask": step.shift_mask,
            "hidden_states": predicting_states(step.hidden, seq_len),
        }

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self._ot_step(inputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

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

    def compute_token_weights(
        self,
        chosen_hidden: torch.Tensor,
        rejected_hidden: torch.Tensor,
        chosen_mask: torch.Tensor,
        rejected_mask: torch.Tensor,
    ) -> torch.Tensor:
        """The token weights of a batch; override this method for another token weighting.

        Args:
            chosen_hidden, rejected_hidden: (B, T-1, H) detached last-layer states of the policy, the state at
                position t-1 being the one that predicts token t.
            chosen_mask, rejected_mask: (B, T-1) bool, True at the completion tokens.

        Returns:
            (2B, T-1) weights of [chosen; rejected], multiplied into the policy's and the reference's per-token
            log-probs (values at masked positions are not read). OTPO's: the OT plan's marginals (`ot_*` settings),
            with their `ot/*` metrics logged.
        """
        with warnings.catch_warnings():  # a fallback is logged once below and counted in `ot/fallbacks`
            warnings.filterwarnings("ignore", message="OT weights: ", category=UserWarning)
            chosen_w, rejected_w, info = ot_token_weights(
                chosen_hidden,
                rejected_hidden,
                chosen_mask,
                rejected_mask,
                **ot_kwargs(self.args),
                return_info=True,
                return_plan=False,
            )
        weights = torch.cat([chosen_w, rejected_w], dim=0)
        shift_mask = torch.cat([chosen_mask, rejected_mask], dim=0)
        self._log_ot_metrics(weights, shift_mask, info)
        if self._ot_histogram and self.model.training:
            self._ot_last_weights = weights[shift_mask].cpu()
        return weights

    # ------------------------------------------------------------------ OT metrics

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

    def evaluation_loop(self, *args, metric_key_prefix: str = "eval", **kwargs):
        self._ot_eval_prefix = metric_key_prefix  # `evaluate` logs this loop's metrics next, in `log`
        return super().evaluation_loop(*args, metric_key_prefix=metric_key_prefix, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """TRL's `log`, with the `ot/*` metrics of an evaluation under its `metric_key_prefix`: `eval_a_ot/*` for the
        set "a" of `evaluate({"a": ..., "b": ...})`, as transformers names that set's loss (TRL 1.16 logs its own
        metrics of every set as `eval_*`)."""
        prefix, self._ot_eval_prefix = self._ot_eval_prefix, None
        if not self.model.training and prefix not in (None, "eval"):
            metrics = self._metrics["eval"]
            for key in [key for key in metrics if key.startswith("ot/")]:
                values = metrics.pop(key)
                logs[f"{prefix}_{key}"] = sum(values) / len(values)
        super().log(logs, start_time)

    # ------------------------------------------------------------------ precomputed (per-token) reference log-probs

    def _ref_width(self) -> int:
        """Width of the stored per-token reference log-probs: the longest padded batch, minus the shifted token."""
        multiple = self.args.pad_to_multiple_of or 1
        return math.ceil(self.args.max_length / multiple) * multiple

    def compute_ref_log_probs(self, model, inputs):
        """Per-token reference log-probs of one padded batch, (B, width) each for chosen and rejected.

        TRL 1.16 returns the summed log-probs here; OTPO keeps them per token (zero-padded to a fixed width,
        `max_length` rounded up to `pad_to_multiple_of`, so that TRL's `_precompute_ref_logps` can concatenate
        batches) and weights them at train time.
        """
        self._install_ot_hooks()  # TRL's __init__ precomputes before ours resumes
        with self._ot_step(inputs, reference_only=True) as step:
            super().compute_ref_log_probs(model, inputs)  # TRL's adapter, no-grad and autocast handling
        seq_len = step.shift_mask.size(1)
        per_token = step.ref_log_probs[:, -seq_len:].float()
        per_token = torch.nn.functional.pad(per_token, (0, self._ref_width() - seq_len))
        return per_token.chunk(2, dim=0)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # Per-token values are stored under TRL's column names: keep their cache apart from DPOTrainer's sums, and
        # apart from any other per-token layout (truncation side, padded width).
        if self._precompute_model_hash is not None and not self._ot_hash_tagged:
            layout = (self.args.max_length, self.args.truncation_mode, self.args.pad_to_multiple_of)
            self._precompute_model_hash = Hasher.hash((self._precompute_model_hash, "otpo-per-token", layout))
            self._ot_hash_tagged = True
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def _weight_precomputed_ref(self, step: _OTStep) -> None:
        """Replace the batch's per-token reference log-probs (B, width) by their weighted sums (B,), which TRL 1.16's
        `_compute_loss` reads after the policy forward."""
        inputs, mask = step.inputs, step.shift_mask
        seq_len = mask.size(1)
        ref = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]], dim=0)
        if ref.dim() != 2 or ref.size(1) < seq_len:
            raise ValueError(
                f"Precomputed reference log-probs have shape {tuple(ref.shape)}; OTPO needs per-token values of width "
                f">= {seq_len}. Were they computed by DPOTrainer? Recompute them with OTPOTrainer."
            )
        ref = ref[:, :seq_len].to(step.weights.device) * step.weights * mask
        if self.ld_alpha is None:
            ref_logps = ref.sum(dim=1)
        else:  # LD-DPO, as in TRL 1.16: tokens past the shorter completion count ld_alpha times
            pos = mask.cumsum(dim=1)
            shared = torch.minimum(*mask.sum(dim=1).chunk(2)).repeat(2).unsqueeze(1)
            ref_logps = (ref * (pos <= shared)).sum(dim=1) + self.ld_alpha * (ref * (pos > shared)).sum(dim=1)
        inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = ref_logps.chunk(2, dim=0)

    # ------------------------------------------------------------------ the model card

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`, then this model's card in the same folder (not for checkpoints: `_internal_call`).

        PEFT 0.21's `save_pretrained` rewrites a folder's card with the base model's path on this machine as
        `base_model` (TRL 1.16 wrote the card at the last checkpoint): the card is saved again over it.
        """
        super().save_model(output_dir, _internal_call)
        if not _internal_call:
            save_model_card(self, folder=output_dir)

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        license: str | None = None,
    ) -> None:
        """Save `output_dir/README.md`, a model card that can be published as it is: `otpo_trl.model_card`.

        Overrides TRL 1.16's `BaseTrainer.create_model_card` (same signature, plus transformers' `license`), which is
        called at each checkpoint by `DPOTrainer._save_checkpoint`, by `push_to_hub` and by the training script.
        """
        save_model_card(self, model_name=model_name, dataset_name=dataset_name, tags=tags, license=license)


__all__ = ["OTPOPrinterCallback", "OTPOProgressCallback", "OTPOTrainer", "OTWeightHistogramCallback"]
