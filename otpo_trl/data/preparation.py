"""A split made ready for training or evaluation: [`load_preference_dataset`], the entry point of the scripts (load,
check, filter, map to TRL's format), its filters (pairs with an empty side, tied scores, identical completions) and
[`split_off_eval`], which holds out pairs for evaluation.
"""

import logging

from datasets import Dataset

from .files import load_raw_split
from .layout import REQUIRED_COLUMNS, is_empty, to_preference_format, validate_columns, validate_rows


logger = logging.getLogger(__package__)  # "otpo_trl.data", the one logger of the data package

# (chosen score, rejected score) column names: TRL / H4 UltraFeedback, then Argilla's cleaned UltraFeedback.
SCORE_COLUMNS = (("score_chosen", "score_rejected"), ("chosen-rating", "rejected-rating"))


def drop_empty_pairs(dataset: Dataset, name: str = "dataset") -> Dataset:
    """Drop pairs whose `chosen` or `rejected` is missing or empty (None, blank text, no messages), with a logged
    count; raise a `ValueError` naming the column if it is empty in every row, or if no pair is left."""
    if len(dataset) == 0:
        raise ValueError(f"{name} has no rows.")
    empty = {c: [is_empty(v) for v in dataset[c]] for c in REQUIRED_COLUMNS}
    all_empty = [c for c, flags in empty.items() if all(flags)]
    if all_empty:
        raise ValueError(f"{name}: column(s) {all_empty} are empty in every one of its {len(dataset)} rows.")
    keep = [i for i, flags in enumerate(zip(*empty.values(), strict=True)) if not any(flags)]
    if not keep:
        raise ValueError(f"{name}: every one of its {len(dataset)} pairs has an empty 'chosen' or 'rejected'.")
    if len(keep) < len(dataset):
        counts = ", ".join(f"{sum(flags)} with an empty '{c}'" for c, flags in empty.items() if any(flags))
        logger.warning(f"Dropped {len(dataset) - len(keep)} of {len(dataset)} pairs of {name}: {counts}.")
        dataset = dataset.select(keep)
    return dataset


def _score_columns(column_names) -> tuple[str, str] | None:
    return next((pair for pair in SCORE_COLUMNS if all(c in column_names for c in pair)), None)


def drop_score_ties(dataset: Dataset) -> Dataset:
    """Drop pairs whose chosen and rejected completions have the same score; log how many were dropped.

    A data set without score columns (see `SCORE_COLUMNS`) is returned unchanged, with a warning.
    """
    columns = _score_columns(dataset.column_names)
    if columns is None:
        logger.warning(f"drop_ties: no score columns {list(SCORE_COLUMNS)} in the data set; no pair was dropped.")
        return dataset

    def keep(chosen_scores, rejected_scores):
        return [c is None or c != r for c, r in zip(chosen_scores, rejected_scores)]

    kept = dataset.filter(keep, input_columns=list(columns), batched=True, desc="Dropping score ties")
    logger.info(f"Dropped {len(dataset) - len(kept)} of {len(dataset)} pairs with tied scores ({columns[0]}).")
    return kept


def drop_identical_pairs(dataset: Dataset) -> Dataset:
    """Drop pairs whose chosen and rejected are equal (no preference to learn); log how many were dropped."""

    def keep(chosen, rejected):
        return [c != r for c, r in zip(chosen, rejected)]

    kept = dataset.filter(keep, input_columns=["chosen", "rejected"], batched=True, desc="Dropping identical pairs")
    logger.info(f"Dropped {len(dataset) - len(kept)} of {len(dataset)} pairs whose chosen equals rejected.")
    return kept


def split_off_eval(dataset: Dataset, size: float, seed: int = 42) -> tuple[Dataset, Dataset]:
    """Hold out pairs of `dataset` for evaluation: `(train, eval)`, disjoint, drawn at random with `seed`.

    Args:
        dataset: the pairs to split.
        size: a share of the pairs (0 < size < 1, rounded, at least 1) or a number of pairs (size >= 1).
        seed: seed of the shuffle, so that a resumed run holds out the same pairs.
    """
    if size <= 0 or (size >= 1 and size != int(size)):
        raise ValueError(f"`eval_split_size` must be a share in (0, 1) or a whole number of pairs, got {size}.")
    count = max(1, round(size * len(dataset))) if size < 1 else int(size)
    if count >= len(dataset):
        raise ValueError(
            f"`eval_split_size` {size} holds out {count} of {len(dataset)} pairs: none would be left to train on."
        )
    split = dataset.train_test_split(test_size=count, shuffle=True, seed=seed)
    logger.info(f"Held out {count} of {len(dataset)} pairs for evaluation (eval_split_size={size}, seed {seed}).")
    return split["train"], split["test"]


def load_preference_dataset(
    name_or_path: str,
    split: str = "train",
    config: str | None = None,
    max_samples: int | None = None,
    drop_ties: bool = False,
    drop_identical: bool = False,
) -> Dataset:
    """Load one split of a preference data set in TRL's preference format.

    Steps: load (see [`load_raw_split`]) → check the columns (see [`validate_columns`]) and every row (see
    [`validate_rows`]) → drop pairs with an empty side (see [`drop_empty_pairs`]) → drop tied / identical pairs if
    asked → keep the first `max_samples` pairs → map to TRL's format (see [`to_preference_format`]).

    Args:
        name_or_path: a Hub data set id or a local file / folder.
        split: the split to load, e.g. `"train"` or `"train_prefs"` (HuggingFaceH4/ultrafeedback_binarized).
        config: the Hub data set's configuration name, if it has several.
        max_samples: keep at most this many pairs (the first ones, after filtering).
        drop_ties: drop pairs whose chosen and rejected scores are equal.
        drop_identical: drop pairs whose chosen equals rejected.

    Returns:
        `Dataset` with columns `chosen`, `rejected` and, for an explicit prompt, `prompt`.

    Raises:
        ValueError: a row is malformed (see [`validate_rows`]), or no pair is left, or `max_samples` < 1.
    """
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 (or unset, for all pairs), got {max_samples}.")
    name = f"{name_or_path} [{split}]"
    dataset = load_raw_split(name_or_path, split, config)
    validate_columns(dataset.column_names, name=name)
    logger.info(f"Loaded {len(dataset)} pairs from {name}.")
    validate_rows(dataset, name=name)
    dataset = drop_empty_pairs(dataset, name=name)
    loaded = len(dataset)
    if drop_ties:
        dataset = drop_score_ties(dataset)
    if drop_identical:
        dataset = drop_identical_pairs(dataset)
    if len(dataset) == 0:
        filters = " and ".join(f for f, on in (("drop_ties", drop_ties), ("drop_identical", drop_identical)) if on)
        raise ValueError(f"{name}: {filters} removed all {loaded} pairs; nothing is left to train or evaluate on.")
    if max_samples is not None and max_samples < len(dataset):
        dataset = dataset.select(range(max_samples))
    return to_preference_format(dataset)
