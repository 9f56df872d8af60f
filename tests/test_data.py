"""Preference data: every supported layout maps to TRL's format, filters count right, bad data fails clearly."""

import json
import logging

import pytest
from datasets import Dataset
from trl.data_utils import extract_prompt

from otpo_trl.data import (
    detect_layout,
    drop_empty_pairs,
    drop_identical_pairs,
    drop_score_ties,
    load_preference_dataset,
    load_raw_split,
    split_off_eval,
    to_preference_format,
    validate_columns,
    validate_rows,
)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# One pair, in each layout. The H4 row mirrors HuggingFaceH4/ultrafeedback_binarized (train_prefs).
PROMPT, GOOD, BAD = "What is 2 + 2?", "It is 4.", "It is 5."
TRL_IMPLICIT = {  # trl-lib/ultrafeedback_binarized
    "chosen": [user(PROMPT), assistant(GOOD)],
    "rejected": [user(PROMPT), assistant(BAD)],
    "score_chosen": 8.0,
    "score_rejected": 3.0,
}
TRL_EXPLICIT = {"prompt": [user(PROMPT)], "chosen": [assistant(GOOD)], "rejected": [assistant(BAD)]}
STANDARD_EXPLICIT = {"prompt": PROMPT, "chosen": GOOD, "rejected": BAD}
STANDARD_IMPLICIT = {"chosen": f"{PROMPT} {GOOD}", "rejected": f"{PROMPT} {BAD}"}
H4 = {
    "prompt": PROMPT,
    "prompt_id": "0f3e",
    "chosen": [user(PROMPT), assistant(GOOD)],
    "rejected": [user(PROMPT), assistant(BAD)],
    "messages": [user(PROMPT), assistant(GOOD)],
    "score_chosen": 8.0,
    "score_rejected": 3.0,
}


@pytest.mark.parametrize(
    ("row", "layout", "expected"),
    [
        (TRL_IMPLICIT, "conversational", TRL_EXPLICIT),  # the shared user turn becomes the prompt, as in TRL
        (TRL_EXPLICIT, "conversational", TRL_EXPLICIT),
        (STANDARD_EXPLICIT, "standard", STANDARD_EXPLICIT),
        (STANDARD_IMPLICIT, "standard", STANDARD_IMPLICIT),
        (H4, "prompt_in_completions", TRL_EXPLICIT),
    ],
    ids=["trl_implicit", "trl_explicit", "standard_explicit", "standard_implicit", "h4"],
)
def test_each_layout_maps_to_trl_format(row, layout, expected):
    assert detect_layout(row) == layout
    mapped = to_preference_format(Dataset.from_list([row, row]))
    assert sorted(mapped.column_names) == sorted(expected)
    assert mapped[0] == expected


def test_h4_multi_turn_keeps_the_shared_turns_as_prompt():
    history = [user("Hi"), assistant("Hello!"), user(PROMPT)]
    row = {**H4, "chosen": [*history, assistant(GOOD)], "rejected": [*history, assistant(BAD)]}
    mapped = to_preference_format(Dataset.from_list([row]))[0]
    assert mapped == {"prompt": history, "chosen": [assistant(GOOD)], "rejected": [assistant(BAD)]}


def pairs(scores, identical=()):
    """Rows in the trl-lib layout with these (chosen, rejected) scores; rows in `identical` have chosen == rejected."""
    rows = []
    for i, (sc, sr) in enumerate(scores):
        good, bad = f"answer {i}", f"answer {i}" if i in identical else f"wrong {i}"
        rows.append(
            {
                "chosen": [user(f"q{i}"), assistant(good)],
                "rejected": [user(f"q{i}"), assistant(bad)],
                "score_chosen": sc,
                "score_rejected": sr,
            }
        )
    return rows


def test_drop_ties_and_identical_count_and_log(caplog):
    dataset = Dataset.from_list(pairs([(5, 1), (3, 3), (4, 2), (2, 2), (6, 1)], identical={2, 3}))
    with caplog.at_level(logging.INFO, logger="otpo_trl"):
        no_ties = drop_score_ties(dataset)
        assert len(no_ties) == 3
        assert "Dropped 2 of 5 pairs with tied scores" in caplog.text
        distinct = drop_identical_pairs(no_ties)
    assert len(distinct) == 2  # row 2 (identical) goes; row 3 (identical) already went as a tie
    assert "Dropped 1 of 3 pairs whose chosen equals rejected" in caplog.text
    assert [r["chosen"][0]["content"] for r in distinct] == ["q0", "q4"]


