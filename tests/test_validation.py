"""Bad arguments, paths and data stop scripts/train.py (and evaluate.py) before any model loads, with a message that
names the problem."""

import json
import logging
import math
import tempfile
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import transformers
import yaml

from otpo_trl import OTPOConfig
from otpo_trl.cli import evaluate as evaluate_cli

from .testing_utils import REPO_ROOT, forbid_models, tiny_argv


QUICKSTART = REPO_ROOT / "configs" / "quickstart.yaml"


@pytest.fixture
def no_model(train, monkeypatch):
    forbid_models(monkeypatch, train)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pairs(n, prompt="What is 2 + 2?"):
    return [
        {"prompt": f"{prompt} ({i})", "chosen": f"It is 4 ({i}).", "rejected": f"It is 5 ({i})."} for i in range(n)
    ]


def run(train, argv):
    train.main(*train.parse_args(argv))


# ------------------------------------------------------------------ the recipe and the arguments


def test_trainer_from_the_recipe_is_checked(train, tmp_path):
    recipe = {**yaml.safe_load(QUICKSTART.read_text()), "trainer": "ppo"}  # YAML bypasses argparse's choices
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match=r"`trainer` must be one of \['otpo', 'dpo'\], got 'ppo'"):
        train.parse_args(["--config", str(tmp_path / "r.yaml")])


def test_missing_or_broken_config_file(train, tmp_path):
    with pytest.raises(ValueError, match="`--config .*nope.yaml`: no such file"):
        train.parse_args(["--config", str(tmp_path / "nope.yaml")])
    broken = tmp_path / "broken.yaml"
    broken.write_text("beta: 0.1\nlora_target_modules: [q_proj, v_proj\nmax_steps: 3\n")
    with pytest.raises(ValueError, match="is not valid YAML at line 3, column 10"):
        train.parse_args(["--config", str(broken)])
    listing = tmp_path / "list.yaml"
    listing.write_text("- beta: 0.1\n")
    with pytest.raises(ValueError, match="must hold a YAML mapping"):
        train.parse_args(["--config", str(listing)])


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("ot_reg", float("inf"), "`ot_reg` must be a finite number > 0, got inf"),
        ("ot_reg_m", float("nan"), "`ot_reg_m` must be a finite number > 0, got nan"),
        ("ot_tol", "small", "`ot_tol` must be a finite number > 0, got 'small'"),
        ("beta", True, "`beta` must be a finite number > 0, got True"),
        ("ot_max_iter", 10.5, "`ot_max_iter` must be an int, got 10.5"),
        ("ot_max_iter", 0, "`ot_max_iter` must be >= 1, got 0"),
    ],
)
def test_ot_numbers_are_checked_by_type_and_value(tmp_path, key, value, message):
    with pytest.raises(ValueError, match=message):
        OTPOConfig(output_dir=str(tmp_path), bf16=False, **{key: value})


def test_numpy_numbers_are_numbers(tmp_path):
    args = OTPOConfig(output_dir=str(tmp_path), bf16=False, ot_reg=np.float32(0.5), ot_max_iter=np.int64(20))
    assert (args.ot_reg, args.ot_max_iter) == (0.5, 20)
    assert type(args.ot_reg) is float and type(args.ot_max_iter) is int  # stored as plain Python numbers


def test_ot_numbers_from_the_recipe(train, tmp_path):
    path = tmp_path / "r.yaml"
    for line, message in (("ot_reg: .inf", "`ot_reg` must be a finite number"), ("ot_max_iter: 10.5", "an int")):
        key = line.split(":")[0]  # the recipe's own line goes: a key set twice is an error of its own
        kept = [kept for kept in QUICKSTART.read_text().splitlines() if not kept.startswith(f"{key}:")]
        path.write_text("\n".join([*kept, line]) + "\n")
        with pytest.raises(ValueError, match=message):
            train.parse_args(["--config", str(path)])


@pytest.mark.parametrize("value", ["0", "-3"])
def test_max_train_samples_below_one_is_refused(train, value):
    with pytest.raises(ValueError, match=f"`max_train_samples` must be an int >= 1 .*got {value}"):
        train.parse_args(["--config", str(QUICKSTART), "--max_train_samples", value])


def test_bf16_without_a_gpu_says_what_to_set(train, monkeypatch):
    # As on a machine without a bf16 GPU, whatever this one has.
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: False)
    monkeypatch.setattr(transformers.training_args, "is_torch_xla_available", lambda: False)
    argv = ["--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", "o"]  # flags only: bf16 by default
    with pytest.raises(
        ValueError, match=r"set `bf16=False` \(`--bf16 false`, `bf16: false` in a recipe\) to train in fp32"
    ):
        train.parse_args(argv)
    train.parse_args([*argv, "--bf16", "false", "--use_cpu", "true"])  # what it says works


