"""The kernel backends: which exist, which are available here (and why not), and which one
``backend="auto"`` picks for a device.

A backend maps op families (``"kd_loss"``, ...) to ops that follow the family's schema
(kdcore/ops/kd_loss.py).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch


def _always_available() -> str | None:
    return None


@dataclass(frozen=True)
class Backend:
    """A set of kernels for some devices.

    ``ops`` maps an op family to a qualified op name (``"kdcore::kd_loss_cpp"``) or a callable with
    the family's schema. ``unavailable_reason()`` returns None when the backend can run here, else a
    sentence saying why not. ``backend="auto"`` picks the available backend with the highest
    ``priority`` among those listing the tensors' device type in ``devices`` (``"*"``: any device).
    """

    name: str
    devices: tuple[str, ...]
    priority: int
    ops: Mapping[str, str | Callable]
    unavailable_reason: Callable[[], str | None] = _always_available
    description: str = ""
    source: str = field(default="kdcore", compare=False)  # the plugin that registered it


@dataclass(frozen=True)
class BackendStatus:
    """What ``kdcore.backends()`` reports for one backend."""

    name: str
    available: bool
    reason: str | None
    devices: tuple[str, ...]
    priority: int
    families: tuple[str, ...]
    description: str
    source: str


class BackendRegistry:
    """Name -> Backend, with cached availability and op resolution."""

    def __init__(self) -> None:
        self._backends: dict[str, Backend] = {}
        self._reasons: dict[str, str | None] = {}
        self._resolved: dict[tuple[str, str, str], Callable] = {}

    def register(self, backend: Backend) -> None:
        if not isinstance(backend, Backend):
            raise TypeError(f"register_backend: expected a kdcore.Backend, got {type(backend).__name__}")
        existing = self._backends.get(backend.name)
        if existing is not None:
            raise ValueError(
                f"backend {backend.name!r} from {backend.source} clashes with the one registered by "
                f"{existing.source}; backend names must be unique"
            )
        self._backends[backend.name] = backend
        self._resolved.clear()

    def clear(self) -> None:
        self._backends.clear()
        self._reasons.clear()
        self._resolved.clear()

    def names(self) -> list[str]:
        return list(self._backends)

    def reason(self, name: str) -> str | None:
        if name not in self._reasons:
            try:
                self._reasons[name] = self._backends[name].unavailable_reason()
            except Exception as exc:  # a broken availability probe makes the backend unavailable
                self._reasons[name] = f"its availability check raised {type(exc).__name__}: {exc}"
        return self._reasons[name]

    def status(self) -> dict[str, BackendStatus]:
        out = {}
        for name, b in sorted(self._backends.items(), key=lambda item: -item[1].priority):
            reason = self.reason(name)
            out[name] = BackendStatus(name, reason is None, reason, b.devices, b.priority, tuple(b.ops),
                                      b.description, b.source)
        return out

    def resolve(self, family: str, name: str, device: torch.device, caller: str) -> Callable:
        """The op implementing ``family`` for ``name`` ("auto" or a backend) on ``device``."""
        key = (family, name, device.type)
        op = self._resolved.get(key)
        if op is None:
            op = self._lookup(family, name, device.type, caller)
            self._resolved[key] = op
        return op

    def _lookup(self, family: str, name: str, device_type: str, caller: str) -> Callable:
        if name == "auto":
            candidates = [
                b for b in sorted(self._backends.values(), key=lambda b: -b.priority)
                if _runs_on(b, device_type) and family in b.ops and self.reason(b.name) is None
            ]
            if not candidates:
                raise ValueError(f"{caller}: no available backend implements {family} on {device_type} tensors; "
                                 f"kdcore.backends() lists the backends and why each is unavailable")
            return _as_callable(candidates[0].ops[family])
        backend = self._backends.get(name)
        if backend is None:
            raise ValueError(f"{caller}: unknown backend {name!r}{_suggest(name, self.names())}; "
                             f"choose 'auto' or one of {sorted(self._backends)}")
        reason = self.reason(name)
        if reason is not None:
            raise ValueError(f"{caller}: backend {name!r} is not available: {reason}")
        if not _runs_on(backend, device_type):
            raise ValueError(f"{caller}: backend {name!r} runs on {', '.join(backend.devices)} tensors, "
                             f"not {device_type}")
        if family not in backend.ops:
            raise ValueError(f"{caller}: backend {name!r} does not implement {family} "
                             f"(it implements {', '.join(backend.ops)})")
        return _as_callable(backend.ops[family])


def _runs_on(backend: Backend, device_type: str) -> bool:
    return "*" in backend.devices or device_type in backend.devices


def _as_callable(op: str | Callable) -> Callable:
    if callable(op):
        return op
    namespace, _, opname = op.partition("::")
    return getattr(getattr(torch.ops, namespace), opname)


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


REGISTRY = BackendRegistry()


def backends() -> dict[str, BackendStatus]:
    """Every registered backend, best first, with whether it is available here and why not."""
    return REGISTRY.status()
