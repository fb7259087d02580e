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
* **Sharded runs.** A run under ``training.parallel: fsdp`` keeps its model and optimizer state in
  ``shards/<name>/`` (one file per process, see :mod:`kdcore.parallel.sharded_checkpoint`) and
  ``checkpoint.pt`` names that directory; a checkpoint whose directory is missing or incomplete
  counts as unreadable. Directories neither checkpoint names are removed after each write.
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
import stat
import tempfile
import time
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
SHARDS_NAME = "shards"  # sharded runs: one directory of model and optimizer shards per checkpoint
UNREADABLE_NAME = "checkpoint.unreadable.pt"  # an unreadable checkpoint.pt, moved aside by a resume
# what every checkpoint of version 1 holds
CHECKPOINT_KEYS = ("config", "stage", "stage_state", "rng", "log_offset", "metrics", "teacher_metrics")
# what makes a directory a run's: a fresh run into a directory holding any of these is refused
RUN_FILES = (CHECKPOINT_NAME, PREVIOUS_NAME, LOG_NAME, STUDENT_NAME, STAGES_NAME, SHARDS_NAME)


class RunDirectoryError(RuntimeError):
    """The output directory cannot take this run (busy, already a run's, unwritable, unreadable
    checkpoints); the message names the directory or file and what to do."""


