"""scripts/train.py's command line: every recipe parses, unknown keys and bad values fail by name, configs load."""

import json
import logging
import os
from types import SimpleNamespace

import pytest
import trl
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from trl import DPOConfig

from otpo_trl import OTPOConfig
from otpo_trl.cli import upstream

from .testing_utils import CONFIGS, RECIPES, REPO_ROOT, forbid_models, recipe_argv


ACCELERATE_CONFIGS = sorted((CONFIGS / "accelerate").glob("*.yaml"))
QUICKSTART = CONFIGS / "quickstart.yaml"


def write_recipe(tmp_path, **changes):
    recipe = {**yaml.safe_load(QUICKSTART.read_text()), **changes}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_recipes_found():
    names = {str(p.relative_to(CONFIGS)) for p in RECIPES}
    assert "quickstart.yaml" in names
    assert {"llama-3-8b-instruct/otpo_full.yaml", "llama-3.2-3b-instruct/dpo_full.yaml"} <= names
    assert {p.stem for p in ACCELERATE_CONFIGS} == {"single_gpu", "ddp", "deepspeed_zero3", "fsdp"}


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(CONFIGS)) for p in RECIPES])
def test_every_recipe_parses(train, path):
    script_args, training_args, model_args = train.parse_args(recipe_argv(path))
    recipe = yaml.safe_load(path.read_text())
    assert isinstance(training_args, OTPOConfig)
    assert script_args.trainer == recipe["trainer"]
    assert model_args.model_name_or_path == recipe["model_name_or_path"]
    assert training_args.learning_rate == pytest.approx(float(recipe["learning_rate"]))
    if script_args.trainer == "dpo":
        assert type(train.to_dpo_config(training_args)) is DPOConfig


@pytest.mark.parametrize("path", [p for p in RECIPES if p.stem.startswith("dpo_")], ids=lambda p: p.parent.name)
def test_dpo_baselines_match_their_otpo_recipe(path):
    dpo = yaml.safe_load(path.read_text())
    otpo = yaml.safe_load(path.with_name(path.name.replace("dpo_", "otpo_")).read_text())
    assert dpo.pop("trainer") == "dpo" and otpo.pop("trainer") == "otpo"
    assert dpo.pop("output_dir") != otpo.pop("output_dir")
    assert dpo == otpo


def test_paper_hyper_parameters():
    full = yaml.safe_load((CONFIGS / "llama-3-8b-instruct" / "otpo_full.yaml").read_text())
    expected = {"beta": 0.01, "ot_reg": 1.0, "ot_reg_m": 0.2, "learning_rate": 5.0e-7, "lr_scheduler_type": "cosine"}
    expected |= {"warmup_steps": 0.1, "num_train_epochs": 1, "max_length": 2048, "bf16": True, "seed": 42}
    assert {k: full[k] for k in expected} == expected
    assert full["activation_checkpointing"] is True
    assert 8 * full["per_device_train_batch_size"] * full["gradient_accumulation_steps"] == 128  # on 8 GPUs
    small = yaml.safe_load((CONFIGS / "llama-3.2-3b-instruct" / "otpo_full.yaml").read_text())
    assert (small["beta"], small["ot_reg"]) == (0.1, 0.1)


def test_quickstart_recipe_is_cpu_sized():
    recipe = yaml.safe_load(QUICKSTART.read_text())
    assert recipe["bf16"] is False and recipe["use_peft"] is True and recipe["trainer"] == "otpo"
    assert recipe["max_steps"] <= 12 and recipe["max_length"] <= 512 and recipe["per_device_train_batch_size"] <= 2
    # Paths are relative to the repository root, where `make quickstart` runs.
    assert recipe["model_name_or_path"] == "models/SmolLM2-135M-Instruct"
    assert (REPO_ROOT / recipe["dataset_name"]).resolve() == (REPO_ROOT.parent / "shared/data/ultrafeedback").resolve()


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.stem)
def test_accelerate_configs_load(path):
    config = load_config_from_file(str(path))
    assert config.compute_environment.value == "LOCAL_MACHINE"
    assert config.num_machines == 1 and config.machine_rank == 0
    # Precision comes from the recipe's `bf16`: an accelerate-level bf16 would override `bf16: false` on CPU.
    assert config.mixed_precision == "no"
    expected_type = {"single_gpu": "NO", "ddp": "MULTI_GPU", "deepspeed_zero3": "DEEPSPEED", "fsdp": "FSDP"}
    assert config.distributed_type.value == expected_type[path.stem]