def test_a_key_set_twice_in_a_recipe_names_both_lines(train, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("beta: 0.1\nmodel_init_kwargs:\n  dtype: float32\n  dtype: bfloat16\nbeta: 0.2\n")
    with pytest.raises(ValueError, match=r"r.yaml` sets `dtype` twice, at lines 3 and 4"):
        train.parse_args(["--config", str(path)])
    lines = QUICKSTART.read_text().splitlines()
    path.write_text("\n".join([*lines, "beta: 0.5"]) + "\n")
    first = 1 + next(i for i, line in enumerate(lines) if line.startswith("beta:"))
    with pytest.raises(
        ValueError, match=rf"sets `beta` twice, at lines {first} and {len(lines) + 1}; YAML would keep"
    ):
        train.parse_args(["--config", str(path)])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max_steps", "0"], "`max_steps` is 0: no step would run"),
        (["--max_steps", "-1", "--num_train_epochs", "0"], "`num_train_epochs` is 0.0 (and `max_steps` unset)"),
        (["--max_steps", "-1", "--num_train_epochs", "-2"], "`num_train_epochs` is -2.0"),
    ],
    ids=["steps", "epochs", "negative_epochs"],
)
def test_zero_steps_or_epochs_are_refused(train, argv, message):
    with pytest.raises(ValueError) as err:
        train.parse_args(["--config", str(QUICKSTART), *argv])
    assert message in str(err.value)
    train.parse_args(["--config", str(QUICKSTART), "--max_steps", "-1", "--num_train_epochs", "0.5"])  # a share: fine


def test_ot_flags_with_the_dpo_trainer_are_warned(train, caplog):
    dpo_recipe = REPO_ROOT / "configs" / "llama-3.2-3b-instruct" / "dpo_full.yaml"  # its own ot_reg: 0.1
    with caplog.at_level(logging.WARNING, logger="otpo_trl.cli.arguments"):
        train.parse_args(["--config", str(dpo_recipe), "--use_cpu", "true"])
        train.parse_args(["--config", str(QUICKSTART), "--ot_reg", "0.5"])  # trainer otpo: used
    assert not caplog.records  # the recipe's own ot_* keys are not warned about
    with caplog.at_level(logging.WARNING, logger="otpo_trl.cli.arguments"):
        train.parse_args(["--config", str(QUICKSTART), "--trainer", "dpo", "--ot_reg", "1.0", "--ot_cost=cosine"])
    assert "trainer 'dpo' ignores --ot_reg, --ot_cost: the `ot_*` settings are OTPO's" in caplog.text


# ------------------------------------------------------------------ output_dir and checkpoints


def test_output_dir_that_is_a_file_or_read_only(
    train, tiny_model_dir, sample_data_dir, tmp_path, no_model, monkeypatch
):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(train.InputError, match="`output_dir` .*a-file is a file"):
        run(train, tiny_argv(tiny_model_dir, sample_data_dir, a_file))
    with pytest.raises(train.InputError, match="`output_dir` .*a-file/out cannot be written to: Not a directory"):
        run(train, tiny_argv(tiny_model_dir, sample_data_dir, a_file / "out"))

    def read_only(*args, **kwargs):  # (chmod does not stop root, who runs CI)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(train.InputError, match="cannot be written to: Permission denied"):
        run(train, tiny_argv(tiny_model_dir, sample_data_dir, tmp_path / "out"))


