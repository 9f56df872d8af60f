"""otpo_trl.inspection and otpo_trl.evaluation, and the scripts on top of them (plot_weights.py, evaluate.py), on a tiny
Llama (CPU, offline)."""

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

from otpo_trl import OTPOConfig, OTPOTrainer, inspection
from otpo_trl.cli import evaluate as evaluate_cli
from otpo_trl.cli import plot_weights as plot_weights_cli
from otpo_trl.cli.options import add_ot_arguments
from otpo_trl.data import load_preference_dataset
from otpo_trl.evaluation import score_preferences
from otpo_trl.inspection import implicit_rewards, inline_example, pair_token_stats
from otpo_trl.loading import load_model_and_tokenizer
from otpo_trl.ot import ot_token_weights
from otpo_trl.otpo_config import ot_kwargs
from otpo_trl.tokenization import tokenize_pair


# As in test_trainer.py: a huge entropic regularisation makes the plan uniform and "length" makes every weight 1.
NEAR_UNIFORM = {"reg": 1e6, "normalization": "length"}
PARIS = {
    "prompt": "What's the capital of France?",
    "chosen": "The capital of France is Paris.",
    "rejected": "The capital of France is Italy, which is definitely incorrect.",
}
ANSWERS = [
    ("Hello! How can I help you today?", "Go away."),
    ("Two plus two is four.", "It is five, I think, or maybe six."),
    ("Water boils at 100 degrees Celsius.", "Water boils when it feels like it."),
]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """A .jsonl in trl-lib/ultrafeedback_binarized's schema: conversational, implicit prompt, with scores."""
    path = tmp_path_factory.mktemp("data") / "test.jsonl"
    with path.open("w") as f:
        for i in range(6):
            chosen, rejected = ANSWERS[i % len(ANSWERS)]
            user = {"role": "user", "content": f"Question {i}: please explain the answer step by step."}
            row = {
                "chosen": [user, {"role": "assistant", "content": chosen}],
                "rejected": [user, {"role": "assistant", "content": rejected}],
                "score_chosen": 8.0,
                "score_rejected": 3.0,
            }
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter on the tiny model, saved without a tokenizer. Random (not zero) lora_B, so that the policy
    differs from its base and the margins are not 0."""
    path = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights=False
    )
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def adapter_models(adapter_dir):
    return load_model_and_tokenizer(adapter_dir, device="cpu")


# ------------------------------------------------------------------ loading


def test_adapter_loads_with_its_base_as_reference(adapter_dir, adapter_models, tiny_model_dir):
    policy, reference, tokenizer = adapter_models
    assert isinstance(policy, PeftModel) and reference is policy
    assert tokenizer.pad_token is not None and tokenizer.chat_template is not None  # from the base's folder
    examples = [inline_example(**PARIS)]
    stats = pair_token_stats(policy, reference, tokenizer, examples)
    base, no_ref, _ = load_model_and_tokenizer(tiny_model_dir, device="cpu")
    assert no_ref is None
    base_stats = pair_token_stats(base, None, tokenizer, examples)
    assert stats.has_reference and not base_stats.has_reference
    # The reference forward is the base (adapter disabled); the policy forward is not.
    torch.testing.assert_close(stats.ref_chosen_logps, base_stats.chosen_logps)
    torch.testing.assert_close(stats.ref_rejected_logps, base_stats.rejected_logps)
    assert not torch.allclose(stats.chosen_logps, stats.ref_chosen_logps)
    # Without a reference, the policy is its own: every margin is 0.
    torch.testing.assert_close(base_stats.ref_chosen_logps, base_stats.chosen_logps)

    # `ref` given for an adapter: the base it is loaded on (here the same folder, so the same numbers).
    policy2, reference2, _ = load_model_and_tokenizer(adapter_dir, ref=tiny_model_dir, device="cpu")
    assert reference2 is policy2
    torch.testing.assert_close(
        pair_token_stats(policy2, reference2, tokenizer, examples).chosen_logps, stats.chosen_logps
    )


def test_full_model_with_separate_reference(tiny_model_dir):
    policy, reference, tokenizer = load_model_and_tokenizer(tiny_model_dir, ref=tiny_model_dir, device="cpu")
    assert reference is not None and reference is not policy
    stats = pair_token_stats(policy, reference, tokenizer, [inline_example(**PARIS)])
    assert stats.has_reference
    torch.testing.assert_close(stats.ref_chosen_logps, stats.chosen_logps)  # the same weights


def test_missing_model_path_errors_clearly(tmp_path, adapter_dir, data_file):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model.*no such folder"):
        load_model_and_tokenizer(str(missing))
    argv = ["--model", str(missing), "--data", str(data_file), "--output_dir", str(tmp_path)]
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        evaluate_cli.main(argv)
    # An adapter whose base has moved: the message names the base and suggests `ref`.
    moved = tmp_path / "adapter"
    shutil.copytree(adapter_dir, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "moved-base")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="base model .*moved-base.*no such folder.*`ref`"):
        load_model_and_tokenizer(str(moved))


# ------------------------------------------------------------------ tokenisation and scores, against TRL


def tokenized_by_dpo_trainer(dataset, tokenizer, tmp_path):
    """`dataset` as TRL 1.16's DPOTrainer tokenises it (`prompt_ids`, `chosen_ids`, `rejected_ids` per row)."""
    fake_trainer = SimpleNamespace(_tokenizer=tokenizer)  # `_prepare_dataset` reads only this attribute
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    return DPOTrainer._prepare_dataset(fake_trainer, dataset, tokenizer, args, "test")


