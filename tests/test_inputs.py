"""A run never destroys its inputs, never trains on nothing, and stops on bad input before any model loads, saying what
to do. The command-line cases run `scripts/train.py` in a subprocess, or its entry point `otpo_trl.cli.train.cli` in
this process with model loading forbidden."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from otpo_trl.data import data_fingerprint, load_preference_dataset, load_raw_split
from otpo_trl.data import files as data_files  # where the data is read: the Hub is patched there
from otpo_trl.runs import run_settings

from .testing_utils import REPO_ROOT, child_env, forbid_models, record, tiny_argv


QUICKSTART = REPO_ROOT / "configs" / "quickstart.yaml"


@pytest.fixture
def no_model(train, monkeypatch):
    forbid_models(monkeypatch, train)


def script(*argv, cwd=REPO_ROOT):
    """Run `python scripts/train.py *argv` offline: (returncode, combined output)."""
    command = [sys.executable, str(REPO_ROOT / "scripts" / "train.py"), *map(str, argv)]
    result = subprocess.run(command, cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout + result.stderr


def cli_error(train, argv, capsys=None) -> str:
    """The message `scripts/train.py`'s entry point exits with (it must exit, with a message and no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        train.cli([str(a) for a in argv])
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith("error: "), message
    return message


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pairs(n, tag=""):
    return [
        {"prompt": f"What is {i} + 2?{tag}", "chosen": f"It is {i + 2}.", "rejected": f"It is {i + 3}."}
        for i in range(n)
    ]


# ------------------------------------------------------------------ inputs are never deleted


def test_overwrite_into_the_model_folder_is_refused_and_deletes_nothing(tiny_model_dir, sample_data_dir, tmp_path):
    """The headline case, through scripts/train.py: `output_dir` = `model_name_or_path` with `--overwrite_output_dir`
    used to delete model.safetensors; the refusal of a used folder suggested that flag."""
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    before = sorted(p.name for p in model.iterdir())
    code, output = script(*tiny_argv(model, sample_data_dir, model, "--overwrite_output_dir", "true"))
    assert code == 1, output[-3000:]
    assert f"`output_dir` {model} is the model of the run (`model_name_or_path` {model})" in output
    assert "Traceback" not in output and "overwrite_output_dir" not in output.split("error: ")[-1]
    assert sorted(p.name for p in model.iterdir()) == before  # nothing deleted, nothing written


@pytest.mark.parametrize("overwrite", ["false", "true"])
@pytest.mark.parametrize("where", ["model", "inside_model", "data_inside", "data_folder", "template_inside"])
def test_output_dir_overlapping_an_input_is_refused(train, tiny_model_dir, tmp_path, no_model, where, overwrite):
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    data = write_jsonl(tmp_path / "data" / "train.jsonl", pairs(8))
    out, extra = tmp_path / "out", []
    if where == "model":
        out = model
    elif where == "inside_model":
        out = model / "run"
    elif where == "data_inside":
        data = write_jsonl(out / "train.jsonl", pairs(8))
    elif where == "data_folder":
        out = data.parent
    else:
        (out / "chat.jinja").parent.mkdir()
        (out / "chat.jinja").write_text("{{ messages }}")
        extra = ["--chat_template", out / "chat.jinja"]
    snapshot = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    message = cli_error(train, tiny_argv(model, data, out, "--overwrite_output_dir", overwrite, *extra))
    assert f"`output_dir` {out} " in message and "which would destroy an input of the run" in message
    assert "overwrite_output_dir" not in message  # the flag that deletes is not suggested
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == snapshot  # nothing created, changed, deleted


# ------------------------------------------------------------------ a chat_template that is no file


