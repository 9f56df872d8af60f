"""Shared fixtures: a tiny Llama and a byte-level BPE tokenizer with a chat template, built offline and saved to disk.

`DPOTrainer(model="<path>")` builds its reference model from the path, so the tiny model lives in a folder.
"""

from pathlib import Path

import pytest


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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

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
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = make_tiny_tokenizer()
    config = LlamaConfig(
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
    model = AutoModelForCausalLM.from_config(config)
    Path(path).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A folder holding a tiny Llama (hidden 16, 2 layers) and its tokenizer, built once per test session."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def sample_data_dir() -> Path:
    """The offline UltraFeedback sample (`train.jsonl`, `test.jsonl`) beside the checkout, in `../shared`."""
    if not (SAMPLE_DATA_DIR / "train.jsonl").exists():
        pytest.skip(f"the UltraFeedback sample is not at {SAMPLE_DATA_DIR}")
    return SAMPLE_DATA_DIR


@pytest.fixture(scope="module")
def train():
    """The command line of scripts/train.py (a thin wrapper around it), `otpo_trl.cli.train`."""
    from otpo_trl.cli import train as train_cli

    return train_cli
