"""`studies/filler_reward.py`: the reward's gain from an appended closing, per run of a length study, and its
bootstrap. Runs are stand-ins (a tiny model saved with a run record), so that nothing trains."""

import json
import shutil

import numpy as np
import pytest

from otpo_trl.data import load_preference_dataset
from otpo_trl.evaluation import score_preferences
from otpo_trl.loading import load_model_and_tokenizer
from studies import filler_reward
from studies.planted_variants import FILLERS

from .testing_utils import SAMPLE_DATA_DIR, make_tiny_model_dir


def fake_run(folder, model_dir, base):
    """A finished run's folder: the model, a record naming `base` as the model (no LoRA), and results."""
    shutil.copytree(model_dir, folder)
    settings = {"use_peft": False, "model_name_or_path": base, "beta": 0.1}
    (folder / "run_args.json").write_text(json.dumps({"settings": settings}))
    (folder / "all_results.json").write_text("{}")


def test_the_gain_is_zero_for_the_reference_and_the_report_re_renders(tmp_path, monkeypatch):
    base = make_tiny_model_dir(tmp_path / "base", seed=0)
    other = make_tiny_model_dir(tmp_path / "other", seed=1)
    runs = tmp_path / "runs"
    fake_run(runs / "dpo-seed1", base, base)  # the policy is its reference: every gain is 0
    fake_run(runs / "ld_dpo-seed1", other, base)
    report = tmp_path / "report" / "filler_reward.md"
    argv = ["--runs", str(runs), "--arms", "dpo", "ld_dpo", "--seeds", "1", "--data", str(SAMPLE_DATA_DIR)]
    argv += ["--pairs", "6", "--answer_tokens", "48", "--bootstrap", "50", "--report", str(report)]
    summary = filler_reward.main(argv)

    assert summary["n_answers"] > 0 and len(summary["gains"]["dpo-seed1"]) == summary["n_answers"]
    assert summary["gains"]["dpo-seed1"] == [0.0] * summary["n_answers"]
    gains = np.array(summary["gains"]["ld_dpo-seed1"])
    assert np.abs(gains).max() > 0
    # The same gains as DPO's margin of (answer + filler, answer), policy and reference in one call.
    policy, reference, tokenizer = load_model_and_tokenizer(str(runs / "ld_dpo-seed1"), ref=base)
    examples = filler_reward.filler_examples(
        load_preference_dataset(str(SAMPLE_DATA_DIR), "test"), tokenizer, 6, 48, 512
    )
    scored = score_preferences(policy, reference, tokenizer, examples, beta=0.1, reward_weightings=("unweighted",))
    margins = {p["index"]: p["margin_unweighted"] for p in scored["pairs"]}
    assert gains == pytest.approx([margins[i] for i in range(len(examples))], abs=1e-6)
    stats = summary["stats"]
    assert stats["ld_dpo-dpo"]["mean"] == pytest.approx(gains.mean()) == pytest.approx(stats["ld_dpo"]["mean"])
    text = report.read_text()
    assert "| LD-DPO (α 0) - DPO |" in text and f"{summary['n_answers']} answers" in text
    # --render_only rewrites the same Markdown from the JSON alone.
    report.unlink()
    filler_reward.main(["--render_only", "--report", str(report)])
    assert report.read_text() == text

    # A missing run is named before any model loads, even when it comes last.
    shutil.rmtree(runs / "ld_dpo-seed1")
    monkeypatch.setattr(filler_reward, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match="ld_dpo-seed1 holds no finished run"):
        filler_reward.main([*argv[:-1], str(tmp_path / "again.md")])


def test_each_answer_is_scored_against_itself_with_a_closing_appended(tmp_path):
    _, _, tokenizer = load_model_and_tokenizer(make_tiny_model_dir(tmp_path / "m"))
    dataset = load_preference_dataset(str(SAMPLE_DATA_DIR), "test")
    examples = filler_reward.filler_examples(dataset, tokenizer, 6, 48, 512)
    assert examples and {e["row"] for e in examples} <= set(range(6))
    for e in examples:
        padded, plain = e["chosen"][0]["content"], e["rejected"][0]["content"]
        assert padded == f"{plain}\n\n{FILLERS[e['row'] % len(FILLERS)]}"
    with pytest.raises(ValueError, match="fits --max_length 8"):
        filler_reward.filler_examples(dataset, tokenizer, 6, 48, 8)


def test_the_bootstrap_pairs_each_arm_with_the_first():
    rng = np.random.default_rng(0)
    first = rng.normal(size=(2, 40))
    gains = {f"a-seed{s}": first[i].tolist() for i, s in enumerate((1, 2))}
    gains |= {f"b-seed{s}": (first[i] + 0.5).tolist() for i, s in enumerate((1, 2))}
    stats = filler_reward.bootstrap(gains, ["a", "b"], [1, 2], 200)
    diff = stats["b-a"]
    # Paired: the shared noise cancels, so every resample gives exactly the shift.
    assert diff["mean"] == pytest.approx(0.5) and diff["low"] == pytest.approx(0.5) == diff["high_seeds"]
    assert stats["a"]["low"] < stats["a"]["mean"] < stats["a"]["high"]
    assert stats["b"]["per_seed"] == pytest.approx([first[0].mean() + 0.5, first[1].mean() + 0.5])