def test_tokenize_pair_matches_dpo_trainer(tiny_model_dir, data_file, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    conversational = load_preference_dataset(str(data_file))  # implicit prompt
    standard = Dataset.from_list([{"prompt": "Q: 2 + 2?", "chosen": " Four.", "rejected": " Five."}] * 2)
    for dataset in (conversational, standard):
        for example, row in zip(dataset, tokenized_by_dpo_trainer(dataset, tokenizer, tmp_path)):
            ids = tokenize_pair(example, tokenizer)
            assert ids == {k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}


# A chat template that renders the `tools` and a `style` argument, so that dropping either changes the tokens.
TOOLS_TEMPLATE = (
    "{% if tools %}<tools>{% for tool in tools %}{{ tool['name'] }};{% endfor %}</tools>\n{% endif %}"
    "{% if style is defined %}[{{ style }}]\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_tokenize_pair_passes_tools_and_chat_template_kwargs_as_dpo_trainer(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = TOOLS_TEMPLATE
    rows = []
    for i, (tool, style) in enumerate([("get_weather", "terse"), ("search", "long")]):
        pair = inline_example(f"Question {i}?", "Yes.", "No.")
        rows.append({**pair, "tools": json.dumps([{"name": tool}]), "chat_template_kwargs": {"style": style}})
    dataset = Dataset.from_list(rows)
    for example, row in zip(dataset, tokenized_by_dpo_trainer(dataset, tokenizer, tmp_path)):
        ids = tokenize_pair(example, tokenizer)
        assert ids == {k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
        prompt = tokenizer.decode(ids["prompt_ids"])
        assert f"<tools>{json.loads(example['tools'])[0]['name']};</tools>" in prompt
        assert f"[{example['chat_template_kwargs']['style']}]" in prompt
        plain = tokenize_pair({k: example[k] for k in ("prompt", "chosen", "rejected")}, tokenizer)
        assert plain["prompt_ids"] != ids["prompt_ids"]  # the columns matter here
    with pytest.raises(ValueError, match="`chat_template_kwargs` must be a mapping"):
        tokenize_pair({**rows[0], "chat_template_kwargs": "terse"}, tokenizer)


@pytest.mark.parametrize("trainer_cls", [DPOTrainer, OTPOTrainer], ids=["unweighted", "ot"])
def test_scores_match_trainer_metrics(trainer_cls, tiny_model_dir, adapter_dir, adapter_models, data_file, tmp_path):
    """Our implicit-reward accuracy and margin equal those DPOTrainer (unweighted) / OTPOTrainer (OT) log in eval."""
    policy, reference, tokenizer = adapter_models
    dataset = load_preference_dataset(str(data_file))
    ours = score_preferences(policy, reference, tokenizer, list(dataset), beta=0.1, max_length=64, progress=False)

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir, is_trainable=True
    )
    config_cls = OTPOConfig if trainer_cls is OTPOTrainer else DPOConfig
    args = config_cls(
        output_dir=str(tmp_path),
        per_device_eval_batch_size=len(dataset),
        max_length=64,
        beta=0.1,
        report_to="none",
        use_cpu=True,
        bf16=False,
    )
    # (fp32: the trainer's numbers are compared with the analysis tools' at fp32 tolerance.)
    # The base as an explicit reference: given a PeftModel alone, TRL takes a copy of the adapter as the reference.
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = trainer_cls(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=tokenizer,
    )
    metrics = trainer.evaluate()
    weighting = "ot" if trainer_cls is OTPOTrainer else "unweighted"
    assert metrics["eval_rewards/margins"] == pytest.approx(ours[weighting]["margin_mean"], rel=1e-4, abs=1e-6)
    assert metrics["eval_rewards/chosen"] == pytest.approx(ours[weighting]["chosen_reward_mean"], rel=1e-4, abs=1e-6)
    assert metrics["eval_rewards/accuracies"] == pytest.approx(ours[weighting]["accuracy"])


def test_near_uniform_ot_equals_unweighted(adapter_models, data_file):
    policy, reference, tokenizer = adapter_models
    examples = list(load_preference_dataset(str(data_file)))
    result = score_preferences(policy, reference, tokenizer, examples, batch_size=4, progress=False, **NEAR_UNIFORM)
    assert result["n_pairs"] == len(examples) and result["n_skipped"] == 0
    assert result["unweighted"]["margin_mean"] != 0  # a real test: the adapter moved the policy
    for key, value in result["unweighted"].items():
        assert result["ot"][key] == pytest.approx(value, rel=1e-4, abs=1e-7), key
    for pair in result["pairs"]:
        assert pair["margin_ot"] == pytest.approx(pair["margin_unweighted"], rel=1e-4, abs=1e-7)


def test_without_token_weights_no_ot_problem_is_solved(adapter_models, data_file, monkeypatch):
    """`token_weights=False` (pair_token_stats) and `reward_weightings=("unweighted",)` (score_preferences) give the
    same log-probs and DPO margins as with weights, and never call the OT solver."""
    policy, reference, tokenizer = adapter_models
    examples = list(load_preference_dataset(str(data_file)))
    with_ot = pair_token_stats(policy, reference, tokenizer, examples[:3], return_hidden=True)
    scored = score_preferences(policy, reference, tokenizer, examples, batch_size=4, progress=False)

    def no_solve(*args, **kwargs):
        raise AssertionError("an OT problem was solved")

    monkeypatch.setattr(inspection, "ot_token_weights", no_solve)
    stats = pair_token_stats(policy, reference, tokenizer, examples[:3], token_weights=False, return_hidden=True)
    assert stats.chosen_weights is None and stats.rejected_weights is None and stats.plan is None
    for name in ("chosen_logps", "ref_rejected_logps", "chosen_hidden", "rejected_mask"):
        torch.testing.assert_close(getattr(stats, name), getattr(with_ot, name))
    torch.testing.assert_close(
        implicit_rewards(stats, 0.1, "unweighted"), implicit_rewards(with_ot, 0.1, "unweighted")
    )
    with pytest.raises(ValueError, match="`weighting='ot'` needs OT weights.*token_weights=False"):
        implicit_rewards(stats, 0.1, "ot")
    with pytest.raises(ValueError, match=r"OT options \(reg\) were given with `token_weights=False`"):
        pair_token_stats(policy, reference, tokenizer, examples[:1], token_weights=False, reg=0.5)

    dpo_only = score_preferences(
        policy, reference, tokenizer, examples, batch_size=4, progress=False, reward_weightings=("unweighted",)
    )
    assert "ot" not in dpo_only and dpo_only["unweighted"] == pytest.approx(scored["unweighted"])
    assert [p["margin_unweighted"] for p in dpo_only["pairs"]] == pytest.approx(
        [p["margin_unweighted"] for p in scored["pairs"]]
    )
    assert all("margin_ot" not in p for p in dpo_only["pairs"])
    with pytest.raises(ValueError, match="OT options .* without 'ot' in `reward_weightings`"):
        score_preferences(policy, reference, tokenizer, examples, reward_weightings=("unweighted",), reg=0.5)
    with pytest.raises(ValueError, match="`reward_weightings` must be some of"):
        score_preferences(policy, reference, tokenizer, examples, reward_weightings=("uniform",))


def test_ot_arguments_follow_the_config():
    parser = argparse.ArgumentParser()
    add_ot_arguments(parser)
    args = parser.parse_args(["--ot_cost", "cosine", "--ot_reg", "0.5"])
    assert (args.ot_cost, args.ot_reg, args.ot_normalization) == ("cosine", 0.5, OTPOConfig.ot_normalization)
    with pytest.raises(SystemExit):
        parser.parse_args(["--ot_solver", "no-such-solver"])


# ------------------------------------------------------------------ the scripts


def test_plot_weights_inline_pair(tiny_model_dir, tmp_path):
    out = tmp_path / "paris.png"
    argv = ["--model", tiny_model_dir, "--out", str(out), "--svg", "--device", "cpu"]
    argv += [arg for key, value in PARIS.items() for arg in (f"--{key}", value)]
    paths = plot_weights_cli.main(argv)
    assert paths == [out, out.with_suffix(".svg")]
    assert out.read_bytes().startswith(b"\x89PNG") and out.stat().st_size > 10_000
    assert "<svg" in out.with_suffix(".svg").read_text()


def test_plot_weights_dataset_pair_with_adapter(adapter_dir, data_file, tmp_path):
    out = tmp_path / "pair.png"
    argv = ["--model", adapter_dir, "--data", str(data_file), "--index", "1", "--out", str(out), "--max_tokens", "4"]
    argv += ["--ot_cost", "cosine", "--device", "cpu"]
    plot_weights_cli.main(argv)  # max_tokens below the completions' lengths: the truncated plan
    assert out.read_bytes().startswith(b"\x89PNG") and out.stat().st_size > 10_000
    with pytest.raises(IndexError, match="out of range"):
        plot_weights_cli.main([*argv[:4], "--index", "99", "--out", str(out)])


def test_evaluate_script(adapter_dir, data_file, tmp_path):
    out = tmp_path / "eval"
    argv = ["--model", adapter_dir, "--data", str(data_file), "--split", "test", "--max_samples", "5"]
    argv += ["--batch_size", "2", "--num_generations", "3", "--max_new_tokens", "6", "--output_dir", str(out)]
    argv += ["--device", "cpu"]
    result = evaluate_cli.main(argv)
    summary = json.loads((out / "eval.json").read_text())
    assert summary["reference"] == "base (adapter disabled)"
    assert summary["preference"]["n_pairs"] == 5
    for weighting in ("unweighted", "ot"):
        assert 0 <= summary["preference"][weighting]["accuracy"] <= 1
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == summary["generation"]["n"] == 3
    assert all(1 <= g["length"] <= 6 for g in generations)
    assert summary["generation"]["hit_budget_share"] == sum(g["hit_budget"] for g in generations) / 3
    assert all(g["prompt"][0]["role"] == "user" for g in generations)
    report = (out / "eval.md").read_text()
    assert "| unweighted (DPO) |" in report and "| OT (OTPO) |" in report
    assert result["preference"] == summary["preference"] and len(result["pairs"]) == 5


# ------------------------------------------------------------------ the scripts' checks, before any model loads


@pytest.fixture
def no_model(monkeypatch):
    """The scripts may not load a model (nor evaluate) in these tests: the checks must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(plot_weights_cli, "load_model_and_tokenizer", refuse)
    monkeypatch.setattr(evaluate_cli, "evaluate", refuse)


def inline_argv(out):
    return ["--model", "no-such-model", "--out", str(out), *(a for k, v in PARIS.items() for a in (f"--{k}", v))]


def test_plot_weights_checks_out_before_the_model(tmp_path, no_model, monkeypatch, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match=r"--out .*a-file/fig.png: its folder .*a-file is a file"):
        plot_weights_cli.main(inline_argv(a_file / "fig.png"))
    with pytest.raises(ValueError, match=r"--out .*a-file/sub/fig.png: its folder .* cannot be written to"):
        plot_weights_cli.main(inline_argv(a_file / "sub" / "fig.png"))
    for folder in (tmp_path, tmp_path / "figs.png"):  # an existing folder, with or without a .png name
        folder.mkdir(exist_ok=True)
        with pytest.raises(ValueError, match=r"is a folder; give a file name, such as .*ot_weights.png"):
            plot_weights_cli.main(inline_argv(folder))

    # (chmod does not stop root, who runs CI: the checks' probes say "read-only" instead)
    existing = tmp_path / "old.png"
    existing.write_bytes(b"")
    monkeypatch.setattr(plot_weights_cli.os, "access", lambda path, mode: Path(path) != existing)
    with pytest.raises(ValueError, match=r"--out .*old.png exists and cannot be written to"):
        plot_weights_cli.main(inline_argv(existing))

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(SystemExit, match=r"error: --out .*: its folder .* cannot be written to: Permission denied"):
        plot_weights_cli.cli(inline_argv(tmp_path / "new" / "fig.png"))


@pytest.mark.parametrize("script", ["plot_weights", "evaluate"])
@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--ot_reg", "-1", "--ot_reg must be a finite number > 0, got -1.0"),
        ("--ot_reg_m", "0", "--ot_reg_m must be a finite number > 0, got 0.0"),
        ("--ot_tol", "nan", "--ot_tol must be a finite number > 0, got nan"),
        ("--ot_max_iter", "0", "--ot_max_iter must be >= 1, got 0"),
        ("--beta", "inf", "--beta must be a finite number > 0, got inf"),
    ],
)
def test_scripts_check_ot_options_as_the_config_does(script, option, value, message, tmp_path, no_model, capsys):
    """The same checks as OTPOConfig's (`otpo_config.checked_value`), as a usage error before any model loads."""
    if script == "plot_weights":
        main, argv = plot_weights_cli.main, inline_argv(tmp_path / "fig.png")
    else:
        main, argv = evaluate_cli.main, ["--model", "m", "--data", "d", "--output_dir", str(tmp_path / "eval")]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, option, value])
    assert exit_info.value.code == 2
    assert f"error: {message}" in capsys.readouterr().err
    key = option.removeprefix("--")
    with pytest.raises(ValueError, match=f"`{key}` must be"):  # what OTPOConfig says of the same value
        OTPOConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, **{key: type(getattr(OTPOConfig, key))(value)})


