"""The length study (`studies/length_study.py`, run by scripts/length_study.py): its statistics on numbers whose answer
is known, its settings and held-out pairs, and the quick study end to end (scores cached, a baseline's arms reused)."""

import json
import shlex
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from otpo_trl.cli import train as train_cli
from otpo_trl.evaluation import score_preferences
from otpo_trl.loading import load_model_and_tokenizer
from otpo_trl.tokenization import tokenize_pair
from studies import length_report, length_settings, length_stats, length_study, scoring

from .testing_utils import REPO_ROOT


def split_recipe(data_dir):
    """The recipe's values the held-out pairs depend on: the sample's train and test splits, filtered as training."""
    return {
        "dataset_name": str(data_dir),
        "dataset_train_split": "train",
        "dataset_test_split": "test",
        "drop_ties": True,
        "drop_identical": True,
    }


def quick_argv(model_dir, data_dir, out, report):
    """A quick study of the tiny model on the sample data, its runs in `out`, its report at `report`."""
    return ["--quick", "--model", model_dir, "--data", str(data_dir), "--out", str(out), "--report", str(report)]


# ------------------------------------------------------------------ statistics


def test_pair_metrics_known_values():
    # Pairs 1, 2, 6 chosen longer (one right: 6 is a tie, wrong as in TRL), 3-4 chosen shorter (both right), 5 the
    # same length (in neither subset).
    m = np.array([1.0, -1.0, 0.5, 2.0, -3.0, 0.0])
    d = np.array([3.0, 5.0, -2.0, -4.0, 0.0, 1.0])
    got = length_stats.pair_metrics(m, d)
    assert got["accuracy"] == pytest.approx(3 / 6)
    assert got["margin_mean"] == pytest.approx(-0.5 / 6)
    assert got["acc_chosen_longer"] == pytest.approx(1 / 3)
    assert got["acc_chosen_shorter"] == pytest.approx(1.0)
    assert got["subset_gap"] == pytest.approx(1 / 3 - 1)
    assert got["corr_margin_length"] == pytest.approx(np.corrcoef(m, d)[0, 1])


def test_pair_metrics_correlation_and_empty_subset():
    d = np.array([1.0, 2.0, 3.0, 4.0])
    assert length_stats.pair_metrics(2 * d + 7, d)["corr_margin_length"] == pytest.approx(1.0)
    assert length_stats.pair_metrics(-d, d)["corr_margin_length"] == pytest.approx(-1.0)
    rng = np.random.default_rng(0)
    m, d = rng.normal(size=(3, 50)), rng.normal(size=50)  # leading axes (seeds) are kept
    corr = length_stats.pair_metrics(m, d)["corr_margin_length"]
    assert corr == pytest.approx([np.corrcoef(row, d)[0, 1] for row in m])
    # No pair has its chosen side shorter: that accuracy is undefined (NaN), not 0.
    assert np.isnan(length_stats.pair_metrics(np.ones(4), np.arange(1.0, 5.0))["acc_chosen_shorter"])


def test_bootstrap_interval_of_a_known_accuracy():
    # 2,000 pairs, 70% right: the 95% interval of the accuracy is about 0.7 ± 1.96 * sqrt(0.21 / 2000) = ± 0.020.
    n = 2000
    correct = np.zeros(n, bool)
    correct[: int(0.7 * n)] = True
    margins = np.where(correct, 1.0, -1.0)[None]
    stats = length_stats.bootstrap({"dpo": margins}, np.ones(n), n_resamples=2000, seed=1)
    acc = stats["dpo"]["accuracy"]
    assert acc["mean"] == pytest.approx(0.7)
    assert acc["low"] == pytest.approx(0.7 - 0.020, abs=0.002)
    assert acc["high"] == pytest.approx(0.7 + 0.020, abs=0.002)


def test_bootstrap_differences_are_paired():
    # OTPO = DPO + 0.5 on every pair: with the same resample for both arms the difference is exactly 0.5 in every
    # resample (an interval of width 0), though each arm's own margin varies widely between resamples.
    rng = np.random.default_rng(0)
    dpo = rng.normal(size=(2, 300)) * 3
    d = rng.normal(size=300)
    stats = length_stats.bootstrap({"dpo": dpo, "otpo": dpo + 0.5, "uniform": dpo}, d, n_resamples=500)
    diff = stats["otpo-dpo"]["margin_mean"]
    assert (
        diff["mean"] == pytest.approx(0.5) and diff["low"] == pytest.approx(0.5) and diff["high"] == pytest.approx(0.5)
    )
    assert stats["dpo"]["margin_mean"]["high"] - stats["dpo"]["margin_mean"]["low"] > 0.2
    assert stats["otpo-uniform"]["margin_mean"]["low"] == pytest.approx(0.5)
    # Shifting every margin leaves the correlation with length unchanged: a difference of exactly 0.
    corr = stats["otpo-dpo"]["corr_margin_length"]
    assert [corr[k] for k in ("mean", "low", "high", "low_seeds", "high_seeds")] == pytest.approx([0] * 5, abs=1e-9)
    first = length_stats.significance(stats).split("OTPO - OTPO w/o OT")[0].split(". Same sign")[0]
    excludes, includes = first.split("; it includes 0 for ")
    assert "margin_mean" in excludes and "corr_margin_length" in includes and "margin_mean" not in includes
    assert "OTPO - OTPO w/o OT: " in length_stats.significance(stats)


