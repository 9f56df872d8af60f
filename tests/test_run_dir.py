"""The run directory (`otpo_trl.runs`, applied by scripts/train.py): the same run resumes, says it has finished or runs
only its missing final evaluation; a different run is refused before any model loads; `--overwrite_output_dir` clears
only the previous run's own outputs, once training starts; one writer per folder (the lock); each checkpoint carries
its run's record, and a resume is checked against it (settings, data, model, reference, tokenizer, chat template,
versions).

Most cases run `scripts/train.py`'s `main` in this process on a copy of one finished 2-step run (a tiny Llama); the
lock and the refusals whose exit matters run `scripts/train.py` in a subprocess."""

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file

from otpo_trl import runs
from otpo_trl.runs import outputs as run_outputs
from otpo_trl.runs import record as run_record

from .testing_utils import REPO_ROOT, child_env, forbid_models, logged, make_tiny_model_dir, record, tiny_argv


@pytest.fixture(scope="module")
def finished_run(train, tiny_model_dir, sample_data_dir, tmp_path_factory):
    """A finished 2-step run; tests copy it before changing it."""
    out = tmp_path_factory.mktemp("finished") / "out"
    train.main(*train.parse_args(tiny_argv(tiny_model_dir, sample_data_dir, out)))
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    return out


@pytest.fixture
def no_model(train, monkeypatch):
    forbid_models(monkeypatch, train)


def plan_for(args):
    """The run directory's plan for parsed arguments, from the values scripts/train.py passes (no fingerprints)."""
    script_args, training_args, _ = args
    return runs.plan_run(
        training_args.output_dir,
        runs.run_settings(*args),
        resume_from_checkpoint=training_args.resume_from_checkpoint,
        overwrite_output_dir=script_args.overwrite_output_dir,
        do_eval=training_args.do_eval,
    )


def global_step(out):
    return json.loads((out / "trainer_state.json").read_text())["global_step"]


def contents(folder) -> dict:
    """Every file under `folder`, by relative path: its SHA-256 (what "nothing changed" compares)."""
    folder = Path(folder)
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in (runs.LOCK_FILE, runs.HOLDER_FILE)
    }


def set_records(out, **changes):
    """Change the record of the run in `out` and of each of its checkpoints (they carry the same run's record)."""
    for folder in [out, *runs.checkpoint_folders(out)]:
        file = folder / runs.RUN_FILE
        file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def interrupted(out):
    """`out` as if its run had been killed after checkpoint-1: not finished, checkpoint-2 gone."""
    shutil.rmtree(out / "checkpoint-2")
    set_records(out, status="started")
    return out


