"""scripts/train.py's run directory: the same run resumes or says it has finished, a different run is refused before any
model loads, `--overwrite_output_dir` clears, incomplete checkpoints are skipped."""

import json
import logging
import shutil

import pytest

from otpo_trl.cli import run_dir

from .testing_utils import forbid_models, record, tiny_argv


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


def plan_for(args):
    """The run directory's plan for parsed arguments, from the values scripts/train.py passes (no data fingerprint)."""
    script_args, training_args, _ = args
    return run_dir.plan_run(
        training_args.output_dir,
        run_dir.run_settings(*args),
        resume_from_checkpoint=training_args.resume_from_checkpoint,
        overwrite_output_dir=script_args.overwrite_output_dir,
    )


def global_step(out):
    return json.loads((out / "trainer_state.json").read_text())["global_step"]


def test_a_run_records_its_arguments_and_finishes(finished_run):
    saved = record(finished_run)
    assert saved["status"] == "finished" and saved["global_step"] == 2 == global_step(finished_run)
    settings = saved["settings"]
    assert settings["beta"] == 0.1 and settings["max_steps"] == 2 and settings["world_size"] == 1
    assert settings["model_name_or_path"].startswith("/")  # local paths absolute
    assert "output_dir" not in settings and "logging_steps" not in settings and "hub_token" not in settings


def test_the_same_run_again_is_reported_finished_without_a_step(train, run_copy, tiny_model_dir, sample_data_dir,
                                                                monkeypatch, caplog):  # fmt: skip
    forbid_models(monkeypatch, train)
    before = (run_copy / "trainer_state.json").read_text()
    # Logging and saving options do not make another run.
    argv = tiny_argv(tiny_model_dir, sample_data_dir, run_copy, "--logging_steps", "5", "--save_total_limit", "1")
    with caplog.at_level(logging.INFO):
        train.main(*train.parse_args(argv))
    assert "holds this run, finished at step 2: nothing to train" in caplog.text
    assert (run_copy / "trainer_state.json").read_text() == before


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
def test_a_different_run_is_refused_before_any_model_loads(train, run_copy, tiny_model_dir, sample_data_dir,
                                                           monkeypatch, change, described):  # fmt: skip
    forbid_models(monkeypatch, train)
    before = (run_copy / "run_args.json").read_text()
    args = train.parse_args(tiny_argv(tiny_model_dir, sample_data_dir, run_copy, *change))
    with pytest.raises(train.InputError, match="holds a run with other arguments") as err:
        train.main(*args)
    message = str(err.value)
    assert described in message
    assert "new `--output_dir`" in message and "--resume_from_checkpoint" in message
    assert "--overwrite_output_dir" in message
    assert (run_copy / "run_args.json").read_text() == before  # nothing written


def test_resume_false_in_a_used_dir_needs_overwrite(train, run_copy, tiny_model_dir, sample_data_dir, monkeypatch):
    forbid_models(monkeypatch, train)
    argv = tiny_argv(tiny_model_dir, sample_data_dir, run_copy, "--resume_from_checkpoint", "false")
    with pytest.raises(train.InputError, match="would leave its checkpoints for a later run to resume from"):
        train.main(*train.parse_args(argv))
    assert (run_copy / "checkpoint-2").exists()

    # With the flag, the old run is deleted (checkpoints, results, weights) and a fresh one recorded ...
    args = train.parse_args([*argv, "--overwrite_output_dir", "true", "--beta", "0.5"])
    plan, *_ = train.prepare_run(*args)
    assert plan.action == "train" and plan.checkpoint is None and plan.clear
    assert not list(run_copy.glob("checkpoint-*"))
    for name in ("trainer_state.json", "all_results.json", "model.safetensors"):
        assert not (run_copy / name).exists(), name
    assert record(run_copy)["status"] == "started" and record(run_copy)["settings"]["beta"] == 0.5
    # ... so that a later plain run of the same arguments has no stale checkpoint to resume from.
    args = train.parse_args(tiny_argv(tiny_model_dir, sample_data_dir, run_copy, "--beta", "0.5"))
    assert plan_for(args).checkpoint is None


