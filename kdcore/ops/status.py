"""Per-row status codes of an op, read back from the device at most once per call.

An op that validates its inputs on the device gathers every check into one int8 ``[N]`` status
tensor (0: the row is fine; a nonzero code names the first thing wrong with it) and hands it to
:func:`check_status` once, instead of synchronizing with the host after each check. While a CUDA
graph is being captured nothing can be read back; the status is then not read at all, and the op
itself must make the failing rows' outputs NaN (each op documents this).
"""

from __future__ import annotations

from typing import Callable, NoReturn

import torch


def stream_is_capturing(device: torch.device) -> bool:
    """Whether work on ``device`` is being captured into a CUDA graph (never for CPU tensors)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _to_host(values: torch.Tensor) -> list[int]:
    """The one device-to-host read of :func:`check_status`."""
    return values.tolist()


def check_status(status: torch.Tensor, raise_row: Callable[[int, int], NoReturn]) -> None:
    """Calls ``raise_row(row, code)`` for the first row whose status is nonzero.

    ``status`` is int8 ``[N]``, 0 where the row is fine. Reads from the device at most once (the
    first failing row and its code together), and not at all while a CUDA graph is captured."""
    if status.numel() == 0 or stream_is_capturing(status.device):
        return
    failed = status != 0
    first = failed.to(torch.int8).argmax()
    row, code = _to_host(torch.stack([first, status[first].long()]))
    if code != 0:
        raise_row(row, code)
