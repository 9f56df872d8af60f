"""Folders and files written safely: a folder that must be writable, a JSON file replaced in one step, and the
permissions a plain `open` or `mkdir` would have given (the temporary files and folders they are made from are private
to their owner, which on a shared machine would hide a run's record or a prepared model from the user's group)."""

import json
import os
import tempfile
from pathlib import Path


def default_mode(directory: bool = False) -> int:
    """The mode `open` (0o666) or `mkdir` (0o777) gives under the process's umask, e.g. 0o644 / 0o755 under 022."""
    try:  # Linux states it; reading it does not change it
        with open("/proc/self/status") as status:
            umask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0)
        os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


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
        os.fchmod(handle, default_mode())  # mkstemp's file is 0o600; the record is read by others as any file
        with os.fdopen(handle, "w") as file:
            file.write(json.dumps(value, indent=2) + "\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)  # the temporary file this function made, never `path`
        raise
