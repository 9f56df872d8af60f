"""`otpo-trl evaluate` never writes over an earlier evaluation's results: the default folder takes the next free
number, a folder given that holds results is refused (before any model loads) unless --overwrite, a folder being
written by another evaluation is refused, and nothing else in the folder is touched."""

import json

import pytest
from filelock import FileLock, Timeout

from otpo_trl.cli import evaluate as evaluate_cli


ROWS = [("What is 2 + 2?", " Four.", " Five, I think."), ("Name a colour.", " Blue.", " A cat.")]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(dict(zip(("prompt", "chosen", "rejected"), r))) + "\n" for r in ROWS))
    return path


def run(model, data_file, *flags):
    argv = ["--model", model, "--data", str(data_file), "--num_generations", "1", "--max_new_tokens", "2"]
    return evaluate_cli.main([*argv, "--device", "cpu", "--disable_tqdm", *flags])


def lock_is_free(path) -> bool:
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return False
    lock.release()
    return True


def test_the_default_folder_takes_the_next_number(tiny_model_dir, data_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run(tiny_model_dir, data_file)
    first = {name: (tmp_path / "out/eval" / name).read_text() for name in evaluate_cli.RESULT_FILES}
    run(tiny_model_dir, data_file, "--max_samples", "1")
    assert "Wrote out/eval-2/eval.json" in capsys.readouterr().out
    assert {name: (tmp_path / "out/eval" / name).read_text() for name in evaluate_cli.RESULT_FILES} == first
    assert json.loads((tmp_path / "out/eval-2/eval.json").read_text())["preference"]["n_pairs"] == 1
    assert all(lock_is_free(path) for path in tmp_path.glob("out/eval*/.evaluate.lock"))  # released at the end

    # --overwrite without --output_dir replaces out/eval's results, and only those files.
    (tmp_path / "out/eval/notes.txt").write_text("mine")
    run(tiny_model_dir, data_file, "--max_samples", "1", "--overwrite")
    assert json.loads((tmp_path / "out/eval/eval.json").read_text())["preference"]["n_pairs"] == 1
    assert (tmp_path / "out/eval/notes.txt").read_text() == "mine"
    assert not (tmp_path / "out/eval-3").exists()


def test_a_folder_given_with_results_is_refused_unless_overwrite(tiny_model_dir, data_file, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "eval.md").write_text("an earlier evaluation")
    (out / "notes.txt").write_text("mine")
    refusal = (
        r"--output_dir .*eval holds the results of an earlier evaluation \(eval.md\).*--overwrite to replace them"
    )
    with monkeypatch.context() as patched:
        patched.setattr(evaluate_cli, "evaluate", lambda *a, **k: pytest.fail("evaluated before refusing"))
        with pytest.raises(ValueError, match=refusal):
            run(tiny_model_dir, data_file, "--output_dir", str(out))
        with pytest.raises(SystemExit, match="error: --output_dir .*holds the results"):  # the command's exit
            evaluate_cli.cli(["--model", tiny_model_dir, "--data", str(data_file), "--output_dir", str(out)])
    assert (out / "eval.md").read_text() == "an earlier evaluation" and not (out / "eval.json").exists()

    # A folder without results is used as it is; with --overwrite the results are replaced, the rest kept.
    run(tiny_model_dir, data_file, "--output_dir", str(out), "--overwrite")
    assert (out / "eval.md").read_text().startswith("# Evaluation of") and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == [
        ".evaluate.lock",
        "eval.json",
        "eval.md",
        "generations.jsonl",
        "notes.txt",
    ]


def test_a_failed_overwrite_keeps_the_old_results(tiny_model_dir, data_file, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "eval.json").write_text('{"old": true}')

    def fails(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(evaluate_cli, "evaluate", fails)
    with pytest.raises(RuntimeError, match="out of memory"):
        run(tiny_model_dir, data_file, "--output_dir", str(out), "--overwrite")
    assert json.loads((out / "eval.json").read_text()) == {"old": True} and lock_is_free(out / ".evaluate.lock")


def test_a_folder_another_evaluation_writes_to_is_not_shared(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out/eval").mkdir(parents=True)
    with FileLock(tmp_path / "out/eval/.evaluate.lock"):  # an evaluation running in out/eval
        with pytest.raises(ValueError, match="--output_dir out/eval: another evaluation is writing to it now"):
            with evaluate_cli.results_dir("out/eval", overwrite=True):
                pass
        with evaluate_cli.results_dir(None) as folder:  # the default moves on to the next number
            assert str(folder) == "out/eval-2" and folder.is_dir()