def cli_error(train, argv) -> str:
    """The message scripts/train.py's entry point exits with (a message, no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        train.cli([str(a) for a in argv])
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith("error: "), message
    return message


def script(*argv, timeout=300):
    """`python scripts/train.py *argv` in a subprocess: (returncode, combined output)."""
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "train.py"), *map(str, argv)],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done.returncode, done.stdout + done.stderr


def hand_made_run(out, status="finished", outputs=("checkpoint-1", "model.safetensors")):
    """A run folder written by hand, as a run leaves it (no training): a checkpoint of what a run writes there, the
    weights, and a record of a 2-step run (without `evaluated`, as an older version wrote it) listing `outputs`."""
    (out / "checkpoint-1").mkdir(parents=True)
    (out / "checkpoint-1" / "optimizer.pt").write_bytes(b"state")
    (out / "checkpoint-1" / "trainer_state.json").write_text('{"global_step": 1}')
    (out / "model.safetensors").write_bytes(b"weights")
    settings = {"status": status, "settings": {"max_steps": 2}, "global_step": 2, "outputs": list(outputs)}
    (out / runs.RUN_FILE).write_text(json.dumps(settings))
    return out


# ------------------------------------------------------------------ the record


def test_a_run_records_its_arguments_inputs_versions_and_outputs(finished_run, tiny_model_dir):
    saved = record(finished_run)
    assert saved["status"] == "finished" and saved["global_step"] == 2 == global_step(finished_run)
    assert saved["evaluated"] is False  # no final evaluation was asked for
    settings = saved["settings"]
    assert settings["beta"] == 0.1 and settings["max_steps"] == 2 and settings["world_size"] == 1
    assert settings["model_name_or_path"].startswith("/")  # local paths absolute
    assert "output_dir" not in settings and "logging_steps" not in settings and "hub_token" not in settings
    # The inputs a resume depends on, by file name, and the versions.
    assert saved["inputs"] == runs.input_fingerprints(tiny_model_dir)
    assert set(saved["inputs"]["model"]["files"]) == {"config.json", "generation_config.json", "model.safetensors"}
    assert set(saved["inputs"]["tokenizer"]["files"]) == {"tokenizer.json", "tokenizer_config.json"}
    assert saved["inputs"]["reference"] == saved["inputs"]["model"]
    assert saved["versions"] == runs.package_versions() and saved["versions"]["trl"]
    # Every entry the run wrote, and nothing else (the lock's files are not outputs).
    written = {p.name for p in finished_run.iterdir()} - {runs.RUN_FILE, runs.LOCK_FILE}
    assert set(saved["outputs"]) == written and {"checkpoint-1", "checkpoint-2", "model.safetensors"} <= written
    assert not (finished_run / runs.HOLDER_FILE).exists()  # the lock was given back
    # Each checkpoint carries the run's record, at its own step.
    carried = record(finished_run / "checkpoint-1")
    assert carried["run_id"] == saved["run_id"] and carried["global_step"] == 1 and carried["status"] == "started"
    assert (
        carried["settings"] == settings and carried["inputs"] == saved["inputs"] and carried["data"] == saved["data"]
    )
    assert runs.run_record_of(finished_run / "checkpoint-1")[0] == finished_run / "checkpoint-1" / runs.RUN_FILE


def test_the_record_is_written_atomically(tmp_path, monkeypatch):
    """A write cut short (here: the rename that ends it fails, as under a kill or a full disk) leaves the old record
    whole, and no temporary file."""
    file = tmp_path / "run_args.json"
    runs.write_json(file, {"settings": {"beta": 0.1}})

    def cut_short(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", cut_short)
    with pytest.raises(OSError, match="No space left"):
        runs.write_json(file, {"settings": {"beta": 0.2}})
    assert json.loads(file.read_text()) == {"settings": {"beta": 0.1}}  # the old record, whole
    assert [p.name for p in tmp_path.iterdir()] == ["run_args.json"]  # no temporary file left


def test_the_record_has_a_plain_files_permissions(tmp_path):
    """Written through `mkstemp` (0o600), the record gets what `open` gives under the umask: a teammate on a shared
    machine can read it."""
    old = os.umask(0o022)
    try:
        runs.write_json(tmp_path / "run_args.json", {"settings": {}})
    finally:
        os.umask(old)
    assert (tmp_path / "run_args.json").stat().st_mode & 0o777 == 0o644


# ------------------------------------------------------------------ the same run again, a different run


def test_the_same_run_again_is_reported_finished_without_a_step(
    train, run_copy, tiny_model_dir, sample_data_dir, no_model, caplog
):
    before = contents(run_copy)
    # Logging and saving options do not make another run.
    argv = tiny_argv(tiny_model_dir, sample_data_dir, run_copy, "--logging_steps", "5", "--save_total_limit", "1")
    with caplog.at_level(logging.INFO):
        train.main(*train.parse_args(argv))
    assert "holds this run, finished at step 2: nothing to train" in caplog.text
    assert contents(run_copy) == before


@pytest.mark.parametrize(
    ("change", "described"),
    [
        (["--beta", "0.5", "--ot_reg", "0.1"], "beta: 0.1 -> 0.5, ot_reg: 1.0 -> 0.1"),
        (["--max_steps", "4"], "max_steps: 2 -> 4"),
        (["--use_peft", "true"], "use_peft: False -> True"),  # a LoRA run into a full fine-tune's folder
        (["--max_train_samples", "6"], "max_train_samples: 8 -> 6"),
    ],
    ids=["hyper_parameters", "max_steps", "lora", "data"],
)
def test_a_different_run_is_refused_before_any_model_loads(
    train, run_copy, tiny_model_dir, sample_data_dir, no_model, change, described
):
    before = contents(run_copy)
    args = train.parse_args(tiny_argv(tiny_model_dir, sample_data_dir, run_copy, *change))
    with pytest.raises(train.InputError, match="holds a run with other arguments") as err:
        train.main(*args)
    message = str(err.value)
    assert described in message
    assert "new `--output_dir`" in message and "--resume_from_checkpoint" in message
    assert "--overwrite_output_dir" in message
    assert contents(run_copy) == before  # nothing written


def test_resume_false_in_a_used_dir_needs_overwrite(train, run_copy, tiny_model_dir, sample_data_dir, no_model):
    argv = tiny_argv(tiny_model_dir, sample_data_dir, run_copy, "--resume_from_checkpoint", "false")
    with pytest.raises(train.InputError, match="would leave its checkpoints for a later run to resume from"):
        train.main(*train.parse_args(argv))
    assert (run_copy / "checkpoint-2").exists()

    # With the flag, the old run is cleared when the new one starts training, not before ...
    args = train.parse_args([*argv, "--overwrite_output_dir", "true", "--beta", "0.5"])
    plan, *_ = train.prepare_run(*args)
    assert plan.action == "train" and plan.checkpoint is None and plan.clear
    assert (run_copy / "checkpoint-2").exists() and record(run_copy)["status"] == "finished"  # not yet
    runs.start_run(plan, run_copy)  # what the run does when training starts
    plan.release()
    assert not list(run_copy.glob("checkpoint-*"))
    for name in ("trainer_state.json", "all_results.json", "model.safetensors", "config.json", "README.md"):
        assert not (run_copy / name).exists(), name
    assert not list(run_copy.parent.glob("out.replaced-*"))  # everything was listed by the record: nothing moved
    assert record(run_copy)["status"] == "started" and record(run_copy)["settings"]["beta"] == 0.5
    # ... so that a later plain run of the same arguments has no stale checkpoint to resume from.
    args = train.parse_args(tiny_argv(tiny_model_dir, sample_data_dir, run_copy, "--beta", "0.5"))
    assert plan_for(args).checkpoint is None


def test_overwrite_cannot_be_combined_with_resuming_from_the_same_dir(
    train, run_copy, tiny_model_dir, sample_data_dir
):
    for resume in ("true", str(run_copy / "checkpoint-1")):
        flags = ("--overwrite_output_dir", "true", "--resume_from_checkpoint", resume)
        args = train.parse_args(tiny_argv(tiny_model_dir, sample_data_dir, run_copy, *flags))
        with pytest.raises(ValueError, match="cannot be combined") as err:
            plan_for(args)
        assert "To continue that run, leave `--overwrite_output_dir` out; to replace it" in str(err.value)


def test_a_run_without_a_record_is_not_resumed_automatically(train, run_copy, tiny_model_dir, sample_data_dir):
    (run_copy / "run_args.json").unlink()  # written by an older version of the script, or by another tool
    args = train.parse_args(tiny_argv(tiny_model_dir, sample_data_dir, run_copy))
    with pytest.raises(ValueError, match="no run_args.json: the arguments of that run are unknown"):
        plan_for(args)


def test_a_folder_of_a_users_files_is_not_trained_into(
    train, run_copy, tiny_model_dir, sample_data_dir, tmp_path, no_model
):
    """A folder that holds no run but a user's files (other models, notes) is refused before the lock, naming them: the
    run's weights, checkpoints and logs would be mixed with them. With `--overwrite_output_dir` they stay where they
    are; a file a run would overwrite (a model card) makes the folder a run without a record."""
    models = tmp_path / "models"
    shutil.copytree(tiny_model_dir, models / "other-model")  # a parent of someone's model, not this run's input
    (models / "notes.txt").write_text("mine")
    (models / ".hidden").write_text("")  # hidden files do not count
    before = sorted(str(p.relative_to(models)) for p in models.rglob("*"))
    for resume in ([], ["--resume_from_checkpoint", run_copy / "checkpoint-1"]):
        message = cli_error(train, tiny_argv(tiny_model_dir, sample_data_dir, models, *resume))
        assert f"{models} holds files that no run wrote (notes.txt, other-model): a run would write" in message
        assert f"{models / '<run-name>'}" in message and "add `--overwrite_output_dir` to train there" in message
    assert sorted(str(p.relative_to(models)) for p in models.rglob("*")) == before  # not even the lock's file
    plan = runs.plan_run(models, {"max_steps": 2}, overwrite_output_dir=True)
    assert plan.action == "train" and not plan.clear
    (models / "README.md").write_text("mine")
    with pytest.raises(ValueError, match=r"holds checkpoints, results or model files \(README.md\) but no"):
        runs.plan_run(models, {"max_steps": 2})


# ------------------------------------------------------------------ resuming


def test_interrupted_run_skips_an_incomplete_checkpoint_and_finishes(
    train, run_copy, tiny_model_dir, sample_data_dir, caplog
):
    # A kill during step 2's save: the run is not finished and checkpoint-2 lacks what is written last.
    set_records(run_copy, status="started")
    (run_copy / "checkpoint-2" / "trainer_state.json").unlink()
    (run_copy / "checkpoint-2" / "optimizer.pt").unlink()
    with caplog.at_level(logging.INFO):
        train.main(*train.parse_args(tiny_argv(tiny_model_dir, sample_data_dir, run_copy)))
    assert f"Skipping the incomplete checkpoint {run_copy / 'checkpoint-2'}" in caplog.text
    assert "no trainer_state.json, optimizer state" in caplog.text
    assert f"resuming training from {run_copy / 'checkpoint-1'}" in caplog.text
    assert record(run_copy)["status"] == "finished" and global_step(run_copy) == 2
    assert record(run_copy / "checkpoint-2")["global_step"] == 2  # saved again, whole, with its record


def test_explicit_resume_from_a_missing_or_incomplete_checkpoint_fails_naming_it(
    train, run_copy, tiny_model_dir, sample_data_dir, no_model
):
    missing = run_copy / "checkpoint-7"
    argv = tiny_argv(tiny_model_dir, sample_data_dir, run_copy, "--resume_from_checkpoint", str(missing))
    with pytest.raises(train.InputError, match="checkpoint-7`: no such checkpoint folder"):
        train.main(*train.parse_args(argv))
    (run_copy / "checkpoint-2" / "model.safetensors").write_bytes(b"")  # a save cut short by a full disk
    argv = tiny_argv(
        tiny_model_dir, sample_data_dir, run_copy, "--resume_from_checkpoint", str(run_copy / "checkpoint-2")
    )
    with pytest.raises(
        train.InputError, match=r"checkpoint-2` is incomplete \(no model weights\).*\['checkpoint-1'\]"
    ):
        train.main(*train.parse_args(argv))


def test_a_run_folder_as_the_checkpoint_names_the_real_cause(
    train, run_copy, tiny_model_dir, sample_data_dir, tmp_path, no_model
):
    """A run's folder has weights and a trainer state but no optimizer: it is not a `save_only_model` checkpoint."""
    argv = tiny_argv(tiny_model_dir, sample_data_dir, tmp_path / "new", "--resume_from_checkpoint", run_copy)
    message = cli_error(train, argv)
    assert (
        f"is a run's folder, not one of its checkpoints: pass one of its checkpoints, `--resume_from_checkpoint "
        f"{run_copy}/checkpoint-2`" in message
    )
    assert "save_only_model" not in message
    model = tmp_path / "a-model"
    shutil.copytree(tiny_model_dir, model)
    argv = tiny_argv(tiny_model_dir, sample_data_dir, tmp_path / "new", "--resume_from_checkpoint", model)
    assert "is not a checkpoint folder" in cli_error(train, argv)


