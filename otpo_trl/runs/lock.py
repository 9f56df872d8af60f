"""One writer per run directory: an OS-level lock on `output_dir/run.lock`, held for the whole run.

The lock is `filelock`'s (`flock` on Unix; it comes with huggingface_hub, which transformers requires): the operating
system releases it when its process ends, however it ends (an exception, Ctrl-C, a SIGKILL, the machine's out-of-memory
killer), so it is never left stale. Whoever holds it writes who they are to `run.lock.json` beside it, for the message
that stops a second run. In a launch of several processes (DDP, DeepSpeed, FSDP) only the main process (global rank 0)
takes it, for all of them: see `otpo_trl.cli.train`. The rules are stated in docs/training.md ("The run directory").
"""

import json
import os
import socket
import sys
import time
from datetime import datetime
from pathlib import Path

from filelock import FileLock, Timeout

from .files import writable_dir, write_json


LOCK_FILE = "run.lock"
HOLDER_FILE = "run.lock.json"


class OutputDirInUse(ValueError):
    """Another process holds the lock of `output_dir`; the message names it."""


def holder_description(output_dir: str | Path) -> str:
    """Who holds the lock of `output_dir`, from its `run.lock.json`: pid, host, start time and command."""
    try:
        holder = json.loads((Path(output_dir) / HOLDER_FILE).read_text())
        started = datetime.fromtimestamp(holder["started"]).isoformat(sep=" ", timespec="seconds")
        return f"pid {holder['pid']} on {holder['host']}, started {started}: `{holder['command']}`"
    except (OSError, ValueError, KeyError, TypeError):  # the holder is between taking the lock and saying so
        return "a process that has not yet said who it is"


class RunLock:
    """The lock of one run directory; `acquire` takes it or raises [`OutputDirInUse`], `release` gives it back (also a
    context manager). Within one process the lock is re-entrant: a run that takes it twice holds it until both
    release it."""

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir).expanduser()
        self._lock = None

    def acquire(self) -> "RunLock":
        """Create `output_dir` if needed and take its lock without waiting.

        Raises:
            OutputDirInUse: another process holds it (the message names that process and how to go on).
            ValueError: `output_dir` is a file or cannot be written to.
        """
        folder = writable_dir(self.output_dir, "`output_dir`")
        # is_singleton: the same FileLock for the same file within a process, so that taking it again counts instead
        # of locking out the process that already holds it.
        lock = FileLock(folder / LOCK_FILE, timeout=0, is_singleton=True)
        try:
            lock.acquire()
        except Timeout:
            raise OutputDirInUse(
                f"`output_dir` {folder} is in use by another run, {holder_description(folder)}. Only one run writes "
                "to a run directory at a time: wait until that one has ended (the lock is released when its process "
                "exits, whatever the cause), or use another `--output_dir`."
            ) from None
        self._lock = lock
        write_json(
            folder / HOLDER_FILE,
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.time(),
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python",
            },
        )
        return self

    def release(self) -> None:
        """Give the lock back (once per `acquire`); nothing when it is not held."""
        if self._lock is None:
            return
        lock, self._lock = self._lock, None
        if lock.lock_counter == 1:
            # Written by this process when it took the lock; removed while it still holds it, so that it never
            # removes the next holder's.
            (self.output_dir / HOLDER_FILE).unlink(missing_ok=True)
        lock.release()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
