"""`OTPOTrainer`: TRL 1.16's `DPOTrainer` with token weights on the policy's and the reference's per-token log-probs.

The seam is forward hooks on the models' fused forwards, one `_BatchHookState` per batch (the class docstring says what
it relies on); the manual is docs/otpo_trainer.md, the wiring docs/how_it_works.md.
"""

import contextlib
import math
import textwrap
import warnings
import weakref
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate.utils import is_peft_model
from datasets.fingerprint import Hasher
from transformers.utils import logging
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import get_config_model_id

from . import forward
from .callbacks import install_otpo_callbacks
from .ot import ot_token_weights, token_weight_stats
from .otpo_config import OTPOConfig, ot_kwargs


logger = logging.get_logger(__name__)


@dataclass
class _BatchHookState:
    """What the hooks of one batch's fused forwards share: made by `OTPOTrainer._hooked_batch`, filled by the hooks.
    (A batch, not a step: a step may hold several, and evaluation, precompute and inspection batches are no step.)"""

    trainer: "OTPOTrainer"
    inputs: dict[str, Any]  # the collated batch; precomputed per-token reference values are replaced by weighted sums
    shift_mask: torch.Tensor  # (2B, T-1) bool: the completion tokens of [chosen; rejected], aligned with log_probs
    reference_only: bool = False  # precomputing reference log-probs: every fused call is the reference
    hidden: torch.Tensor | None = None  # (2B, P+T, H) detached last-layer states of the backbone's latest call
    weights: torch.Tensor | None = None  # (2B, T-1) checked token weights (0 outside the completions), by the policy
    policy_log_probs: torch.Tensor | None = None  # (2B, P+T-1) the policy's unweighted per-token log-probs
    ref_log_probs: torch.Tensor | None = None  # (2B, P+T-1) unweighted, kept by a `reference_only` call


# The batch in progress (None outside `compute_loss`, `compute_ref_log_probs` and `concatenated_forward`): a context
# variable, not a trainer field, so that hooks of several trainers on a shared model act only for the batch's trainer.
_ACTIVE_BATCH: ContextVar[_BatchHookState | None] = ContextVar("otpo_active_batch", default=None)


def _call_weakly(method):
    """A hook calling `method` (a bound method) through a weak reference; a no-op once its object is gone."""
    ref = weakref.WeakMethod(method)
    return lambda *args, **kwargs: None if ref() is None else ref()(*args, **kwargs)