def test_drop_ties_without_scores_warns_and_keeps_everything(caplog):
    dataset = Dataset.from_list([STANDARD_EXPLICIT] * 3)
    with caplog.at_level(logging.WARNING, logger="otpo_trl"):
        assert len(drop_score_ties(dataset)) == 3
    assert "no score columns" in caplog.text


def test_drop_ties_reads_argilla_rating_columns():
    rows = [{**STANDARD_EXPLICIT, "chosen-rating": c, "rejected-rating": r} for c, r in [(5, 5), (5, 4)]]
    assert len(drop_score_ties(Dataset.from_list(rows))) == 1


def test_missing_columns_name_the_found_and_expected():
    with pytest.raises(ValueError) as err:
        validate_columns(["prompt", "completion", "label"], name="my/data [train]")
    message = str(err.value)
    assert "my/data [train]" in message
    assert "['completion', 'label', 'prompt']" in message  # found
    assert "'chosen', 'rejected'" in message  # expected


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_local_jsonl_json_parquet_and_folder(tmp_path):
    rows = pairs([(5, 1), (4, 2), (3, 1)])
    write_jsonl(tmp_path / "train.jsonl", rows)
    (tmp_path / "data.json").write_text(json.dumps(rows))
    Dataset.from_list(rows).to_parquet(str(tmp_path / "pairs.parquet"))
    for source in (tmp_path / "train.jsonl", tmp_path / "data.json", tmp_path / "pairs.parquet", tmp_path):
        dataset = load_preference_dataset(str(source), "train")
        assert len(dataset) == 3, source
        assert dataset.column_names == ["prompt", "chosen", "rejected"]


def test_load_folder_split_names_and_save_to_disk(tmp_path):
    h4 = tmp_path / "h4"
    h4.mkdir()
    write_jsonl(h4 / "train_prefs.jsonl", [H4] * 4)
    write_jsonl(h4 / "test_prefs.jsonl", [H4] * 2)
    assert len(load_preference_dataset(str(h4), "test_prefs")) == 2
    train = load_preference_dataset(str(h4), "train_prefs", max_samples=3)
    assert len(train) == 3 and train[0] == TRL_EXPLICIT

    Dataset.from_list([TRL_EXPLICIT] * 2).save_to_disk(str(tmp_path / "saved"))
    assert len(load_raw_split(str(tmp_path / "saved"), "train")) == 2


def test_missing_split_or_path_fails_clearly(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", pairs([(5, 1)]))
    with pytest.raises(FileNotFoundError, match=r"split 'test'.*found \['train.jsonl'\]"):
        load_raw_split(str(tmp_path), "test")
    with pytest.raises(FileNotFoundError, match="No such data file or folder"):
        load_raw_split(str(tmp_path / "nope.jsonl"), "train")


def test_wrong_columns_fail_before_filtering(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "p", "completion": "c", "label": True}])
    with pytest.raises(ValueError, match=r"has columns \['completion', 'label', 'prompt'\]"):
        load_preference_dataset(str(path), drop_ties=True)


def test_ultrafeedback_sample(sample_data_dir):
    raw = load_raw_split(str(sample_data_dir), "train")
    assert len(raw) == 1000
    dataset = load_preference_dataset(str(sample_data_dir), "train", drop_ties=True, drop_identical=True)
    assert len(dataset) == 1000 - 111 - 3  # 111 ties, 4 identical of which 1 is also a tie (see its README)
    assert dataset.column_names == ["prompt", "chosen", "rejected"]
    assert detect_layout(dataset[0]) == "conversational"
    # The prompts are those TRL's DPOTrainer would have extracted from the implicit layout itself.
    kept = load_preference_dataset(str(sample_data_dir), "train")
    assert kept.to_list() == raw.map(extract_prompt, remove_columns=raw.column_names).to_list()
    test = load_preference_dataset(str(sample_data_dir), "test", max_samples=10)
    assert len(test) == 10