def test_bootstrap_over_seeds_is_paired_and_wider():
    # Seeds differ a lot (seed offsets -2, 0, +2), pairs little. Over pairs only, the seeds are taken as given: a
    # narrow interval around the mean. Over pairs and seeds the interval must widen to show the seed spread. OTPO is
    # DPO + 0.3 in every seed: the same seed draw for both arms keeps the difference exactly 0.3 in every resample.
    rng = np.random.default_rng(0)
    dpo = np.array([[-2.0], [0.0], [2.0]]) + 0.1 * rng.normal(size=(3, 400))
    d = rng.normal(size=400)
    stats = length_stats.bootstrap({"dpo": dpo, "otpo": dpo + 0.3}, d, n_resamples=1000)
    m = stats["dpo"]["margin_mean"]
    assert m["per_seed"] == pytest.approx(dpo.mean(1)) and m["mean"] == pytest.approx(dpo.mean())
    assert m["high"] - m["low"] < 0.05 < 1.0 < m["high_seeds"] - m["low_seeds"]
    diff = stats["otpo-dpo"]["margin_mean"]
    assert [diff[k] for k in ("low", "high", "low_seeds", "high_seeds")] == pytest.approx([0.3] * 4)
    assert diff["per_seed"] == pytest.approx([0.3] * 3)
    # The difference is significant over pairs and seeds, and has one sign in every seed.
    sentence = length_stats.significance(stats)
    assert "margin_mean" in sentence.split("over pairs and seeds for ")[1].split(";")[0]
    assert "margin_mean" in sentence.split("Same sign in every seed: ")[1]
    with pytest.raises(ValueError, match="same seeds"):
        length_stats.bootstrap({"dpo": dpo, "otpo": dpo[:2]}, d)


def test_significance_separates_pairs_only_from_pairs_and_seeds():
    # OTPO's correlation is lower than DPO's by 0.1 in two seeds and higher by 0.05 in the third: significant over
    # pairs (many pairs, these seeds), not over seeds, and not of one sign across seeds.
    row = {"mean": -0.05, "low": -0.08, "high": -0.02, "low_seeds": -0.1, "high_seeds": 0.05}
    row["per_seed"] = [-0.1, -0.1, 0.05]
    zero = {"mean": 0.0, "low": -0.1, "high": 0.1, "low_seeds": -0.1, "high_seeds": 0.1, "per_seed": [0.1, -0.1, 0]}
    stats = {"otpo-dpo": {k: (row if k == "corr_margin_length" else zero) for k in length_stats.METRICS}}
    sentence = length_stats.significance(stats)
    assert "over pairs and seeds for no metric; over pairs only (these seeds) for corr_margin_length;" in sentence
    assert sentence.endswith("Same sign in every seed: no metric.")