# ------------------------------------------------------------------ data, before the model


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([*pairs(2), {"prompt": "p", "chosen": 7, "rejected": "r"}], r"row 2, column 'chosen': expected text .*int 7"),
        (
            [
                *pairs(1),
                {
                    "prompt": "p",
                    "chosen": [{"role": "assistant", "content": "a"}],
                    "rejected": [{"role": "assistant", "content": "b"}],
                },
            ],
            "row 1, column 'chosen' is a list of messages but row 0 is text",
        ),
    ],
    ids=["number", "mixed_layout"],
)
def test_bad_rows_fail_before_the_model(train, tiny_model_dir, tmp_path, no_model, rows, message):
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(train.InputError, match=message):
        run(train, tiny_argv(tiny_model_dir, data, tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # a run refused for its data creates no output_dir (nor its lock)


def test_nothing_left_after_drop_identical(train, tiny_model_dir, tmp_path, no_model):
    rows = [{"prompt": "p", "chosen": "same", "rejected": "same"}] * 3
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(train.InputError, match="drop_identical removed all 3 pairs"):
        run(train, tiny_argv(tiny_model_dir, data, tmp_path / "out", "--drop_identical", "true"))


def test_empty_data_file(train, tiny_model_dir, tmp_path, no_model):
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(train.InputError, match="train.jsonl: no rows"):
        run(train, tiny_argv(tiny_model_dir, tmp_path / "train.jsonl", tmp_path / "out"))


def test_fewer_pairs_than_one_batch_with_drop_last(train, tiny_model_dir, tmp_path, no_model):
    data = write_jsonl(tmp_path / "train.jsonl", pairs(1))
    with pytest.raises(train.InputError, match=r"Only 1 train pair\(s\) .*fewer than one batch"):
        run(train, tiny_argv(tiny_model_dir, data, tmp_path / "out"))  # batch 2, dataloader_drop_last
    assert not (tmp_path / "out").exists()


def test_fewer_eval_pairs_than_one_eval_batch_with_drop_last(train, tiny_model_dir, tmp_path, no_model):
    """transformers drops the last short batch of the evaluation dataloader too: no eval_loss, without a word."""
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train.jsonl", pairs(8))
    write_jsonl(tmp_path / "data" / "test.jsonl", pairs(3))
    argv = tiny_argv(tiny_model_dir, tmp_path / "data", tmp_path / "out", "--do_eval", "true")
    with pytest.raises(train.InputError, match=r"Only 3 eval pair\(s\) .*per_device_eval_batch_size 4 x 1 process"):
        run(train, [*argv, "--per_device_eval_batch_size", "4"])  # dataloader_drop_last


def test_every_prompt_longer_than_max_length(train, tiny_model_dir, tmp_path, no_model):
    data = write_jsonl(tmp_path / "train.jsonl", pairs(4, prompt="Please explain the answer step by step. " * 20))
    with pytest.raises(train.InputError, match=r"4 of the 4 train pairs have a prompt of at least max_length \(64\)"):
        run(train, tiny_argv(tiny_model_dir, data, tmp_path / "out", "--max_length", "64"))


def test_single_file_with_do_eval_needs_a_held_out_split(train, tiny_model_dir, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", pairs(10))
    argv = tiny_argv(tiny_model_dir, data, tmp_path / "out", "--do_eval", "true", "--per_device_eval_batch_size", "3")
    forbid_models(monkeypatch, train)
    with pytest.raises(train.InputError, match="single file, so a single split.*`eval_split_size`"):
        run(train, argv)
    monkeypatch.undo()
    args = train.parse_args([*argv, "--eval_split_size", "0.3"])
    plan, train_pairs, eval_pairs, _ = train.prepare_run(*args)
    assert (len(train_pairs), len(eval_pairs)) == (7, 3)
    assert not {row["prompt"] for row in train_pairs} & {row["prompt"] for row in eval_pairs}  # held out
    assert plan.record["settings"]["eval_split_size"] == 0.3  # part of what is trained on


# ------------------------------------------------------------------ evaluate.py


def test_evaluate_checks_its_output_dir_first(tmp_path, tiny_model_dir, monkeypatch):

    def refuse(*args, **kwargs):
        raise AssertionError("evaluated before checking the output folder")

    monkeypatch.setattr(evaluate_cli, "evaluate", refuse)
    (tmp_path / "eval").write_text("x")
    argv = ["--model", tiny_model_dir, "--data", "d", "--output_dir", str(tmp_path / "eval")]
    with pytest.raises(ValueError, match="--output_dir .*eval is a file"):
        evaluate_cli.main(argv)


def test_evaluate_with_no_pairs_writes_null_not_nan(tiny_model_dir, sample_data_dir, tmp_path):
    out = tmp_path / "eval"
    # Every prompt is longer than max_length: both pairs are skipped, as DPOTrainer drops them.
    argv = ["--model", tiny_model_dir, "--data", str(sample_data_dir), "--max_samples", "2", "--max_length", "4"]
    argv += ["--num_generations", "0", "--output_dir", str(out), "--device", "cpu"]
    result = evaluate_cli.main(argv)
    assert math.isnan(result["preference"]["unweighted"]["accuracy"])  # in memory, a mean over nothing
    text = (out / "eval.json").read_text()
    summary = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in eval.json"))  # strict JSON
    assert (summary["preference"]["n_pairs"], summary["preference"]["n_skipped"]) == (0, 2)
    assert (
        summary["preference"]["unweighted"]["accuracy"] is None and summary["preference"]["ot"]["margin_mean"] is None
    )


# ------------------------------------------------------------------ adapters record an absolute base path


def test_adapter_from_a_relative_model_path_loads_from_elsewhere(
    train, tiny_model_dir, sample_data_dir, tmp_path, monkeypatch
):
    from otpo_trl.loading import load_model_and_tokenizer

    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    (work / "models" / "tiny").symlink_to(tiny_model_dir)
    monkeypatch.chdir(work)
    argv = tiny_argv("models/tiny", sample_data_dir, "out", "--use_peft", "true", "--lora_r", "2", "--max_steps", "1")
    argv += ["--lora_target_modules", "q_proj", "v_proj"]
    run(train, argv)
    config = json.loads((work / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(work / "models" / "tiny")
    monkeypatch.chdir(tmp_path)  # another directory: the adapter still finds its base
    policy, reference, _ = load_model_and_tokenizer(str(work / "out"), device="cpu")
    assert reference is policy

    # An adapter saved elsewhere with a relative base: the error suggests --ref, for a path (`models/...` is never a
    # Hub id) as for a name the Hub cannot give. (Offline, as in CI: online lookups would retry for a minute.)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for recorded in ("models/tiny", "tiny-base"):
        config["base_model_name_or_path"] = recorded
        (work / "out" / "adapter_config.json").write_text(json.dumps(config))
        with pytest.raises(FileNotFoundError, match=rf"'{recorded}'.* records this base .*Pass `ref` \(`--ref`\)"):
            load_model_and_tokenizer(str(work / "out"), device="cpu")
    load_model_and_tokenizer(str(work / "out"), ref=str(Path(tiny_model_dir)), device="cpu")