def test_overwrite_cannot_be_combined_with_resuming_from_the_same_dir(train, run_copy, tiny_model_dir,
                                                                       sample_data_dir):  # fmt: skip
    for resume in ("true", str(run_copy / "checkpoint-1")):
        args = train.parse_args(tiny_argv(tiny_model_dir, sample_data_dir, run_copy, "--overwrite_output_dir", "true",
                                          "--resume_from_checkpoint", resume))  # fmt: skip
        with pytest.raises(ValueError, match="cannot be combined"):
            plan_for(args)


def test_interrupted_run_skips_an_incomplete_checkpoint_and_finishes(train, run_copy, tiny_model_dir,
                                                                    sample_data_dir, caplog):  # fmt: skip
    # A kill during step 2's save: the run is not finished and checkpoint-2 lacks what is written last.
    (run_copy / "run_args.json").write_text(json.dumps({**record(run_copy), "status": "started"}))
    (run_copy / "checkpoint-2" / "trainer_state.json").unlink()
    (run_copy / "checkpoint-2" / "optimizer.pt").unlink()
    with caplog.at_level(logging.INFO):
        train.main(*train.parse_args(tiny_argv(tiny_model_dir, sample_data_dir, run_copy)))
    assert f"Skipping the incomplete checkpoint {run_copy / 'checkpoint-2'}" in caplog.text
    assert "no trainer_state.json, optimizer state" in caplog.text
    assert f"resuming training from {run_copy / 'checkpoint-1'}" in caplog.text
    assert record(run_copy)["status"] == "finished" and global_step(run_copy) == 2


def test_explicit_resume_from_a_missing_or_incomplete_checkpoint_fails_naming_it(train, run_copy, tiny_model_dir,
                                                                                sample_data_dir, monkeypatch):  # fmt: skip
    forbid_models(monkeypatch, train)
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


def test_explicit_resume_with_new_arguments_is_recorded(train, run_copy, tiny_model_dir, sample_data_dir):
    args = train.parse_args(tiny_argv(tiny_model_dir, sample_data_dir, run_copy, "--max_steps", "3", "--beta", "0.2",
                                      "--resume_from_checkpoint", str(run_copy / "checkpoint-2")))  # fmt: skip
    plan = plan_for(args)
    assert plan.action == "train" and plan.checkpoint == str(run_copy / "checkpoint-2")
    [change] = plan.record["resumed_with_changes"]
    assert change["changes"] == {"beta": [0.1, 0.2], "max_steps": [2, 3]}
    # At or past its end, the checkpoint is reported finished, not stepped again.
    args = train.parse_args(tiny_argv(tiny_model_dir, sample_data_dir, run_copy, "--beta", "0.2",
                                      "--resume_from_checkpoint", str(run_copy / "checkpoint-2")))  # fmt: skip
    plan = plan_for(args)
    assert plan.action == "finished" and "nothing to train" in plan.message


def test_a_run_without_a_record_is_not_resumed_automatically(train, run_copy, tiny_model_dir, sample_data_dir):
    (run_copy / "run_args.json").unlink()  # written by an older version of the script, or by another tool
    args = train.parse_args(tiny_argv(tiny_model_dir, sample_data_dir, run_copy))
    with pytest.raises(ValueError, match="no run_args.json: the arguments of that run are unknown"):
        plan_for(args)