def test_answers_follow_the_intervals_of_the_correlation():
    def stats(mean, low, high, low_seeds, high_seeds):
        row = dict(mean=mean, low=low, high=high, low_seeds=low_seeds, high_seeds=high_seeds, per_seed=[mean] * 3)
        return {"otpo-dpo": {"corr_margin_length": row}, "otpo-uniform": {"corr_margin_length": row}}

    cases = {  # (mean, low, high, low_seeds, high_seeds): the verdict
        (-0.1, -0.15, -0.05, -0.2, -0.01): "Yes, at this scale",
        (0.1, 0.05, 0.15, 0.01, 0.2): "No, the opposite",
        (-0.1, -0.15, -0.05, -0.2, 0.02): "Only for these seeds: the interval over pairs is below 0",
        (0.1, 0.05, 0.15, -0.01, 0.2): "Only for these seeds, and the opposite",
        (-0.02, -0.1, 0.05, -0.2, 0.1): "Not shown at this scale",
    }
    for numbers, verdict in cases.items():
        dpo, uniform = length_stats.answers(stats(*numbers))
        assert dpo.startswith("**Does OTPO's reward depend less on length than DPO's?** " + verdict), dpo
        assert uniform.startswith("**Do OT weights add anything") and verdict in uniform
        assert f"{numbers[0]:+.3f} (95% CI over pairs [{numbers[1]:+.3f}, {numbers[2]:+.3f}]" in dpo
    # The plan's part is put beside OTPO - DPO: -0.008 of -0.331 is 2% of it.
    both = stats(-0.331, -0.4, -0.25, -0.42, -0.24)
    both["otpo-uniform"] = stats(-0.008, -0.012, -0.005, -0.012, -0.004)["otpo-uniform"]
    dpo, uniform = length_stats.answers(both)
    assert uniform.endswith(
        "Beside OTPO - DPO (-0.331), the weights' part is 2% of it; the rest is OTPO's "
        "normalisation, which OTPO w/o OT shares."
    )
    assert "Beside" not in dpo
    assert "Beside" not in length_stats.answers({"otpo-uniform": both["otpo-uniform"]})[0]
    # No whole to share where OTPO - DPO is not shown over pairs and seeds; a part of the other sign is said so.
    assert (
        "Beside" not in length_stats.answers({**both, "otpo-dpo": stats(-0.02, -0.1, 0.05, -0.2, 0.1)["otpo-dpo"]})[1]
    )
    both["otpo-uniform"] = stats(0.01, 0.005, 0.015, 0.004, 0.016)["otpo-uniform"]
    assert length_stats.answers(both)[1].endswith("Beside OTPO - DPO (-0.331), the weights' part goes the other way.")
    # Nor where the part itself is not shown: its interval over pairs and seeds includes 0.
    both["otpo-uniform"] = stats(0.005, -0.012, 0.022, -0.014, 0.028)["otpo-uniform"]
    assert "Beside" not in length_stats.answers(both)[1] and "Not shown at this scale" in length_stats.answers(both)[1]
    # A second OTPO arm (another ε) gets both questions, in its own words, and its own share beside its own - DPO.
    reg = {"otpo_reg_0.02-" + k.split("-")[1]: v for k, v in stats(-0.331, -0.4, -0.25, -0.42, -0.24).items()}
    reg["otpo_reg_0.02-uniform"] = stats(-0.033, -0.05, -0.02, -0.05, -0.02)["otpo-uniform"]
    dpo, uniform, reg_dpo, reg_uniform = length_stats.answers({**both, **reg})
    assert reg_dpo.startswith("**Does the reward of OTPO (ε 0.02) depend less on length than DPO's?** Yes")
    assert "OTPO (ε 0.02)'s margin-length correlation minus DPO's is -0.331" in reg_dpo
    assert reg_uniform.startswith("**Do the OT weights of OTPO (ε 0.02) add anything over OTPO w/o OT?** Yes")
    assert reg_uniform.endswith(
        "Beside OTPO (ε 0.02) - DPO (-0.331), the weights' part is 10% of it; the rest is "
        "OTPO's normalisation, which OTPO w/o OT shares."
    )
    # The recipe's OTPO against each peer method, after the OTPO questions, in the known arms' order.
    peers = {"otpo-sampo": stats(0.1, 0.05, 0.15, 0.01, 0.2)["otpo-dpo"]}
    peers["otpo-ld_dpo"] = stats(-0.07, -0.1, -0.04, -0.11, -0.03)["otpo-dpo"]
    said = length_stats.answers({**both, **peers})
    assert said[2].startswith("**Does OTPO's reward depend less on length than LD-DPO (α 0)'s?** Yes, at this scale")
    assert "OTPO's margin-length correlation minus LD-DPO (α 0)'s is -0.070" in said[2]
    assert said[3].startswith("**Does OTPO's reward depend less on length than SamPO's?** No, the opposite")
    assert "Beside" not in said[2] + said[3]
    # One seed: its seed "interval" is the one over pairs, so nothing may be claimed beyond that seed.
    one = stats(-0.1, -0.15, -0.05, -0.15, -0.05)
    for row in one.values():
        row["corr_margin_length"]["per_seed"] = [-0.1]
    assert "For this one seed only: the interval over pairs is below 0" in length_stats.answers(one)[0]
    sig = {"otpo-dpo": dict.fromkeys(length_stats.METRICS, one["otpo-dpo"]["corr_margin_length"])}
    assert "excludes 0 over pairs and seeds for no metric; over pairs only (these seeds) for accuracy" in (
        length_stats.significance(sig)
    )


