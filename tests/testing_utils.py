"""Helpers shared by several test modules (fixtures are in `conftest.py`, which imports from here too); a test module
imports helpers from here, never from `conftest.py` or another test module."""

import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import transformers
import yaml
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast, TrainerCallback
from trl import DPOConfig, DPOTrainer

from otpo_trl import OTPOConfig, OTPOTrainer


# ------------------------------------------------------------------ the checkout, and a tiny model built offline


REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "ultrafeedback"

# ChatML; every turn ends with the EOS token, so a completion teaches the model to stop.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
# Enough text for a few hundred BPE merges; every byte is in the alphabet anyway, so nothing is ever unknown.
_CORPUS = [
    "The capital of France is Paris. Two plus two is four. Water boils at 100 degrees Celsius.",
    "Hello! How can I help you today? Please explain the answer step by step, with an example.",
    "Write a short poem about the sea. Translate this sentence into German. Summarise the article below.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5",
    "user assistant system question answer because therefore however although the of and to in is that",
]


def make_tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE `PreTrainedTokenizerFast` (pad `<|pad|>`, EOS `<|im_end|>`) with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # generic names, kept local

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS * 20, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<|pad|>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def make_tiny_model_dir(
    path, hidden_size: int = 16, num_hidden_layers: int = 2, max_position_embeddings: int = 2048, seed: int = 0
) -> str:
    """Build a tiny random `LlamaForCausalLM` and its tokenizer, save both to `path`, and return `path` as a string.

    Args:
        path: the folder to write (created if needed).
        hidden_size: model width; 4 attention heads and 2 key-value heads, MLP width `2 * hidden_size`.
        num_hidden_layers: number of decoder layers.
        max_position_embeddings: longest sequence the model accepts.
        seed: seed of the random initialisation (the same seed gives the same weights).
    """
    tokenizer = make_tiny_tokenizer()
    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config)
    Path(path).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


# ------------------------------------------------------------------ trainers on a tiny model


# Near-uniform OT weights: a huge entropic regularisation makes the plan uniform, and "length" normalisation makes
# every weight 1, so OTPO must reproduce DPO exactly.
UNIFORM = {"ot_reg": 1e6, "ot_normalization": "length"}


def conversational_pairs(n=8):
    answers = [
        ("The capital of France is Paris.", "The capital of France is Italy, which is definitely incorrect."),
        ("Two plus two is four.", "It is five, I think, or maybe six."),
        ("Water boils at 100 degrees.", "Water boils when it feels like it."),
        ("Hello! How can I help?", "Go away."),
    ]
    rows = []
    for i in range(n):
        chosen, rejected = answers[i % len(answers)]
        prompt = [{"role": "user", "content": f"Question {i}: tell me something true."}]
        rows.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    return Dataset.from_list(rows)


def config(cls, tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        max_steps=3,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,  # bf16 stays DPOConfig's default (True): the precision users train in, autocast on the CPU
        save_strategy="no",
        seed=42,
        max_length=64,
        gradient_checkpointing=False,
        dataloader_drop_last=True,
    )
    kwargs.update(overrides)
    return cls(**kwargs)


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def train_pair(tiny_model_dir, tmp_path, dataset=None, dpo_kwargs=None, **kwargs):
    """Train DPOTrainer and near-uniform OTPOTrainer on the same data and seed; return both trainers."""
    dataset = dataset if dataset is not None else conversational_pairs()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    trainers = []
    for cls, cfg_cls, extra in ((DPOTrainer, DPOConfig, {}), (OTPOTrainer, OTPOConfig, UNIFORM)):
        args = config(cfg_cls, tmp_path / cls.__name__, **kwargs, **extra)
        trainer = cls(
            model=tiny_model_dir, args=args, train_dataset=dataset, processing_class=tok, **(dpo_kwargs or {})
        )
        trainer.train()
        trainers.append(trainer)
    return trainers


class StopAfter(TrainerCallback):
    """Save and stop training at `step`: an interruption a run can resume from."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True


def perturbed(model, scale=0.05, seed=1):
    """Move every trainable parameter by Gaussian noise (policy != reference), in place; returns the model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen).to(p.dtype))
    return model


# ------------------------------------------------------------------ the official OTPO procedure, as an oracle


REG_M = 0.2


def official_weights(
    chosen,
    rejected,
    chosen_mask,
    rejected_mask,
    reg,
    reg_m=REG_M,
    method="sinkhorn_stabilized",
    stop=1e-6,
    max_iter=1000,
):
    """The official procedure, pair by pair, in float64. chosen, rejected (B, L, H) on the same padded length L;
    masks (B, L) True at completion tokens. Returns (B, L) chosen and rejected weights and the (B,) scaled_coeff."""
    import ot  # POT: the tests that call this skip without it

    out_c, out_r, coeff = [], [], []
    for x, y, a, b in zip(chosen.double(), rejected.double(), chosen_mask.double(), rejected_mask.double()):
        cost = torch.cdist(a[:, None] * x, b[:, None] * y, p=2) + 1e-6  # zeroed masked states
        if cost.max() > 1:
            cost = cost / cost.max()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "reg_type = entropy overwrites c", convergence notes
            plan = ot.unbalanced.sinkhorn_unbalanced(
                a.numpy(),
                b.numpy(),
                cost.numpy(),
                reg,
                reg_m,
                method=method,
                reg_type="entropy",
                stopThr=stop,
                numItermax=max_iter,
            )
        plan = torch.from_numpy(np.asarray(plan))
        scaled_coeff = plan.sum() / min(a.sum(), b.sum())
        out_c.append(plan.sum(1) / scaled_coeff)
        out_r.append(plan.sum(0) / scaled_coeff)
        coeff.append(scaled_coeff)
    return torch.stack(out_c), torch.stack(out_r), torch.stack(coeff)