class RunDirectory:
    """The output directory of one run, locked for the run's duration (a context manager)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock_file: int | None = None
        self._created_directory = self._created_lock = False  # what acquire() added, removed by a failed run
        self._found: set[str] = set()  # the directory's entries before acquire()

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
        if self.path.is_symlink() and not self.path.exists():
            raise RunDirectoryError(f"output_dir {self.path} is a symbolic link to {os.readlink(self.path)}, which "
                                    "does not exist; create that directory or choose another output_dir")
        if self.path.exists() and not self.path.is_dir():
            raise RunDirectoryError(f"output_dir {self.path} exists and is not a directory; choose another output_dir")
        self._created_directory = not self.path.exists()
        self._found = set()
        with contextlib.suppress(OSError):
            self._found = {entry.name for entry in self.path.iterdir()}
        lock_path = self.path / LOCK_NAME
        for _ in range(100):  # until the file locked is the one at lock_path (see check_held)
            self._created_lock = not os.path.lexists(lock_path)
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                handle = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                if os.path.lexists(lock_path):
                    raise self._bad_lock_file(exc) from None
                raise self._unwritable(exc) from None
            if not stat.S_ISREG(os.fstat(handle).st_mode):
                os.close(handle)
                raise self._bad_lock_file(None)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_live_holder(handle)
                os.close(handle)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    raise RunDirectoryError(f"output_dir {self.path}: cannot lock {LOCK_NAME} "
                                            f"({exc.strerror})") from None
                raise RunDirectoryError(f"output_dir {self.path} is in use by another run ({_describe(holder)}); "
                                        "wait for it to end or choose another output_dir") from None
            if _same_file(handle, lock_path):
                break
            os.close(handle)  # removed or replaced between open and lock: locking it keeps no one out
        else:
            raise RunDirectoryError(f"output_dir {self.path}: {LOCK_NAME} keeps being replaced; is another program "
                                    "removing it?")
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

    def check_held(self) -> None:
        """Raises when this run's lock file was removed or replaced since it was taken (then another
        run may have taken a new one and be writing here too); called before each write of the run's
        files. Does nothing in a process that does not hold the lock (DDP ranks other than 0)."""
        if self._lock_file is None or _same_file(self._lock_file, self.path / LOCK_NAME):
            return
        raise RunDirectoryError(
            f"{self.path / LOCK_NAME} was removed or replaced while this run held it, so another run may be using "
            f"{self.path}: this run stops before writing there again (its last checkpoint is intact); make sure no "
            "other run uses the directory, then resume with --resume")

    def release(self, *, failed: bool = False) -> None:
        """Releases the lock. When ``failed`` and the run wrote nothing, the directory is left as
        it was found (a directory this run created is removed again)."""
        if self._lock_file is None:
            return
        handle, self._lock_file = self._lock_file, None
        with contextlib.suppress(OSError):
            os.ftruncate(handle, 0)  # an empty lock file: nobody holds it, nobody was killed holding it
        try:
            nothing_written = failed and {entry.name for entry in self.path.iterdir()} <= self._found | {LOCK_NAME}
        except OSError:  # the directory is gone
            nothing_written = False
        if nothing_written and self._created_lock and _same_file(handle, self.path / LOCK_NAME):
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
        """Checks the directory, and what a resumed run writes into of what is there (its log, the
        stage directories), can be written, and that none of the run's files is a directory or the
        other way round (an unreadable checkpoint.pt aside, which a resume sets aside)."""
        for name in (PREVIOUS_NAME, LOG_NAME, STUDENT_NAME):
            if (self.path / name).is_dir():
                raise RunDirectoryError(f"{self.path / name} is a directory where the run keeps a file; remove it or "
                                        "choose another output_dir")
        for name in (STAGES_NAME, SHARDS_NAME):
            if (self.path / name).exists() and not (self.path / name).is_dir():
                raise RunDirectoryError(f"{self.path / name} is not a directory; remove it or choose another "
                                        "output_dir")
        shards = [self.path / SHARDS_NAME] if (self.path / SHARDS_NAME).is_dir() else []
        for directory in [self.path, *shards, *(p for p in self.path.glob(f"{STAGES_NAME}/*") if p.is_dir())]:
            try:
                with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-", suffix=".tmp"):
                    pass
            except OSError as exc:
                if directory == self.path:
                    raise self._unwritable(exc) from None
                raise RunDirectoryError(f"{directory} is not writable ({exc.strerror or exc}); fix its permissions "
                                        "or choose another output_dir") from None
        if self.log_path.is_file():
            try:
                with open(self.log_path, "r+b"):
                    pass
            except OSError as exc:
                raise RunDirectoryError(f"{self.log_path} is not writable ({exc.strerror or exc}); fix its "
                                        "permissions or choose another output_dir") from None

    def _bad_lock_file(self, exc: OSError | None) -> RunDirectoryError:
        lock_path = self.path / LOCK_NAME
        if lock_path.is_file():
            return RunDirectoryError(f"{lock_path} cannot be opened for writing ({exc.strerror or exc}); fix its "
                                     "permissions or choose another output_dir")
        return RunDirectoryError(f"{lock_path} is not a regular file; remove it (kdcore creates it) or choose "
                                 "another output_dir")

    def _unwritable(self, exc: OSError) -> RunDirectoryError:
        return RunDirectoryError(f"output_dir {self.path} is not writable ({exc.strerror or exc}); fix its "
                                 "permissions or choose another output_dir")

    def _remove_temporaries(self) -> None:
        """Removes the ``.<name>.<pid>.tmp`` files that writes killed midway left behind (only the
        lock holder may, and it holds the lock now)."""
        for directory in [self.path, *self.path.glob(f"{STAGES_NAME}/*")]:
            for leftover in directory.glob(".*.tmp"):
                _remove(leftover)

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
                saved = read_checkpoint(path, CHECKPOINT_KEYS)
                self._check_shards(path, saved)
            except RunDirectoryError as exc:
                problems.append(str(exc))
                continue
            if path != self.checkpoint_path:
                warnings.warn(f"{problems[0]}; resuming from the checkpoint before it, {path}"
                              f"{self._set_aside_latest()}", RuntimeWarning, stacklevel=3)
            return path, saved
        raise RunDirectoryError(f"cannot resume {self.path}: " + "; ".join(problems))

    def shards_path(self, name: str) -> Path:
        """The directory of a sharded checkpoint's model and optimizer state."""
        return self.path / SHARDS_NAME / name

    def _check_shards(self, path: Path, saved: dict[str, Any]) -> None:
        """Raises when the shard directory a checkpoint names is missing, or a file of it is lost,
        cut or changed since it was written (checked against the checkpoint's manifest)."""
        name = sharded_state(saved)
        if name is None:
            return
        from kdcore.parallel import sharded_checkpoint  # torch.distributed.checkpoint: only for sharded runs

        shards = self.shards_path(name)
        problem = "it does not exist" if not shards.is_dir() else \
            sharded_checkpoint.damage(shards, saved["stage_state"].get("shard_files", {}))
        if problem:
            raise RunDirectoryError(f"{path} names the model shards {shards}, which are missing or incomplete: "
                                    f"{problem}")

    def prune_shards(self) -> None:
        """Removes the shard directories (and unfinished ones) that neither checkpoint names."""
        root = self.path / SHARDS_NAME
        if not root.is_dir():
            return
        kept = set()
        for path in (self.checkpoint_path, self.previous_path):
            with contextlib.suppress(OSError, RunDirectoryError):
                kept.add(sharded_state(read_checkpoint(path)))
        for entry in root.iterdir():
            if entry.name not in kept:
                _remove(entry)

    def _set_aside_latest(self) -> str:
        """Moves an unreadable ``checkpoint.pt`` out of the way of the resumed run, whose next
        checkpoint write would otherwise keep it as ``checkpoint.previous.pt`` in place of the one
        the run resumes from (a kill during that write would then leave no readable checkpoint).
        Returns a note for the warning."""
        if not os.path.lexists(self.checkpoint_path):
            return ""
        aside = self.path / UNREADABLE_NAME
        try:
            if aside.is_dir() and not aside.is_symlink():
                shutil.rmtree(aside)
            os.replace(self.checkpoint_path, aside)
        except OSError as exc:
            raise RunDirectoryError(f"{self.checkpoint_path} is unreadable and cannot be moved aside to {aside} "
                                    f"({exc.strerror or exc}); move it away and resume again") from None
        return f" (the unreadable file is kept as {aside})"

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
        self.check_held()
        # a write killed after the previous one was linked leaves both names on one file: nothing to keep then
        # (and renaming one link of a file over another is a no-op that would leave the temporary link behind)
        if self.checkpoint_path.exists() and not _same_path(self.checkpoint_path, self.previous_path):
            kept = self.path / f".{PREVIOUS_NAME}.{os.getpid()}.tmp"
            with contextlib.suppress(FileNotFoundError):
                kept.unlink()
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


