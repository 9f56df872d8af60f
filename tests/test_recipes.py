"""Every shipped training recipe needs no optional package, and runs one optimizer step through scripts/train.py on
the CPU.

Only what a CPU test must change is changed: the model id becomes a tiny Llama with the same tokenizer setup, the data
set becomes the UltraFeedback sample in ../shared (same schema as trl-lib/ultrafeedback_binarized), the run stops after
one step of one micro-batch (`gradient_accumulation_steps` 1: the recipes' 8 micro-batches of up to 2048 tokens took
20-80 s a recipe on the 2 CPU cores, 13 recipes in all, and accumulation is TRL's, tested end to end), `use_cpu`
is set where the recipe asks for bf16 (transformers refuses bf16 without a GPU otherwise), and the evaluation at the
end reads 4 pairs. Every other key is as shipped: bf16, activation checkpointing, LoRA, max_length, the OT settings.
"""

import json
import math

import pytest
import yaml

from .testing_utils import CONFIGS, RECIPES, make_tiny_model_dir, recipe_argv


# What a recipe may name and still run from `pip install otpo-trl` alone (no extras): no tracker, torch's own attention.
CORE_ATTENTION = (None, "sdpa", "eager")


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(CONFIGS)) for p in RECIPES])
def test_recipe_needs_no_optional_package(train, path):
    """A tracker (tensorboard, wandb, ...), flash-attention or bitsandbytes would make the recipe fail on a plain
    install: they are one flag away (`--report_to tensorboard`), not in the recipe."""
    script_args, training_args, model_args = train.parse_args(recipe_argv(path))
    assert training_args.report_to in ([], ["none"]), training_args.report_to
    assert model_args.attn_implementation in CORE_ATTENTION
    assert not (model_args.load_in_4bit or model_args.load_in_8bit)
    assert "bnb" not in str(training_args.optim) and "8bit" not in str(training_args.optim)


@pytest.fixture(scope="module")
def recipe_model_dir(tmp_path_factory):
    # Long enough for the recipes' max_length (2048).
    return make_tiny_model_dir(tmp_path_factory.mktemp("recipe-llama"), max_position_embeddings=2048)


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(CONFIGS)) for p in RECIPES])
def test_recipe_runs_one_step_on_cpu(train, recipe_model_dir, sample_data_dir, tmp_path, path):  # noqa: F811
    recipe = yaml.safe_load(path.read_text())
    out = tmp_path / "out"
    overrides = {
        "model_name_or_path": recipe_model_dir,
        "dataset_name": str(sample_data_dir),
        "dataset_train_split": "train",
        "dataset_test_split": "test",
        "output_dir": str(out),
        "max_steps": "1",
        "gradient_accumulation_steps": "1",
        "max_train_samples": str(4 * recipe["per_device_train_batch_size"]),  # TRL drops prompts > max_length
        "max_eval_samples": "4",
        "report_to": "none",
    }
    argv = recipe_argv(path) + [arg for key, value in overrides.items() for arg in (f"--{key}", value)]
    script_args, training_args, model_args = train.parse_args(argv)
    for key in ("bf16", "activation_checkpointing", "max_length", "beta", "ot_reg", "ot_cost", "ot_normalization"):
        if key in recipe:
            assert getattr(training_args, key) == recipe[key], key
    train.main(script_args, training_args, model_args)

    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 1
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    train_loss = state["log_history"][-1]["train_loss"]
    assert math.isfinite(train_loss) and all(math.isfinite(x) for x in losses)
    if recipe["trainer"] == "otpo":
        logged = [h for h in state["log_history"] if "ot/weight_entropy" in h]
        assert all(math.isfinite(h["ot/plan_mass"]) and h["ot/fallbacks"] == 0 for h in logged)
    saved = "adapter_config.json" if recipe.get("use_peft") else "model.safetensors"
    assert (out / saved).exists()
