"""scripts/evaluate.py follows the run it evaluates: `--max_length`, `--drop_ties`, `--drop_identical`, `--beta` and
the `--ot_*` options default to the values in the run folder's `run_args.json`, a flag given wins, and without a run
record the documented defaults apply. Also its progress bars."""

import json
import logging
from pathlib import Path

import pytest
import transformers

from otpo_trl.cli import evaluate as evaluate_cli
from otpo_trl.evaluation import OT_DEFAULTS, generate_responses
from otpo_trl.inspection import DEFAULT_MAX_LENGTH
from otpo_trl.loading import load_model_and_tokenizer
from otpo_trl.runs import run_settings

from .testing_utils import make_tiny_model_dir


LONG_PROMPT = "Please explain the answer step by step, with an example. " * 12  # far over 40 tokens, under 1024
# (prompt, chosen, rejected, score_chosen, score_rejected): a tie, an identical pair, a long prompt, two plain pairs.
ROWS = [
    ("What is 2 + 2?", " Four.", " Five, I think.", 8.0, 3.0),
    ("Name a colour.", " Blue.", " A cat.", 5.0, 5.0),
    ("Say hello.", " Hello!", " Hello!", 6.0, 2.0),
    (LONG_PROMPT, " Sure.", " No.", 9.0, 1.0),
    ("Is water wet?", " Yes, it is.", " Go away.", 7.0, 2.0),
]
# What the run trained with: each differs from the default without a run.
RUN = {"max_length": 40, "drop_ties": True, "drop_identical": True, "beta": 0.5, "ot_reg": 0.3, "ot_cost": "cosine"}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    columns = ("prompt", "chosen", "rejected", "score_chosen", "score_rejected")
    path.write_text("".join(json.dumps(dict(zip(columns, row))) + "\n" for row in ROWS))
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_file, train):
    """A tiny model in a run folder with the run record the training command writes for RUN's flags."""
    path = make_tiny_model_dir(tmp_path_factory.mktemp("run"))
    argv = ["--model_name_or_path", path, "--dataset_name", str(data_file), "--output_dir", path]
    argv += ["--bf16", "false", "--use_cpu", "true", "--report_to", "none"]
    argv += [x for key, value in RUN.items() for x in (f"--{key}", str(value).lower())]
    settings = run_settings(*train.parse_args(argv))
    assert {key: settings[key] for key in RUN} == RUN  # the record's keys are the ones evaluate reads
    Path(path, "run_args.json").write_text(json.dumps({"status": "finished", "settings": settings, "global_step": 3}))
    return path


def evaluate(model, data_file, tmp_path, *flags):
    argv = ["--model", model, "--data", str(data_file), "--num_generations", "0", "--device", "cpu"]
    return evaluate_cli.main([*argv, "--output_dir", str(tmp_path / "eval"), "--disable_tqdm", *flags])


def test_the_runs_settings_reach_the_evaluation(run_dir, data_file, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="otpo_trl"):
        result = evaluate(run_dir, data_file, tmp_path)
    # The tie and the identical pair are dropped; the long prompt fills max_length 40, so it is skipped.
    assert (result["preference"]["n_pairs"], result["preference"]["n_skipped"]) == (2, 1)
    assert all(p["chosen_tokens"] < RUN["max_length"] for p in result["pairs"])
    assert (result["max_length"], result["drop_ties"], result["drop_identical"], result["beta"]) == (
        40,
        True,
        True,
        0.5,
    )
    assert (result["ot"]["reg"], result["ot"]["cost"]) == (0.3, "cosine")
    assert result["ot"]["reg_m"] == OT_DEFAULTS["reg_m"]  # the run's, which is the default
    assert result["defaults_from_run"]["file"] == str(Path(run_dir, "run_args.json"))
    assert {k: result["defaults_from_run"]["settings"][k] for k in RUN} == RUN
    assert (
        json.loads((tmp_path / "eval" / "eval.json").read_text())["defaults_from_run"]["settings"]["max_length"] == 40
    )
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Settings of the run"))
    assert str(Path(run_dir, "run_args.json")) in line and "max_length=40" in line and "drop_ties=True" in line
    assert "ot_reg=0.3" in line and "given on the command line" not in line