def test_accelerate_configs_differ_only_in_the_distributed_block():
    distributed = {"distributed_type", "num_processes", "deepspeed_config", "fsdp_config", "gpu_ids"}
    distributed |= {"enable_cpu_affinity"}
    configs = [yaml.safe_load(p.read_text()) for p in ACCELERATE_CONFIGS]
    common = [{k: v for k, v in config.items() if k not in distributed} for config in configs]
    assert all(c == common[0] for c in common)


def test_command_line_overrides_the_recipe(train):
    script_args, training_args, model_args = train.parse_args(
        ["--config", str(QUICKSTART), "--max_steps", "2", "--ot_reg", "0.5", "--trainer", "dpo", "--lora_r", "4"]
    )
    assert (training_args.max_steps, training_args.ot_reg, model_args.lora_r) == (2, 0.5, 4)
    assert script_args.trainer == "dpo"
    recipe = yaml.safe_load(QUICKSTART.read_text())
    assert training_args.per_device_train_batch_size == recipe["per_device_train_batch_size"]  # kept from the recipe


def test_script_arguments_are_trls_plus_ours(train, tmp_path):
    """`ScriptArguments` extends `trl.ScriptArguments`: TRL's `dataset_*` flags parse into it, ours beside them."""
    assert issubclass(train.ScriptArguments, trl.ScriptArguments)
    script_args, *_ = train.parse_args(
        ["--config", str(QUICKSTART), "--dataset_config", "default", "--ignore_bias_buffers", "true"]
    )
    assert (script_args.dataset_config, script_args.ignore_bias_buffers) == ("default", True)
    with pytest.raises(ValueError, match="`dataset_streaming` is not supported"):
        train.parse_args(["--config", str(write_recipe(tmp_path, dataset_streaming=True))])


def test_unknown_key_in_recipe_fails_naming_it(train, tmp_path):
    path = write_recipe(tmp_path, lerning_rate=1e-5)
    with pytest.raises(ValueError, match=r"`lerning_rate` in the recipe \(did you mean `learning_rate`"):
        train.parse_args(["--config", str(path)])


@pytest.mark.parametrize("flag", ["--ot_regg", "--ot_re"], ids=["misspelt", "abbreviated"])
def test_unknown_key_on_command_line_fails_naming_it(train, flag):
    with pytest.raises(ValueError, match=f"`{flag[2:]}` in the command line"):
        train.parse_args(["--config", str(QUICKSTART), flag, "0.5"])


@pytest.mark.parametrize(
    ("argv0", "env", "command"),
    [
        ("/somewhere/.venv/bin/accelerate", "otpo-trl train", "otpo-trl train"),  # the processes otpo-trl starts
        ("scripts/train.py", None, "scripts/train.py"),
        (str(REPO_ROOT / "otpo_trl" / "cli" / "train.py"), None, "python -m otpo_trl.cli.train"),
        ("/usr/bin/python", None, "otpo-trl train"),  # called from Python
    ],
    ids=["otpo-trl", "script", "module", "python"],
)
def test_unknown_key_message_names_the_command_used(train, monkeypatch, argv0, env, command):
    from otpo_trl.cli.arguments import COMMAND_ENV

    monkeypatch.setattr("sys.argv", [argv0])
    if env is None:
        monkeypatch.delenv(COMMAND_ENV, raising=False)
    else:
        monkeypatch.setenv(COMMAND_ENV, env)
    with pytest.raises(ValueError, match="Unknown argument") as error:
        train.parse_args(["--config", str(QUICKSTART), "--lerning_rate", "1e-5"])
    assert str(error.value).endswith(f"See `{command} --help`.")


