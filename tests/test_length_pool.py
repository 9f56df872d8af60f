"""`studies/length_pool.py`: the length study's untruncated data set (no pair cut, a chosen-longer pool, held-out pairs
never in it), and its folder rules."""

import json

import pytest
from transformers import AutoTokenizer

from otpo_trl.data import load_preference_dataset
from otpo_trl.tokenization import tokenize_pair
from studies import length_pool
from studies.length_settings import held_out_pairs, parse_args

from .testing_utils import SAMPLE_DATA_DIR, make_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    make_tiny_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The sample's first 200 train and 40 test pairs (tokenising all of them takes minutes with the tiny tokenizer)."""
    path = tmp_path_factory.mktemp("data")
    for split, n in (("train", 200), ("test", 40)):
        lines = (SAMPLE_DATA_DIR / f"{split}.jsonl").read_text().splitlines(keepends=True)[:n]
        (path / f"{split}.jsonl").write_text("".join(lines))
    return path


def argv(tokenizer_dir, data_dir, out, *extra):
    return ["--data", str(data_dir), "--model", tokenizer_dir, "--out", str(out), "--max_length", "768", *extra]


def lengths(path, tokenizer):
    data = load_preference_dataset(str(path.parent), path.stem)
    ids = [tokenize_pair(e, tokenizer) for e in data]
    return [(len(i["prompt_ids"]), len(i["chosen_ids"]), len(i["rejected_ids"])) for i in ids]


def test_the_pool_fits_whole_has_the_chosen_longer_and_is_never_held_out(tokenizer_dir, data_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    train = load_preference_dataset(str(data_dir), "train", drop_ties=True, drop_identical=True)
    ids = [tokenize_pair(train[i], tokenizer) for i in range(len(train))]
    fit = [i for i, t in enumerate(ids) if length_pool.fits(t, 768)]
    cut = fit[len(fit) // 2]  # the pool's bound on a fitting row: the row itself is held out, the one before is not
    out = tmp_path / "pool"
    meta = length_pool.write_pool(length_pool.parse_args(argv(tokenizer_dir, data_dir, out, "--pool_rows", str(cut))))
    pool, held = lengths(out / "train.jsonl", tokenizer), lengths(out / "test.jsonl", tokenizer)
    assert len(pool) == len(meta["train"]) > 10 and len(held) == len(meta["test"]) > 10
    assert all(p + max(c, r) <= 768 for p, c, r in pool + held)  # nothing is truncated
    assert all(c > r for _, c, r in pool)
    assert any(c < r for _, c, r in held)  # held-out pairs keep either order
    assert all(split == "train" and row < cut for split, row in meta["train"])
    assert all(split == "test" or row >= cut for split, row in meta["test"])
    # Exactly the fitting pairs: recounted from the source, the pool's rows and the held-out ones.
    longer = [i for i in fit if i < cut and len(ids[i]["chosen_ids"]) > len(ids[i]["rejected_ids"])]
    assert [row for _, row in meta["train"]] == longer
    assert [row for split, row in meta["test"] if split == "train"] == [i for i in fit if i >= cut]
    # The study reads it as its data: the held-out pairs are test.jsonl's, in order.
    study = parse_args(["--data", str(out), "--train_pairs", str(len(pool)), "--held_out_train", "0"])
    recipe = {"dataset_name": str(out), "dataset_train_split": "train", "dataset_test_split": "test"}
    recipe |= {"drop_ties": True, "drop_identical": True}
    study.test_pairs = len(held)
    pairs = held_out_pairs(study, recipe)
    written = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
    assert [p["chosen"] for p in pairs] == [w["chosen"] for w in written]

    # --any_longer keeps the pool's chosen-shorter pairs too.
    meta_any = length_pool.write_pool(
        length_pool.parse_args(
            argv(tokenizer_dir, data_dir, tmp_path / "any", "--pool_rows", str(cut), "--any_longer")
        )
    )
    assert [row for _, row in meta_any["train"]] == [i for i in fit if i < cut]


def test_a_folder_is_written_once_and_never_mixed(tokenizer_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "pool"
    args = length_pool.parse_args(argv(tokenizer_dir, data_dir, out, "--pool_rows", "120"))
    length_pool.write_pool(args)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    length_pool.write_pool(args)  # the same pool: nothing rewritten
    assert "the same pool is there" in capsys.readouterr().out
    with pytest.raises(ValueError, match="holds another pool"):
        length_pool.write_pool(length_pool.parse_args(argv(tokenizer_dir, data_dir, out, "--pool_rows", "50")))
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds \['notes.txt'\]"):
        length_pool.write_pool(args)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "notes.txt"} == before
    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(ValueError, match="a file, not a folder"):
        length_pool.write_pool(length_pool.parse_args(argv(tokenizer_dir, data_dir, tmp_path / "a_file")))
    with pytest.raises(ValueError, match="pool_rows 5000"):
        length_pool.write_pool(
            length_pool.parse_args(argv(tokenizer_dir, data_dir, tmp_path / "new", "--pool_rows", "5000"))
        )
    assert not (tmp_path / "new").exists()