def test_a_chat_template_that_is_no_file_and_no_template_is_an_error(
    train, tiny_model_dir, sample_data_dir, tmp_path, no_model
):
    typo = tmp_path / "chatml.jnja"
    message = cli_error(train, tiny_argv(tiny_model_dir, sample_data_dir, tmp_path / "out", "--chat_template", typo))
    assert f"`chat_template` '{typo}' is not a file" in message and "not a Jinja template" in message
    assert not (tmp_path / "out").exists()
    # A file and a template itself are both taken.
    (tmp_path / "chatml.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    for template in (tmp_path / "chatml.jinja", "{{ messages[0]['content'] }}"):
        script_args, *_ = train.parse_args(
            tiny_argv(tiny_model_dir, sample_data_dir, tmp_path, "--chat_template", str(template))
        )
        assert script_args.chat_template == str(template)


# ------------------------------------------------------------------ data folders are read at their own level


def test_a_data_folder_is_not_searched_recursively(tmp_path, caplog):
    write_jsonl(tmp_path / "train.jsonl", pairs(20))
    write_jsonl(tmp_path / "old" / "train.jsonl", pairs(20, tag=" (old)"))
    with caplog.at_level("WARNING"):
        assert len(load_raw_split(str(tmp_path), "train")) == 20
    assert "ignored the ones in other subfolders (old/train.jsonl)" in caplog.text
    # The Hub's layout, data/<split>-*.parquet, is read when the folder's own level has none; nothing deeper.
    hub = tmp_path / "hub"
    write_jsonl(hub / "data" / "train-00000-of-00001.jsonl", pairs(3))
    assert len(load_raw_split(str(hub), "train")) == 3
    deep = tmp_path / "deep"
    write_jsonl(deep / "a" / "b" / "train.jsonl", pairs(3))
    with pytest.raises(FileNotFoundError, match=r"found \['a/b/train.jsonl'\] \(subfolders other than data/ are not"):
        load_raw_split(str(deep), "train")


def test_the_h4_folder_without_its_split_names_says_which_to_set(train, tiny_model_dir, tmp_path, no_model):
    h4 = tmp_path / "h4"
    write_jsonl(h4 / "data" / "train_prefs-00000-of-00001.jsonl", pairs(4))
    write_jsonl(h4 / "data" / "test_prefs-00000-of-00001.jsonl", pairs(2))
    message = cli_error(train, tiny_argv(tiny_model_dir, h4, tmp_path / "out"))
    assert "No data file for split 'train'" in message
    assert "its split(s): ['test_prefs', 'train_prefs']: set `dataset_train_split`" in message
    assert "--dataset_train_split train_prefs --dataset_test_split test_prefs" in message


# ------------------------------------------------------------------ the data's fingerprint in the run record


def test_data_fingerprint_is_cheap_and_sees_an_edit(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", pairs(4))
    before = data_fingerprint(str(data))
    assert list(before["files"]) == [str(data.resolve())]
    assert set(before["files"][str(data.resolve())]) == {"size", "mtime_ns", "sha256"}
    stat = data.stat()
    data.write_text(data.read_text().replace("It is 2.", "It is X.", 1))  # the same size, other content ...
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ... and the same modification time
    assert data_fingerprint(str(data)) != before
    data.touch()  # the same content, modified later
    assert data_fingerprint(str(data))["files"][str(data.resolve())]["mtime_ns"] != stat.st_mtime_ns
    big = tmp_path / "big.jsonl"
    big.write_bytes(b"x" * (3 << 20))
    first = data_fingerprint(str(big))["files"][str(big.resolve())]
    with big.open("r+b") as handle:
        handle.seek(-10, 2)
        handle.write(b"y")
    assert data_fingerprint(str(big))["files"][str(big.resolve())]["sha256"] != first["sha256"]  # the last MiB
    assert data_fingerprint(str(tmp_path), "train")["files"].keys() == before["files"].keys()  # a folder: its split


@pytest.fixture
def interrupted_on_own_data(train, finished_run, tmp_path):
    """The finished 2-step run, as if interrupted after checkpoint-1, trained on a copy of the sample it used."""
    out = Path(shutil.copytree(finished_run, tmp_path / "out"))
    saved = record(out)
    data = Path(shutil.copy(saved["settings"]["dataset_name"] + "/train.jsonl", tmp_path / "train.jsonl"))
    shutil.rmtree(out / "checkpoint-2")
    saved["settings"]["dataset_name"] = str(data)
    for folder in (out, out / "checkpoint-1"):  # a checkpoint carries its run's record
        (folder / "run_args.json").write_text(
            json.dumps({**saved, "status": "started", "data": data_fingerprint(str(data))})
        )
    return out, data


@pytest.fixture(scope="module")
def finished_run(train, tiny_model_dir, sample_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "out"
    train.main(*train.parse_args(tiny_argv(tiny_model_dir, sample_data_dir, out)))
    return out


def test_the_record_holds_the_data_fingerprint_beside_the_settings(
    train, finished_run, tiny_model_dir, sample_data_dir
):
    saved = record(finished_run)
    assert saved["data"] == data_fingerprint(str(sample_data_dir), "train")
    # Not among the settings: the length study compares run_settings() of finished runs to reuse them.
    assert "data" not in saved["settings"] and not [k for k in saved["settings"] if "fingerprint" in k]
    args = train.parse_args(tiny_argv(tiny_model_dir, sample_data_dir, finished_run))
    assert run_settings(*args) == saved["settings"]


def test_a_hub_data_set_is_fingerprinted_by_datasets(monkeypatch):
    from datasets import Dataset

    loaded = Dataset.from_list(pairs(2))
    monkeypatch.setattr(data_files, "load_raw_split", lambda name, split, config: loaded)
    assert data_fingerprint("org/prefs", "train_prefs") == {
        "hub": "org/prefs",
        "config": None,
        "split": "train_prefs",
        "fingerprint": loaded._fingerprint,
    }


def test_resuming_on_changed_data_is_refused_naming_it(train, tiny_model_dir, interrupted_on_own_data, no_model):
    out, data = interrupted_on_own_data
    argv = tiny_argv(tiny_model_dir, data, out)
    plan, *_ = train.prepare_run(*train.parse_args(argv))  # unchanged: resumes
    assert plan.checkpoint == str(out / "checkpoint-1")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[3]["chosen"], rows[3]["rejected"] = rows[3]["rejected"], rows[3]["chosen"]  # the same size
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    message = cli_error(train, argv)
    assert f"{out} holds a run with other arguments (data {data}: '" in message
    assert "--resume_from_checkpoint" in message  # the usual ways on
    # An explicit checkpoint resumes on the new data, with a warning, and the record says so.
    args = train.parse_args([*argv, "--resume_from_checkpoint", str(out / "checkpoint-1")])
    plan, *_ = train.prepare_run(*args)
    [change] = plan.record["resumed_with_changes"]
    assert list(change["changes"]) == [f"data {data}"]


def test_a_record_without_a_fingerprint_resumes_with_a_warning(
    train, tiny_model_dir, interrupted_on_own_data, no_model, caplog
):
    out, data = interrupted_on_own_data
    saved = record(out)
    del saved["data"]  # written by an older version, whose checkpoints carry no record
    (out / "run_args.json").write_text(json.dumps(saved))
    (out / "checkpoint-1" / "run_args.json").unlink()
    with caplog.at_level("WARNING"):
        plan, *_ = train.prepare_run(*train.parse_args(tiny_argv(tiny_model_dir, data, out)))
    assert plan.checkpoint == str(out / "checkpoint-1")
    assert "has no fingerprint of the data (it was written by an older version): the data could not be" in caplog.text
    assert plan.record["data"] == data_fingerprint(str(data))  # recorded from now on


# ------------------------------------------------------------------ --resume_from_checkpoint true, nothing there


def test_resume_true_with_nothing_to_resume_is_an_error(train, tiny_model_dir, sample_data_dir, tmp_path, no_model):
    typo = tmp_path / "otu"
    message = cli_error(train, tiny_argv(tiny_model_dir, sample_data_dir, typo, "--resume_from_checkpoint", "true"))
    assert f"there is nothing to resume: {typo} does not exist" in message
    assert not typo.exists()
    (tmp_path / "empty").mkdir()
    argv = tiny_argv(tiny_model_dir, sample_data_dir, tmp_path / "empty", "--resume_from_checkpoint", "true")
    assert f"nothing to resume: {tmp_path / 'empty'} holds no run" in cli_error(train, argv)


# ------------------------------------------------------------------ save_only_model checkpoints


@pytest.mark.parametrize("flag", [[], ["--save_only_model", "true"], ["--resume_from_checkpoint", "<checkpoint>"]])
def test_a_save_only_model_checkpoint_is_refused_not_resumed_afresh(
    train, tiny_model_dir, sample_data_dir, finished_run, tmp_path, no_model, flag
):
    out = Path(shutil.copytree(finished_run, tmp_path / "out"))
    shutil.rmtree(out / "checkpoint-2")
    (out / "run_args.json").write_text(json.dumps({**record(out), "status": "started"}))
    for name in ("optimizer.pt", "scheduler.pt"):  # what save_only_model leaves out
        (out / "checkpoint-1" / name).unlink()
    flag = [str(out / "checkpoint-1") if f == "<checkpoint>" else f for f in flag]
    message = cli_error(train, tiny_argv(tiny_model_dir, sample_data_dir, out, *flag))
    assert f"{out / 'checkpoint-1'} was saved with `save_only_model`" in message
    assert "restart the schedule with a fresh optimizer" in message and "cut short" not in message


# ------------------------------------------------------------------ LoRA target modules, --config=


@pytest.mark.parametrize("how", ["yaml_scalar", "one_flag"])
def test_a_lone_lora_target_module_is_a_list(train, tiny_model_dir, tmp_path, how):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    from trl import get_peft_config

    recipe = {**yaml.safe_load(QUICKSTART.read_text()), "model_name_or_path": tiny_model_dir}
    extra = ["--lora_target_modules", "q_proj"] if how == "one_flag" else []
    if how == "yaml_scalar":
        recipe["lora_target_modules"] = "q_proj"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    *_, model_args = train.parse_args(["--config", str(tmp_path / "r.yaml"), *extra])
    assert model_args.lora_target_modules == ["q_proj"]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), get_peft_config(model_args))
    assert sum("lora_A" in name for name, _ in model.named_parameters()) == 2  # q_proj of both layers


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--config=<recipe>"], "`trainer` must be one of ['otpo', 'dpo'], got 'ppo'"),  # the recipe is read
        (["--config", "<recipe>", "--trainer", "otpo", "--ot_tol", "-1e-6"], "`ot_tol` must be a finite number > 0"),
    ],
    ids=["config_equals", "negative_exponent"],
)
def test_command_line_spellings_through_the_script(tmp_path, argv, expected):
    recipe = {**yaml.safe_load(QUICKSTART.read_text()), "trainer": "ppo", "output_dir": str(tmp_path / "out")}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    code, output = script(*(a.replace("<recipe>", str(tmp_path / "r.yaml")) for a in argv))
    assert code == 1 and expected in output, output[-3000:]
    assert "Traceback" not in output and "bf16" not in output  # the recipe's `bf16: false` was read


