"""Shared fixtures: a tiny Llama and a byte-level BPE tokenizer with a chat template, built offline and saved to disk.

`DPOTrainer(model="<path>")` builds its reference model from the path, so the tiny model lives in a folder. Only pytest
hooks and fixtures live here; the helpers they call, and every helper a test module imports, are in `testing_utils.py`.
The fixtures import it when first used: it loads torch and TRL, which a test module that needs neither (the docs'
links) should not wait for.
"""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A folder holding a tiny Llama (hidden 16, 2 layers) and its tokenizer, built once per test session."""
    from .testing_utils import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def sample_data_dir() -> Path:
    """The offline UltraFeedback sample (`train.jsonl`, `test.jsonl`) beside the checkout, in `../shared`."""
    from .testing_utils import SAMPLE_DATA_DIR

    if not (SAMPLE_DATA_DIR / "train.jsonl").exists():
        pytest.skip(f"the UltraFeedback sample is not at {SAMPLE_DATA_DIR}")
    return SAMPLE_DATA_DIR


@pytest.fixture(scope="module")
def train():
    """The command line of scripts/train.py (a thin wrapper around it), `otpo_trl.cli.train`."""
    from otpo_trl.cli import train as train_cli

    return train_cli
