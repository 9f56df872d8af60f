"""The wheel as a user gets it: built, installed (not editable) into a fresh venv, trained one step by `otpo-trl train`,
printing the clone's console.

The venv gets the wheel only (`--no-deps`); torch, TRL and the rest come from this interpreter's site-packages through
a `.pth` line. A path in a `.pth` file is appended to `sys.path` without processing the `.pth` files inside it, so
this environment's editable `otpo_trl` finder stays inactive there: the package that runs is the installed wheel's.
About a minute on 2 CPU cores (mostly the two interpreter start-ups of the launcher and the training process). The
same with torch and the wheel alone (no extras), the package index reachable, is `.ci/fresh_install`.
"""

import json
import os
import re
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .testing_utils import REPO_ROOT


pytestmark = pytest.mark.slow


def build_wheel(tmp_path) -> Path:
    """Build the wheel offline from a copy of the sources (pip builds in the source tree: not in the checkout)."""
    pytest.importorskip("setuptools", reason="building the wheel without isolation needs setuptools installed")
    src = tmp_path / "src"
    src.mkdir()
    for path in REPO_ROOT.iterdir():
        if path.name in ("pyproject.toml", "README.md", "MANIFEST.in") or path.name.startswith("LICENSE"):
            shutil.copy(path, src / path.name)
    shutil.copytree(REPO_ROOT / "otpo_trl", src / "otpo_trl", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), "."]
    subprocess.run(command, cwd=src, check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("otpo_trl-*.whl")
    return wheel


def make_venv(tmp_path, wheel) -> Path:
    """A fresh venv with `wheel` installed, seeing this interpreter's site-packages; returns its `bin` folder."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index"]
    subprocess.run([*install, str(wheel)], check=True, capture_output=True, timeout=300)
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(purelib) / "otpo_test_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return bin_dir


def test_the_wheel_trains_one_step_through_otpo_trl_train(tiny_model_dir, sample_data_dir, tmp_path):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    for name in ("otpo_trl/recipes/quickstart.yaml", "otpo_trl/recipes/accelerate/single_gpu.yaml"):
        assert name in names, name
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "otpo-trl = otpo_trl.cli.main:main" in entry_points
    bin_dir = make_venv(tmp_path, wheel)

    work = tmp_path / "work"  # an empty directory: no checkout, no configs/ beside it
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TENSORBOARD_LOGGING_DIR")}
    env |= {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    found = subprocess.run(
        [str(bin_dir / "python"), "-c", "import importlib.util as u; print(u.find_spec('otpo_trl').origin)"],
        cwd=work,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert Path(found).is_relative_to(tmp_path / "venv"), found  # the wheel's copy, not this checkout's

    command = [str(bin_dir / "otpo-trl"), "train", "--config", "quickstart", "--model_name_or_path", tiny_model_dir]
    command += ["--dataset_name", str(sample_data_dir), "--max_steps", "1", "--max_train_samples", "4"]
    command += ["--max_eval_samples", "4", "--report_to", "none"]  # 3 fit max_length: one eval batch of 2
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    # The clone's console: the training module's logger is named after it (run by `-m`, it is `__main__`), so its
    # INFO lines reach the console, and no upstream warning does.
    for line in (
        " - INFO - otpo_trl.data - Loaded ",
        " - INFO - otpo_trl.cli.train - Training on 4 pairs, evaluating on ",
        " - INFO - otpo_trl.cli.train - *** Train with OTPOTrainer ***",
        " - INFO - otpo_trl.cli.train - Model, tokenizer, metrics, state and model card saved to out/quickstart.",
        " - INFO - otpo_trl.cli.train - *** Evaluate ***",
    ):
        assert line in output, line
    assert "__main__" not in output and not re.search(r"\w+Warning: ", output), output[-5000:]

    out = work / "out" / "quickstart"  # the recipe's output_dir, relative to the current directory
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "run_args.json"):
        assert (out / name).exists(), name
    for name in ("train_results.json", "eval_results.json", "trainer_state.json"):
        assert (out / name).exists(), name
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 1
    card = (out / "README.md").read_text()
    assert "OTPO" in card and str(tmp_path) not in card and "licence" not in card