# ------------------------------------------------------------------ early messages, not late tracebacks


def test_a_recipe_value_outside_its_choices_lists_them(train, tmp_path):
    recipe = {**yaml.safe_load(QUICKSTART.read_text()), "dtype": "bf16"}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    expected = (
        r"`dtype` must be one of \['auto', 'bfloat16', 'float16', 'float32'\], "
        r"got 'bf16' \(did you mean 'bfloat16'\?\)"
    )
    with pytest.raises(ValueError, match=expected):
        train.parse_args(["--config", str(tmp_path / "r.yaml")])


def test_liger_kernel_without_liger_is_an_error(train, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "liger_kernel" else find_spec(n, *a))
    with pytest.raises(ValueError, match="`use_liger_kernel` is true, but the liger-kernel package is not installed"):
        train.parse_args(["--config", str(QUICKSTART), "--use_liger_kernel", "true"])


def test_an_adapter_folder_as_model_names_its_base(train, tiny_model_dir, sample_data_dir, tmp_path, no_model):
    adapter = tmp_path / "checkpoint-5"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/models/base"}))
    message = cli_error(train, tiny_argv(adapter, sample_data_dir, tmp_path / "out"))
    assert f"`model_name_or_path` {adapter} is a PEFT adapter (it has adapter_config.json), not a model" in message
    assert "Pass its base model as `model_name_or_path` (/models/base)" in message
    assert f"`--resume_from_checkpoint {adapter}`" in message  # a run's checkpoint: how to continue that run