def test_checkpoint_problems(tmp_path, train):
    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    assert run_dir.checkpoint_problems(checkpoint) == ["trainer_state.json", "model weights", "optimizer state"]
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    (checkpoint / "adapter_model.safetensors").write_bytes(b"x")
    assert run_dir.checkpoint_problems(checkpoint) == ["optimizer state"]
    assert run_dir.saved_weights_only(run_dir.checkpoint_problems(checkpoint))  # a save_only_model checkpoint
    (checkpoint / "optimizer.pt").write_bytes(b"x")
    assert run_dir.checkpoint_problems(checkpoint) == []
    (checkpoint / "trainer_state.json").write_text('{"global_st')  # cut mid-write
    assert run_dir.checkpoint_problems(checkpoint) == ["trainer_state.json"]
    deepspeed = tmp_path / "checkpoint-4"
    (deepspeed / "global_step4").mkdir(parents=True)
    (deepspeed / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    assert run_dir.checkpoint_problems(deepspeed) == []  # ZeRO keeps weights and optimizer in global_step<N>/


def test_a_kill_during_the_final_save_is_not_stepped_again(train, run_copy, tiny_model_dir, sample_data_dir):
    (run_copy / "run_args.json").write_text(json.dumps({**record(run_copy), "status": "started"}))
    args = train.parse_args(tiny_argv(tiny_model_dir, sample_data_dir, run_copy))
    plan = plan_for(args)
    assert plan.action == "finished" and "the trained weights are in" in plan.message


def test_the_dpo_baseline_does_not_compare_ot_arguments(train, tiny_model_dir, sample_data_dir, tmp_path):
    args = train.parse_args(tiny_argv(tiny_model_dir, sample_data_dir, tmp_path, "--trainer", "dpo"))
    settings = run_dir.run_settings(*args)
    assert settings["trainer"] == "dpo" and not [key for key in settings if key.startswith("ot_")]


def test_a_plan_is_made_from_plain_values(tmp_path):
    out, settings = tmp_path / "new", {"max_steps": 2, "num_train_epochs": 3.0, "beta": 0.1}
    plan = run_dir.plan_run(out, settings)
    assert plan.action == "train" and plan.checkpoint is None and not plan.clear
    assert plan.record == {"status": "started", "settings": settings}
    run_dir.apply_run_plan(plan, out)
    (out / "checkpoint-1").mkdir()  # the run has begun
    with pytest.raises(ValueError, match=r"holds a run with other arguments \(beta: 0.1 -> 0.5\)"):
        run_dir.plan_run(out, {**settings, "beta": 0.5})
    with pytest.raises(ValueError, match="would leave its checkpoints"):
        run_dir.plan_run(out, settings, resume_from_checkpoint="false")
    plan = run_dir.plan_run(out, {**settings, "beta": 0.5}, overwrite_output_dir=True)
    assert plan.action == "train" and plan.clear


def test_settings_changes_and_their_description():
    old = {"beta": 0.1, "max_steps": 2, "seed": 0}
    new = {"beta": 0.2, "max_steps": 2, "ot_reg": 1.0}
    changes = run_dir.settings_changes(old, new)
    assert changes == {"beta": [0.1, 0.2], "ot_reg": ["<unset>", 1.0], "seed": [0, "<unset>"]}
    assert run_dir.settings_changes(old, dict(old)) == {}
    assert run_dir.describe_changes(changes) == "beta: 0.1 -> 0.2, ot_reg: '<unset>' -> 1.0, seed: 0 -> '<unset>'"
    many = run_dir.settings_changes({}, {f"k{i}": i for i in range(10)})
    assert run_dir.describe_changes(many, limit=2) == "k0: '<unset>' -> 0, k1: '<unset>' -> 1 and 8 more"


def test_finished_run_changes_reads_the_recorded_settings(tmp_path):
    assert run_dir.finished_run_changes(tmp_path, {"max_steps": 2}) == {"max_steps": ["<unset>", 2]}  # no record
    (tmp_path / run_dir.RUN_FILE).write_text(json.dumps({"settings": {"max_steps": 2, "seed": 42}, "finished": True}))
    assert run_dir.finished_run_changes(tmp_path, {"max_steps": 2, "seed": 42}) == {}
    assert run_dir.finished_run_changes(tmp_path, {"max_steps": 3, "seed": 42}) == {"max_steps": [2, 3]}
    (tmp_path / run_dir.RUN_FILE).write_text(json.dumps({"finished": True}))  # a record without settings
    assert run_dir.finished_run_changes(tmp_path, {"seed": 42}) == {"seed": ["<unset>", 42]}
