"""Folders and files written safely: a folder that must be writable, a JSON file replaced in one step."""

import json
import os
import tempfile
from pathlib import Path


def writable_dir(path: str | Path, what: str) -> Path:
    """Create the folder `path` if needed; a `ValueError` naming `what` if it is a file or cannot be written to."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file; it must be a folder (or not exist yet).")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ValueError(f"{what} {path} cannot be written to: {err.strerror or err}.") from err
    return path


def write_json(path: str | Path, value) -> None:
    """Write `value` as indented JSON to `path` atomically: a temporary file in the same folder, then `os.replace`,
    so that a kill or a full disk leaves the old file or the new one, never half of one."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(json.dumps(value, indent=2) + "\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)  # the temporary file this function made, never `path`
        raise