def test_held_out_pairs_never_overlap_training(sample_data_dir):
    recipe = split_recipe(sample_data_dir)
    args = Namespace(train_pairs=900, held_out_train=200, test_pairs=5)
    with pytest.raises(ValueError, match="held-out pairs would be trained on"):
        length_settings.held_out_pairs(args, recipe)
    args.train_pairs = 100
    pairs = length_settings.held_out_pairs(args, recipe)
    train_rows = [p["row"] for p in pairs if p["source"] == "train"]
    assert len(train_rows) == 200 and min(train_rows) >= 100 and [p["source"] for p in pairs[:5]] == ["test"] * 5
    assert all(isinstance(p["prompt"], list) for p in pairs)  # the implicit prompt is extracted
    with pytest.raises(ValueError, match="eval_split_size"):  # a shuffled training pool could reach the held-out rows
        length_settings.held_out_pairs(args, {**recipe, "eval_split_size": 0.1})


def test_held_out_file_pairs_and_training_pool(sample_data_dir, tmp_path):
    recipe = split_recipe(sample_data_dir)
    test_rows = (sample_data_dir / "test.jsonl").read_text().splitlines()
    held = tmp_path / "held.jsonl"
    held.write_text("\n".join(test_rows[:4]) + "\n")
    args = Namespace(train_pairs=100, held_out_train=0, test_pairs=0, held_out_file=str(held))
    pairs = length_settings.held_out_pairs(args, recipe)
    assert [p["source"] for p in pairs] == ["file"] * len(pairs) and [p["row"] for p in pairs] == list(
        range(len(pairs))
    )
    assert 0 < len(pairs) <= 4 and all(isinstance(p["prompt"], list) for p in pairs)  # the prompt is extracted
    # A pair of the training pool (train row 3 is kept by the filters: pool index 2) is not held out; one past the
    # pool is.
    train_rows = (sample_data_dir / "train.jsonl").read_text().splitlines()
    held.write_text(test_rows[0] + "\n" + train_rows[3] + "\n")
    with pytest.raises(ValueError, match=r"1 of its pairs \(rows \[1\]\) are in the training pool"):
        length_settings.held_out_pairs(args, recipe)
    args.train_pairs = 2
    assert len(length_settings.held_out_pairs(args, recipe)) == 2
    with pytest.raises(ValueError, match="no such file"):
        length_settings.held_out_pairs(
            Namespace(**{**vars(args), "held_out_file": str(tmp_path / "none.jsonl")}), recipe
        )


def test_options_quick_never_writes_the_real_report():
    args = length_settings.parse_args(["--quick", "--beta", "0.2"])  # unknown flags go to scripts/train.py
    assert args.max_steps == 2 and args.seeds == [42] and args.train_flags == ["--beta", "0.2"]
    assert args.report != length_settings.STUDY_REPORT and args.out != length_settings.parse_args([]).out
    full = length_settings.parse_args(["--max_steps", "5"])
    assert full.report == "reports/length_study/length_study.md" and full.max_steps == 5 and full.seeds == [42, 43, 44]
    # `--seed` (not `--seeds`) would give every run the same seed: refused, like the other per-run flags.
    for flag in ("--seed", "--trainer", "--output_dir=x"):
        with pytest.raises(SystemExit):
            length_settings.parse_args([flag, "1"])


