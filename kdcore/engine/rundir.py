"""A run's output directory: one run at a time, never overwritten, and a checkpoint that survives a bad write.

* **One run at a time.** A run holds an exclusive ``fcntl.flock`` on ``output_dir/.lock`` from
  before it writes anything until it ends (under DDP the main process holds it). The file names
  the holder (pid, host, start time), so a second run, or a ``--resume`` of a run still going,
  stops at once naming it. The kernel drops the lock when its process dies, so a lock file still
  naming a holder but no longer locked is left by a killed run: it is taken over, with a message.
  (``flock`` is per host: two hosts sharing a network filesystem are not kept apart.)
* **Never overwritten.** A fresh run refuses a directory that holds any run's files.
* **Two checkpoints.** Each checkpoint write keeps the one it replaces as
  ``checkpoint.previous.pt``; a resume whose latest checkpoint is unreadable falls back to it with
  a warning naming both. Temporary files a killed write left behind are removed at start.
* **Fails before training, not after.** The directory's writability is checked when the lock is
  taken; a fresh run that fails before writing anything leaves the directory as it found it.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Any

from kdcore.engine import checkpoint

LOCK_NAME = ".lock"
CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_NAME = "checkpoint.previous.pt"
LOG_NAME = "metrics.jsonl"
STUDENT_NAME = "student.pt"
STAGES_NAME = "stages"
# what makes a directory a run's: a fresh run into a directory holding any of these is refused
RUN_FILES = (CHECKPOINT_NAME, PREVIOUS_NAME, LOG_NAME, STUDENT_NAME, STAGES_NAME)


class RunDirectoryError(RuntimeError):
    """The output directory cannot take this run (busy, already a run's, unwritable, unreadable
    checkpoints); the message names the directory or file and what to do."""


class RunDirectory:
    """The output directory of one run, locked for the run's duration (a context manager)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock_file: int | None = None
        self._created_directory = self._created_lock = False  # what acquire() added, removed by a failed run

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT_NAME

    @property
    def previous_path(self) -> Path:
        return self.path / PREVIOUS_NAME

    @property
    def log_path(self) -> Path:
        return self.path / LOG_NAME

    # -- the lock -----------------------------------------------------------------------------------

    def acquire(self) -> str | None:
        """Takes the lock (creating the directory), checks the directory is writable and removes
        temporary files of killed writes. Returns a message when a dead run's lock was taken over."""
        if self.path.exists() and not self.path.is_dir():
            raise RunDirectoryError(f"output_dir {self.path} is a file, not a directory; choose another output_dir")
        self._created_directory = not self.path.exists()
        self._created_lock = not (self.path / LOCK_NAME).exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise self._unwritable(exc) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(handle)
            os.close(handle)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise RunDirectoryError(f"output_dir {self.path}: cannot lock {LOCK_NAME} ({exc.strerror})") from None
            raise RunDirectoryError(f"output_dir {self.path} is in use by another run ({_describe(holder)}); wait "
                                    "for it to end or choose another output_dir") from None
        self._lock_file = handle
        previous = _read_holder(handle)
        try:
            try:
                _write_holder(handle)
            except OSError as exc:
                raise self._unwritable(exc) from None
            self._check_writable()
            self._remove_temporaries()
        except BaseException:
            self.release(failed=True)
            raise
        if previous:
            return (f"took over the lock of {self.path}: its holder ({_describe(previous)}) ended without "
                    "releasing it (killed?)")
        return None

    def release(self, *, failed: bool = False) -> None:
        """Releases the lock. When ``failed`` and the run wrote nothing, the directory is left as
        it was found (a directory this run created is removed again)."""
        if self._lock_file is None:
            return
        handle, self._lock_file = self._lock_file, None
        with contextlib.suppress(OSError):
            os.ftruncate(handle, 0)  # an empty lock file: nobody holds it, nobody was killed holding it
        nothing_written = failed and [entry.name for entry in self.path.iterdir()] == [LOCK_NAME]
        if nothing_written and self._created_lock:
            with contextlib.suppress(OSError):
                (self.path / LOCK_NAME).unlink()
        fcntl.flock(handle, fcntl.LOCK_UN)
        os.close(handle)
        if nothing_written and self._created_directory:
            with contextlib.suppress(OSError):
                self.path.rmdir()

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.release(failed=kind is not None)

    def _check_writable(self) -> None:
        try:
            with tempfile.NamedTemporaryFile(dir=self.path, prefix=".write-test-", suffix=".tmp"):
                pass
        except OSError as exc:
            raise self._unwritable(exc) from None

    def _unwritable(self, exc: OSError) -> RunDirectoryError:
        return RunDirectoryError(f"output_dir {self.path} is not writable ({exc.strerror or exc}); fix its "
                                 "permissions or choose another output_dir")

    def _remove_temporaries(self) -> None:
        """Removes the ``.<name>.<pid>.tmp`` files that writes killed midway left behind (only the
        lock holder may, and it holds the lock now)."""
        for directory in [self.path, *self.path.glob(f"{STAGES_NAME}/*")]:
            for leftover in directory.glob(".*.tmp"):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()

    # -- what the run finds -----------------------------------------------------------------------

    def check_fresh(self) -> None:
        """Raises when the directory holds a run's files (a fresh run must not overwrite them)."""
        found = [name for name in RUN_FILES if (self.path / name).exists()]
        if found:
            raise RunDirectoryError(
                f"output_dir {self.path} already holds a run ({', '.join(found)}); resume it with --resume "
                "(fit(resume=True)), choose another output_dir, or delete those files to start over")

    def latest_checkpoint(self) -> tuple[Path, dict[str, Any]]:
        """The latest readable checkpoint and its path: ``checkpoint.pt``, or
        ``checkpoint.previous.pt`` (with a warning naming both) when the latest is missing or
        unreadable."""
        problems = []
        for path in (self.checkpoint_path, self.previous_path):
            if not path.exists():
                problems.append(f"{path} does not exist")
                continue
            try:
                saved = read_checkpoint(path)
            except RunDirectoryError as exc:
                problems.append(str(exc))
                continue
            if path != self.checkpoint_path:
                warnings.warn(f"{problems[0]}; resuming from the checkpoint before it, {path}", RuntimeWarning,
                              stacklevel=2)
            return path, saved
        raise RunDirectoryError(f"cannot resume {self.path}: " + "; ".join(problems))

    def resume_point(self) -> tuple[Path, dict[str, Any]] | None:
        """What ``--resume`` continues from: :meth:`latest_checkpoint`, or None for a run that
        stopped before its first checkpoint (its directory holds only its log; it starts over)."""
        if self.checkpoint_path.exists() or self.previous_path.exists():
            return self.latest_checkpoint()
        outputs = [name for name in (STUDENT_NAME, STAGES_NAME) if (self.path / name).exists()]
        if outputs:
            raise RunDirectoryError(f"nothing to resume: {self.checkpoint_path} does not exist, but {self.path} "
                                    f"holds a run's results ({', '.join(outputs)}); start a new run in another "
                                    "output_dir")
        if not self.log_path.exists():
            raise RunDirectoryError(f"nothing to resume: {self.checkpoint_path} does not exist (run without "
                                    "--resume to start)")
        return None

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Writes ``state`` as the latest checkpoint, keeping the one it replaces as the previous.
        ``checkpoint.pt`` exists at every moment: the previous one is a hard link (or a copy)."""
        if self.checkpoint_path.exists():
            kept = self.path / f".{PREVIOUS_NAME}.{os.getpid()}.tmp"
            try:
                os.link(self.checkpoint_path, kept)
            except OSError:  # a filesystem without hard links
                shutil.copy2(self.checkpoint_path, kept)
            os.replace(kept, self.previous_path)
        checkpoint.save_atomic(state, self.checkpoint_path)

    def check_log(self, offset: int) -> None:
        """Raises when ``metrics.jsonl`` is shorter than the checkpoint says it was: its events of
        finished work were lost, and padding the gap would corrupt it."""
        size = self.log_path.stat().st_size if self.log_path.exists() else 0
        if size < offset:
            raise RunDirectoryError(
                f"{self.log_path} has {size} bytes but the checkpoint was written when it had {offset}: the log "
                "was cut or replaced since; restore it, or start a new run in another output_dir")


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Reads a checkpoint (``weights_only``: plain data only); a file that is not one raises
    :class:`RunDirectoryError` saying what is wrong with it."""
    if path.stat().st_size == 0:
        raise RunDirectoryError(f"{path} is empty")
    try:
        saved = checkpoint.load(path)
    except Exception as exc:  # torch's errors for a foreign, torn or garbage file vary by what it finds
        message = str(exc)
        if "Unsupported global" in message:  # torch's weights_only refusal of a pickled class
            raise RunDirectoryError(f"{path} is not a kdcore checkpoint (it holds objects a checkpoint never "
                                    "contains, so it was not loaded)") from None
        # the first line of torch's message, unless it is its advice about weights_only (never right here)
        reason = message.strip().splitlines()[0] if message.strip() else type(exc).__name__
        detail = "" if "weights_only" in reason or "Weights only" in reason else f" ({reason})"
        raise RunDirectoryError(f"{path} is truncated or not a checkpoint{detail}") from None
    if not isinstance(saved, dict) or "version" not in saved:
        raise RunDirectoryError(f"{path} is not a kdcore checkpoint (no version record)")
    return saved


def _write_holder(handle: int) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(handle, 0)
    os.pwrite(handle, json.dumps(record).encode(), 0)
    os.fsync(handle)


def _read_holder(handle: int) -> dict[str, Any] | None:
    try:
        text = os.pread(handle, 4096, 0).decode()
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return {"unreadable": True}


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder or "pid" not in holder:
        return "holder unknown"
    return f"pid {holder['pid']} on host {holder.get('host', '?')}, started {holder.get('started', '?')}"