def _remove(path: Path) -> None:
    """Removes a leftover, a directory (with what it holds) or anything else; gone already is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def sharded_state(saved: dict[str, Any]) -> str | None:
    """The shard directory a checkpoint names (None for a checkpoint that holds its state itself)."""
    stage_state = saved.get("stage_state")
    return stage_state.get("shards") if isinstance(stage_state, dict) else None


def read_checkpoint(path: Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Reads a checkpoint (``weights_only``: plain data only); a file that is not one (or, at
    version 1, lacks a key of ``required``) raises :class:`RunDirectoryError` saying what is wrong
    with it."""
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
        reason = reason.split(". ")[0]  # torch's first sentence names the problem; the rest is general advice
        detail = "" if "weights_only" in reason or "Weights only" in reason else f" ({reason})"
        raise RunDirectoryError(f"{path} is truncated or not a checkpoint{detail}") from None
    if not isinstance(saved, dict) or "version" not in saved:
        raise RunDirectoryError(f"{path} is not a kdcore checkpoint (no version record)")
    missing = [key for key in required if key not in saved]
    if missing and saved["version"] == 1:
        raise RunDirectoryError(f"{path} is not a kdcore checkpoint (it has no {', '.join(missing)})")
    return saved


def _write_holder(handle: int) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(handle, 0)
    os.pwrite(handle, json.dumps(record).encode(), 0)
    os.fsync(handle)


def _read_live_holder(handle: int) -> dict[str, Any] | None:
    """The holder record of a lock another process holds. That process writes its record just
    after taking the lock, so a record read at that moment may still be empty or name the dead run
    it took over from: it is read after a moment, and again while it is empty or names a process of
    this host that no longer runs."""
    holder = None
    for _ in range(50):
        time.sleep(0.01)
        holder = _read_holder(handle)
        if holder and "pid" in holder and not _dead_here(holder):
            break
    return holder


def _dead_here(holder: dict[str, Any]) -> bool:
    """Whether ``holder`` names a process of this host that no longer runs."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _same_path(first: Path, second: Path) -> bool:
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False


def _same_file(handle: int, path: Path) -> bool:
    """Whether the open file ``handle`` is the file at ``path``."""
    try:
        return os.path.samestat(os.fstat(handle), os.stat(path))
    except OSError:
        return False


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