def test_arms_are_picked_from_the_known_ones():
    assert length_settings.parse_args([]).arms == ["dpo", "otpo", "uniform"]
    args = length_settings.parse_args(["--arms", "dpo", "sampo", "ld_dpo_0.5"])
    assert args.arms == ["dpo", "sampo", "ld_dpo_0.5"] and args.baseline_arms == ["dpo", "uniform"]
    flags = length_settings.train_flags(args, "ld_dpo_0.5", 42, Path("out/ld_dpo_0.5-seed42"))
    assert flags[2:6] == ["--trainer", "dpo", "--ld_alpha", "0.5"]
    # Refused: an unknown arm, one twice, a flag that would override an arm's own setting, baseline arms without a
    # baseline.
    refused = (
        ["--arms", "nope"],
        ["--arms", "dpo", "dpo"],
        ["--arms", "otpo_reg_0.02", "--ot_reg", "0.1"],
        ["--baseline_arms", "dpo"],
        ["--baseline", "b.json", "--baseline_arms", "nope"],
    )
    for argv in refused:
        with pytest.raises(SystemExit):
            length_settings.parse_args(argv)
    assert length_settings.parse_args(["--ot_reg", "0.1"]).train_flags == ["--ot_reg", "0.1"]  # no default arm sets it
    # Every arm is compared with DPO, and OTPO with OTPO w/o OT.
    assert length_stats.differences(["dpo", "otpo", "uniform", "ld_dpo"]) == [
        ("otpo", "dpo"),
        ("uniform", "dpo"),
        ("ld_dpo", "dpo"),
        ("otpo", "uniform"),
        ("otpo", "ld_dpo"),
    ]
    assert length_stats.differences(["otpo", "sampo"]) == [("otpo", "sampo")]
    # Every OTPO arm (each ε) against OTPO w/o OT too: what its plan adds; SamPO and the peers are no plan.
    assert length_stats.differences(["dpo", "uniform", "otpo", "otpo_reg_0.02", "sampo"])[-3:-1] == [
        ("otpo", "uniform"),
        ("otpo_reg_0.02", "uniform"),
    ]
    # The recipe's OTPO against each peer method present (not OTPO at another ε, nor w/o OT: no peer); no OTPO, none.
    assert length_stats.differences(["dpo", "otpo", "uniform", "otpo_reg_0.02", "sigmoid_norm", "sampo"])[-2:] == [
        ("otpo", "sigmoid_norm"),
        ("otpo", "sampo"),
    ]
    assert length_stats.differences(["dpo", "otpo_reg_0.02", "sampo", "ld_dpo"]) == [
        ("otpo_reg_0.02", "dpo"),
        ("sampo", "dpo"),
        ("ld_dpo", "dpo"),
    ]
    # The results table's greedy lengths: an arm's mean and share at the budget, a difference of means, "-" without.
    generation = {"dpo": {"lengths": [100, 256], "hit_budget": [False, True]}, "otpo": {"lengths": [90, 100]}}
    assert length_report.greedy_cell("dpo", generation) == "178.0 (50% at the budget)"
    assert length_report.greedy_cell("otpo-dpo", generation) == "-83.0"
    assert length_report.greedy_cell("uniform", generation) == length_report.greedy_cell("otpo-uniform", generation)
    assert length_report.greedy_cell("uniform", generation) == "-"
    # The report names the arms by their flags (the default three keep the committed sentence).
    line = length_report.describe_arms(["dpo", "sampo"])
    assert line == "- Arms: DPO (`trainer: dpo`), SamPO (`trainer: otpo, ot_weighting: sampo`), trained alike."
    assert length_report.describe_arms(length_settings.DEFAULT_ARMS).startswith("- Arms: DPO (`trainer: dpo`), OTPO (")
    assert length_report.listed(["A", "B", "C"]) == "A, B and C" and length_report.listed(["A", "B"]) == "A and B"


# ------------------------------------------------------------------ the quick study, end to end


