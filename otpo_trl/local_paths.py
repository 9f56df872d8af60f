"""Local paths: the one rule for "Hub id or local path", the chat template's file, and what to say when a path of the
quickstart is missing. Pure (pathlib only), so that `otpo-trl train` checks a recipe's paths before it imports torch:
`otpo_trl.loading` (models), `otpo_trl.data` (data sets), the training preflight and the launcher all use these.
"""

from pathlib import Path


# The Hub's own top-level pages (huggingface.co/models, /datasets, /spaces): no user or organisation can take these
# names, so `models/<name>` (where `otpo-trl prepare-model` writes) is a path, never a Hub id.
HUB_PAGES = ("models", "datasets", "spaces")


def looks_like_local_path(name_or_path: str) -> bool:
    """True for a name that cannot be a Hub id ("name" or "org/name"): one that starts with `.`, `/` or `~`, has more
    than one `/`, or is "org/name" where `org` is one of the Hub's own pages ([`HUB_PAGES`]) or a local folder. Where
    such a path does not exist, the scripts say so instead of asking the Hub (which, without network, retries for
    about a minute and a half)."""
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        return True
    first = name_or_path.split("/")[0] if "/" in name_or_path else None
    return first is not None and (first in HUB_PAGES or Path(first).is_dir())


def resolve_model_path(name_or_path: str, what: str, hint: str = "") -> str:
    """`name_or_path` as given if it is a local folder or may be a Hub id; a clear error for a missing path."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{what} {name_or_path!r} is a file; expected a model or adapter folder.")
        return str(path)
    parent_exists = path.parent != Path(".") and path.parent.is_dir()
    if looks_like_local_path(name_or_path) or parent_exists:
        raise FileNotFoundError(f"{what} {name_or_path!r}: no such folder (relative to {Path.cwd()}).{hint}")
    return name_or_path


# Local file extension -> `datasets` builder.
DATA_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def looks_like_data_path(name_or_path: str) -> bool:
    """True for a `dataset_name` that cannot be a Hub id: a local-looking path
    ([`looks_like_local_path`]) or a name ending in a data file's extension (`.jsonl`, ...)."""
    return looks_like_local_path(name_or_path) or Path(name_or_path).suffix in DATA_FILE_BUILDERS


def read_chat_template(chat_template: str) -> str:
    """The Jinja chat template `chat_template` names: the text of the file of that path, or `chat_template` itself
    when it is a template (holds `{{` or `{%`).

    Raises:
        ValueError: it is neither a file nor a template (a mistyped path would be used as the template's text, and
            every prompt and completion would render as that text).
    """
    path = Path(chat_template).expanduser()
    if path.is_file():
        try:
            return path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"`chat_template` {chat_template} cannot be read: {err}.") from err
    if "{{" in chat_template or "{%" in chat_template:
        return chat_template
    what = "is a folder" if path.is_dir() else f"is not a file (relative to {Path.cwd()})"
    raise ValueError(
        f"`chat_template` {chat_template!r} {what} and not a Jinja template (no `{{{{` or `{{%`). Give the path of a "
        "file holding the template, or the template itself; leave it unset to use the tokenizer's."
    )


# The quickstart's model and data, named in the message when their folder is missing, with the way to get them.
QUICKSTART_MODEL_NAME = "SmolLM2-135M-Instruct"
QUICKSTART_MODEL_DIR = "models/SmolLM2-135M-Instruct"  # `otpo-trl prepare-model`'s default --output_dir
QUICKSTART_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SAMPLE_DATA_PARTS = ("shared", "data", "ultrafeedback")  # ../shared/data/ultrafeedback, beside a clone
SAMPLE_DATA_HUB_ID = "trl-lib/ultrafeedback_binarized"


def missing_model_hint(name_or_path: str) -> str:
    """How to get the model folder `name_or_path` when it is missing ("" when there is nothing to say)."""
    if Path(name_or_path).name != QUICKSTART_MODEL_NAME:
        return ""
    flag = "" if Path(name_or_path) == Path(QUICKSTART_MODEL_DIR) else f" --output_dir {name_or_path}"
    return (
        f" It is the quickstart model: `otpo-trl prepare-model{flag}` writes it (`make prepare-model` in a clone); "
        f"with Hub access, `--model_name_or_path {QUICKSTART_MODEL_HUB_ID}` downloads it instead."
    )


def missing_data_hint(name_or_path: str) -> str:
    """Where the data `name_or_path` comes from when it is missing ("" when there is nothing to say)."""
    if Path(name_or_path).parts[-3:] != SAMPLE_DATA_PARTS:
        return ""
    return (
        " It is the UltraFeedback sample (1,000 + 100 pairs), which lies beside a clone of the repository: "
        "`../shared/data/ultrafeedback` from the clone's root, so run from there. With Hub access, "
        f"`--dataset_name {SAMPLE_DATA_HUB_ID}` reads the full set (the same schema)."
    )


def check_local_paths(model_name_or_path: str | None, dataset_name: str | None) -> None:
    """A model or data path that cannot be a Hub id and does not exist fails, before any Hub call, saying where it
    comes from.

    Raises:
        FileNotFoundError: the missing path, relative to the current directory, and how to get it.
        NotADirectoryError: `model_name_or_path` is a file.
    """
    if model_name_or_path is not None:
        resolve_model_path(model_name_or_path, "`model_name_or_path`", missing_model_hint(model_name_or_path))
    data = dataset_name
    if data is not None and not Path(data).expanduser().exists() and looks_like_data_path(data):
        raise FileNotFoundError(
            f"`dataset_name` {data!r}: no such file or folder (relative to {Path.cwd()}).{missing_data_hint(data)}"
        )