def padded_batch(seed, offset_ratio=0.0, B=3, L=48, H=16):
    """Chosen and rejected states on one padded length: a prompt region (masked), a completion, right padding. The
    masked positions hold junk, which the official code zeroes and ours never reads. `offset_ratio`: a component
    shared by every state, of norm offset_ratio x the states' own spread (sqrt(H))."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(H, generator=g, dtype=torch.float64)
    shared *= offset_ratio * H**0.5 / shared.norm()
    states, masks = [], []
    for _ in range(2):
        states.append(torch.randn(B, L, H, generator=g, dtype=torch.float64) + shared)
        mask = torch.zeros(B, L, dtype=torch.bool)
        for k in range(B):
            prompt = int(torch.randint(2, 12, (), generator=g))
            length = int(torch.randint(5, L - prompt, (), generator=g))
            mask[k, prompt : prompt + length] = True
        masks.append(mask)
    junk = ~torch.stack(masks)[..., None]
    states = [
        torch.where(j, 50.0 * torch.randn(s.shape, generator=g, dtype=torch.float64), s) for s, j in zip(states, junk)
    ]
    return states[0], states[1], masks[0], masks[1]


def worst_error(ours, reference, masks):
    """max over the pairs and both sides of max_i |ours_i - ref_i| / max_i ref_i (valid tokens)."""
    worst = 0.0
    for w, r, m in zip(ours, reference, masks):
        for k in range(len(m)):
            worst = max(worst, float((w[k][m[k]].double() - r[k][m[k]]).abs().max() / r[k][m[k]].abs().max()))
    return worst


# ------------------------------------------------------------------ scripts/train.py: recipes and command lines


CONFIGS = REPO_ROOT / "configs"


RECIPES = sorted(p for p in CONFIGS.rglob("*.yaml") if "accelerate" not in p.parts)


def recipe_argv(path):
    # bf16 recipes are for GPUs; transformers refuses bf16 on a machine without one unless told to use the CPU.
    needs_cpu = yaml.safe_load(Path(path).read_text()).get("bf16") and not torch.cuda.is_available()
    return ["--config", str(path), *(["--use_cpu", "true"] if needs_cpu else [])]


def tiny_argv(model_dir, data_dir, output_dir, *extra):
    """A 2-step full fine-tune of the tiny model on 8 UltraFeedback pairs, a checkpoint every step, CPU fp32 (these
    tests are about the run directory, and fp32 is the fast precision on a CPU)."""
    argv = ["--model_name_or_path", str(model_dir), "--dataset_name", str(data_dir), "--output_dir", str(output_dir)]
    argv += ["--max_train_samples", "8", "--max_steps", "2", "--per_device_train_batch_size", "2"]
    argv += ["--learning_rate", "1e-3", "--max_length", "512", "--bf16", "false", "--use_cpu", "true"]
    argv += ["--save_strategy", "steps", "--save_steps", "1", "--logging_steps", "1", "--report_to", "none"]
    argv += ["--dataloader_drop_last", "true", "--activation_checkpointing", "false", "--seed", "0"]
    return [*argv, *extra]


def record(out):
    """The run record (`run_args.json`) of the run directory `out`."""
    return json.loads((Path(out) / "run_args.json").read_text())


def forbid_models(monkeypatch, train):
    """Make any model load fail the test: the checks under test must stop the run before one."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(train, "TRAINERS", {"otpo": refuse, "dpo": refuse})
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


# ------------------------------------------------------------------ scripts run in a subprocess


ACCELERATE = str(Path(sys.executable).parent / "accelerate")


def child_env():
    """The environment of the scripts run by these tests."""
    # Without an editable install, the child processes find otpo_trl through PYTHONPATH.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    env |= {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env.pop("TENSORBOARD_LOGGING_DIR", None)  # the logs must land in output_dir/runs
    return env


def tiny_recipe(model_dir, data_dir, output_dir, **changes):
    """A recipe like configs/quickstart.yaml, sized for a tiny model: 3 steps of 2 pairs, 512 tokens, CPU."""
    recipe = {
        # Model and LoRA
        "model_name_or_path": model_dir,
        "use_peft": True,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_target_modules": ["q_proj", "v_proj"],
        # Data
        "dataset_name": str(data_dir),
        "max_train_samples": 16,
        "max_eval_samples": 4,
        "drop_ties": True,
        "drop_identical": True,
        # OTPO
        "trainer": "otpo",
        "beta": 0.1,
        # Training
        "output_dir": str(output_dir),
        "max_steps": 3,
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 2,
        "learning_rate": 1.0e-2,
        "max_length": 512,
        "bf16": False,  # the quickstart's CPU setting (fp32 runs well on any CPU); bf16 recipes run in test_recipes
        "use_cpu": True,
        "activation_checkpointing": False,
        "dataloader_drop_last": True,
        "do_eval": True,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 1,
        "report_to": "none",
        "seed": 42,
    }
    recipe.update(changes)
    return recipe


def logged(output_dir, key="loss"):
    state = json.loads((Path(output_dir) / "trainer_state.json").read_text())
    return {h["step"]: h[key] for h in state["log_history"] if key in h}