def test_explicit_resume_with_new_arguments_is_recorded(train, run_copy, tiny_model_dir, sample_data_dir):
    resume = ("--resume_from_checkpoint", str(run_copy / "checkpoint-2"))
    args = train.parse_args(
        tiny_argv(tiny_model_dir, sample_data_dir, run_copy, "--max_steps", "3", "--beta", "0.2", *resume)
    )
    plan = plan_for(args)
    assert plan.action == "train" and plan.checkpoint == str(run_copy / "checkpoint-2")
    [change] = plan.record["resumed_with_changes"]
    assert change["changes"] == {"beta": [0.1, 0.2], "max_steps": [2, 3]}
    assert plan.record["run_id"] == record(run_copy)["run_id"]  # the same run, continued
    # At or past its end, the checkpoint is reported finished, not stepped again.
    args = train.parse_args(tiny_argv(tiny_model_dir, sample_data_dir, run_copy, "--beta", "0.2", *resume))
    plan = plan_for(args)
    assert plan.action == "finished" and "nothing to train" in plan.message


def test_a_continuation_is_resumed_from_its_own_checkpoint_not_the_branch_it_left(
    train, run_copy, tiny_model_dir, sample_data_dir, caplog
):
    """Continued from checkpoint-1 with a new beta and killed before its next save, the run resumes from checkpoint-1
    (with the new beta), not from checkpoint-2, which the old beta trained."""
    argv = tiny_argv(tiny_model_dir, sample_data_dir, run_copy, "--beta", "0.2")
    args = train.parse_args([*argv, "--resume_from_checkpoint", str(run_copy / "checkpoint-1")])
    runs.start_run(plan_for(args), run_copy)  # the continuation started training, then was killed
    with caplog.at_level(logging.INFO):
        plan = plan_for(train.parse_args(argv))
    assert plan.checkpoint == str(run_copy / "checkpoint-1")
    assert (
        f"Skipping {run_copy / 'checkpoint-2'}: it was saved under other arguments (beta: 0.1 -> 0.2)" in caplog.text
    )


def test_a_run_stopped_in_its_final_save_saves_again_without_a_step(
    train, run_copy, tiny_model_dir, sample_data_dir, monkeypatch, caplog
):
    """Killed while it saved the model (its record says "started", model.safetensors cut short, no card yet), the run
    run again trains no step: it saves the last checkpoint's weights, keeps its train metrics, and finishes."""
    from otpo_trl import OTPOTrainer

    set_records(run_copy, status="started")
    (run_copy / "model.safetensors").write_bytes(b"cut sh")
    (run_copy / "README.md").unlink()
    train_results = (run_copy / "train_results.json").read_text()
    monkeypatch.setattr(OTPOTrainer, "training_step", lambda *a, **k: pytest.fail("a step was trained"))
    with caplog.at_level(logging.INFO):
        train.main(*train.parse_args(tiny_argv(tiny_model_dir, sample_data_dir, run_copy)))
    assert (
        f"{run_copy / 'checkpoint-2'} is at step 2, the last of this run, but the run's final save did not complete: "
        "saving the trained model from it (no training)." in caplog.text
    )
    saved, last = (load_file(folder / "model.safetensors") for folder in (run_copy, run_copy / "checkpoint-2"))
    assert saved.keys() == last.keys() and all(saved[k].equal(last[k]) for k in saved)
    assert (run_copy / "README.md").exists() and (run_copy / "train_results.json").read_text() == train_results
    assert record(run_copy)["status"] == "finished" and record(run_copy)["global_step"] == 2 == global_step(run_copy)


def test_resuming_another_runs_last_step_into_a_new_folder_fails(
    train, run_copy, tiny_model_dir, sample_data_dir, tmp_path, no_model
):
    """Nothing to train and nothing to save: an error that says how to train it further, not an exit 0 that did
    nothing (the same run's finished checkpoint is reported finished)."""
    argv = tiny_argv(
        tiny_model_dir, sample_data_dir, tmp_path / "new", "--resume_from_checkpoint", run_copy / "checkpoint-2"
    )
    message = cli_error(train, argv)
    assert (
        f"`--resume_from_checkpoint` {run_copy / 'checkpoint-2'} is at step 2, where training with these " in message
    )
    assert "To train it further, raise `--max_steps`" in message and "its trained weights are in" in message
    assert not (tmp_path / "new" / runs.RUN_FILE).exists()


