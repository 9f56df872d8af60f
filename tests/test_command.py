"""The `otpo-trl` command: subcommands, exit statuses, recipes by name, and the `accelerate launch` it starts."""

import json
import runpy
import subprocess
import sys

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from otpo_trl.cli import launch, main

from .testing_utils import REPO_ROOT, child_env


# runpy re-runs a module the test session already imported (as `python -m` would run it fresh): expected here.
pytestmark = pytest.mark.filterwarnings("ignore:.*found in sys.modules after import of package:RuntimeWarning")


def run_main(argv, capsys):
    """`otpo-trl <argv>` in this process: (exit status, stdout, stderr)."""
    try:
        status = main.main(argv)
    except SystemExit as exit:
        status = exit.code
    out, err = capsys.readouterr()
    return status, out, err


def test_help_lists_every_command(capsys):
    status, out, _ = run_main(["--help"], capsys)
    assert status == 0
    for name in main.COMMANDS:
        assert name in out


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["--frobnicate"]])
def test_no_command_or_an_unknown_one_exits_2(argv, capsys):
    status, _, err = run_main(argv, capsys)
    assert status == 2 and "usage: otpo-trl" in err


HEAVY = ("torch", "trl", "transformers", "datasets", "accelerate", "peft")
# In a fresh interpreter: what `import otpo_trl` and then `otpo-trl --help` have imported, and what the lazy names give.
_IMPORTS = f"""
import json, sys
heavy = {HEAVY!r}
import otpo_trl
loaded = {{"import": [m for m in heavy if m in sys.modules]}}
from otpo_trl.cli import main
try:
    main.main(["--help"])
except SystemExit:
    pass
loaded["help"] = [m for m in heavy if m in sys.modules]
loaded["dir"] = [n for n in otpo_trl.__all__ if n in dir(otpo_trl)]
from otpo_trl import OTPOTrainer
loaded["lazy"] = [OTPOTrainer.__name__, otpo_trl.OTPOConfig.__name__, otpo_trl.ot_token_weights.__name__]
loaded["after"] = [m for m in ("torch", "trl") if m in sys.modules]
print(json.dumps(loaded))
"""


