"""`OTPOTrainer`: TRL 1.16's `DPOTrainer` with token weights on the policy's and the reference's per-token log-probs,
by one forward hook per model on the batch in progress (`_BatchHookState`). Manual: docs/otpo_trainer.md."""

import contextlib
import math
import textwrap
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate.utils import is_peft_model
from datasets.fingerprint import Hasher
from trl import DPOTrainer
from trl.trainer.utils import get_config_model_id

from . import forward
from .callbacks import install_otpo_callbacks
from .model_card import save_model_card
from .ot import ot_token_weights, token_weight_stats
from .otpo_config import OTPOConfig, ot_kwargs


@dataclass
class _BatchHookState:
    """What the hooks share during one batch's fused forwards (a batch, not a step: a step may hold several batches,
    and evaluation and `concatenated_forward` batches belong to none). Made by `OTPOTrainer._hooked_batch`."""

    inputs: dict[str, Any]  # the collated batch; precomputed per-token reference values are replaced by weighted sums
    shift_mask: torch.Tensor  # (2B, T-1) bool: the completion tokens of [chosen; rejected], aligned with log_probs
    hidden: torch.Tensor | None = None  # (2B, P+T, H) detached last-layer states of the backbone's latest call
    weights: torch.Tensor | None = None  # (2B, T-1) checked token weights (0 outside the completions), by the policy
    policy_log_probs: torch.Tensor | None = None  # (2B, P+T-1) the policy's unweighted per-token log-probs