def test_a_flag_given_wins_over_the_run(run_dir, data_file, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="otpo_trl"):
        result = evaluate(
            run_dir, data_file, tmp_path, "--max_length", "1024", "--drop_ties", "false", "--beta", "0.2"
        )
    # Only the identical pair is dropped; with 1024 tokens the long prompt is scored.
    assert (result["preference"]["n_pairs"], result["preference"]["n_skipped"]) == (4, 0)
    assert (result["max_length"], result["drop_ties"], result["drop_identical"], result["beta"]) == (
        1024,
        False,
        True,
        0.2,
    )
    assert result["ot"]["reg"] == 0.3  # not given: still the run's
    assert not {"max_length", "drop_ties", "beta"} & set(result["defaults_from_run"]["settings"])
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Settings of the run"))
    assert "given on the command line: max_length=1024, drop_ties=False, beta=0.2." in line


def test_without_a_run_record_the_documented_defaults_apply(tiny_model_dir, data_file, tmp_path, capsys, caplog):
    with caplog.at_level(logging.INFO, logger="otpo_trl"):
        result = evaluate(tiny_model_dir, data_file, tmp_path)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("No run_args.json"))
    assert f"the defaults: max_length={DEFAULT_MAX_LENGTH}, drop_ties=False" in line
    assert (result["preference"]["n_pairs"], result["preference"]["n_skipped"]) == (len(ROWS), 0)
    settings = (result["max_length"], result["drop_ties"], result["drop_identical"], result["beta"])
    assert settings == (DEFAULT_MAX_LENGTH, False, False, 0.1)
    assert result["ot"] == OT_DEFAULTS and result["defaults_from_run"] == {"file": None, "settings": {}}
    with pytest.raises(SystemExit):
        evaluate_cli.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"the evaluated run's, else {DEFAULT_MAX_LENGTH} (TRL's)" in help_text and "else 0.1" in help_text
    assert "Without run_args.json (a Hub id, a model not trained here) the defaults are the ones listed" in help_text


def test_a_checkpoint_folder_follows_its_run(run_dir, tmp_path):
    checkpoint = tmp_path / "run" / "checkpoint-3"
    checkpoint.mkdir(parents=True)
    (tmp_path / "run" / "run_args.json").write_text(Path(run_dir, "run_args.json").read_text())
    args = evaluate_cli.parse_args(["--model", str(checkpoint), "--data", "unused"])
    assert args.run_file == tmp_path / "run" / "run_args.json"
    assert (args.max_length, args.drop_ties, args.beta, args.ot_reg) == (40, True, 0.5, 0.3)


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(evaluate_cli, "evaluate", refuse)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"settings": {"ot_reg": -1.0}}, "`ot_reg` of the run in {file} must be a finite number > 0, got -1.0"),
        ({"settings": {"max_length": 0}}, "`max_length` of the run in {file} must be an int >= 1, got 0"),
        ({"status": "finished"}, "{file} is not a run record"),
    ],
    ids=["ot_reg", "max_length", "no-settings"],
)
def test_a_bad_run_record_is_named_before_any_model_loads(tmp_path, capsys, no_model_loads, record, message):
    (tmp_path / "run_args.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit) as exit_info:
        evaluate_cli.main(["--model", str(tmp_path), "--data", "unused", "--output_dir", str(tmp_path / "eval")])
    assert exit_info.value.code == 2
    assert message.format(file=tmp_path / "run_args.json") in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "value"), [("--drop_ties", "maybe"), ("--beta", "0"), ("--max_length", "0")])
def test_a_bad_flag_is_named_before_any_model_loads(run_dir, capsys, no_model_loads, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_cli.main(["--model", run_dir, "--data", "unused", flag, value])
    assert exit_info.value.code == 2 and flag in capsys.readouterr().err


def test_generation_shows_prompts_and_the_token_being_generated(tiny_model_dir, capsys):
    policy, _, tokenizer = load_model_and_tokenizer(tiny_model_dir, device="cpu")
    records = generate_responses(policy, tokenizer, ["Hello!", "Say hi.", "Why?"], max_new_tokens=4, batch_size=2)
    err = capsys.readouterr().err
    assert len(records) == 3 and "Generating" in err and "3/3" in err and "prompt" in err and "token 1/4" in err
    generate_responses(policy, tokenizer, ["Hello!"], max_new_tokens=4, progress=False)
    assert capsys.readouterr().err == ""