def test_pairs_with_an_empty_side_are_dropped_and_counted(tmp_path, caplog):
    rows = [
        {"prompt": "p0", "chosen": "good", "rejected": "bad"},
        {"prompt": "p1", "chosen": "", "rejected": "bad"},
        {"prompt": "p2", "chosen": "good", "rejected": "   "},
        {"prompt": "p3", "chosen": "good", "rejected": "worse"},
    ]
    with caplog.at_level(logging.WARNING, logger="otpo_trl.data"):
        dataset = load_preference_dataset(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert dataset["prompt"] == ["p0", "p3"]
    assert "Dropped 2 of 4 pairs" in caplog.text
    assert "1 with an empty 'chosen'" in caplog.text and "1 with an empty 'rejected'" in caplog.text


def test_a_column_empty_everywhere_fails_naming_it(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": [], "rejected": [{"role": "assistant", "content": "x"}]} for i in range(3)]
    with pytest.raises(ValueError, match=r"\['chosen'\] are empty in every one of its 3 rows"):
        load_preference_dataset(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    with pytest.raises(ValueError, match="my data has no rows"):
        drop_empty_pairs(Dataset.from_dict({"chosen": [], "rejected": []}), name="my data")


# ------------------------------------------------------------------ every row checked, naming its row and column


def message(role, content="text", **extra):
    return {"role": role, "content": content, **extra}


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([STANDARD_EXPLICIT, {**STANDARD_EXPLICIT, "chosen": 5}], r"row 1, column 'chosen': expected text .*int 5"),
        ([STANDARD_EXPLICIT, {**STANDARD_EXPLICIT, "rejected": {"text": "x"}}], r"row 1, column 'rejected'.*dict"),
        (
            [STANDARD_EXPLICIT, STANDARD_EXPLICIT, TRL_EXPLICIT],
            "row 2, column 'prompt' is a list of messages but row 0 is text: every row must use one layout",
        ),
        ([{**STANDARD_EXPLICIT, "rejected": [assistant(BAD)]}], "row 0: 'chosen' is text but 'rejected' is a list"),
        (
            [TRL_IMPLICIT, {**TRL_IMPLICIT, "chosen": [user(PROMPT), {"role": "assistant"}]}],
            r"row 1, column 'chosen', message 1 \(role 'assistant'\) has no 'content'",
        ),
        (
            [{**TRL_IMPLICIT, "rejected": [message("human", PROMPT), message("bot", BAD)]}],
            r"row 0, column 'rejected', message 0 has role 'human', not one of .*; use 'user'",
        ),
        (
            [{"chosen": [{"from": "human", "value": PROMPT}], "rejected": [{"from": "gpt", "value": BAD}]}],
            r"row 0, column 'chosen', message 0 has 'from'/'value' keys \(ShareGPT\)",
        ),
        ([{**TRL_IMPLICIT, "chosen": [user(PROMPT), message("assistant", 3)]}], "has a int 'content'; expected text"),
        ([{"prompt": [user(PROMPT)], "chosen": GOOD, "rejected": BAD}], "'prompt' is a list of messages but the"),
        ([STANDARD_EXPLICIT, {**STANDARD_EXPLICIT, "prompt": None}], "row 1 has no 'prompt'"),
    ],
    ids=[
        "number",
        "dict",
        "mixed_rows",
        "mixed_in_row",
        "no_content",
        "roles",
        "sharegpt",
        "content_type",
        "message_prompt_text_completions",
        "missing_prompt",
    ],
)
def test_bad_rows_fail_naming_row_and_column(tmp_path, rows, expected):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(ValueError, match=expected) as err:
        load_preference_dataset(str(path))
    assert str(path) in str(err.value)


def test_good_rows_pass_including_tool_calls_and_empty_values():
    tool_call = {"role": "assistant", "content": None, "tool_calls": [{"name": "add"}]}
    rows = [
        {**TRL_IMPLICIT, "chosen": [user(PROMPT), tool_call, message("tool", "4"), assistant(GOOD)]},
        {**TRL_IMPLICIT, "rejected": []},  # empty: dropped later, not an error
        TRL_IMPLICIT,
    ]
    validate_rows(Dataset.from_list(rows))
    validate_rows(Dataset.from_list([H4, H4]))  # text prompt, message completions


def test_nothing_left_fails_clearly(tmp_path):
    same = [{"prompt": "p", "chosen": "x", "rejected": "x"}] * 3
    with pytest.raises(ValueError, match="drop_identical removed all 3 pairs"):
        load_preference_dataset(str(write_jsonl(tmp_path / "same.jsonl", same)), drop_identical=True)
    ties = [STANDARD_EXPLICIT | {"score_chosen": 1, "score_rejected": 1}] * 2
    with pytest.raises(ValueError, match="drop_ties removed all 2 pairs"):
        load_preference_dataset(str(write_jsonl(tmp_path / "ties.jsonl", ties)), drop_ties=True)
    half_empty = [{"prompt": "p", "chosen": "", "rejected": "r"}, {"prompt": "p", "chosen": "c", "rejected": ""}]
    with pytest.raises(ValueError, match="every one of its 2 pairs has an empty 'chosen' or 'rejected'"):
        load_preference_dataset(str(write_jsonl(tmp_path / "half.jsonl", half_empty)))
    for max_samples in (0, -1):
        with pytest.raises(ValueError, match=f"max_samples must be >= 1.*got {max_samples}"):
            load_preference_dataset(str(tmp_path / "same.jsonl"), max_samples=max_samples)
    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("empty.json", "[]")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=f"{name}: no rows"):
            load_preference_dataset(str(tmp_path / name))


