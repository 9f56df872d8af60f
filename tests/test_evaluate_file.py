"""scripts/evaluate.py on the pairs of one file, in TRL's preference formats (`--data FILE` or `--held_out_file FILE`)."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from otpo_trl.cli import evaluate as evaluate_cli
from otpo_trl.evaluation import score_preferences
from otpo_trl.loading import load_model_and_tokenizer


ROWS = [
    ("What is 2 + 2?", "Four.", "Five, I think."),
    ("Name a colour.", "Blue.", "A cat."),
    ("Say hello.", "Hello!", "Go away, please, I am busy today."),
]


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights=False
    )
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config).save_pretrained(path)
    return str(path)


def layouts(tmp_path):
    """The same three pairs as a standard (text) .json with an explicit prompt, and as a conversational .jsonl with
    an implicit prompt (trl-lib/ultrafeedback_binarized's layout)."""
    standard = tmp_path / "standard.json"
    standard.write_text(json.dumps([{"prompt": p, "chosen": " " + c, "rejected": " " + r} for p, c, r in ROWS]))
    conversational = tmp_path / "conversational.jsonl"
    with conversational.open("w") as f:
        for p, c, r in ROWS:
            user = {"role": "user", "content": p}
            row = {
                "chosen": [user, {"role": "assistant", "content": c}],
                "rejected": [user, {"role": "assistant", "content": r}],
            }
            f.write(json.dumps(row) + "\n")
    return {"standard": standard, "conversational": conversational}


@pytest.mark.parametrize("option", ["--data", "--held_out_file"])
def test_evaluate_scores_every_pair_of_a_file(adapter, tmp_path, option):
    policy, reference, tokenizer = load_model_and_tokenizer(adapter, device="cpu")
    for name, path in layouts(tmp_path).items():
        out = tmp_path / f"eval-{name}"
        argv = ["--model", adapter, option, str(path), "--split", "validation", "--num_generations", "0"]
        argv += ["--output_dir", str(out), "--device", "cpu"]
        result = evaluate_cli.main(argv)
        assert result["preference"]["n_pairs"] == len(ROWS) and result["data"] == str(path)
        if name == "standard":
            examples = [{"prompt": p, "chosen": " " + c, "rejected": " " + r} for p, c, r in ROWS]
        else:
            examples = [
                {
                    "prompt": [{"role": "user", "content": p}],
                    "chosen": [{"role": "assistant", "content": c}],
                    "rejected": [{"role": "assistant", "content": r}],
                }
                for p, c, r in ROWS
            ]
        direct = score_preferences(policy, reference, tokenizer, examples, progress=False)
        assert [p["margin_unweighted"] for p in result["pairs"]] == pytest.approx(
            [p["margin_unweighted"] for p in direct["pairs"]], rel=1e-5, abs=1e-7
        )
        assert any(abs(p["margin_unweighted"]) > 1e-6 for p in result["pairs"])
        assert json.loads((out / "eval.json").read_text())["preference"]["n_pairs"] == len(ROWS)