def test_continuing_a_finished_run_further_follows_the_new_schedule(train, run_copy, tiny_model_dir, sample_data_dir):
    """The 2-step linear schedule ends at a learning rate of 0; continued to 4 steps, step 3 runs at the 4-step
    schedule's rate (HF Trainer would restore the old one's 0: a step that changes nothing)."""
    resume = ("--resume_from_checkpoint", run_copy / "checkpoint-2")
    argv = tiny_argv(tiny_model_dir, sample_data_dir, run_copy, "--max_steps", "4", *resume)
    train.main(*train.parse_args([str(a) for a in argv]))
    rates = logged(run_copy, "learning_rate")
    assert rates[3] == pytest.approx(1e-3 * 2 / 4) and rates[4] == pytest.approx(1e-3 * 1 / 4)
    before, after = (load_file(run_copy / f"checkpoint-{s}" / "model.safetensors") for s in (2, 3))
    assert any(not before[name].equal(after[name]) for name in before)
    assert record(run_copy)["status"] == "finished" and record(run_copy)["global_step"] == 4


# ------------------------------------------------------------------ a checkpoint knows its run


def test_another_runs_checkpoint_into_a_finished_run_needs_overwrite(
    train, finished_run, tiny_model_dir, sample_data_dir, tmp_path
):
    """Run A finished in outA; run B (another run) was interrupted in outB. Continuing B's checkpoint in outA is
    refused (exit 1, outA untouched); with `--overwrite_output_dir` A's outputs are cleared and B goes on there."""
    out_a, out_b = tmp_path / "outA", tmp_path / "outB"
    shutil.copytree(finished_run, out_a)
    shutil.copytree(finished_run, out_b)
    interrupted(out_b)
    set_records(out_b, run_id="b" * 32)  # another run (its own id), whatever its arguments
    before = contents(out_a)
    resume = ("--resume_from_checkpoint", out_b / "checkpoint-1")
    argv = tiny_argv(tiny_model_dir, sample_data_dir, out_a, *resume, "--max_steps", "3", "--ot_reg", "0.1")
    code, output = script(*argv)
    assert code == 1, output[-3000:]
    assert f"is a checkpoint of another run than the one in {out_a} (a run trained to step 2)" in output
    assert "Traceback" not in output and contents(out_a) == before

    train.main(*train.parse_args([*map(str, argv), "--overwrite_output_dir", "true"]))
    saved = record(out_a)
    assert saved["resumed_from"] == {"checkpoint": str((out_b / "checkpoint-1").resolve()), "run_id": "b" * 32}
    assert saved["run_id"] not in ("b" * 32, record(finished_run)["run_id"]) and saved["global_step"] == 3
    assert sorted(p.name for p in runs.checkpoint_folders(out_a)) == ["checkpoint-2", "checkpoint-3"]  # A's are gone
    assert record(out_a / "checkpoint-2")["run_id"] == saved["run_id"]
    assert record(out_b)["status"] == "started" and (out_b / "checkpoint-1").exists()  # B's checkpoint left as it was


@pytest.mark.parametrize("where", ["is", "inside"])
def test_a_checkpoint_is_never_the_output_dir_of_its_own_resume(
    train, run_copy, tiny_model_dir, sample_data_dir, no_model, where
):
    checkpoint = run_copy / "checkpoint-1"
    out = checkpoint if where == "is" else checkpoint / "more"
    before = contents(run_copy)
    for overwrite in ([], ["--overwrite_output_dir", "true"]):
        argv = tiny_argv(tiny_model_dir, sample_data_dir, out, "--resume_from_checkpoint", checkpoint, *overwrite)
        relation = "is" if where == "is" else "lies inside"
        assert f"`output_dir` {out} {relation} the checkpoint it resumes" in cli_error(train, argv)
    assert contents(run_copy) == before and not out.with_name("more").exists()