class OTPOTrainer(DPOTrainer):
    """
    Trainer for Optimal-Transport token-weighted preference optimisation (OTPO).

    A drop-in replacement for [`~trl.DPOTrainer`]: same constructor, data formats and `loss_type`s. The only change:
    before TRL sums the policy's and the reference's per-token log-probs, both are multiplied by the batch's token
    weights from [`compute_token_weights`] (OTPO's: the marginals of an unbalanced OT plan between the chosen and the
    rejected completion's last-layer states, [`ot_token_weights`]). For another weighting, override that method (and
    set `allow_negative_token_weights = True` if it means to return negative weights).

    What this relies on in TRL 1.16 (`trl>=1.16,<1.17`, checked by `tests/test_trainer.py`) and PEFT:
        - `DPOTrainer._compute_loss` calls the policy, then (unless precomputed) the reference, each once per batch as
          `model(..., labels=..., fused_lm_head=True)`, and sums `outputs.log_probs[:, -(T-1):]` (with `ld_alpha`,
          shared and tail parts). With PEFT and no `ref_model`, the reference is the policy under TRL's `use_adapter`:
          adapters disabled (PEFT's public `PeftModel.has_active_enabled_adapter`, PEFT >= 0.18) or the adapter
          named "ref" active.
        - WPO reads `outputs.log_sum_sq_probs` (`FusedCausalLMOutput`); `_metrics[mode]` collects the logged metrics.
        - With `precompute_ref_log_probs`: `_precompute_ref_logps` stores what `compute_ref_log_probs` returns, in a
          cache keyed by `self._precompute_model_hash`, and `_compute_loss` reads it from `inputs["ref_chosen_logps"]`
          / `["ref_rejected_logps"]` after the policy call.
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
        if args is None:  # named as DPOTrainer names its; fp32 unless a GPU does bf16 (DPOConfig's bf16 fails there)
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            args = OTPOConfig(f"{name.split('/')[-1]}-OTPO", bf16=bf16)
        elif not isinstance(args, OTPOConfig):
            raise TypeError(
                f"`args` must be an `OTPOConfig` (a `DPOConfig` with the `ot_*` fields), got {type(args).__name__}: "
                "build it as `OTPOConfig(...)`, with the same arguments."
            )
        if args.precompute_ref_log_probs and args.max_length is None:
            raise ValueError(
                "`precompute_ref_log_probs=True` needs `max_length`: OTPO stores per-token reference log-probs "
                "(the OT weights are only known at train time), padded to `max_length`."
            )
        self._ot_hash_tagged = False
        self._ot_batch: _BatchHookState | None = None  # the batch in progress, for the hooks (`_hooked_batch`)
        self._ot_sampled: tuple[tuple, int] = ((), -1)  # the phase of the latest sampling generator, and its number
        super().__init__(model, ref_model, args, *pargs, **kwargs)
        self._weight_histogram = install_otpo_callbacks(self.callback_handler)  # None without TensorBoard
        self._install_ot_hooks()

    # ------------------------------------------------------------------ the seam with TRL's fused forwards

    def _install_ot_hooks(self) -> None:
        """Hook the policy, its backbone and the reference. The hooks hold the trainer weakly and go with it: a model
        outliving its trainer (a sweep, a policy handed on) neither keeps the trainer alive nor runs its hooks."""
        policy = self.accelerator.unwrap_model(self.model)
        self._ot_reference = None if self.ref_model is None else self.accelerator.unwrap_model(self.ref_model)
        capture, weigh = weakref.WeakMethod(self._ot_capture_hidden), weakref.WeakMethod(self._ot_weigh)
        hooks = [forward.backbone(policy).register_forward_hook(lambda *a: capture() and capture()(*a))]
        for module in (m for m in (policy, self._ot_reference) if m is not None):
            hooks.append(module.register_forward_hook(lambda *a, **k: weigh() and weigh()(*a, **k), with_kwargs=True))
        weakref.finalize(self, lambda handles: [handle.remove() for handle in handles], hooks)

    @contextlib.contextmanager
    def _hooked_batch(self, inputs: dict[str, Any]):
        """Make `inputs` the batch that this trainer's hooks act on, while inside; yields its `_BatchHookState`."""
        self._ot_batch = _BatchHookState(inputs, inputs["completion_mask"][:, 1:].bool())
        try:
            yield self._ot_batch
        finally:
            self._ot_batch = None

    def _ot_capture_hidden(self, module, args, output):
        if self._ot_batch is not None:
            self._ot_batch.hidden = forward.last_hidden_state(output)

    def _ot_weigh(self, module, args, kwargs, outputs):
        """After a fused forward of this trainer's batch: compute the weights (policy) and weight the log-probs."""
        if (batch := self._ot_batch) is None or not kwargs.get("fused_lm_head"):
            return None
        # The reference: the reference model, or the PEFT policy under TRL's `use_adapter` (adapters disabled or "ref")
        peft_ref = is_peft_model(module) and (not module.has_active_enabled_adapter or module.active_adapter == "ref")
        if not (module is self._ot_reference or peft_ref):
            hidden = forward.predicting_states(batch.hidden, batch.shift_mask.size(1))
            weights = self.compute_token_weights(*hidden.chunk(2), *batch.shift_mask.chunk(2))
            batch.weights, batch.policy_log_probs = self._checked(weights, batch.shift_mask), outputs.log_probs
            if self.precompute_ref_logps:
                self._weight_precomputed_ref(batch.inputs, batch.weights, batch.shift_mask)
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
            mode = "training" if self.model.training else "evaluation"
            fix = "; if you mean negative weights, set `allow_negative_token_weights = True` on the trainer class"
            raise ValueError(
                f"{type(self).compute_token_weights.__qualname__} returned token weights with {problem} (global_step "
                f"{self.state.global_step}, {mode}). They must be one (2B, T-1) tensor, finite and >= 0 at the "
                f"completion tokens{fix if 'negative' in problem else ''}."  # listed only when not allowed
            )
        return weights.masked_fill(~mask, 0)  # values outside the completions are not read

    def _sampling_generator(self) -> torch.Generator:
        """A fresh CPU generator for a weighting that samples (SamPO), seeded from `seed`, the process and: in
        training, `global_step` and the generators made before in that step (a resumed run draws what the
        uninterrupted one drew); in evaluation, those made before in that evaluation (each evaluation draws alike)."""
        phase = (0, self.state.global_step) if self.model.training else (1,)
        self._ot_sampled = (phase, self._ot_sampled[1] + 1 if self._ot_sampled[0] == phase else 0)
        words = [self.args.seed, self.accelerator.process_index, *phase, self._ot_sampled[1]]
        return torch.Generator().manual_seed(int(np.random.SeedSequence(words).generate_state(1)[0]))

    def concatenated_forward(self, model, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The policy's (`model`, possibly wrapped) forward of a collated [chosen; rejected] batch (`input_ids`,
        `attention_mask`, `completion_mask`, each (2B, T)) through the hooks of training, to inspect what a training
        step sees. Under TRL 1.16 training does not call it: `_compute_loss` calls the policy itself, so the hooks do
        the work (routing that call here would mean copying the method or calling the policy twice).

        Returns a dict of `per_token_logps` (2B, T-1), the unweighted log-prob of token t+1 at position t; `weights`
        (2B, T-1), the checked token weights; `completion_mask` (2B, T-1) bool; `hidden_states` (2B, T-1, H), the
        detached last-layer state at position t, the one predicting token t+1."""
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

        Returns (2B, T-1) weights of [chosen; rejected], multiplied into the policy's and the reference's per-token
        log-probs: finite and >= 0 at the completion tokens (checked; `allow_negative_token_weights` lifts the
        latter), not read elsewhere. OTPO's: the OT plan's marginals (`ot_*` settings), with `ot/*` metrics logged.
        """
        options = dict(ot_kwargs(self.args), return_info=True, return_plan=False)
        options["generator"] = self._sampling_generator() if self.args.ot_weighting == "sampo" else None
        with warnings.catch_warnings():  # a fallback is counted in `ot/fallbacks` (the console explains it once)
            warnings.filterwarnings("ignore", message="OT weights: ", category=UserWarning)
            chosen_w, rejected_w, info = ot_token_weights(
                chosen_hidden, rejected_hidden, chosen_mask, rejected_mask, **options
            )
        weights = torch.cat([chosen_w, rejected_w])
        self._log_ot_metrics(weights, torch.cat([chosen_mask, rejected_mask]), info)
        return weights

    def _log_ot_metrics(self, weights: torch.Tensor, mask: torch.Tensor, info) -> None:
        stats = token_weight_stats(weights, mask)  # per completion; NaN for one without tokens
        entropy, weight_max = stats.entropy.nanmean().nan_to_num(1), stats.max.nan_to_num(0).max()
        local = torch.stack([info.plan_mass.double().mean(), weight_max, entropy, info.fallback.double().sum()])
        rows = self.accelerator.gather_for_metrics(local.float()[None]).view(-1, 4)  # one row per process
        values = torch.stack([rows[:, 0].mean(), rows[:, 1].max(), rows[:, 2].mean(), rows[:, 3].sum()]).tolist()
        metrics = self._metrics["train" if self.model.training else "eval"]
        for key, value in zip(("plan_mass", "weight_max", "weight_entropy", "fallbacks"), values):
            metrics[f"ot/{key}"].append(value)
        metrics["ot/solver_iters"].append(float(info.n_iter))

    def evaluation_loop(self, *args, metric_key_prefix: str = "eval", **kwargs):
        """transformers' loop; the `ot/*` metrics of a set `a` of `evaluate({"a": ..., "b": ...})` are returned as
        `eval_a_ot/*`, as transformers names that set's loss (TRL 1.16 logs its own metrics of every set as `eval_*`)."""
        self._ot_sampled = ((), -1)  # every evaluation draws the same samples
        output = super().evaluation_loop(*args, metric_key_prefix=metric_key_prefix, **kwargs)
        if metric_key_prefix != "eval":  # with "eval", TRL's `log` adds them as `eval_ot/*`
            for key in [key for key in self._metrics["eval"] if key.startswith("ot/")]:
                values = self._metrics["eval"].pop(key)
                output.metrics[f"{metric_key_prefix}_{key}"] = sum(values) / len(values)
        return output

    # ------------------------------------------------------------------ precomputed (per-token) reference log-probs
    # Only with `precompute_ref_log_probs=True`, where TRL stores the reference's log-probs in the data set (in its
    # `__init__`, and in `evaluate` given a new data set). OTPO stores them per token, since the weights that sum them
    # are known only at train time, and sums them with the batch's weights after the policy forward.

    def compute_ref_log_probs(self, model, inputs):
        """Per-token reference log-probs of one padded batch, (B, width) each for chosen and rejected, where TRL 1.16
        returns their sums; zero-padded to `max_length` rounded up to `pad_to_multiple_of`, one width for all."""
        with forward.capture_log_probs(model) as box:
            super().compute_ref_log_probs(model, inputs)  # TRL's adapter, no-grad and autocast handling
        seq_len, multiple = inputs["completion_mask"].size(1) - 1, self.args.pad_to_multiple_of or 1
        width = math.ceil(self.args.max_length / multiple) * multiple  # the longest padded batch - 1, at most
        return torch.nn.functional.pad(box["log_probs"][:, -seq_len:].float(), (0, width - seq_len)).chunk(2)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # Per-token values are stored under TRL's column names: keep their cache apart from DPOTrainer's sums, and
        # apart from any other per-token layout (truncation side, padded width).
        if self._precompute_model_hash is not None and not self._ot_hash_tagged:
            layout = (self.args.max_length, self.args.truncation_mode, self.args.pad_to_multiple_of)
            self._precompute_model_hash = Hasher.hash((self._precompute_model_hash, "otpo-per-token", layout))
            self._ot_hash_tagged = True
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def _weight_precomputed_ref(self, inputs: dict[str, Any], weights: torch.Tensor, mask: torch.Tensor) -> None:
        """Replace the batch's per-token reference log-probs (B, width) by their sums with `weights` (B,), which TRL
        1.16's `_compute_loss` reads after the policy forward."""
        ref = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
        if ref.dim() != 2 or ref.size(1) < mask.size(1):  # e.g. DPOTrainer's sums, in the data set
            raise ValueError(
                f"Precomputed reference log-probs of shape {tuple(ref.shape)}, not per-token values of "
                f"width >= {mask.size(1)}: recompute them with OTPOTrainer."
            )
        sums = forward.sum_log_probs(ref[:, : mask.size(1)].to(weights.device) * weights, mask, self.ld_alpha)
        inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = sums.chunk(2)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if not _internal_call:  # PEFT rewrote the folder's card, naming the base by its path: `otpo_trl.model_card`
            save_model_card(self, folder=output_dir)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None, license=None) -> None:
        """TRL 1.16's `create_model_card` (and transformers' `license`): the card of `otpo_trl.model_card`."""
        save_model_card(self, model_name=model_name, dataset_name=dataset_name, tags=tags, license=license)


__all__ = ["OTPOTrainer"]