def test_import_and_help_load_no_heavy_package():
    """`import otpo_trl` and `otpo-trl --help` import neither torch nor TRL (that took ~9 s); the public names still
    load, on first use."""
    done = subprocess.run(
        [sys.executable, "-c", _IMPORTS], env=child_env(), cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    loaded = json.loads(done.stdout.splitlines()[-1])
    assert loaded["import"] == [] and loaded["help"] == []
    assert loaded["dir"] == ["OTPOConfig", "OTPOTrainer", "__version__", "ot_token_weights"]
    assert loaded["lazy"] == ["OTPOTrainer", "OTPOConfig", "ot_token_weights"] and loaded["after"] == ["torch", "trl"]


def test_an_unknown_name_of_the_package_is_an_attribute_error():
    import otpo_trl

    with pytest.raises(AttributeError, match="no attribute 'OTPOTrainerr'"):
        otpo_trl.OTPOTrainerr  # noqa: B018


def test_every_command_module_has_cli():
    import importlib

    for module, _ in main.COMMANDS.values():
        assert callable(importlib.import_module(module).cli), module


@pytest.mark.parametrize("module", ["otpo_trl.cli.train", "otpo_trl.cli.launch", "otpo_trl"])
def test_python_m_with_a_missing_recipe_fails(module, monkeypatch, capsys):
    """`python -m <module> [train] --config /nonexistent.yaml` exits non-zero, naming the file (it exited 0)."""
    argv = ["train"] if module == "otpo_trl" else []
    monkeypatch.setattr(sys, "argv", [module, *argv, "--config", "/nonexistent.yaml"])
    with pytest.raises(SystemExit) as exit:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert exit.value.code not in (0, None)
    assert "/nonexistent.yaml" in str(exit.value.code) + capsys.readouterr().err


@pytest.mark.parametrize("module", ["otpo_trl.cli.evaluate", "otpo_trl.cli.plot_weights"])
def test_python_m_tools_parse_their_arguments(module, monkeypatch):
    monkeypatch.setattr(sys, "argv", [module])  # no --model: argparse's error, exit 2
    with pytest.raises(SystemExit) as exit:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert exit.value.code == 2


@pytest.mark.parametrize(
    "value", ["quickstart", "quickstart.yaml", "configs/quickstart.yaml", "llama-3-8b-instruct/otpo_full"]
)
def test_a_shipped_recipe_is_found_by_name(value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no recipe here: the shipped one
    path = launch.resolve_recipe(value)
    assert path.endswith(f"{value.removeprefix('configs/').removesuffix('.yaml')}.yaml")
    assert (REPO_ROOT / "configs" / path.split("recipes/", 1)[1]).resolve() == (REPO_ROOT / path).resolve()


def test_a_recipe_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart.yaml").write_text("max_steps: 1\n")
    assert launch.resolve_recipe("quickstart.yaml") == "quickstart.yaml"


def test_an_unknown_recipe_names_the_closest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="did you mean quickstart"):
        launch.resolve_recipe("quikstart")
    with pytest.raises(ValueError, match="did you mean single_gpu"):
        launch.resolve_accelerate_config("single-gpu")


def test_shipped_names_are_the_configs_folder():
    recipes = {
        p.relative_to(REPO_ROOT / "configs").with_suffix("").as_posix()
        for p in (REPO_ROOT / "configs").rglob("*.yaml")
    }
    assert set(launch.shipped_recipes()) == {r for r in recipes if not r.startswith("accelerate/")}
    assert set(launch.shipped_accelerate_configs()) == {"single_gpu", "ddp", "deepspeed_zero3", "fsdp"}


def test_flags_only_accelerate_knows_go_to_the_launcher():
    from accelerate.commands.launch import launch_command_parser

    from otpo_trl.cli.arguments import make_parser

    argv = ["--num_processes", "2", "--config", "quickstart", "--learning_rate", "1e-6", "--cpu"]
    argv += ["--gradient_accumulation_steps", "4", "--main_process_port=29600", "--accelerate_config", "ddp"]
    launch_args, training = launch.split_argv(
        argv, set(make_parser()._option_string_actions), launch_command_parser()._option_string_actions
    )
    assert launch_args == ["--num_processes", "2", "--cpu", "--main_process_port=29600", "--accelerate_config", "ddp"]
    # both know --gradient_accumulation_steps: the training script's wins
    assert training == ["--config", "quickstart", "--learning_rate", "1e-6", "--gradient_accumulation_steps", "4"]
    with pytest.raises(ValueError, match="runs otpo_trl.cli.train itself"):
        launch.split_argv(["--module", "x"], set(), launch_command_parser()._option_string_actions)


@pytest.mark.parametrize(
    ("argv", "config", "processes"),
    [
        ([], "single_gpu", None),
        (["--num_processes", "2"], "ddp", 2),
        (["--accelerate_config", "deepspeed_zero3", "--num_processes", "2"], "deepspeed_zero3", 2),
    ],
)
def test_the_launch_runs_the_training_module_with_a_shipped_config(argv, config, processes, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(launch, "_has_accelerator", lambda: False)
    args = launch.launch_args_for([*argv, "--config", "quickstart", "--max_steps", "1"])
    assert args.module and args.training_script == "otpo_trl.cli.train"
    assert args.training_script_args == ["--config", launch.resolve_recipe("quickstart"), "--max_steps", "1"]
    assert args.config_file == launch.resolve_accelerate_config(config)
    assert args.num_processes == processes
    load_config_from_file(args.config_file)  # a config accelerate reads
    # Without a GPU the processes share the cores (accelerate would give each one thread).
    assert args.num_cpu_threads_per_process >= 1


@pytest.mark.parametrize("value", ["", "0", "two", "-1"])
def test_a_bad_omp_num_threads_is_named_before_accelerate_reads_it(value, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    with pytest.raises(SystemExit) as exit:
        launch.cli(["--config", "quickstart", "--max_steps", "1"])
    assert f"OMP_NUM_THREADS={value!r} is not a positive whole number" in str(exit.value.code)
    assert "unset OMP_NUM_THREADS" in str(exit.value.code)


def test_a_set_omp_num_threads_is_left_to_the_processes(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert launch.launch_args_for(["--config", "quickstart", "--max_steps", "1"]).num_cpu_threads_per_process is None


def test_train_without_a_recipe_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit:
        launch.cli(["--max_steps", "1"])
    assert "`--config` is required" in str(exit.value.code)


def test_train_help_names_the_shipped_recipes_and_the_launcher(capsys):
    launch.cli(["--help"])
    out = capsys.readouterr().out
    assert "usage: otpo-trl train" in out and "llama-3-8b-instruct/otpo_full" in out and "deepspeed_zero3" in out
    assert "relative to the current directory" in out and "--learning_rate" in out
