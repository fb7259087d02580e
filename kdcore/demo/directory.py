"""The demo's output directory: claimed for one demo at a time, and cleared of nothing but what a
demo of the same kind wrote there.

A demo writes a JSON file named after its kind (``demo.json``, ``capacity.json``, ...) the moment it
claims a directory, and its results into that file at the end; ``"kind"`` in it says which demo
wrote it. Running a demo again replaces that demo's own files (the JSON, its plot, the ``seed<N>``
run directories) and leaves everything else alone; a directory with other content and no such
file is refused, as is one that another demo is writing to (an ``fcntl.flock`` on
``.demo.lock``, dropped by the kernel if the demo dies).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".demo.lock"
#: the command that writes each kind of results, for messages
COMMANDS = {"demo": "`kdcore demo`", "capacity": "`kdcore demo --sweep capacity`", "lm": "`kdcore demo --suite lm`"}
_RUN_DIRECTORY = re.compile(r"seed-?\d+")


class DemoDirectoryError(Exception):
    """The output directory cannot be used; the message says why and what to do."""


@contextlib.contextmanager
def claim(root: Path, kind: str, sections: tuple[str, ...] = ()) -> Iterator[Path]:
    """Holds ``root`` for a demo of ``kind`` (its results file is ``<kind>.json``, its plot
    ``<kind>.png``, and ``sections`` name the other directories it writes): creates or clears it as
    the module docstring says, writes the results file with ``{"kind": kind}``, and yields the
    results file's path; released on exit."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        handle = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise DemoDirectoryError(f"--output-dir {root}: cannot create or write it ({exc.strerror or exc}); choose "
                                 "another directory") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DemoDirectoryError(f"--output-dir {root}: another kdcore demo is writing to it; wait for it to "
                                     "finish or choose another directory") from None
        results = root / f"{kind}.json"
        _clear(root, kind, results, sections)
        try:
            results.write_text(json.dumps({"kind": kind}) + "\n")
        except OSError as exc:
            raise DemoDirectoryError(f"--output-dir {root}: cannot write to it ({exc.strerror or exc}); choose "
                                     "another directory") from None
        yield results
    finally:
        os.close(handle)


def _clear(root: Path, kind: str, results: Path, sections: tuple[str, ...]) -> None:
    """Removes what an earlier demo of ``kind`` wrote in ``root``; refuses a directory holding
    anything else unless it also holds that demo's results file."""
    entries = [entry for entry in root.iterdir() if entry.name != LOCK_NAME]
    if not entries:
        return
    if _kind_of(results) != kind:
        other = next((found for found in map(_kind_of, sorted(root.glob("*.json"))) if found in COMMANDS), None)
        if other is not None:
            raise DemoDirectoryError(f"--output-dir {root} holds the results of {COMMANDS.get(other, other)}, not of "
                                     f"{COMMANDS.get(kind, kind)}; choose another --output-dir")
        raise DemoDirectoryError(f"--output-dir {root} exists and was not written by `kdcore demo`; choose another "
                                 "--output-dir (the demo only replaces its own earlier results)")
    for entry in entries:
        if entry == results or entry.name == f"{kind}.png":
            entry.unlink()
        elif entry.is_dir() and not entry.is_symlink() and (_RUN_DIRECTORY.fullmatch(entry.name)
                                                             or entry.name in sections):
            shutil.rmtree(entry)


def _kind_of(path: Path) -> str | None:
    """The ``"kind"`` of a demo results file, or None when ``path`` is not one."""
    try:
        kind = json.loads(path.read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None