def test_quick_study_end_to_end_and_resume(tmp_path, tiny_model_dir, sample_data_dir, monkeypatch):
    out, report = tmp_path / "runs", tmp_path / "reports" / "length_study.md"
    argv = quick_argv(tiny_model_dir, sample_data_dir, out, report)
    # `make study ARGS=--quick` as a user runs it, with the tiny model (-o: the SmolLM2 folder is not prepared).
    make = ["make", "-s", "-o", "prepare-model", "study", f"PY={sys.executable}", f"SAMPLE_DATA={sample_data_dir}"]
    make.append("ARGS=" + " ".join(shlex.quote(a) for a in argv))
    done = subprocess.run(make, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    assert report.exists() and report.with_suffix(".json").exists()
    figures = sorted(p.name for p in (report.parent / "figures").iterdir())
    assert figures == ["length_study_generation.png", "length_study_scatter.png", "length_study_subsets.png"]
    saved = json.loads(report.with_suffix(".json").read_text())
    n = len(saved["pairs"])
    assert n > 0 and {p["source"] for p in saved["pairs"]} == {"test", "train"}
    assert sorted(saved["margins"]) == ["dpo-seed42", "otpo-seed42", "uniform-seed42"]
    assert all(len(v) == n for v in saved["margins"].values())
    assert saved["margins"]["otpo-seed42"] != saved["margins"]["dpo-seed42"]  # different models, different margins
    for name in ("dpo", "otpo", "uniform", "otpo-dpo", "otpo-uniform"):
        assert set(saved["stats"][name]) == set(length_stats.METRICS)
    text = report.read_text()
    assert (
        "python scripts/length_study.py --quick" in text and "| OTPO - DPO |" in text and "**Significance.**" in text
    )
    run_args = {
        arm: json.loads((out / f"{arm}-seed42" / "run_args.json").read_text())["settings"]
        for arm in length_settings.DEFAULT_ARMS
    }
    assert run_args["dpo"]["trainer"] == "dpo" and run_args["uniform"]["ot_weighting"] == "uniform"
    # The OT runs' logged weight spread is read back; DPO logs no ot/* scalars.
    assert "otpo-seed42" in saved["ot_logged"] and "dpo-seed42" not in saved["ot_logged"]
    assert 0 < saved["ot_logged"]["otpo-seed42"]["ot/weight_entropy"] <= 1 + 1e-6
    assert "## OTPO's token weights in training" in text
    # The pairs scored with an answer cut at max_length, counted again from the tokens (TRL cuts prompt + completion).
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    held = length_settings.held_out_pairs(
        Namespace(train_pairs=8, held_out_train=8, test_pairs=8), split_recipe(sample_data_dir)
    )
    ids = {(p["source"], p["row"]): tokenize_pair(p, tokenizer) for p in held}
    cut = [
        [len(i["prompt_ids"]) + len(i[side]) > 512 for side in ("chosen_ids", "rejected_ids")]
        for i in (ids[p["source"], p["row"]] for p in saved["pairs"])
    ]
    assert saved["truncation"] == {"one_or_both": sum(map(any, cut)), "both": sum(map(all, cut))}
    assert 0 < saved["truncation"]["both"] < saved["truncation"]["one_or_both"] < n
    assert f"{sum(map(any, cut))} of them with an answer cut at max_length, {sum(map(all, cut))} with both cut" in text
    # Trained and scored by the study's own process: its torch threads are the runs'.
    assert saved["compute"]["torch_threads"] >= 1 and f"(torch threads: {saved['compute']['torch_threads']})" in text

    # Resume: finished runs and scores are reused, so neither training nor a model load may happen again.
    stamps = {p: p.stat().st_mtime_ns for p in [*out.glob("*/all_results.json"), *out.glob("scores/*.json")]}
    assert len(stamps) == 7  # 3 runs, their 3 scores and the reference's scores

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished run or its scores were redone")

    monkeypatch.setattr(train_cli, "main", forbidden)
    monkeypatch.setattr(scoring, "load_model_and_tokenizer", forbidden)
    report.unlink()
    again = length_study.main(argv)
    assert report.exists() and again["margins"] == saved["margins"] and again["stats"] == saved["stats"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # Reused runs were trained elsewhere: no thread count is claimed for them.
    assert again["compute"]["torch_threads"] is None and "torch threads" not in report.read_text()

    # The reference's scores were computed once for the three runs (one cache entry), and every run's entry names it.
    references = sorted(out.glob("scores/reference-*.json"))
    runs = sorted(out.glob("scores/*-seed42-*.json"))
    assert len(references) == 1 and len(runs) == 3
    assert {json.loads(p.read_text())["value"]["reference_scores"] for p in runs} == {references[0].name}

    # Scores made for other held-out pairs are not reused: one more test pair rescores every run (no retraining),
    # with one reference pass for the new held-out set and then only the policy, once per run; the cache keeps both.
    monkeypatch.undo()
    monkeypatch.setattr(train_cli, "main", forbidden)
    passes = []
    real_sums = scoring.log_prob_sums
    monkeypatch.setattr(scoring, "log_prob_sums", lambda *a: passes.append(1) or real_sums(*a))
    rescored = length_study.main([*argv, "--test_pairs", "9"])
    assert len(passes) == 3 + 1 and len(list(out.glob("scores/reference-*.json"))) == 2
    assert len(list(out.glob("scores/*-seed42-*.json"))) == 6 and {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # The margins with the cached reference are today's: the policy and its reference scored together, as
    # scripts/evaluate.py does (up to float rounding).
    recipe = split_recipe(sample_data_dir)
    pairs = length_settings.held_out_pairs(Namespace(train_pairs=8, held_out_train=8, test_pairs=9), recipe)
    order = [(p["source"], p["row"]) for p in rescored["pairs"]]
    for arm in length_settings.DEFAULT_ARMS:
        policy, reference, tokenizer = load_model_and_tokenizer(str(out / f"{arm}-seed42"), device="cpu")
        scored = score_preferences(policy, reference, tokenizer, pairs, beta=0.1, max_length=512, progress=False)
        direct = {
            (pairs[p["index"]]["source"], pairs[p["index"]]["row"]): p["margin_unweighted"] for p in scored["pairs"]
        }
        assert sorted(direct) == order
        assert rescored["margins"][f"{arm}-seed42"] == pytest.approx([direct[k] for k in order], rel=1e-5, abs=1e-6)

    # A finished run of other training settings in the same --out is refused, not reported under the new ones.
    with pytest.raises(ValueError, match=r"finished run of other settings \(learning_rate: 0.0001 -> 0.001"):
        length_study.main([*argv, "--learning_rate", "1e-3"])


# ------------------------------------------------------------------ a baseline's arms, a held-out file


def test_quick_study_baseline_reuse_and_held_out_file(tmp_path, tiny_model_dir, sample_data_dir, monkeypatch):
    out, report = tmp_path / "runs", tmp_path / "report" / "length_study.md"
    argv = quick_argv(tiny_model_dir, sample_data_dir, out, report)
    first = length_study.main(argv)
    baseline = tmp_path / "baseline.json"  # a copy: the report's JSON is rewritten by the studies below
    baseline.write_text(report.with_suffix(".json").read_text())
    assert first["baseline"] is None and set(first["run_settings"]) == {
        f"{a}-seed42" for a in length_settings.DEFAULT_ARMS
    }

    trained, scored = [], []
    real_train, real_score = train_cli.main, length_study.score_run
    monkeypatch.setattr(train_cli, "main", lambda *a: trained.append(str(a[1].output_dir)) or real_train(*a))
    monkeypatch.setattr(length_study, "score_run", lambda *a: scored.append(a[2].name) or real_score(*a))

    # Refused before anything trains, naming the difference: a study setting, a training setting of the arms.
    new_out, new_report = tmp_path / "reg0.5", tmp_path / "reg0.5" / "report" / "length_study.md"
    again = [*argv[:-4], "--out", str(new_out), "--report", str(new_report), "--baseline", str(baseline)]
    with pytest.raises(ValueError, match=r"cannot stand in.*learning_rate: 0.0001 there, 0.001 here"):
        length_study.main([*again, "--learning_rate", "1e-3"])
    with pytest.raises(ValueError, match=r"dpo-seed42 trained with other settings \(beta: 0.1 -> 0.2\)"):
        length_study.main([*again, "--beta", "0.2"])
    with pytest.raises(ValueError, match=r"uniform-seed42 trained with other settings \(ot_normalization"):
        length_study.main([*again, "--ot_normalization", "mean"])
    assert trained == [] and scored == []

    # Another ot_reg: only the otpo arm trains and scores; the dpo and uniform arms are the baseline's, as they were.
    summary = length_study.main([*again, "--ot_reg", "0.5"])
    assert [Path(t).name for t in trained] == ["otpo-seed42"] and scored == ["otpo-seed42"]
    assert summary["baseline"]["arms"] == ["dpo", "uniform"]
    for run in ("dpo-seed42", "uniform-seed42"):
        assert summary["margins"][run] == first["margins"][run]
    assert summary["margins"]["otpo-seed42"] != first["margins"]["otpo-seed42"]
    assert summary["generation"]["dpo"] == first["generation"]["dpo"]
    assert summary["run_settings"]["otpo-seed42"]["ot_reg"] == 0.5
    assert "DPO and OTPO w/o OT arms were not trained or scored here" in new_report.read_text()

    # Any arm from the baseline: a peer arm trains alone, DPO, OTPO and OTPO w/o OT are the baseline's, and every arm
    # is compared with DPO. OTPO solves OT: another ot_reg refuses it (only the arms without OT may differ in ot_*).
    trained.clear()
    scored.clear()
    peers = [*again, "--arms", "ld_dpo", "--baseline_arms", "dpo", "otpo", "uniform"]
    with pytest.raises(ValueError, match=r"otpo-seed42 trained with other settings \(ot_reg: 1.0 -> 0.5\)"):
        length_study.main([*peers, "--ot_reg", "0.5"])
    assert trained == [] and scored == []
    peer = length_study.main(peers)
    assert [Path(t).name for t in trained] == ["ld_dpo-seed42"] and scored == ["ld_dpo-seed42"]
    assert list(peer["margins"]) == [f"{a}-seed42" for a in ("dpo", "otpo", "uniform", "ld_dpo")]
    for run in ("dpo-seed42", "otpo-seed42", "uniform-seed42"):
        assert peer["margins"][run] == first["margins"][run]
    assert peer["margins"]["ld_dpo-seed42"] != first["margins"]["dpo-seed42"]
    assert {"otpo-dpo", "uniform-dpo", "ld_dpo-dpo", "otpo-uniform"} <= set(peer["stats"])
    assert peer["ot_logged"] == first["ot_logged"] and peer["run_settings"]["ld_dpo-seed42"]["ld_alpha"] == 0
    text = new_report.read_text()
    assert "| LD-DPO (α 0) - DPO |" in text and "The DPO, OTPO and OTPO w/o OT arms were not trained" in text

    # A JSON that predates the recorded settings is checked against what its command trains: the same answers.
    old = json.loads(baseline.read_text())
    del old["run_settings"], old["scoring"]
    old_path = tmp_path / "old.json"
    old_path.write_text(json.dumps(old))
    trained.clear()
    again_old = [*again[:-1], str(old_path), "--ot_reg", "0.5"]
    assert length_study.main(again_old)["margins"] == summary["margins"] and trained == []  # the otpo run is reused
    with pytest.raises(ValueError, match=r"its command .* dpo-seed42 trained with other settings \(beta"):
        length_study.main([*again_old, "--beta", "0.2"])

    # --held_out_file: every pair of a file is scored instead of the split slices (the runs are reused)...
    rows = (sample_data_dir / "test.jsonl").read_text().splitlines()
    held = tmp_path / "held.jsonl"
    held.write_text("\n".join(rows[20:26]) + "\n")
    trained.clear()
    scored.clear()
    filed = length_study.main([*argv, "--held_out_file", str(held)])
    assert trained == [] and sorted(scored) == [f"{a}-seed42" for a in sorted(length_settings.DEFAULT_ARMS)]
    assert {p["source"] for p in filed["pairs"]} == {"file"} and 0 < len(filed["pairs"]) <= 6
    assert filed["scoring"]["held_out"]["file"] == str(held.resolve())
    assert f"every pair of `{held}`" in report.read_text()
    # ... refused for a baseline scored on other pairs, and for a file holding a training pair.
    with pytest.raises(ValueError, match="scoring held_out"):
        length_study.main([*argv, "--held_out_file", str(held), "--baseline", str(baseline)])
    trained_row = (sample_data_dir / "train.jsonl").read_text().splitlines()[3]
    (tmp_path / "leak.jsonl").write_text(trained_row + "\n" + rows[20] + "\n")
    with pytest.raises(ValueError, match=r"1 of its pairs \(rows \[0\]\) are in the training pool"):
        length_study.main([*argv, "--held_out_file", str(tmp_path / "leak.jsonl")])


def control_stats(mean, low, high, low_seeds, high_seeds, seeds=3):
    """Stats with only the positive control's correlation row (LD-DPO α 0 - DPO), one value for every seed."""
    row = dict(mean=mean, low=low, high=high, low_seeds=low_seeds, high_seeds=high_seeds, per_seed=[mean] * seeds)
    return {"ld_dpo-dpo": {"corr_margin_length": row}}


CONTROL_CASES = {  # (mean, low, high, low_seeds, high_seeds): the answer's verdict, the opening sentence's
    (-0.1, -0.15, -0.05, -0.2, -0.01): (
        "Detected: the interval over pairs and seeds is below 0.",
        "DPO) was detected**",
    ),
    (-0.1, -0.15, -0.05, -0.2, 0.02): ("Detected for these seeds only", "was detected for these seeds only**"),
    (0.05, 0.01, 0.09, -0.02, 0.12): ("Not detected, and the opposite", "was not detected, and went the other way**"),
    (-0.02, -0.06, 0.02, -0.1, 0.06): ("Not detected: the interval over pairs includes 0.", "was not detected**"),
}


def test_the_positive_control_is_answered_first_with_what_the_study_can_detect():
    """With an LD-DPO arm, the answers open with whether it was detected (its correlation below DPO's) and the smallest
    difference the study detects: 2.8 standard errors read from each interval (width / 3.92)."""
    for numbers, (verdict, _) in CONTROL_CASES.items():
        (control,) = length_stats.answers(control_stats(*numbers))
        assert control.startswith("**Was the positive control detected") and verdict in control, control
    # With one seed the interval "over pairs and seeds" is the one over pairs: never a verdict over seeds.
    (control,) = length_stats.answers(control_stats(-0.3, -0.4, -0.2, -0.4, -0.2, seeds=1))
    assert "Detected for this seed only" in control and "over pairs and seeds is below 0" not in control
    (control,) = length_stats.answers(control_stats(-0.02, -0.059, 0.019, -0.0625, 0.0355))
    assert "detects a difference of about 0.056 over pairs, 0.070 over pairs and seeds" in control
    # The committed studies have no LD-DPO arm: their answers (and so their reports) are unchanged.
    assert not any("positive control" in a for a in length_stats.answers({}))


def test_the_report_opens_with_one_sentence_on_the_positive_control():
    """The same verdicts as the answer, in the one sentence the report opens with; none without the control."""
    for numbers, (_, verdict) in CONTROL_CASES.items():
        sentence = length_stats.control_summary(control_stats(*numbers))
        assert sentence.startswith("**The positive control (LD-DPO") and verdict in sentence, sentence
        assert sentence.count(". ") == 0 and sentence.endswith("(80% power at the 5% level).")  # one sentence
    sentence = length_stats.control_summary(control_stats(-0.02, -0.059, 0.019, -0.0625, 0.0355))
    assert "95% CI [-0.059, +0.019] over pairs, [-0.062, +0.035] over pairs and seeds" in sentence
    assert "detects a difference of about 0.056 over pairs, 0.070 over pairs and seeds" in sentence
    one = length_stats.control_summary(control_stats(-0.3, -0.4, -0.2, -0.4, -0.2, seeds=1))
    assert "was detected for this one seed only**" in one and "over pairs and seeds)" not in one
    assert length_stats.control_summary({}) == ""