def test_plot_weights_warns_of_an_empty_completion(tiny_model_dir, tmp_path):
    argv = ["--model", tiny_model_dir, "--out", str(tmp_path / "fig.png"), "--device", "cpu"]
    argv += ["--prompt", "Hi?", "--chosen", " ", "--rejected", "No."]
    with pytest.warns(UserWarning, match="The chosen completion is empty") as record:
        plot_weights_cli.main(argv)
    assert not [w for w in record if "rejected completion" in str(w.message)]
    user = {"role": "user", "content": "Hi?"}
    implicit = {
        "chosen": [user, {"role": "assistant", "content": "Yes."}],
        "rejected": [user, {"role": "assistant", "content": ""}],
    }
    with pytest.warns(UserWarning, match="The rejected completion is empty"):
        assert plot_weights_cli.warn_empty_completions(implicit) == ["rejected"]
    assert plot_weights_cli.warn_empty_completions({"prompt": "p", "chosen": "a", "rejected": "b"}) == []


@pytest.mark.parametrize("rows", [1, 2, 30])
def test_plan_labels_do_not_overlap_the_heading(rows):
    """The plan's axis and colour-bar labels are centred on its height; over a short plan (one or two chosen tokens)
    they used to reach into the "Transport plan" heading above it."""
    cols = 10
    stats = SimpleNamespace(
        chosen_tokens=[[f"c{i}" for i in range(rows)]],
        rejected_tokens=[[f"r{j}" for j in range(cols)]],
        chosen_weights=torch.rand(1, rows),
        rejected_weights=torch.rand(1, cols),
        plan=torch.rand(1, rows, cols),
    )
    fig = plot_weights_cli.plot_pair(stats, 0, ["title"], max_tokens=64)
    renderer = fig.canvas.get_renderer()
    fig.canvas.draw()
    heading = next(t for ax in fig.axes for t in ax.texts if t.get_text().startswith("Transport plan"))
    heading_box = heading.get_window_extent(renderer)
    labels = [ax.yaxis.label for ax in fig.axes if ax.yaxis.label.get_text()]
    assert sorted(label.get_text() for label in labels) == ["chosen tokens", "transport mass"]
    for label in labels:
        box = label.get_window_extent(renderer)
        assert box.y1 < heading_box.y0, (label.get_text(), box, heading_box)
    plot_weights_cli.plt.close(fig)


