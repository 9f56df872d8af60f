"""Preference data for the scripts: load a split, map it to TRL's preference format, drop unusable pairs.

Accepted inputs (each example is one preference pair):

- TRL's preference format: `chosen` and `rejected`, with or without an explicit `prompt`, all plain text
  ("standard", kept as it is) or all message lists ("conversational"). `trl-lib/ultrafeedback_binarized` is
  conversational with an implicit prompt (the user turn opens both `chosen` and `rejected`).
- `HuggingFaceH4/ultrafeedback_binarized` (splits `train_prefs` / `test_prefs`) and layouts like it: a text `prompt`
  next to message-list `chosen` / `rejected` that repeat it as their first user turn, plus `messages`, `prompt_id`,
  `score_*` columns. TRL would take the text prompt as explicit and train on the user turn as part of the completion.

Conversational pairs leave here with an explicit prompt that holds every turn before the answers: the leading turns
that `chosen` and `rejected` share when the prompt is implicit (or text, as in H4), and the `prompt` itself when it is
given, with any repeat of it removed from the completions (see [`to_preference_format`]); pairs where that is
ambiguous are refused by [`validate_rows`], naming the row. The rules are stated in docs/training.md ("Data").

Only `prompt`, `chosen` and `rejected` are kept; scores are read before that by [`drop_score_ties`]. Every row is
checked before any of this (see [`validate_rows`]): a bad value fails naming its row and column.

[`data_fingerprint`] is a cheap fingerprint of what a split is loaded from, for the run record of `scripts/train.py`.

- `files`: where a split's rows come from (the Hub, a file, a data folder), [`load_raw_split`], the fingerprints.
- `layout`: the layouts, the row checks and where a conversational prompt ends; [`to_preference_format`].
- `preparation`: [`load_preference_dataset`], its filters, and [`split_off_eval`].
"""

from .files import data_fingerprint, file_fingerprint, load_raw_split, split_files
from .layout import (
    CHAT_ROLES,
    PREFERENCE_COLUMNS,
    REQUIRED_COLUMNS,
    detect_layout,
    repeats_prompt,
    same_turn,
    shared_prompt_length,
    split_shared_prompt,
    to_preference_format,
    validate_columns,
    validate_rows,
)
from .preparation import (
    SCORE_COLUMNS,
    drop_empty_pairs,
    drop_identical_pairs,
    drop_score_ties,
    load_preference_dataset,
    split_off_eval,
)


__all__ = [
    "CHAT_ROLES",
    "PREFERENCE_COLUMNS",
    "REQUIRED_COLUMNS",
    "SCORE_COLUMNS",
    "data_fingerprint",
    "detect_layout",
    "drop_empty_pairs",
    "drop_identical_pairs",
    "drop_score_ties",
    "file_fingerprint",
    "load_preference_dataset",
    "load_raw_split",
    "repeats_prompt",
    "same_turn",
    "shared_prompt_length",
    "split_files",
    "split_off_eval",
    "split_shared_prompt",
    "to_preference_format",
    "validate_columns",
    "validate_rows",
]