def test_otpo_trl_train_tells_its_processes_the_command(monkeypatch, tiny_model_dir, sample_data_dir):
    """`otpo-trl train` starts the training through `accelerate launch -m`: it names itself in the environment the
    processes inherit, for their messages. (The model and data are given: the launcher checks that local paths exist,
    and a clean checkout has no prepared quickstart model.)"""
    import accelerate.commands.launch

    from otpo_trl.cli import launch
    from otpo_trl.cli.arguments import COMMAND_ENV

    seen = []
    monkeypatch.delenv(COMMAND_ENV, raising=False)
    monkeypatch.setattr(
        accelerate.commands.launch, "launch_command", lambda args: seen.append(os.environ[COMMAND_ENV])
    )
    inputs = ["--model_name_or_path", tiny_model_dir, "--dataset_name", str(sample_data_dir)]
    launch.cli(["--config", "quickstart", "--max_steps", "1", *inputs])
    assert seen == ["otpo-trl train"]


@pytest.mark.parametrize(
    ("field", "value"),
    [("ot_reg", -1.0), ("ot_normalization", "sum"), ("beta", 0.0), ("loss_type", ["sigmoid", "typo"])],
)
def test_bad_value_in_recipe_fails_naming_the_field(train, tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        train.parse_args(["--config", str(write_recipe(tmp_path, **{field: value}))])


@pytest.mark.parametrize(
    "argv",
    [["--ot_cost", "manhattan"], ["--per_device_train_batch_size", "two"], ["--trainer", "ppo"]],
    ids=["choice", "type", "trainer"],
)
def test_bad_value_on_command_line_fails_naming_the_field(train, capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--config", str(QUICKSTART), *argv])
    assert exit_info.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_dpo_config_keeps_every_shared_value(train):
    _, training_args, _ = train.parse_args(["--config", str(QUICKSTART), "--beta", "0.3", "--max_length", "128"])
    dpo = train.to_dpo_config(training_args)
    assert type(dpo) is DPOConfig
    shared = ("beta", "max_length", "learning_rate", "lr_scheduler_type", "seed", "bf16", "max_steps")
    assert {f: getattr(dpo, f) for f in shared} == {f: getattr(training_args, f) for f in shared}
    assert dpo.activation_checkpointing is False


def test_bad_data_fails_before_loading_the_model(train, tmp_path, tiny_model_dir, monkeypatch):
    forbid_models(monkeypatch, train)
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    args = train.parse_args(
        [
            *["--config", str(QUICKSTART), "--dataset_name", str(data), "--output_dir", str(tmp_path / "out")],
            *["--model_name_or_path", tiny_model_dir, "--do_eval", "false"],  # one file: no eval
        ]
    )
    with pytest.raises(ValueError, match=r"has columns \['completion', 'prompt'\].*'chosen', 'rejected'"):
        train.main(*args)


def test_missing_model_path_fails_naming_it(train, tmp_path, sample_data_dir):
    missing = tmp_path / "no-such-model"
    args = train.parse_args(
        [
            *["--config", str(QUICKSTART), "--dataset_name", str(sample_data_dir)],
            *["--output_dir", str(tmp_path / "out"), "--model_name_or_path", str(missing)],
        ]
    )
    with pytest.raises(FileNotFoundError, match=f"`model_name_or_path` '{missing}': no such folder"):
        train.main(*args)


def test_the_tensorboard_message_names_what_the_trainer_logs(tmp_path, caplog):
    """DPOTrainer logs no `ot/*` scalars: the message says so for `trainer: dpo`."""
    from transformers.integrations import TensorBoardCallback

    from otpo_trl import OTPOTrainer

    messages = {}
    for name, trainer in (("dpo", SimpleNamespace()), ("otpo", object.__new__(OTPOTrainer))):
        trainer.callback_handler = SimpleNamespace(callbacks=[TensorBoardCallback()])
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="otpo_trl"):
            upstream.keep_tensorboard_logs_with_run(trainer, str(tmp_path / name))
        messages[name] = caplog.text
        assert trainer.callback_handler.callbacks[0].logging_dir == str(tmp_path / name / "runs")
    assert "ot/*" in messages["otpo"] and "ot/*" not in messages["dpo"] and "loss, rewards" in messages["dpo"]