@pytest.mark.parametrize("where", ["is", "inside"])
def test_a_checkpoint_of_another_run_is_never_an_output_dir(
    train, run_copy, tiny_model_dir, sample_data_dir, no_model, where
):
    """A checkpoint carries its run's record: taken for a run folder, the same arguments would train afresh into it
    (over its weights and optimizer), and an overwrite would move it out of its run. Refused with or without the flag,
    before anything is written; so is a folder inside one (an overwrite of its run would delete it)."""
    checkpoint = run_copy / "checkpoint-1"
    out = checkpoint if where == "is" else checkpoint / "more"
    before = contents(run_copy)
    for overwrite in ([], ["--overwrite_output_dir", "true"]):
        message = cli_error(train, tiny_argv(tiny_model_dir, sample_data_dir, out, *overwrite))
        relation = "is" if where == "is" else "lies inside"
        assert f"`output_dir` {out} {relation} {checkpoint}, a checkpoint of the run in {run_copy}" in message
        assert f"`--output_dir {run_copy}`" in message and f"`--resume_from_checkpoint {checkpoint}`" in message
    assert contents(run_copy) == before and not out.with_name("more").exists()
    assert not list(run_copy.glob("checkpoint-1.replaced-*"))


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    """A tiny Llama like the fixture's, with other random weights (seed 1)."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("other-llama"), seed=1)


def test_a_checkpoint_of_another_model_is_refused(
    train, run_copy, other_model_dir, sample_data_dir, tmp_path, no_model
):
    argv = tiny_argv(
        other_model_dir, sample_data_dir, tmp_path / "new", "--resume_from_checkpoint", run_copy / "checkpoint-1"
    )
    message = cli_error(train, argv)
    assert "was trained from other inputs than these (model model.safetensors: '" in message
    assert "reference model.safetensors" in message and "tokenizer" not in message.split("(")[1].split(")")[0]
    assert not (tmp_path / "new" / runs.RUN_FILE).exists()


def relocated(out, model_dir, to):
    """Copy the model of the run in `out` to `to` and make its records name the copy (as if trained from it)."""
    shutil.copytree(model_dir, to)
    for folder in [out, *runs.checkpoint_folders(out)]:
        saved = record(folder)
        saved["settings"]["model_name_or_path"] = str(to)
        (folder / runs.RUN_FILE).write_text(json.dumps(saved))
    return to


@pytest.mark.parametrize("changed", ["weights", "chat_template"])
def test_changed_inputs_between_an_interruption_and_its_resume_are_refused(
    train, run_copy, tiny_model_dir, other_model_dir, sample_data_dir, tmp_path, no_model, changed
):
    model = relocated(interrupted(run_copy), tiny_model_dir, tmp_path / "model")
    argv = tiny_argv(model, sample_data_dir, run_copy)
    plan, *_ = train.prepare_run(*train.parse_args(argv))
    plan.release()
    assert plan.checkpoint == str(run_copy / "checkpoint-1")  # unchanged inputs: it resumes
    if changed == "weights":
        shutil.copy(Path(other_model_dir) / "model.safetensors", model / "model.safetensors")
        named = ["model model.safetensors", "reference model.safetensors"]
    else:
        template = model / "chat_template.jinja"
        template.write_text(template.read_text().replace("<|im_start|>", "<|im_begin|>"))
        named = ["chat_template chat_template.jinja"]
    messages = [
        cli_error(train, [*argv, *resume]) for resume in ([], ["--resume_from_checkpoint", run_copy / "checkpoint-1"])
    ]
    for message in messages:
        assert all(f"{name}: '" in message for name in named), message
        assert "trained from other inputs than these" in message
    # The ways on that the folder's refusal names leave out a resume of its checkpoints, refused for the same reason.
    ways = messages[0].rsplit("): ", 1)[1]
    assert "give it those, unchanged" in ways and "--resume_from_checkpoint" not in ways
    assert record(run_copy)["status"] == "started"


def test_a_resume_under_other_package_versions_warns_and_records_them(
    train, run_copy, tiny_model_dir, sample_data_dir, no_model, caplog
):
    interrupted(run_copy)
    versions = {**record(run_copy)["versions"], "trl": "0.0.1"}
    set_records(run_copy, versions=versions)
    with caplog.at_level(logging.WARNING):
        plan, *_ = train.prepare_run(*train.parse_args(tiny_argv(tiny_model_dir, sample_data_dir, run_copy)))
    plan.release()
    assert plan.checkpoint == str(run_copy / "checkpoint-1")
    assert "under other package versions than it was trained with (trl: '0.0.1' -> " in caplog.text
    [change] = plan.record["version_changes"]
    assert change["changes"] == {"trl": ["0.0.1", runs.package_versions()["trl"]]}
    assert plan.record["versions"] == runs.package_versions()


def test_a_hub_model_is_fingerprinted_by_its_id_and_revision(tiny_model_dir):
    assert runs.input_fingerprints("org/model", "abc123")["model"] == {"hub": "org/model", "revision": "abc123"}
    hub = runs.input_fingerprints("org/model")
    assert hub["tokenizer"] == {"hub": "org/model", "revision": "main"}
    assert run_record.input_changes(hub, runs.input_fingerprints("org/model", "v2")) == {
        what: ["org/model at revision main", "org/model at revision v2"] for what in run_record.INPUTS
    }
    template = runs.input_fingerprints(tiny_model_dir, chat_template="{{ messages }}")["chat_template"]
    assert set(template) == {"sha256"}


def test_a_failed_resume_never_rewrites_a_finished_runs_record(train, run_copy, tiny_model_dir, sample_data_dir):
    """Checks that catch it refuse before any model loads (LoRA on a full fine-tune's checkpoint); a checkpoint that
    fails to load fails before training starts, which is when the record is first written."""
    before = contents(run_copy)
    resume = ("--resume_from_checkpoint", run_copy / "checkpoint-1")
    argv = tiny_argv(tiny_model_dir, sample_data_dir, run_copy, "--max_steps", "3", *resume)
    message = cli_error(train, [*argv, "--use_peft", "true"])
    assert "holds weights of other shapes than these arguments make (use_peft: False -> True)" in message
    (run_copy / "checkpoint-1" / "model.safetensors").write_bytes(b"not a safetensors file")
    before = contents(run_copy)
    with pytest.raises(Exception, match="(?i)safetensor|header"):
        train.main(*train.parse_args([str(a) for a in argv]))
    assert contents(run_copy) == before and record(run_copy)["status"] == "finished"


def test_ctrl_c_says_how_to_go_on_without_a_traceback(
    train, run_copy, tiny_model_dir, sample_data_dir, monkeypatch, capsys
):
    """Ctrl-C in a step (after checkpoint-1): exit 130 and one line that says the run goes on when run again; it
    does, from checkpoint-1."""
    from otpo_trl import OTPOTrainer

    interrupted(run_copy)
    argv = [str(a) for a in tiny_argv(tiny_model_dir, sample_data_dir, run_copy)]

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(OTPOTrainer, "training_step", ctrl_c)
    with pytest.raises(SystemExit) as exit_info:
        train.cli(argv)
    assert exit_info.value.code == 130
    error = capsys.readouterr().err
    assert f"interrupted: the run in {run_copy} stopped. Run the same command again to go on from its last" in error
    assert "Traceback" not in error and record(run_copy)["status"] == "started"
    plan, *_ = train.prepare_run(*train.parse_args(argv))
    plan.release()
    assert plan.checkpoint == str(run_copy / "checkpoint-1")


# ------------------------------------------------------------------ finished means finished


def test_a_run_stopped_in_its_final_evaluation_is_evaluated_when_run_again(
    train, run_copy, tiny_model_dir, sample_data_dir, monkeypatch, caplog
):
    from otpo_trl import OTPOTrainer

    evaluation = ("--do_eval", "true", "--max_eval_samples", "4", "--per_device_eval_batch_size", "1")
    argv = tiny_argv(tiny_model_dir, sample_data_dir, run_copy, "--max_steps", "3", *evaluation)
    argv = [str(a) for a in argv]
    evaluate = OTPOTrainer.evaluate

    def interrupted_evaluation(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(OTPOTrainer, "evaluate", interrupted_evaluation)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C during the evaluation that follows training
        train.main(*train.parse_args([*argv, "--resume_from_checkpoint", str(run_copy / "checkpoint-2")]))
    assert record(run_copy)["status"] == "trained" and record(run_copy)["global_step"] == 3
    assert not (run_copy / "eval_results.json").exists()

    monkeypatch.setattr(OTPOTrainer, "evaluate", evaluate)
    monkeypatch.setattr(OTPOTrainer, "train", lambda *a, **k: pytest.fail("trained again"))
    trained = load_file(run_copy / "model.safetensors")
    with caplog.at_level(logging.INFO):
        train.main(*train.parse_args(argv))
    assert "trained to step 3, but its final evaluation did not complete: evaluating it (no training)" in caplog.text
    results = json.loads((run_copy / "eval_results.json").read_text())
    assert 0 < results["eval_samples"] <= 4 and "eval_loss" in results
    saved = record(run_copy)
    assert saved["status"] == "finished" and saved["evaluated"] and "eval_results.json" in saved["outputs"]
    assert global_step(run_copy) == 3 and all(
        t.equal(trained[k]) for k, t in load_file(run_copy / "model.safetensors").items()
    )
    caplog.clear()
    with caplog.at_level(logging.INFO):
        train.main(*train.parse_args(argv))
    assert "finished at step 3: nothing to train" in caplog.text


def test_a_finished_run_again_with_do_eval_runs_only_its_evaluation(train, run_copy, tiny_model_dir, sample_data_dir):
    argv = tiny_argv(tiny_model_dir, sample_data_dir, run_copy)
    assert plan_for(train.parse_args([*argv, "--do_eval", "true"])).action == "evaluate"
    set_records(run_copy, status="trained")
    plan = plan_for(train.parse_args(argv))  # trained, not evaluated, and no evaluation asked for
    assert plan.action == "finished" and "add `--do_eval true` to run it" in plan.message


@pytest.mark.parametrize(
    ("status", "results", "action"),
    [("finished", False, "evaluate"), ("finished", True, "finished"), ("trained", True, "evaluate")],
    ids=["finished_without_results", "finished_with_results", "trained"],
)
def test_a_record_without_evaluated_counts_as_evaluated_only_finished_beside_its_results(
    tmp_path, status, results, action
):
    """A record of an older version says nothing of `evaluated`: its run counts as evaluated only if it finished and
    its `eval_results.json` (written once an evaluation completes) is there, so `--do_eval true` never skips an
    evaluation that did not run. A `trained` run's record has no `evaluated` either: its evaluation did not complete."""
    out = hand_made_run(tmp_path / "out", status=status)
    if results:
        (out / "eval_results.json").write_text('{"eval_loss": 0.5}')
    plan = runs.plan_run(out, {"max_steps": 2}, do_eval=True)
    assert plan.action == action, plan.message
    assert runs.plan_run(out, {"max_steps": 2}).action == "finished"  # no evaluation asked for: nothing to do


# ------------------------------------------------------------------ --overwrite_output_dir


def test_overwrite_deletes_after_every_check_and_only_the_runs_own_outputs(
    train, run_copy, tiny_model_dir, sample_data_dir
):
    """A LoRA target that the model does not have fails before anything is deleted; then the overwrite deletes what
    the record lists, moves aside what it does not list, and leaves the user's other files in place."""
    before = contents(run_copy)
    argv = tiny_argv(tiny_model_dir, sample_data_dir, run_copy, "--overwrite_output_dir", "true")
    with pytest.raises(ValueError, match="q_prj"):
        train.main(*train.parse_args([*argv, "--use_peft", "true", "--lora_target_modules", "q_prj"]))
    assert contents(run_copy) == before

    (run_copy / "notes.txt").write_text("mine")
    shutil.copytree(run_copy / "checkpoint-1", run_copy / "checkpoint-9")  # not the run's (the user put it there)
    plan, *_ = train.prepare_run(*train.parse_args([*argv, "--beta", "0.5"]))
    runs.start_run(plan, run_copy)
    plan.release()
    [aside] = run_copy.parent.glob("out.replaced-*")
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint-9"]
    assert sorted(p.name for p in run_copy.iterdir()) == ["notes.txt", "run.lock", "run_args.json"]


def test_overwrite_moves_what_no_record_lists(tmp_path):
    """A folder of unknown origin (a model, no record): `--overwrite_output_dir` moves its model files aside."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"weights")
    (out / "config.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    plan = runs.plan_run(out, {"max_steps": 2}, overwrite_output_dir=True)
    assert plan.clear
    runs.start_run(plan, out)
    [aside] = tmp_path.glob("out.replaced-*")
    assert (aside / "model.safetensors").read_bytes() == b"weights" and (aside / "config.json").exists()
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "run_args.json"]


def test_overwrite_moves_a_run_whose_record_lists_no_outputs(tmp_path):
    """A run of an older version (its record lists no outputs): moved aside whole, record and all."""
    out = tmp_path / "out"
    (out / "checkpoint-1").mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"weights")
    (out / runs.RUN_FILE).write_text(json.dumps({"status": "finished", "settings": {"max_steps": 2}}))
    runs.start_run(runs.plan_run(out, {"max_steps": 3}, overwrite_output_dir=True), out)
    [aside] = tmp_path.glob("out.replaced-*")
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint-1", "model.safetensors", runs.RUN_FILE]
    assert json.loads((aside / runs.RUN_FILE).read_text())["settings"] == {"max_steps": 2}
    assert record(out)["settings"] == {"max_steps": 3}


def test_overwrite_never_follows_a_link_nor_deletes_a_users_file_inside_a_listed_folder(run_copy, tmp_path):
    """The previous run's record lists checkpoint-1, checkpoint-2 and README.md, but since it ended the user saved an
    evaluation into checkpoint-1 and replaced checkpoint-2 and README.md by links to their own folder and file: those
    three are moved aside (the links as links), the rest of the run is deleted, the user's files are untouched."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    (run_copy / "checkpoint-1" / "eval").mkdir()
    (run_copy / "checkpoint-1" / "eval" / "eval.json").write_text("{}")
    shutil.rmtree(run_copy / "checkpoint-2")
    (run_copy / "checkpoint-2").symlink_to(mine, target_is_directory=True)
    (run_copy / "README.md").unlink()
    (run_copy / "README.md").symlink_to(mine / "notes.txt")
    assert {"checkpoint-1", "checkpoint-2", "README.md"} <= set(record(run_copy)["outputs"])
    runs.start_run(runs.plan_run(run_copy, {"max_steps": 3}, overwrite_output_dir=True), run_copy)
    [aside] = tmp_path.glob("out.replaced-*")
    assert sorted(p.name for p in aside.iterdir()) == ["README.md", "checkpoint-1", "checkpoint-2"]
    assert (aside / "checkpoint-2").is_symlink() and (aside / "README.md").is_symlink()
    assert (aside / "checkpoint-1" / "eval" / "eval.json").exists()
    assert (aside / "checkpoint-1" / "optimizer.pt").exists()  # moved whole
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"] and (mine / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in run_copy.iterdir()) == ["run.lock", runs.RUN_FILE]  # the rest was deleted


def test_an_overwrite_cut_short_leaves_no_record_of_a_finished_run(
    train, run_copy, tiny_model_dir, sample_data_dir, monkeypatch
):
    """Killed while it deletes the previous run's outputs, an overwrite leaves a folder that no record calls finished:
    the same command again is not told "finished" beside missing weights (its leftovers are refused, or moved aside
    by the next overwrite)."""
    deleted, rmtree, unlink = [], shutil.rmtree, Path.unlink

    def killed_after_one(path, *args, **kwargs):
        if deleted:
            raise KeyboardInterrupt  # the kill, at the second deletion
        deleted.append(path)
        rmtree(path) if Path(path).is_dir() else unlink(Path(path))

    monkeypatch.setattr(run_outputs.shutil, "rmtree", killed_after_one)
    monkeypatch.setattr(Path, "unlink", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        runs.start_run(runs.plan_run(run_copy, {"max_steps": 3}, overwrite_output_dir=True), run_copy)
    monkeypatch.undo()
    assert not (run_copy / runs.RUN_FILE).exists()
    with pytest.raises(ValueError, match="no run_args.json: the arguments of that run are unknown"):
        plan_for(train.parse_args(tiny_argv(tiny_model_dir, sample_data_dir, run_copy)))


def test_overwrite_of_a_linked_output_dir_moves_aside_beside_the_folder_it_links_to(tmp_path):
    """`output_dir` is a link to a folder elsewhere (maybe on another file system): entries move beside that folder,
    where the check of the parent's file system was made, not beside the link."""
    real = tmp_path / "elsewhere" / "real"
    real.mkdir(parents=True)
    (real / "model.safetensors").write_bytes(b"weights")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    runs.start_run(runs.plan_run(link, {"max_steps": 2}, overwrite_output_dir=True), link)
    [aside] = (tmp_path / "elsewhere").glob("real.replaced-*")
    assert (aside / "model.safetensors").read_bytes() == b"weights"
    assert not list(tmp_path.glob("link.replaced-*"))


def test_overwrite_moves_a_listed_folder_aside_with_a_users_link_inside_it(tmp_path):
    """The previous run's record lists checkpoint-1, where the user has since put a link to a folder of their own
    (`checkpoint-1/eval`): the checkpoint is moved aside whole, the link as a link, never deleted, and the folder it
    links to is untouched; the rest of the run is deleted."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "eval.json").write_text("{}")
    out = hand_made_run(tmp_path / "out")
    (out / "checkpoint-1" / "eval").symlink_to(mine, target_is_directory=True)
    runs.start_run(runs.plan_run(out, {"max_steps": 3}, overwrite_output_dir=True), out)
    [aside] = tmp_path.glob("out.replaced-*")
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint-1"]
    assert (aside / "checkpoint-1" / "eval").is_symlink() and (aside / "checkpoint-1" / "eval").readlink() == mine
    assert (aside / "checkpoint-1" / "optimizer.pt").read_bytes() == b"state"
    assert sorted(p.name for p in mine.iterdir()) == ["eval.json"] and (mine / "eval.json").read_text() == "{}"
    assert sorted(p.name for p in out.iterdir()) == [runs.RUN_FILE]  # the weights, listed, were deleted


@pytest.mark.parametrize("cause", ["not_writable", "other_file_system"])
def test_overwrite_that_cannot_move_aside_beside_the_linked_folder_deletes_nothing(tmp_path, monkeypatch, cause):
    """`output_dir` links to a folder elsewhere whose checkpoint-9 (not listed by the record) must be moved aside,
    beside that folder: when the folder it lies in is not writable, or on another file system, the overwrite is
    refused naming it, in the plan and again when training starts, before anything is deleted. The tests run as root,
    where every folder is writable, so the module's `os` answers for that folder as a user's would."""
    real = hand_made_run(tmp_path / "elsewhere" / "real")
    shutil.copytree(real / "checkpoint-1", real / "checkpoint-9")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    refused = real.parent.resolve()  # the link's own folder (tmp_path) is fine: a move beside the link would pass

    class UsersOs:
        def __getattr__(self, name):
            return getattr(os, name)

        def access(self, path, mode):
            return False if cause == "not_writable" and Path(path) == refused else os.access(path, mode)

        def stat(self, path, *args, **kwargs):
            result = os.stat(path, *args, **kwargs)
            if cause == "other_file_system" and Path(path) == refused:
                return SimpleNamespace(st_dev=result.st_dev + 1)
            return result

    monkeypatch.setattr(run_outputs, "os", UsersOs())
    before = contents(real)
    with pytest.raises(ValueError, match="not writable or on another file system") as err:
        runs.plan_run(link, {"max_steps": 3}, overwrite_output_dir=True)
    assert "holds checkpoint-9, which no run record lists" in str(err.value)
    assert f"to {refused}, rather than deleted" in str(err.value)
    plan = runs.RunPlan("train", clear=True, record={"settings": {"max_steps": 3}})  # the check again, at the start
    with pytest.raises(ValueError, match="not writable or on another file system"):
        runs.start_run(plan, link)
    assert contents(real) == before and json.loads((real / runs.RUN_FILE).read_text())["settings"] == {"max_steps": 2}
    assert sorted(os.listdir(tmp_path)) == ["elsewhere", "link"] and os.listdir(real.parent) == ["real"]


def test_a_checkpoint_is_listed_as_the_runs_before_it_is_written(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    recorder = runs.start_run(runs.plan_run(tmp_path, {"max_steps": 2}, overwrite_output_dir=True), tmp_path)
    recorder.will_write("checkpoint-1")
    assert record(tmp_path)["outputs"] == ["checkpoint-1"] and not (tmp_path / "checkpoint-1").exists()
    (tmp_path / "checkpoint-1").mkdir()
    (tmp_path / "trainer_state.json").write_text("{}")
    recorder.write(status="trained")
    assert record(tmp_path)["outputs"] == ["checkpoint-1", "trainer_state.json"]  # notes.txt is not the run's
    assert record(tmp_path)["status"] == "trained"


def test_a_plan_is_made_from_plain_values(tmp_path):
    out, settings = tmp_path / "new", {"max_steps": 2, "num_train_epochs": 3.0, "beta": 0.1}
    plan = runs.plan_run(out, settings)
    assert plan.action == "train" and plan.checkpoint is None and not plan.clear and not out.exists()
    assert plan.record == {"run_id": plan.record["run_id"], "status": "started", "settings": settings}
    out.mkdir()
    runs.start_run(plan, out)
    (out / "checkpoint-1").mkdir()  # the run has begun
    with pytest.raises(ValueError, match=r"holds a run with other arguments \(beta: 0.1 -> 0.5\)"):
        runs.plan_run(out, {**settings, "beta": 0.5})
    with pytest.raises(ValueError, match="would leave its checkpoints"):
        runs.plan_run(out, settings, resume_from_checkpoint="false")
    plan = runs.plan_run(out, {**settings, "beta": 0.5}, overwrite_output_dir=True)
    assert plan.action == "train" and plan.clear


# ------------------------------------------------------------------ one writer per output_dir


HOLD = """
import sys, time
from otpo_trl.runs import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder():
    """Start a process that takes the lock of a folder and holds it; SIGKILL it at the end."""
    started = []

    def hold(folder):
        process = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(folder)], env=child_env(), stdout=subprocess.PIPE, text=True
        )
        started.append(process)
        assert process.stdout.readline().strip() == "locked"
        return process

    yield hold
    for process in started:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait()


