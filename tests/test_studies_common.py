"""`studies.common.run_arm`, the one way the studies train an arm: a finished run is reused only with the settings the
flags would train, one of other settings is refused naming the difference, anything else trains (or resumes)."""

import json

import pytest

from otpo_trl.cli import train as train_cli
from otpo_trl.runs import RUN_FILE
from studies import common

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
    """The base model has no run for `evaluate` to follow: the study passes the recipe's tie and identical-pair
    dropping to every evaluation, so the base model answers the prompts the runs answer."""
    from argparse import Namespace

    from studies import dpo_vs_otpo

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

    def drops(name):
        argv = dpo_vs_otpo.evaluate_argv(name, "m", args, recipe, "out")
        return [argv[argv.index(f"--{key}") + 1] for key in ("drop_ties", "drop_identical")]

    assert drops("base") == drops("otpo") == drops("dpo") == ["True", "False"]