def test_a_bare_model_name_typo_offline_says_no_folder_and_no_hub(sample_data_dir, tmp_path):
    code, output = script(*tiny_argv("SmolLM2-135M-Instrct", sample_data_dir, tmp_path / "out"), cwd=tmp_path)
    assert code == 1, output[-3000:]
    assert (
        f"`model_name_or_path` 'SmolLM2-135M-Instrct': no local folder of that name (relative to {tmp_path})" in output
    )
    assert "the Hub cannot be reached (offline)" in output and "Traceback" not in output


def test_a_truncated_jsonl_line_names_file_and_line(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", pairs(6))
    data.write_text(data.read_text() + '{"prompt": "cut", "chosen": "sho')  # an interrupted write
    code, output = script(*tiny_argv(tiny_model_dir, data, tmp_path / "out"))
    assert code == 1, output[-3000:]
    assert f"error: {data}: line 7 is not valid JSON (Unterminated string" in output
    assert "Traceback" not in output


def test_a_row_without_the_prompt_of_the_others_says_two_layouts(tmp_path):
    rows = [
        *pairs(10),
        {
            "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
        },
    ]
    with pytest.raises(ValueError, match="row 10 has no 'prompt' but row 0 has one: the rows mix two layouts"):
        load_preference_dataset(str(write_jsonl(tmp_path / "train.jsonl", rows)))


# ------------------------------------------------------------------ every check that can fail runs before any write


def no_package(monkeypatch, what):
    """As on a machine without the package behind `what`, whatever this one has."""
    from transformers import trainer_optimizer
    from transformers.quantizers import quantizer_bnb_4bit

    from otpo_trl.cli import preflight

    if what == "trackers":
        monkeypatch.setattr(preflight, "get_available_reporting_integrations", lambda: [])
    elif what == "bitsandbytes":
        monkeypatch.setattr(quantizer_bnb_4bit, "is_bitsandbytes_available", lambda: False)
        monkeypatch.setattr(trainer_optimizer, "is_bitsandbytes_available", lambda: False)


LORA = ["--use_peft", "true", "--lora_target_modules"]


@pytest.mark.parametrize(
    ("extra", "missing", "expected"),
    [
        ([*LORA, "q_prj"], None, "the name 'q_prj' (closest: 'q_proj'"),
        ([*LORA, "q_proj", "v_prj"], None, "the name 'v_prj' (closest: 'v_proj'"),
        ([*LORA, r".*\.q_prj"], None, r"the regular expression '.*\\.q_prj' (closest:"),
        (["--attn_implementation", "flash_attention_2"], None, "`attn_implementation` 'flash_attention_2' cannot be"),
        (["--load_in_4bit", "true"], "bitsandbytes", "`load_in_4bit` is true, but Using `bitsandbytes` 4-bit"),
        (["--optim", "adamw_bnb_8bit"], "bitsandbytes", "`optim` 'adamw_bnb_8bit' cannot be used here: You need to"),
        (
            ["--report_to", "wandb"],
            "trackers",
            "`pip install wandb` for wandb. Or train without it: `--report_to none`",
        ),
        (["--report_to", "tensorbord"], None, "'tensorbord' (did you mean 'tensorboard'?)"),
        (["--do_eval", "true", "--dataset_test_split", "train"], None, "`dataset_test_split` is the training split"),
    ],
    ids=[
        "lora_typo",
        "lora_one_typo",
        "lora_regex",
        "flash_attention",
        "4bit",
        "optim",
        "wandb",
        "tracker_typo",
        "eval_on_train",
    ],
)
def test_a_late_failure_stops_the_run_before_overwrite_deletes(
    train, finished_run, tiny_model_dir, sample_data_dir, tmp_path, no_model, monkeypatch, extra, missing, expected
):
    """With `--overwrite_output_dir` on a finished run, each of these failed only after the run was deleted."""
    out = Path(shutil.copytree(finished_run, tmp_path / "out"))
    snapshot = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    no_package(monkeypatch, missing)
    message = cli_error(
        train, tiny_argv(tiny_model_dir, sample_data_dir, out, "--overwrite_output_dir", "true", *extra)
    )
    assert expected in message
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == snapshot  # nothing deleted, written or touched


def test_a_lora_typo_through_the_script_leaves_the_previous_run(
    finished_run, tiny_model_dir, sample_data_dir, tmp_path
):
    out = Path(shutil.copytree(finished_run, tmp_path / "out"))
    snapshot = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    code, output = script(
        *tiny_argv(tiny_model_dir, sample_data_dir, out, "--overwrite_output_dir", "true", *LORA, "q_proj", "v_prj")
    )
    assert code == 1, output[-3000:]
    assert "error: `lora_target_modules`: the name 'v_prj' (closest: 'v_proj'" in output and "Traceback" not in output
    assert "PEFT would leave it out without a word" in output
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == snapshot


def test_the_install_command_names_the_extra_that_brings_a_package(monkeypatch):
    from email.message import Message

    from otpo_trl.cli import preflight

    def metadata(requires):
        message = Message()
        for extra in ("test", "viz"):
            message["Provides-Extra"] = extra
        for line in requires:
            message["Requires-Dist"] = line
        return lambda name: message

    viz = ["trl>=1.16", 'pytest>=8; extra == "test"', 'tensorboard>=2.15; extra == "viz"']
    monkeypatch.setattr(preflight.importlib.metadata, "metadata", metadata(viz))
    assert preflight.install_command("tensorboard") == 'pip install "otpo-trl[viz]"'
    assert preflight.install_command("wandb") == "pip install wandb"
    monkeypatch.setattr(preflight.importlib.metadata, "metadata", metadata(["trl>=1.16", "tensorboard>=2.15"]))
    assert preflight.install_command("tensorboard") == "pip install tensorboard"  # a dependency: no extra to name


# ------------------------------------------------------------------ missing local inputs fail before any Hub call


@pytest.fixture
def no_hub(monkeypatch):
    """Make any Hub lookup (a config, a tokenizer, a data set by name) fail the test."""
    import datasets
    from transformers import AutoConfig, AutoTokenizer

    def refuse(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    for owner, name in (
        (AutoConfig, "from_pretrained"),
        (AutoTokenizer, "from_pretrained"),
        (datasets, "load_dataset"),
    ):
        monkeypatch.setattr(owner, name, refuse)
    monkeypatch.setattr(data_files, "load_dataset", refuse)


def test_the_quickstart_without_its_model_names_prepare_model(train, tmp_path, monkeypatch, no_model, no_hub):
    monkeypatch.chdir(tmp_path)  # an empty folder, as after `pip install otpo-trl`
    message = cli_error(train, ["--config", QUICKSTART, "--report_to", "none"])
    assert "`model_name_or_path` 'models/SmolLM2-135M-Instruct': no such folder" in message
    assert "`otpo-trl prepare-model` writes it" in message and "HuggingFaceTB/SmolLM2-135M-Instruct" in message
    message = cli_error(train, ["--config", QUICKSTART, "--model_name_or_path", "my/models/SmolLM2-135M-Instruct"])
    assert "`otpo-trl prepare-model --output_dir my/models/SmolLM2-135M-Instruct` writes it" in message
    assert list(tmp_path.iterdir()) == []  # no out/quickstart left behind


def test_the_quickstart_without_its_data_says_where_it_comes_from(
    train, tiny_model_dir, tmp_path, monkeypatch, no_model, no_hub
):
    monkeypatch.chdir(tmp_path)
    message = cli_error(train, ["--config", QUICKSTART, "--model_name_or_path", tiny_model_dir, "--report_to", "none"])
    assert "`dataset_name` '../shared/data/ultrafeedback': no such file or folder" in message
    assert (
        "beside a clone of the repository" in message and "--dataset_name trl-lib/ultrafeedback_binarized" in message
    )
    assert list(tmp_path.iterdir()) == []


def test_a_models_path_is_never_a_hub_id(tmp_path, monkeypatch):
    from otpo_trl.loading import looks_like_local_path

    monkeypatch.chdir(tmp_path)
    assert looks_like_local_path("models/SmolLM2-135M-Instruct")  # `models` is a page of the Hub, not an organisation
    assert not looks_like_local_path("HuggingFaceTB/SmolLM2-135M-Instruct")
    (tmp_path / "HuggingFaceTB").mkdir()  # a local folder of that name: the path is local
    assert looks_like_local_path("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_the_quickstart_from_an_empty_folder_fails_at_once(tmp_path):
    """As a new user with the package and no model: the script stops naming the command that makes the model."""
    code, output = script("--config", QUICKSTART, cwd=tmp_path)
    assert code == 1, output[-3000:]
    assert "`otpo-trl prepare-model` writes it" in output and "Traceback" not in output
    assert "Retrying" not in output and list(tmp_path.iterdir()) == []


def test_the_model_skeleton_is_plain_under_zero3(train, tiny_model_dir, tmp_path, monkeypatch):
    """Under a ZeRO-3 launch `from_config` would build the skeleton inside `deepspeed.zero.Init` (which partitions it
    across the processes): the preflight checks build it outside."""
    from transformers import modeling_utils

    from otpo_trl.cli import preflight

    monkeypatch.setattr(modeling_utils, "is_deepspeed_zero3_enabled", lambda: True)
    args = train.parse_args(tiny_argv(tiny_model_dir, tmp_path, tmp_path / "out", *LORA, "q_proj"))
    skeleton = preflight.model_skeleton(args[2], args[1])
    assert {p.device.type for p in skeleton.parameters()} == {"meta"}
    assert not any(hasattr(p, "ds_id") for p in skeleton.parameters())  # no DeepSpeed partitioning


def conversation(question, answer):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


@pytest.mark.parametrize("case", ["backup_file", "prompts_differ"])
def test_ambiguous_data_stops_the_script_naming_files_or_row(tiny_model_dir, tmp_path, case):
    """Through scripts/train.py: a backup beside the split was read as a shard; chosen and rejected with different
    user turns ended in an IndexError traceback naming no row."""
    data = tmp_path / "data"
    rows = [{"chosen": conversation(f"Q{i}?", "Yes."), "rejected": conversation(f"Q{i}?", "No.")} for i in range(8)]
    if case == "backup_file":
        write_jsonl(data / "train-backup.jsonl", rows)
        expected = f"error: {data}: ['train-backup.jsonl'] look like files of split 'train'"
    else:
        rows[5]["rejected"] = conversation("Another question?", "No.")
        expected = "[train]: row 5: 'chosen' and 'rejected' differ from their first turn"
    write_jsonl(data / "train.jsonl", rows)
    code, output = script(*tiny_argv(tiny_model_dir, data, tmp_path / "out"))
    assert code == 1, output[-3000:]
    assert expected in output and "Traceback" not in output
    assert not (tmp_path / "out" / "run_args.json").exists()