def test_plot_weights_compares_ot_reg_on_a_relative_scale(tiny_model_dir, tmp_path, monkeypatch):
    """`--compare_ot_reg` adds one panel per ε, computed from the same hidden states as the main one; with
    `--color_scale relative` the tokens are shaded by weight / side mean on a scale centred on 1 (the weight without
    OT) that spans every panel."""
    drawn = {}
    plot = plot_weights_cli.plot_pair

    def spy(stats, i, title, max_tokens, panels=None, color_scale="weight"):
        fig = plot(stats, i, title, max_tokens, panels=panels, color_scale=color_scale)
        drawn.update(stats=stats, panels=panels, color_scale=color_scale, fig=fig)
        return fig

    monkeypatch.setattr(plot_weights_cli, "plot_pair", spy)
    out = tmp_path / "two.png"
    argv = ["--model", tiny_model_dir, "--out", str(out), "--device", "cpu", "--ot_reg", "0.02"]
    argv += ["--compare_ot_reg", "1.0", "--color_scale", "relative"]
    argv += [arg for key, value in PARIS.items() for arg in (f"--{key}", value)]
    plot_weights_cli.main(argv)
    assert out.read_bytes().startswith(b"\x89PNG")
    stats, panels = drawn["stats"], drawn["panels"]
    assert [heading for heading, _, _ in panels] == ["ot_reg = 0.02", "ot_reg = 1.0"]
    n, m = int(stats.chosen_mask[0].sum()), int(stats.rejected_mask[0].sum())
    # The first panel is the figure's own weights; the second is the solver at ε 1 on the same states.
    np.testing.assert_allclose(panels[0][1], stats.chosen_weights[0, :n].numpy())
    expected = ot_token_weights(
        stats.chosen_hidden,
        stats.rejected_hidden,
        stats.chosen_mask,
        stats.rejected_mask,
        **{**ot_kwargs(plot_weights_cli.parse_args(argv)), "reg": 1.0},
    )
    np.testing.assert_allclose(panels[1][1], expected[0][0, :n].numpy(), rtol=1e-6)
    np.testing.assert_allclose(panels[1][2], expected[1][0, :m].numpy(), rtol=1e-6)
    # Smaller ε moves the weights further from their mean.
    spread = [max(w.max() / w.mean() for w in sides) for _, *sides in panels]
    assert spread[0] > spread[1] > 1
    # One scale for both panels, white at 1 and spanning the lowest and highest ratio of any panel.
    bar = next(ax for ax in drawn["fig"].axes if ax.get_label() == "token weight scale")
    ratios = np.concatenate([w / w.mean() for _, *sides in panels for w in sides])
    assert bar.get_xlim() == pytest.approx((min(ratios.min(), 0.95), max(ratios.max(), 1.05)), rel=1e-6)
    plot_weights_cli.plt.close(drawn["fig"])


def test_plot_weights_checks_compare_ot_reg(capsys):
    with pytest.raises(SystemExit):
        plot_weights_cli.parse_args(["--model", "m", "--data", "d", "--compare_ot_reg", "0"])
    assert "--compare_ot_reg must be a finite number > 0" in capsys.readouterr().err
