"""An untruncated data set for the length study: pairs that fit `max_length` whole, a pool where the chosen answer is
the longer one, and held-out pairs that are never trained on.

```bash
python scripts/length_pool.py --max_length 512 --out out/length_pool_512   # -> train.jsonl, test.jsonl, pool.json
python scripts/length_study.py --data out/length_pool_512 --max_length 512 --train_pairs <pool> \
    --held_out_train 0 --test_pairs <held out> ...
```

Why: at the study's first setting (`max_length` 256) TRL cuts most UltraFeedback pairs (for 62 % of them not even the
shorter answer fits beside the prompt), so on those pairs both answers are trained and scored at the same truncated length.
There LD-DPO equals DPO (nothing lies past the shorter answer), and no method can learn, or be seen to learn, anything
about length. Here no pair is truncated: a pair is kept when its prompt and longer answer fit `max_length` (tokens
as TRL 1.16 counts them, [`tokenize_pair`]). The training pool is drawn from the train split's first `pool_rows`
pairs (after the recipe's filters), and keeps, by default, only those whose chosen answer is the longer (a length
signal a reward can learn); the held-out pairs are the fitting pairs of the rest of the train split and of the test
split, whichever answer is longer.

`train.jsonl` is the pool and `test.jsonl` the held-out pairs, both in TRL's explicit-prompt format (prompt, chosen,
rejected: the pairs are filtered already, so a run's `drop_ties` finds no score columns and says so); `pool.json` says
how they were made (the source, the settings, and every pair's split and row there). Nothing is written into a
folder that holds anything but an identical earlier pool.
"""

import argparse
import json
import sys
from pathlib import Path

from transformers import AutoTokenizer

from otpo_trl.data import load_preference_dataset
from otpo_trl.runs import write_json
from otpo_trl.tokenization import tokenize_pair


FILES = ("train.jsonl", "test.jsonl", "pool.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--data", default="../shared/data/ultrafeedback", help="a folder with train.jsonl and test.jsonl")
    p.add_argument("--model", default="models/SmolLM2-135M-Instruct", help="whose tokenizer counts the tokens")
    p.add_argument("--max_length", type=int, default=512, help="prompt + longer answer must fit (tokens)")
    p.add_argument("--pool_rows", type=int, default=600, help="the train split's first N pairs give the pool")
    p.add_argument(
        "--any_longer",
        action="store_true",
        help="keep the pool's pairs whichever answer is longer (default: only those whose chosen answer is longer)",
    )
    p.add_argument("--out", default="out/length_pool_512", help="the folder to write (new, or an identical pool)")
    args = p.parse_args(argv)
    if args.max_length <= 0 or args.pool_rows <= 0:
        p.error(f"--max_length {args.max_length} and --pool_rows {args.pool_rows} must be positive.")
    return args


def fits(ids: dict, max_length: int) -> bool:
    """Whether a tokenised pair is trained and scored whole: its prompt and longer answer within `max_length`."""
    return len(ids["prompt_ids"]) + max(len(ids["chosen_ids"]), len(ids["rejected_ids"])) <= max_length


def build_pool(train, test, tokenizer, max_length: int, pool_rows: int, chosen_longer: bool = True):
    """(pool, held out): lists of (split, row, example). The pool: the fitting pairs of the first `pool_rows` of
    `train` (with `chosen_longer`, only those whose chosen answer has more tokens); held out: the fitting pairs of the
    rest of `train`, then of `test`."""
    if pool_rows >= len(train):
        raise ValueError(
            f"--pool_rows {pool_rows}: the train split has {len(train)} pairs after the filters; "
            "fewer must give the pool, so that the rest are held out."
        )
    pool, held_out = [], []
    for split, data in (("train", train), ("test", test)):
        for row in range(len(data)):
            example = dict(data[row])  # load_preference_dataset has extracted the prompt
            ids = tokenize_pair(example, tokenizer)
            if not fits(ids, max_length):
                continue
            if split == "train" and row < pool_rows:
                if not chosen_longer or len(ids["chosen_ids"]) > len(ids["rejected_ids"]):
                    pool.append((split, row, example))
            else:
                held_out.append((split, row, example))
    if not pool or not held_out:
        raise ValueError(
            f"--max_length {max_length}: {len(pool)} pool pairs and {len(held_out)} held-out pairs fit; "
            "raise --max_length (or --pool_rows for the pool)."
        )
    return pool, held_out


def _jsonl(rows) -> str:
    return "".join(json.dumps({k: e[k] for k in ("prompt", "chosen", "rejected")}) + "\n" for _, _, e in rows)


def write_pool(args) -> dict:
    """Build the pool and write it under `args.out`; returns pool.json's content. Refuses a folder that holds other
    files (before anything loads) or another pool, before writing anything."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: a file, not a folder; give a new folder.")
    others = sorted(p.name for p in out.iterdir() if p.name not in FILES) if out.exists() else []
    if others:
        raise ValueError(f"--out {out}: holds {others}; give a new folder.")
    kwargs = {"drop_ties": True, "drop_identical": True}
    train = load_preference_dataset(args.data, "train", **kwargs)
    test = load_preference_dataset(args.data, "test", **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pool, held_out = build_pool(train, test, tokenizer, args.max_length, args.pool_rows, not args.any_longer)
    meta = {
        "source": str(Path(args.data).resolve()),
        "tokenizer": args.model,
        "max_length": args.max_length,
        "pool_rows": args.pool_rows,
        "chosen_longer": not args.any_longer,
        "filters": kwargs,
        "train": [[s, r] for s, r, _ in pool],
        "test": [[s, r] for s, r, _ in held_out],
    }
    texts = {"train.jsonl": _jsonl(pool), "test.jsonl": _jsonl(held_out)}
    if out.exists():
        old = out / "pool.json"
        same = old.exists() and json.loads(old.read_text()) == meta
        same = same and all((out / n).exists() and (out / n).read_text() == t for n, t in texts.items())
        if not same and any(out.iterdir()):
            raise ValueError(f"--out {out}: holds another pool; give a new folder.")
        if same:
            print(f"{out}: the same pool is there ({len(pool)} pool pairs, {len(held_out)} held out)")
            return meta
    out.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (out / name).write_text(text)
    write_json(out / "pool.json", meta)
    print(
        f"{out}: {len(pool)} pool pairs (train.jsonl), {len(held_out)} held out (test.jsonl); "
        f"for the study: --data {out} --max_length {args.max_length} --train_pairs {len(pool)} "
        f"--held_out_train 0 --test_pairs {len(held_out)}"
    )
    return meta


def cli(argv=None):
    try:
        write_pool(parse_args(argv))
    except ValueError as err:
        sys.exit(f"error: {err}")
