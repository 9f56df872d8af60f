"""scripts/ot_spread.py on a tiny Llama: its numbers against a direct computation, and its checks before loading."""

import json
import sys

import numpy as np
import pytest
import torch
from trl.data_utils import maybe_extract_prompt

from otpo_trl.cli import ot_spread
from otpo_trl.data import load_preference_dataset
from otpo_trl.inspection import pair_token_stats
from otpo_trl.loading import load_model_and_tokenizer
from otpo_trl.tokenization import tokenize_pair


MAX_LENGTH = 512


def direct(model_dir, data_dir, n, **options):
    """Per-completion entropy and max / mean, and per-pair margin change, computed here from pair_token_stats's own
    OT weights (one forward per setting, all pairs in one batch), with numpy."""
    policy, _, tokenizer = load_model_and_tokenizer(model_dir, device="cpu")
    examples = [maybe_extract_prompt(dict(e)) for e in load_preference_dataset(str(data_dir), "test")]
    # The first n pairs whose prompt does not fill MAX_LENGTH (DPOTrainer drops the others), in one batch.
    batch = [e for e in examples if len(tokenize_pair(e, tokenizer)["prompt_ids"]) < MAX_LENGTH][:n]
    ot = pair_token_stats(policy, None, tokenizer, batch, max_length=MAX_LENGTH, **options)
    uni = pair_token_stats(policy, None, tokenizer, batch, max_length=MAX_LENGTH, **options, weighting="uniform")
    entropy, max_mean = [], []
    for side in ("chosen", "rejected"):
        for w, m in zip(getattr(ot, f"{side}_weights").numpy(), getattr(ot, f"{side}_mask").numpy()):
            w = w[m].astype(float)
            p = w / w.sum()
            entropy.append(-(p * np.log(p)).sum() / np.log(len(w)))
            max_mean.append(w.max() / w.mean())

    def margin(s):
        return (s.chosen_weights.double() * s.chosen_logps).sum(1) - (
            s.rejected_weights.double() * s.rejected_logps
        ).sum(1)

    change = ((margin(ot) - margin(uni)).abs() / margin(uni).abs()).numpy()
    return np.median(entropy), np.median(max_mean), np.max(max_mean), np.median(change)


def test_spread_numbers_match_a_direct_computation(tiny_model_dir, sample_data_dir, tmp_path):
    out = tmp_path / "spread"
    argv = ["--model", tiny_model_dir, "--data", str(sample_data_dir), "--split", "test", "--num_pairs", "8"]
    argv += ["--max_length", str(MAX_LENGTH), "--ot_reg", "1e6", "0.01", "--ot_cost_scale", "official", "minmax"]
    argv += ["--out", str(out), "--device", "cpu"]
    summary = ot_spread.main(argv)
    saved = json.loads((out / "ot_spread.json").read_text())
    assert saved["results"] == summary["results"] and (out / "ot_spread.png").read_bytes().startswith(b"\x89PNG")
    assert "| minmax, ε 0.01 |" in (out / "ot_spread.md").read_text()
    rows = saved["results"]
    assert list(rows) == ["official, ε 1e+06", "official, ε 0.01", "minmax, ε 1e+06", "minmax, ε 0.01"]
    assert saved["n_pairs"] == 8 and len(saved["data_rows"]) == 8 and saved["n_skipped"] >= 0
    # At a huge ε the weights are uniform: entropy 1, max / mean 1, no token below half the mean, margin unchanged.
    for name in ("official, ε 1e+06", "minmax, ε 1e+06"):
        r = rows[name]
        assert r["entropy_median"] == pytest.approx(1, abs=1e-5) and r["max_mean_max"] == pytest.approx(1, abs=1e-4)
        assert r["below_half"] == 0 and r["margin_change_median"] < 1e-3
    # At a small ε they are not, and each number is the one computed directly from pair_token_stats's weights.
    for scale in ("official", "minmax"):
        r = rows[f"{scale}, ε 0.01"]
        entropy, max_mean, max_max, change = direct(tiny_model_dir, sample_data_dir, 8, reg=0.01, cost_scale=scale)
        assert entropy < 0.999 and max_mean > 1.05 and change > 1e-3
        assert r["entropy_median"] == pytest.approx(entropy, rel=1e-4)
        assert r["max_mean_median"] == pytest.approx(max_mean, rel=1e-4)
        assert r["max_mean_max"] == pytest.approx(max_max, rel=1e-4)
        assert r["margin_change_median"] == pytest.approx(change, rel=1e-3)
        # Minmax makes the cost range 1 in every pair, so Δ is at most 1 and the bound holds.
        assert r["max_min_median"] <= r["bound_at_median_delta"] * (1 + 1e-6) or scale == "official"
    assert all(0 < d <= 1 + 1e-6 for d in saved["per_pair"]["minmax, ε 0.01"]["delta"])
    # The verdict follows the median max / mean weight.
    verdict = saved["close_to_uniform"]
    close, far = verdict.split("Clearly reweighted: ")
    assert "official, ε 1e+06" in close and "minmax, ε 0.01" not in close
    assert ("minmax, ε 0.01" in far) == (rows["minmax, ε 0.01"]["max_mean_median"] >= 1.25)


def test_spread_checks_options_and_out_before_loading(tmp_path, tiny_model_dir, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(ot_spread, "load_model_and_tokenizer", refuse)
    monkeypatch.setattr(ot_spread, "load_preference_dataset", refuse)
    base = ["--model", tiny_model_dir, "--data", "x.jsonl", "--out", str(tmp_path / "o")]
    for bad in (
        ["--ot_reg", "1.0", "-0.5"],
        ["--ot_cost_scale", "minmax", "max"],
        ["--ot_tol", "0"],
        ["--ot_max_iter", "0"],
        ["--num_pairs", "0"],
    ):
        with pytest.raises(SystemExit):
            ot_spread.parse_args(base + bad)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit):
        ot_spread.parse_args([*base[:-1], str(blocker)])
    args = ot_spread.parse_args(base + ["--ot_reg", "1", "0.1", "--ot_cost_scale", "official", "minmax"])
    every_pair = [("official", 1.0), ("official", 0.1), ("minmax", 1.0), ("minmax", 0.1)]
    assert [(s["cost_scale"], s["reg"]) for s in ot_spread.settings(args)] == every_pair
    # Without matplotlib (the figure comes last) the command stops before the data and the model, naming the extra.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match=r'error: `otpo-trl spread` draws .* `pip install "otpo-trl\[viz\]"'):
        ot_spread.cli(base)


def test_the_per_completion_measures_are_token_weight_stats():
    """The spread tool measures completions with the OT package's `token_weight_stats` (one statistic for the
    trainer's metrics, this tool and the pictures): the known values the tool's own function was tested with."""
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 1.0, 1.0, 0.0]])
    mask = torch.tensor([[True] * 4, [True, True, True, False]])
    got = ot_spread.token_weight_stats(w, mask)
    assert got.entropy[0].item() == pytest.approx(1.0)
    p = np.array([4, 1, 1]) / 6
    assert got.entropy[1].item() == pytest.approx(-(p * np.log(p)).sum() / np.log(3))
    assert got.max_mean.tolist() == pytest.approx([1.0, 2.0]) and got.max_min.tolist() == pytest.approx([1, 4])
    assert got.ratio[1, :3].tolist() == pytest.approx([2.0, 0.5, 0.5]) and got.ratio[1, 3].isnan()
