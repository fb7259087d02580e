"""The kernel backends: which exist, which are available here (and why not), and which one
``backend="auto"`` picks for a device.

Backends come from plugins (the ``kdcore_register_backends`` hook; kdcore's own are registered the
same way). A backend maps op families (``"kd_loss"``, ...) to ``torch.library`` ops that follow the
family's schema (kdcore/ops/kd_loss.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from kdcore.registry import Entry, Registry, suggestion

_QUALNAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*::[A-Za-z_][A-Za-z0-9_.]*$")


def _always_available() -> str | None:
    return None


@dataclass(frozen=True)
class Backend:
    """A set of kernels for some devices.

    ``ops`` maps an op family to the qualified name of a ``torch.library`` op with the family's
    schema (``{"kd_loss": "mylib::kd_loss_npu"}``); ops, not plain callables, so that
    ``torch.compile`` and autograd see them. ``unavailable_reason()`` returns None when the backend
    can run here, else a sentence saying why not; it is called once, lazily. ``backend="auto"``
    picks the available backend with the highest ``priority`` among those listing the tensors'
    device type in ``devices`` (``"*"``: any device).
    """

    name: str
    devices: tuple[str, ...]
    priority: int
    ops: Mapping[str, str]
    unavailable_reason: Callable[[], str | None] = _always_available
    description: str = ""
    source: str = field(default="", compare=False)  # the plugin that registered it

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"Backend: name must be a non-empty string, got {self.name!r}")
        if isinstance(self.devices, str) or not all(isinstance(d, str) for d in self.devices):
            raise TypeError(f"Backend {self.name!r}: devices must be a tuple of device types such as "
                            f"('cuda',), got {self.devices!r}")
        for family, op in self.ops.items():
            if not isinstance(op, str) or not _QUALNAME.match(op):
                raise TypeError(f"Backend {self.name!r}: ops[{family!r}] must be a torch.library op's qualified "
                                f"name such as 'mylib::{family}', got {op!r}")


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


class BackendRegistry(Registry):
    """Name -> Backend, with cached availability and op resolution."""

    def __init__(self) -> None:
        super().__init__("backend")
        self._reasons: dict[str, str | None] = {}
        self._resolved: dict[tuple[str, str, str], str] = {}

    def add(self, entry: Entry) -> None:
        if not isinstance(entry.obj, Backend):
            raise TypeError(f"register: expected a kdcore.Backend, got {type(entry.obj).__name__}")
        super().add(entry)
        self._resolved.clear()

    def remove_plugin(self, plugin: str) -> None:
        for name in self.by_plugin(plugin):
            self._reasons.pop(name, None)
        super().remove_plugin(plugin)
        self._resolved.clear()

    def reason(self, name: str) -> str | None:
        if name not in self._reasons:
            try:
                self._reasons[name] = self.entry(name).obj.unavailable_reason()
            except Exception as exc:  # a broken availability probe makes the backend unavailable
                self._reasons[name] = f"its availability check raised {type(exc).__name__}: {exc}"
        return self._reasons[name]

    def status(self) -> dict[str, BackendStatus]:
        out = {}
        for b in sorted((entry.obj for entry in self), key=lambda b: -b.priority):
            reason = self.reason(b.name)
            out[b.name] = BackendStatus(b.name, reason is None, reason, b.devices, b.priority, tuple(b.ops),
                                        b.description, b.source)
        return out

    def resolve(self, family: str, name: str, device_type: str, caller: str) -> str:
        """The qualified name of the op implementing ``family`` for backend ``name`` (or "auto")
        on ``device_type`` tensors."""
        key = (family, name, device_type)
        op = self._resolved.get(key)
        if op is None:
            op = self._lookup(family, name, device_type, caller)
            self._resolved[key] = op
        return op

    def _lookup(self, family: str, name: str, device_type: str, caller: str) -> str:
        backends = [entry.obj for entry in self]
        if name == "auto":
            candidates = [b for b in sorted(backends, key=lambda b: -b.priority)
                          if _runs_on(b, device_type) and family in b.ops and self.reason(b.name) is None]
            if not candidates:
                raise ValueError(f"{caller}: no available backend implements {family} on {device_type} tensors; "
                                 f"kdcore.backends() lists the backends and why each is unavailable")
            return candidates[0].ops[family]
        if name not in self:
            raise ValueError(f"{caller}: unknown backend {name!r}{suggestion(name, self.names())}; "
                             f"choose 'auto' or one of {self.names()}")
        backend = self.entry(name).obj
        reason = self.reason(name)
        if reason is not None:
            raise ValueError(f"{caller}: backend {name!r} is not available: {reason}")
        if not _runs_on(backend, device_type):
            raise ValueError(f"{caller}: backend {name!r} runs on {', '.join(backend.devices)} tensors, "
                             f"not {device_type}")
        if family not in backend.ops:
            raise ValueError(f"{caller}: backend {name!r} does not implement {family} "
                             f"(it implements {', '.join(backend.ops)})")
        return backend.ops[family]


def _runs_on(backend: Backend, device_type: str) -> bool:
    return "*" in backend.devices or device_type in backend.devices


def backends() -> dict[str, BackendStatus]:
    """Every registered backend, best first, with whether it is available here and why not."""
    from kdcore import plugins

    return plugins.host().backends.status()