def test_split_off_eval_holds_out_disjoint_pairs():
    dataset = Dataset.from_list([{"prompt": f"p{i}", "chosen": "c", "rejected": "r"} for i in range(10)])
    train, held_out = split_off_eval(dataset, 0.2, seed=1)
    assert (len(train), len(held_out)) == (8, 2)
    assert sorted([*train["prompt"], *held_out["prompt"]]) == sorted(dataset["prompt"])
    assert list(split_off_eval(dataset, 0.2, seed=1)[1]["prompt"]) == list(held_out["prompt"])  # same seed, same pairs
    assert len(split_off_eval(dataset, 3)[1]) == 3
    for size, message in ((10, "none would be left to train on"), (2.5, "a whole number"), (0, "a share")):
        with pytest.raises(ValueError, match=message):
            split_off_eval(dataset, size)


# ------------------------------------------------------------------ a split's files are named exactly


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["train.jsonl", "train-backup.jsonl"], r"\['train-backup.jsonl'\] look like files of split 'train'"),
        (["train.jsonl", "train (1).jsonl"], r"\['train \(1\).jsonl'\] look like files of split 'train'"),
        (["train.jsonl", "train.old.jsonl"], r"\['train.old.jsonl'\] look like files of split 'train'"),
        (["train-backup.jsonl"], r"\['train-backup.jsonl'\] look like files"),  # not read as a shard either
        (["train.jsonl", "train.parquet"], r"holds split 'train' in two formats: \['train.jsonl', 'train.parquet'\]"),
        (["train.jsonl", "train-00000-of-00001.jsonl"], r"two forms \(a single file and shards\)"),
        (["train-00000-of-00002.jsonl"], r"incomplete: missing \['train-00001-of-00002.jsonl'\]"),
    ],
    ids=["backup", "copy", "old", "backup_alone", "two_formats", "file_and_shards", "missing_shard"],
)
def test_a_split_is_exactly_its_files(tmp_path, names, expected):
    for name in names:
        if name.endswith(".parquet"):
            Dataset.from_list(pairs([(5, 1)])).to_parquet(str(tmp_path / name))
        else:
            write_jsonl(tmp_path / name, pairs([(5, 1), (4, 2)]))
    with pytest.raises(ValueError, match=expected) as err:
        load_raw_split(str(tmp_path), "train")
    assert str(tmp_path) in str(err.value)


def test_other_splits_and_complete_shards_are_read(tmp_path):
    write_jsonl(tmp_path / "train_prefs.jsonl", pairs([(5, 1)]))  # another split: `_` goes on a split's name
    write_jsonl(tmp_path / "test-backup.jsonl", pairs([(5, 1)]))  # looks like another split's: not this one's business
    for index in range(3):
        write_jsonl(tmp_path / f"train-{index:05d}-of-00003.jsonl", pairs([(5, 1), (4, 2)]))
    assert len(load_raw_split(str(tmp_path), "train")) == 6
    assert len(load_raw_split(str(tmp_path), "train_prefs")) == 1