def test_the_lock_stops_a_second_writer_and_dies_with_its_holder(tmp_path, holder):
    process = holder(tmp_path / "out")
    with pytest.raises(runs.OutputDirInUse, match=f"is in use by another run, pid {process.pid} on ") as err:
        runs.RunLock(tmp_path / "out").acquire()
    assert "started 20" in str(err.value) and "-c" in str(err.value)  # when, and the command
    os.kill(process.pid, signal.SIGKILL)  # no chance to clean up: the OS releases the lock
    process.wait()
    with runs.RunLock(tmp_path / "out") as lock:
        assert lock.output_dir == tmp_path / "out"
        assert json.loads((tmp_path / "out" / runs.HOLDER_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / "out" / runs.HOLDER_FILE).exists()


def test_a_second_run_into_a_locked_output_dir_stops_at_once(
    train, run_copy, tiny_model_dir, sample_data_dir, holder, no_model
):
    """The same command submitted twice (a re-queued job) and another run: both stop, naming the process."""
    interrupted(run_copy)
    before = contents(run_copy)
    process = holder(run_copy)
    argv = tiny_argv(tiny_model_dir, sample_data_dir, run_copy)
    code, output = script(*argv)
    assert code == 1 and f"is in use by another run, pid {process.pid}" in output, output[-3000:]
    for extra in ([], ["--beta", "0.5", "--overwrite_output_dir", "true"]):
        assert f"pid {process.pid}" in cli_error(train, [*argv, *extra])
    assert contents(run_copy) == before
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    plan, *_ = train.prepare_run(*train.parse_args(argv))  # free again: resumes
    plan.release()
    assert plan.checkpoint == str(run_copy / "checkpoint-1")


def test_a_locked_output_dir_is_named_before_the_data_load(train, tiny_model_dir, tmp_path, holder, no_model):
    """An existing output_dir is locked before the data load (a new one after it, tests/test_validation.py): a run
    into a folder in use stops on the lock, even with data it would refuse."""
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')  # one pair: fewer than a batch
    process = holder(tmp_path / "out")
    assert f"in use by another run, pid {process.pid}" in cli_error(
        train, tiny_argv(tiny_model_dir, data, tmp_path / "out")
    )


@pytest.mark.slow
def test_a_locked_output_dir_stops_every_process_of_a_launch(tiny_model_dir, sample_data_dir, tmp_path, holder):
    """Two DDP processes (gloo): the main one takes the lock for both; refused, both stop at once with its message;
    free, they train one run together."""
    from .testing_utils import ACCELERATE

    out = tmp_path / "out"
    one_step = ("--max_steps", "1", "--save_strategy", "no", "--per_device_train_batch_size", "1")
    argv = [str(a) for a in tiny_argv(tiny_model_dir, sample_data_dir, out, *one_step)]
    launch = ("launch", "--config_file", "configs/accelerate/ddp.yaml", "--num_processes", "2")
    command = [ACCELERATE, *launch, "scripts/train.py", *argv]
    process = holder(out)
    done = subprocess.run(command, cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode != 0 and output.count(f"is in use by another run, pid {process.pid}") >= 2, output[-4000:]
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = subprocess.run(command, cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert record(out)["status"] == "finished" and record(out)["settings"]["world_size"] == 2


# ------------------------------------------------------------------ small parts


def test_checkpoint_problems(tmp_path):
    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    assert runs.checkpoint_problems(checkpoint) == ["trainer_state.json", "model weights", "optimizer state"]
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    (checkpoint / "adapter_model.safetensors").write_bytes(b"x")
    assert runs.checkpoint_problems(checkpoint) == ["optimizer state"]
    assert runs.saved_weights_only(runs.checkpoint_problems(checkpoint))  # a save_only_model checkpoint
    (checkpoint / "optimizer.pt").write_bytes(b"x")
    assert runs.checkpoint_problems(checkpoint) == []
    (checkpoint / "trainer_state.json").write_text('{"global_st')  # cut mid-write
    assert runs.checkpoint_problems(checkpoint) == ["trainer_state.json"]
    deepspeed = tmp_path / "checkpoint-4"
    (deepspeed / "global_step4").mkdir(parents=True)
    (deepspeed / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    assert runs.checkpoint_problems(deepspeed) == []  # ZeRO keeps weights and optimizer in global_step<N>/


def test_the_dpo_baseline_does_not_compare_ot_arguments(train, tiny_model_dir, sample_data_dir, tmp_path):
    args = train.parse_args(tiny_argv(tiny_model_dir, sample_data_dir, tmp_path, "--trainer", "dpo"))
    settings = runs.run_settings(*args)
    assert settings["trainer"] == "dpo" and not [key for key in settings if key.startswith("ot_")]


def test_settings_changes_and_their_description():
    old = {"beta": 0.1, "max_steps": 2, "seed": 0}
    new = {"beta": 0.2, "max_steps": 2, "ot_reg": 1.0}
    changes = runs.settings_changes(old, new)
    assert changes == {"beta": [0.1, 0.2], "ot_reg": ["<unset>", 1.0], "seed": [0, "<unset>"]}
    assert runs.settings_changes(old, dict(old)) == {}
    assert runs.describe_changes(changes) == "beta: 0.1 -> 0.2, ot_reg: '<unset>' -> 1.0, seed: 0 -> '<unset>'"
    many = runs.settings_changes({}, {f"k{i}": i for i in range(10)})
    assert runs.describe_changes(many, limit=2) == "k0: '<unset>' -> 0, k1: '<unset>' -> 1 and 8 more"


def test_finished_run_changes_reads_the_recorded_settings(tmp_path):
    assert runs.finished_run_changes(tmp_path, {"max_steps": 2}) == {"max_steps": ["<unset>", 2]}  # no record
    (tmp_path / runs.RUN_FILE).write_text(json.dumps({"settings": {"max_steps": 2, "seed": 42}, "finished": True}))
    assert runs.finished_run_changes(tmp_path, {"max_steps": 2, "seed": 42}) == {}
    assert runs.finished_run_changes(tmp_path, {"max_steps": 3, "seed": 42}) == {"max_steps": [2, 3]}
    (tmp_path / runs.RUN_FILE).write_text(json.dumps({"finished": True}))  # a record without settings
    assert runs.finished_run_changes(tmp_path, {"seed": 42}) == {"seed": ["<unset>", 42]}


def test_small_files_are_the_same_file_whatever_their_time(tmp_path):
    """A file hashed whole is compared by its hash; a longer one also by its modification time."""
    small = {"size": 10, "mtime_ns": 1, "sha256": "a"}
    assert run_record.same_file(small, {**small, "mtime_ns": 2})
    assert not run_record.same_file(small, {**small, "sha256": "b"})
    big = {"size": 3 << 20, "mtime_ns": 1, "sha256": "a"}
    assert not run_record.same_file(big, {**big, "mtime_ns": 2})
    assert run_outputs.RUN_WRITES  # the patterns a used folder is recognised by
