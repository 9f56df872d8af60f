"""What the studies share: `studies.common.run_arm`, the one way they train an arm (a finished run is reused only with
the settings the flags would train, one of other settings is refused naming the difference, anything else trains or
resumes); the arms as data (`KNOWN_ARMS`); and `studies.scoring.ScoreCache`, the one cache of their scores."""

import json

import pytest

from otpo_trl.cli import train as train_cli
from otpo_trl.runs import RUN_FILE
from studies import common, dpo_vs_otpo
from studies.scoring import ScoreCache

from .testing_utils import tiny_argv


def test_run_arm_reuses_only_a_finished_run_of_the_same_settings(
    tiny_model_dir, sample_data_dir, tmp_path, monkeypatch
):
    run_dir = tmp_path / "dpo"
    flags = tiny_argv(tiny_model_dir, sample_data_dir, run_dir, "--trainer", "dpo")
    trained = []
    monkeypatch.setattr(train_cli, "main", lambda *parsed: trained.append(parsed[1].output_dir))

    assert common.run_arm(flags, run_dir) is True and trained == [str(run_dir)]  # nothing there: it trains

    run_dir.mkdir()
    (run_dir / "all_results.json").write_text("{}")
    record = {"settings": common.planned_settings(flags), "finished": True}
    (run_dir / RUN_FILE).write_text(json.dumps(record))
    assert common.run_arm(flags, run_dir) is False and len(trained) == 1  # finished, same settings: reused

    longer = tiny_argv(tiny_model_dir, sample_data_dir, run_dir, "--trainer", "dpo", "--max_steps", "3")
    with pytest.raises(ValueError, match=r"finished run of other settings \(max_steps: 2 -> 3\): start afresh"):
        common.run_arm(longer, run_dir, on_mismatch="start afresh")
    assert len(trained) == 1

    with pytest.raises(ValueError, match="the flags train into"):  # the flags and the folder must agree
        common.run_arm(flags, tmp_path / "elsewhere")


def test_table_and_links():
    assert common.table(["", "a"], [["x", 1]]) == ["| | a |", "|---|---|", "| x | 1 |"]
    assert common.image("pic", "/r/figures/p.png", "/r") == "![pic](figures/p.png)"


def test_the_compare_study_evaluates_base_and_runs_on_the_same_pairs():
    """The base model has no run for the evaluation to follow: the study passes the recipe's tie and identical-pair
    dropping to every evaluation, so the base model answers the prompts the runs answer."""
    from argparse import Namespace

    args = Namespace(max_samples=4, split="test", num_generations=2, max_new_tokens=8)
    recipe = {
        "dataset_name": "d",
        "beta": 0.1,
        "max_length": 512,
        "use_peft": True,
        "model_name_or_path": "m",
        "drop_ties": True,
        "drop_identical": False,
    }
    settings = {name: dpo_vs_otpo.evaluate_settings(name, args, recipe) for name in ("base", "dpo", "otpo")}
    for name, s in settings.items():
        assert (s["drop_ties"], s["drop_identical"], s["ref"]) == (True, False, None), name
    assert settings["base"]["max_samples"] == 0 and settings["otpo"]["max_samples"] == 4
    full = dpo_vs_otpo.evaluate_settings("dpo", args, {**recipe, "use_peft": False})
    assert full["ref"] == "m"  # a full fine-tune's reference is the recipe's model


def test_score_cache_reuses_an_entry_only_under_its_own_key(tmp_path):
    cache = ScoreCache(tmp_path / "scores")
    key = {"pairs": [("test", 0), ("test", 1)], "max_length": 256}
    assert cache.load("dpo-seed42", key) is None and cache.others("dpo-seed42", key) == []
    path = cache.save("dpo-seed42", key, {"margins": [0.5, -1.0]})
    assert path.parent == tmp_path / "scores" and path.name.startswith("dpo-seed42-")
    assert cache.load("dpo-seed42", {"max_length": 256, "pairs": [["test", 0], ["test", 1]]}) == {
        "margins": [0.5, -1.0]
    }
    other = {**key, "max_length": 512}
    assert cache.load("dpo-seed42", other) is None and cache.load("otpo-seed42", key) is None
    assert cache.others("dpo-seed42", other) == [path] and cache.others("dpo", key) == []
    # A file whose stored key is not the one asked for (say, a digest collision) is not read back.
    path.write_text(json.dumps({"key": other, "value": "stale"}))
    assert cache.load("dpo-seed42", key) is None


def test_known_arms_are_data_and_train_through_the_cli(tiny_model_dir, sample_data_dir, tmp_path):
    assert common.arm_label("otpo-uniform") == "OTPO - OTPO w/o OT" and common.arm_label("new") == "NEW"
    assert common.arm_label("ld_dpo_0.5-dpo") == "LD-DPO (α 0.5) - DPO"
    assert common.arm_flags("dpo") == ["--trainer", "dpo"]
    assert [name for name, arm in common.KNOWN_ARMS.items() if arm.solves_ot] == ["otpo", "otpo_reg_0.02"]
    with pytest.raises(ValueError, match="unknown arm 'nope': the known arms are dpo, otpo"):
        common.arm_flags("nope")
    with pytest.raises(ValueError, match="no '-'"):
        common.Arm("otpo-2", "OTPO 2", "--trainer otpo")
    # Every known arm (the peer methods included) is flags the training CLI accepts, each one setting what it names.
    expected = {
        "dpo": {"trainer": "dpo"},
        "otpo": {"trainer": "otpo", "ot_weighting": "ot"},
        "uniform": {"trainer": "otpo", "ot_weighting": "uniform"},
        "otpo_reg_0.02": {"trainer": "otpo", "ot_weighting": "ot", "ot_reg": 0.02},
        "ld_dpo": {"trainer": "dpo", "ld_alpha": 0.0},
        "ld_dpo_0.5": {"trainer": "dpo", "ld_alpha": 0.5},
        "sigmoid_norm": {"trainer": "dpo", "loss_type": ["sigmoid_norm"]},
        "sampo": {"trainer": "otpo", "ot_weighting": "sampo"},
    }
    assert set(common.KNOWN_ARMS) == set(expected)
    for name, wanted in expected.items():
        flags = tiny_argv(tiny_model_dir, sample_data_dir, tmp_path / name, *common.arm_flags(name))
        settings = common.planned_settings(flags)
        assert {k: settings.get(k) for k in wanted} == wanted, name
