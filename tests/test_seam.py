"""The seam with TRL, as users meet it: several trainers sharing a reference model (a sweep), a policy reused by
sequential trainers, `generate` after training, and a custom token weighting through `compute_token_weights`."""

import inspect

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

from otpo_trl import OTPOConfig, OTPOTrainer

from .testing_utils import config, conversational_pairs, losses, perturbed


def batch_loss(trainer):
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch).item()


def make(tiny_model_dir, tmp_path, name, ref_model, policy=None, cls=OTPOTrainer, **overrides):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg_cls = OTPOConfig if cls is OTPOTrainer else DPOConfig
    policy = policy if policy is not None else perturbed(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    # fp32: these compare losses of trainers with each other to 1e-6; bf16 is covered in test_precision / test_oracle.
    args = config(cfg_cls, tmp_path / name, per_device_train_batch_size=4, bf16=False, **overrides)
    return cls(
        model=policy, ref_model=ref_model, args=args, train_dataset=conversational_pairs(4), processing_class=tok
    )


def test_trainers_sharing_a_reference_model_each_get_their_own_loss(tiny_model_dir, tmp_path):
    """A sweep over ot_reg with one reference model in memory (and a DPO baseline beside it) gives every trainer the
    loss it gets alone. (Each trainer used to patch the shared reference again, and all but the last lost it.)"""
    shared = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    regs = (1.0, 0.1, 0.03)
    sweep = [make(tiny_model_dir, tmp_path, f"sweep{r}", shared, ot_reg=r) for r in regs]
    dpo = make(tiny_model_dir, tmp_path, "dpo", shared, cls=DPOTrainer)
    alone = [
        make(tiny_model_dir, tmp_path, f"alone{r}", AutoModelForCausalLM.from_pretrained(tiny_model_dir), ot_reg=r)
        for r in regs
    ]
    dpo_alone = make(
        tiny_model_dir, tmp_path, "dpo_alone", AutoModelForCausalLM.from_pretrained(tiny_model_dir), cls=DPOTrainer
    )
    expected = [batch_loss(t) for t in alone]
    assert len(set(expected)) == len(regs)  # the settings matter: a mix-up would show
    assert [batch_loss(t) for t in sweep] == pytest.approx(expected, rel=1e-6)
    assert batch_loss(dpo) == pytest.approx(batch_loss(dpo_alone), rel=1e-6)


def test_a_policy_reused_by_sequential_trainers(tiny_model_dir, tmp_path):
    """Train with one trainer, then hand the same model object to a second one with other settings: the second
    trainer's loss is the one a fresh trainer gets on a copy of those weights, and the first's hooks stay silent."""
    policy = perturbed(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    first = make(tiny_model_dir, tmp_path, "first", AutoModelForCausalLM.from_pretrained(tiny_model_dir), policy)
    first.train()
    second = make(
        tiny_model_dir, tmp_path, "second", AutoModelForCausalLM.from_pretrained(tiny_model_dir), policy, ot_reg=0.1
    )
    copy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    copy.load_state_dict(policy.state_dict())
    fresh = make(
        tiny_model_dir, tmp_path, "fresh", AutoModelForCausalLM.from_pretrained(tiny_model_dir), copy, ot_reg=0.1
    )
    assert batch_loss(second) == pytest.approx(batch_loss(fresh), rel=1e-6)


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_generate_after_training(tiny_model_dir, tmp_path, use_lora):
    """The models' `forward` is not replaced by OTPO (hooks only), so `generate`, which validates its kwargs against
    `forward`'s signature, works on the trained model."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = config(OTPOConfig, tmp_path, max_steps=2)
    trainer = OTPOTrainer(
        model=tiny_model_dir,
        args=args,
        train_dataset=conversational_pairs(),
        processing_class=tok,
        peft_config=lora if use_lora else None,
    )
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert "input_ids" in inspect.signature(model.forward).parameters
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hello?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 4 or out[0, -1].item() == tok.eos_token_id


class SharedPrefixTrainer(OTPOTrainer):
    """README's example: weight 1 for the tokens within the shorter completion's length, 0 past it."""

    def compute_token_weights(self, chosen_hidden, rejected_hidden, chosen_mask, rejected_mask):
        shorter = torch.minimum(chosen_mask.sum(1), rejected_mask.sum(1))[:, None]
        weights = [(mask.cumsum(1) <= shorter).float() for mask in (chosen_mask, rejected_mask)]
        return torch.cat(weights)


def test_custom_token_weighting_trains(tiny_model_dir, tmp_path):
    """A subclass overriding `compute_token_weights` trains, and its weights reach policy and reference alike: tokens
    past the shorter completion dropped is LD-DPO with ld_alpha=0, which TRL computes on its own."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    runs = []
    for cls, cfg_cls, extra in ((SharedPrefixTrainer, OTPOConfig, {}), (DPOTrainer, DPOConfig, {"ld_alpha": 0.0})):
        args = config(cfg_cls, tmp_path / cls.__name__, max_steps=3, **extra)
        trainer = cls(model=tiny_model_dir, args=args, train_dataset=conversational_pairs(), processing_class=tok)
        trainer.train()
        runs.append(losses(trainer))
    assert runs[0] == pytest.approx(runs[1], rel=1e-4)
    assert runs[0][0] != pytest.approx(runs[0][-1], rel=1e-3)  # it trained


def test_a_trainer_is_freed_with_its_hooks(tiny_model_dir, tmp_path):
    """Hooks on a model that outlives its trainer (a sweep's shared reference) hold the trainer weakly and go with it."""
    import gc
    import weakref

    shared = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = make(tiny_model_dir, tmp_path, "gone", shared)
    assert len(shared._forward_hooks) == 1 and not shared._forward_pre_hooks
    alive = weakref.ref(trainer)
    del trainer
    gc.collect()
    assert alive() is None
    assert not shared._forward_hooks and not shared._forward_pre_hooks
    dpo = make(tiny_model_dir, tmp_path, "after", shared, cls=DPOTrainer)
    assert batch_loss(dpo) > 0  # the model still works