# ------------------------------------------------------------------ where a conversational prompt ends


def system(text):
    return {"role": "system", "content": text}


REPEATING = {
    "prompt": [user(PROMPT)],
    "chosen": [user(PROMPT), assistant(GOOD)],
    "rejected": [user(PROMPT), assistant(BAD)],
}


def test_completions_that_repeat_the_prompt_train_it_as_prompt(caplog):
    rows = [REPEATING, TRL_EXPLICIT, REPEATING]
    dataset = Dataset.from_list(rows)
    validate_rows(dataset)
    with caplog.at_level(logging.INFO, logger="otpo_trl.data"):
        mapped = to_preference_format(dataset)
    assert mapped.to_list() == [TRL_EXPLICIT] * 3
    assert "2 of 3 pairs repeat their prompt's turns at the start of 'chosen' and 'rejected'" in caplog.text
    multi = {"prompt": [system("Be brief."), user(PROMPT)]}
    multi |= {side: [*multi["prompt"], assistant(answer)] for side, answer in (("chosen", GOOD), ("rejected", BAD))}
    assert to_preference_format(Dataset.from_list([multi]))[0]["chosen"] == [assistant(GOOD)]


def test_the_implicit_prompt_is_extracted_as_trl_does_but_ignores_arrows_none_keys():
    tool_call = {"role": "assistant", "content": None, "tool_calls": [{"name": "add"}]}
    row = {"chosen": [user(PROMPT), tool_call, assistant(GOOD)], "rejected": [user(PROMPT), assistant(BAD)]}
    dataset = Dataset.from_list([row])  # Arrow gives every message of `chosen` a `tool_calls` key
    assert dataset[0]["chosen"][0] != dataset[0]["rejected"][0]  # so TRL's extract_prompt finds no prompt here
    assert extract_prompt(dataset[0])["prompt"] == []
    mapped = to_preference_format(dataset)[0]
    assert [m["content"] for m in mapped["prompt"]] == [PROMPT]
    assert [m["content"] for m in mapped["rejected"]] == [BAD]


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (
            {**REPEATING, "rejected": [assistant(BAD)]},
            "row 1: 'chosen' repeats the prompt's 1 turn(s) before its answer but 'rejected' does not",
        ),
        (
            {**REPEATING, "chosen": [user("Another question?"), assistant(GOOD)], "rejected": [assistant(BAD)]},
            "row 1: 'chosen' starts with the user turn 'Another question?', which does not repeat the prompt",
        ),
        (
            {"chosen": [user(PROMPT), assistant(GOOD)], "rejected": [user("What is 3 + 3?"), assistant(BAD)]},
            "row 1: 'chosen' and 'rejected' differ from their first turn ('chosen' has the user turn 'What is 2 + 2?', "
            "'rejected' the user turn 'What is 3 + 3?'): their implicit prompts differ",
        ),
        (
            {
                "chosen": [system("S"), user(PROMPT), assistant(GOOD)],
                "rejected": [system("S"), user("?"), assistant(BAD)],
            },
            "row 1: 'chosen' and 'rejected' differ after 1 shared turn(s)",
        ),
        (
            {"chosen": [assistant(GOOD)], "rejected": [assistant(BAD)]},
            "row 1: 'chosen' and 'rejected' share no leading turn before their answers",
        ),
        (
            {**H4, "rejected": [user("What is 3 + 3?"), assistant(BAD)]},
            "row 1: 'chosen' and 'rejected' differ from their first turn",
        ),
        ({**TRL_EXPLICIT, "prompt": []}, "row 1: 'prompt' is an empty list of messages"),
    ],
    ids=["one_side_repeats", "own_user_turn", "implicit_differ", "after_system", "no_prompt", "h4", "empty_prompt"],
)
def test_ambiguous_prompts_are_refused_naming_the_row(tmp_path, row, expected):
    first = H4 if "prompt_id" in row else TRL_EXPLICIT if "prompt" in row else TRL_IMPLICIT  # a good row 0
    path = write_jsonl(tmp_path / "d.jsonl", [first, row])
    with pytest.raises(ValueError) as err:
        load_preference_dataset(str(path))
    assert f"{path} [train]: {expected}" in str(err.value)
