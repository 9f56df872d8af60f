"""`otpo-trl train`'s early check: a recipe's missing local model, data or chat template stops the command before
accelerate or torch is imported, with the training script's own message, and nothing is written."""

import subprocess
import sys

import pytest

from otpo_trl.cli import launch


# Runs the command as the entry point does, then says which heavy packages it imported.
COMMAND = """
import sys, time
from otpo_trl.cli.main import main
start = time.perf_counter()
try:
    main(["train", "--config", "quickstart"])
except SystemExit as exit:
    print(exit.code, file=sys.stderr)
print(f"{time.perf_counter() - start:.2f} s;", *[name for name in ("torch", "accelerate", "trl") if name in sys.modules])
"""


def test_the_quickstart_without_its_model_stops_before_torch_loads(tmp_path):
    result = subprocess.run([sys.executable, "-c", COMMAND], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "`model_name_or_path` 'models/SmolLM2-135M-Instruct': no such folder" in result.stderr, result.stderr
    assert "`otpo-trl prepare-model` writes it" in result.stderr
    seconds, imported = result.stdout.strip().split(";")
    assert imported.split() == [], f"imported before stopping: {imported}"  # the time is that of the imports
    assert list(tmp_path.iterdir()) == []  # no output_dir, nothing else
    print(f"stopped in {seconds}")

    installed = subprocess.run(  # the same through `python -m otpo_trl` (the entry point's module): exit status 1
        [sys.executable, "-m", "otpo_trl", "train", "--config", "quickstart"], cwd=tmp_path, capture_output=True
    )
    assert installed.returncode == 1 and b"otpo-trl prepare-model" in installed.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def quickstart_model(tmp_path, monkeypatch):
    """The current directory holds the quickstart's model folder (its contents are not read here)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "SmolLM2-135M-Instruct").mkdir(parents=True)


def test_flags_override_the_recipe_and_each_path_is_checked(tmp_path, quickstart_model):
    data = tmp_path / "data"
    data.mkdir()
    launch.check_local_paths_early(["--config", "quickstart", "--dataset_name", str(data)])  # all there
    launch.check_local_paths_early(["--config=quickstart", f"--dataset_name={data}", "--model_name_or_path", "org/m"])

    with pytest.raises(FileNotFoundError, match="`dataset_name` '../shared/data/ultrafeedback': no such file"):
        launch.check_local_paths_early(["--config", "quickstart"])  # the recipe's own data, not here
    with pytest.raises(FileNotFoundError, match="`dataset_name` './mine.jsonl'"):
        launch.check_local_paths_early(["--config", "quickstart", "--dataset_name", "./mine.jsonl"])
    with pytest.raises(FileNotFoundError, match="`model_name_or_path` 'models/Other'"):
        launch.check_local_paths_early(["--config", "quickstart", "--model_name_or_path=models/Other"])
    with pytest.raises(ValueError, match="`chat_template` 'templates/chat.jinja' is not a file"):
        argv = ["--config", "quickstart", "--dataset_name", str(data), "--chat_template", "templates/chat.jinja"]
        launch.check_local_paths_early(argv)


def test_what_it_cannot_read_is_left_to_the_full_checks(tmp_path, quickstart_model):
    launch.check_local_paths_early(["--config", "no-such-recipe"])  # the launcher names the recipes, later
    (tmp_path / "bad.yaml").write_text("model_name_or_path: [unclosed\n")
    launch.check_local_paths_early(["--config", "bad.yaml"])