class OTPOTrainer(DPOTrainer):
    """
    Trainer for Optimal-Transport token-weighted preference optimisation (OTPO).

    A drop-in replacement for [`~trl.DPOTrainer`]: same constructor, data formats and `loss_type`s. The only change:
    before TRL sums the policy's and the reference's per-token log-probs, it multiplies both by the batch's token
    weights, from [`compute_token_weights`] (OTPO's: the marginals of an unbalanced OT plan between the chosen and the
    rejected completion's detached last-layer states, [`ot_token_weights`]). For another weighting, override that
    method; set `allow_negative_token_weights = True` on the subclass if it means to return negative weights.

    What this relies on in TRL 1.16 (`trl>=1.16,<1.17`, checked by `tests/test_trainer.py`) and PEFT:
        - `DPOTrainer._compute_loss` calls the policy, then (unless precomputed) the reference, each once per batch as
          `model(..., labels=..., fused_lm_head=True)`, and sums `outputs.log_probs[:, -(T-1):]` (with `ld_alpha`,
          shared and tail parts). With PEFT and no `ref_model`, the reference is the policy under TRL's `use_adapter`:
          adapters disabled (PEFT's public `PeftModel.has_active_enabled_adapter`, PEFT >= 0.18) or the adapter
          named "ref" active. A reference call without a policy call before it is an error here.
        - WPO reads `outputs.log_sum_sq_probs` (`FusedCausalLMOutput`); `_metrics[mode]` collects the logged metrics.
        - With `precompute_ref_log_probs`: `DPOTrainer.__init__` calls `_precompute_ref_logps` →
          `compute_ref_log_probs` (before our `__init__` resumes), `_compute_loss` reads `inputs["ref_chosen_logps"]`
          / `["ref_rejected_logps"]` after the policy call, and `self._precompute_model_hash` keys their cache.
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
    allow_negative_token_weights = False  # a negative weight reverses that token's preference: refused unless True

    def __init__(self, model, ref_model=None, args: OTPOConfig | None = None, *pargs, **kwargs):
        if args is None:  # named as DPOTrainer names its default; DPOConfig's bf16 fails without a bf16-capable GPU
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            if not bf16:
                logger.info("No bf16-capable GPU: the default OTPOConfig trains in fp32 (bf16=False).")
            args = OTPOConfig(f"{name.split('/')[-1]}-OTPO", bf16=bf16)
        elif not isinstance(args, OTPOConfig):
            got = "a `DPOConfig`: replace `DPOConfig(...)` with `OTPOConfig(...)` (same fields plus the `ot_*` ones)"
            raise TypeError(
                f"`args` must be an `OTPOConfig`, got {got if isinstance(args, DPOConfig) else type(args)}"
            )
        if args.precompute_ref_log_probs and args.max_length is None:
            raise ValueError(
                "`precompute_ref_log_probs=True` needs `max_length`: OTPO stores per-token reference log-probs "
                "(the OT weights are only known at train time), padded to `max_length`."
            )
        self._ot_hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._ot_reference: torch.nn.Module | None = None  # the unwrapped reference model, if any, hooked
        self._ot_warned_fallback = self._ot_hash_tagged = False
        self._ot_eval_prefix: str | None = None  # `metric_key_prefix` of the evaluation in progress, for `log`
        self._ot_sampled: tuple[tuple, int] = ((), -1)  # the phase of the latest sampling generator, and its number
        super().__init__(model, ref_model, args, *pargs, **kwargs)
        self._install_ot_hooks()
        self._weight_histogram = install_otpo_callbacks(self.callback_handler)  # None without TensorBoard

    # ------------------------------------------------------------------ the seam with TRL's fused forwards

    def _install_ot_hooks(self) -> None:
        """Hook the policy, its backbone and the reference (once; TRL's `__init__` may need them before ours runs)."""
        if self._ot_hooks:
            return
        policy = self.accelerator.unwrap_model(self.model)
        if self.ref_model is not None:
            self._ot_reference = self.accelerator.unwrap_model(self.ref_model)
        # The hooks hold the trainer weakly and go with it: a model outliving its trainer (a sweep, a policy handed to
        # the next trainer) neither keeps the trainer's optimizer state alive nor runs its hooks.
        for module in filter(None, (policy, self._ot_reference)):
            self._ot_hooks.append(module.register_forward_hook(_call_weakly(self._ot_weigh), with_kwargs=True))
        self._ot_hooks.append(forward.backbone(policy).register_forward_hook(_call_weakly(self._ot_capture_hidden)))
        weakref.finalize(self, lambda handles: [handle.remove() for handle in handles], list(self._ot_hooks))

    @contextlib.contextmanager
    def _hooked_batch(self, inputs: dict[str, Any], reference_only: bool = False):
        """Make `inputs` the batch of the fused forwards run inside; yields its `_BatchHookState`."""
        token = _ACTIVE_BATCH.set(
            _BatchHookState(self, inputs, inputs["completion_mask"][:, 1:].bool(), reference_only)
        )
        try:
            yield _ACTIVE_BATCH.get()
        finally:
            _ACTIVE_BATCH.reset(token)

    def _my_batch(self) -> _BatchHookState | None:
        batch = _ACTIVE_BATCH.get()
        return batch if batch is not None and batch.trainer is self else None

    def _ot_capture_hidden(self, module, args, output):
        if batch := self._my_batch():
            batch.hidden = forward.last_hidden_state(output)

    def _ot_weigh(self, module, args, kwargs, outputs):
        """After a fused forward of this trainer's batch: compute the weights (policy) and weight the log-probs."""
        if not kwargs.get("fused_lm_head") or not (batch := self._my_batch()):
            return None
        if batch.reference_only:
            batch.ref_log_probs = outputs.log_probs
            return None
        # The reference: the reference model, or the PEFT policy under TRL's `use_adapter` (adapters disabled or "ref")
        peft_ref = is_peft_model(module) and (not module.has_active_enabled_adapter or module.active_adapter == "ref")
        if not (module is self._ot_reference or peft_ref):
            hidden = forward.predicting_states(batch.hidden, batch.shift_mask.size(1))
            weights = self.compute_token_weights(*hidden.chunk(2), *batch.shift_mask.chunk(2))
            batch.weights = self._checked(weights, batch.shift_mask)
            batch.policy_log_probs = outputs.log_probs
            if self.precompute_ref_logps:
                self._weight_precomputed_ref(batch)
            if self._weight_histogram is not None and self.model.training:
                self._weight_histogram.keep(batch.weights, batch.shift_mask)
        elif batch.weights is None:
            raise RuntimeError(
                "OTPOTrainer: a reference forward ran before the policy forward of its batch, so there are no token "
                "weights for it. OTPOTrainer relies on TRL 1.16's order (policy first); check the installed TRL."
            )
        forward.weight_log_probs(outputs, batch.weights)
        return outputs

    def _checked(self, weights, mask: torch.Tensor) -> torch.Tensor:
        """`compute_token_weights`' weights where they enter the loss (one host sync), returned 0 outside `mask`."""
        if problem := forward.token_weight_problems(weights, mask, self.allow_negative_token_weights):
            method = type(self).compute_token_weights.__qualname__
            mode = "training" if self.model.training else "evaluation"
            hint = "negative" in problem and not self.allow_negative_token_weights
            opt_in = "; if you mean negative weights, set `allow_negative_token_weights = True` on the trainer class"
            raise ValueError(
                f"{method} returned token weights with {problem} (global_step {self.state.global_step}, {mode}). "
                f"They must be one (2B, T-1) tensor, finite and >= 0 at the completion tokens{opt_in if hint else ''}."
            )
        return weights.masked_fill(~mask, 0)  # values outside the completions are not read

    def _sampling_generator(self, device: torch.device) -> torch.Generator:
        """A fresh generator for a weighting that samples (SamPO), seeded from `seed`, the process and: in training,
        `global_step` and the generators made before in that step (a resumed run draws what the uninterrupted one
        drew); in evaluation, the generators made before in that evaluation (`evaluate()` twice, the same numbers)."""
        phase = (0, self.state.global_step) if self.model.training else (1,)
        self._ot_sampled = (phase, self._ot_sampled[1] + 1 if self._ot_sampled[0] == phase else 0)
        words = [self.args.seed, self.accelerator.process_index, *phase, self._ot_sampled[1]]
        return torch.Generator(device).manual_seed(int(np.random.SeedSequence(words).generate_state(1)[0]))

    def concatenated_forward(self, model, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The policy's forward of a collated [chosen; rejected] batch through the hooks of training, to inspect what
        a training step sees. Training does not call it: TRL 1.16's `_compute_loss` calls the policy itself (routing
        that call here would mean copying the method, or calling the wrapped policy twice), so the hooks do the work.

        Args:
            model: the policy (possibly wrapped by accelerate / PEFT).
            inputs: a collated batch: `input_ids`, `attention_mask`, `completion_mask`, each (2B, T).

        Returns:
            dict with `per_token_logps` (2B, T-1), unweighted log-prob of token t+1; `weights` (2B, T-1), the checked
            token weights; `completion_mask` (2B, T-1) bool, the completion tokens among them; `hidden_states`
            (2B, T-1, H), the detached last-layer state at position t, the one predicting token t+1.
        """
        with self._hooked_batch(inputs) as batch:
            forward.fused_forward(model, inputs)  # the hooks capture, weight and keep what is returned below
        seq_len = batch.shift_mask.size(1)
        return {
            "per_token_logps": batch.policy_log_probs[:, -seq_len:],
            "weights": batch.weights,
            "completion_mask": batch.shift_mask,
            "hidden_states": forward.predicting_states(batch.hidden, seq_len),
        }

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self._hooked_batch(inputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def compute_token_weights(self, chosen_hidden, rejected_hidden, chosen_mask, rejected_mask) -> torch.Tensor:
        """The token weights of a batch; override this method for another token weighting.

        Args:
            chosen_hidden, rejected_hidden: (B, T-1, H) detached last-layer states of the policy, the state at
                position t-1 being the one that predicts token t.
            chosen_mask, rejected_mask: (B, T-1) bool, True at the completion tokens.

        Returns:
            (2B, T-1) weights of [chosen; rejected], multiplied into the policy's and the reference's per-token
            log-probs: finite and >= 0 at the completion tokens (checked; `allow_negative_token_weights` lifts the
            latter), not read elsewhere. OTPO's: the OT plan's marginals (`ot_*` settings), `ot/*` metrics logged.
        """
        sides = (chosen_hidden, rejected_hidden, chosen_mask, rejected_mask)
        with warnings.catch_warnings():  # a fallback is logged once below and counted in `ot/fallbacks`
            warnings.filterwarnings("ignore", message="OT weights: ", category=UserWarning)
            chosen_w, rejected_w, info = ot_token_weights(
                *sides, **ot_kwargs(self.args), return_info=True, return_plan=False
            )
        weights = torch.cat([chosen_w, rejected_w], dim=0)
        self._log_ot_metrics(weights, torch.cat([chosen_mask, rejected_mask], dim=0), info)
        return weights

    # ------------------------------------------------------------------ the `ot/*` metrics

    def _log_ot_metrics(self, weights: torch.Tensor, mask: torch.Tensor, info) -> None:
        stats = token_weight_stats(weights, mask)  # per completion; NaN for one without tokens
        entropy, weight_max = stats.entropy.nanmean().nan_to_num(1), stats.max.nan_to_num(0).max()
        local = torch.stack([info.plan_mass.double().mean(), weight_max, entropy, info.fallback.double().sum()])
        rows = self.accelerator.gather_for_metrics(local.float()[None]).view(-1, 4)  # one row per process
        values = [rows[:, 0].mean(), rows[:, 1].max(), rows[:, 2].mean(), rows[:, 3].sum()]
        metrics = self._metrics["train" if self.model.training else "eval"]
        for key, value in zip(
            ("plan_mass", "weight_max", "weight_entropy", "fallbacks"), torch.stack(values).tolist()
        ):
            metrics[f"ot/{key}"].append(value)
        metrics["ot/solver_iters"].append(float(info.n_iter))
        if metrics["ot/fallbacks"][-1] > 0 and not self._ot_warned_fallback:
            self._ot_warned_fallback = True
            logger.warning(
                "Non-finite hidden states or OT costs in a preference pair: that pair falls back to uniform token "
                "weights. The count is logged as `ot/fallbacks`. (Shown once.)"
            )

    def evaluation_loop(self, *args, metric_key_prefix: str = "eval", **kwargs):
        self._ot_eval_prefix = metric_key_prefix  # `evaluate` logs this loop's metrics next, in `log`
        self._ot_sampled = ((), -1)  # each evaluation draws the same samples
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
    # Only with `precompute_ref_log_probs=True`: TRL's `__init__` (and `evaluate` given a new data set) stores the
    # reference's log-probs in the data set. OTPO stores them per token, since the weights that sum them are known only
    # at train time: `_weight_precomputed_ref` sums them with the batch's weights after the policy forward.

    def compute_ref_log_probs(self, model, inputs):
        """Per-token reference log-probs of one padded batch, (B, width) each for chosen and rejected (TRL 1.16: the
        sums), zero-padded to one width, `max_length` rounded up to `pad_to_multiple_of`, so that TRL's
        `_precompute_ref_logps` can concatenate the batches."""
        self._install_ot_hooks()  # TRL's __init__ precomputes before ours resumes
        with self._hooked_batch(inputs, reference_only=True) as batch:
            super().compute_ref_log_probs(model, inputs)  # TRL's adapter, no-grad and autocast handling
        seq_len, multiple = batch.shift_mask.size(1), self.args.pad_to_multiple_of or 1
        width = math.ceil(self.args.max_length / multiple) * multiple  # the longest padded batch - 1, at most
        return torch.nn.functional.pad(batch.ref_log_probs[:, -seq_len:].float(), (0, width - seq_len)).chunk(2)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # Per-token values are stored under TRL's column names: keep their cache apart from DPOTrainer's sums, and
        # apart from any other per-token layout (truncation side, padded width).
        if self._precompute_model_hash is not None and not self._ot_hash_tagged:
            layout = (self.args.max_length, self.args.truncation_mode, self.args.pad_to_multiple_of)
            self._precompute_model_hash = Hasher.hash((self._precompute_model_hash, "otpo-per-token", layout))
            self._ot_hash_tagged = True
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def _weight_precomputed_ref(self, batch: _BatchHookState) -> None:
        """Replace the batch's per-token reference log-probs (B, width) by their weighted sums (B,), which TRL 1.16's
        `_compute_loss` reads after the policy forward."""
        inputs, mask = batch.inputs, batch.shift_mask
        ref = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]], dim=0)
        if ref.dim() != 2 or ref.size(1) < mask.size(1):
            raise ValueError(
                f"Precomputed reference log-probs have shape {tuple(ref.shape)}; OTPO needs per-token values of width "
                f">= {mask.size(1)}. Were they computed by DPOTrainer? Recompute them with OTPOTrainer."
            )
        ref = ref[:, : mask.size(1)].to(batch.weights.device) * batch.weights
        inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = forward.sum_log_probs(
            ref, mask, self.ld_alpha
        ).chunk(2)

    # ------------------------------------------------------------------ the model card

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        license: str | None = None,
    ) -> None:
        """Save `output_dir/README.md`, a model card that can be published as it is (see `otpo_trl.model_card`).

        Overrides TRL 1.16's `BaseTrainer.create_model_card` (same signature; called at each checkpoint by
        `DPOTrainer._save_checkpoint`, by `push_to_hub` and by the training script), whose card links a local base
        model as "None", writes `licence: license` and leaves "Training procedure" empty. `dataset_name` may be a
        Hub id or a local path (shown by its name only; only a Hub id enters the metadata). `license` (an addition
        to TRL's arguments, as in `transformers.Trainer.create_model_card`; `push_to_hub(license=...)` passes it)
        replaces the license read from the base model's card.
        """
        from .model_card import otpo_model_card

        if not self.is_world_process_zero():
            return
        card = otpo_model_card(self, model_name=model_name, dataset_name=dataset_name, tags=tags, license=license)
        card.save(f"{self.args.output_dir}/README.md")


__all__ = ["OTPOTrainer"]
