"""kdcore's plugin manager: loads plugins, builds the registries their hooks fill, lists them.

Every plugin, kdcore's own included, is a module (or object) named in the ``kdcore`` entry-point
group of some installed package; its ``@kdcore.hookimpl`` functions implement hooks from
:mod:`kdcore.hookspecs`. Loading happens once, lazily, the first time anything asks for a
registry (``kdcore.kd_loss``, ``kdcore.backends()``, ``kdcore plugins``), in this order: kdcore's
built-ins, then third-party plugins sorted by name. A third-party plugin that fails to import,
implements an unknown hook, or whose registration hook raises is skipped with a
:class:`PluginWarning` naming it and its package; a name it registers that is already taken is
refused with a warning and the rest of what it registers stays: nothing a third-party plugin does
while loading breaks kdcore's built-ins. A failing built-in raises :class:`PluginError`.

Once loaded, a plugin's code runs inside runs (lifecycle hooks, callbacks, a method's losses); an
exception there stops the run as a :class:`PluginFault` naming the plugin, its package and the
hook, with the original exception as its cause.

``KDCORE_DISABLE_PLUGINS=1`` (or the CLI's ``--disable-plugins``) turns third-party autoloading off;
a comma list (``KDCORE_DISABLE_PLUGINS=kdcore-foo,bar``) disables the plugins or packages it names.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pluggy

from kdcore import hookspecs
from kdcore.backends import Backend, BackendRegistry
from kdcore.registry import Entry, Registry, suggestion

PROJECT = "kdcore"
ENTRY_POINT_GROUP = "kdcore"
DISABLE_ENV = "KDCORE_DISABLE_PLUGINS"
KDCORE_PACKAGE = "kdcore"

hookimpl = pluggy.HookimplMarker(PROJECT)

# (plugin name, module) of kdcore's own plugins, as declared in its pyproject.toml entry points;
# used directly only when kdcore runs from a source tree whose entry points are not installed.
BUILTIN_PLUGINS = (
    ("kdcore.backends", "kdcore.ops"),
    ("kdcore.losses", "kdcore_plugins.losses"),
    ("kdcore.zoo", "kdcore_plugins.zoo"),
    ("kdcore.addition", "kdcore_plugins.addition"),
    ("kdcore.supervised", "kdcore_plugins.supervised"),
    ("kdcore.response_kd", "kdcore_plugins.response_kd"),
    ("kdcore.dkd", "kdcore_plugins.dkd"),
    ("kdcore.fitnets", "kdcore_plugins.fitnets"),
    ("kdcore.attention_transfer", "kdcore_plugins.attention_transfer"),
    ("kdcore.rkd", "kdcore_plugins.rkd"),
    ("kdcore.byot", "kdcore_plugins.byot"),
    ("kdcore.pskd", "kdcore_plugins.pskd"),
    ("kdcore.born_again", "kdcore_plugins.born_again"),
    ("kdcore.takd", "kdcore_plugins.takd"),
    ("kdcore.ensemble", "kdcore_plugins.ensemble"),
    ("kdcore.dml", "kdcore_plugins.dml"),
    ("kdcore.llm_kd", "kdcore_plugins.llm_kd"),
    ("kdcore.seq_kd", "kdcore_plugins.seq_kd"),
    ("kdcore.gkd", "kdcore_plugins.gkd"),
    ("kdcore.reasoning_kd", "kdcore_plugins.reasoning_kd"),
    ("kdcore.cached_kd", "kdcore_plugins.cached_kd"),
    ("kdcore.cross_tokenizer_kd", "kdcore_plugins.cross_tokenizer_kd"),
)

REGISTRATION_HOOKS = {
    "kdcore_register_methods": "methods",
    "kdcore_register_losses": "losses",
    "kdcore_register_backends": "backends",
    "kdcore_register_models": "models",
    "kdcore_register_datasets": "datasets",
    "kdcore_register_callbacks": "callbacks",
}
HOOK_NAMES = tuple(name for name in vars(hookspecs) if name.startswith("kdcore_"))
_ALL = ("1", "true", "yes", "all", "*")


class PluginWarning(UserWarning):
    """A third-party plugin was skipped, or one of its registrations was refused."""


class PluginError(RuntimeError):
    """One of kdcore's built-in plugins failed to load (a broken installation)."""


class PluginFault(RuntimeError):
    """A plugin's code raised during a run. ``plugin`` describes it (name and package), ``where``
    is the hook or method call, ``name`` the plugin's name (for ``--disable-plugin``); the
    original exception is ``__cause__``."""

    def __init__(self, plugin: str, where: str, error: BaseException, name: str | None = None) -> None:
        self.plugin, self.where, self.name = plugin, where, name
        super().__init__(f"{plugin} raised in {where}: {type(error).__name__}: {error}")


@dataclass
class PluginInfo:
    """What ``kdcore plugins`` reports for one plugin."""

    name: str
    module: str
    package: str | None
    version: str | None
    builtin: bool
    status: str = "loaded"  # "loaded" | "disabled" | "failed"
    error: str | None = None
    registers: dict[str, list[str]] = field(default_factory=dict)  # "methods" -> names, ...
    hooks: list[str] = field(default_factory=list)  # the lifecycle hooks it implements
    warnings: list[str] = field(default_factory=list)

    @property
    def package_label(self) -> str:
        """"package version", or "" for a plugin registered without a package."""
        return " ".join(filter(None, (self.package, self.version)))

    def describe(self) -> str:
        return f"plugin {self.name!r} ({self.package_label or 'no package'})"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Manager(pluggy.PluginManager):
    """A pluggy manager that also takes unmarked ``kdcore_*`` functions as hook implementations
    (as pytest does for ``pytest_*``), so a forgotten decorator cannot silently drop a hook and a
    misspelled name is always caught."""

    def parse_hookimpl_opts(self, plugin, name):
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None and name.startswith("kdcore_") and callable(getattr(plugin, name, None)):
            opts = {}
        return opts


def disabled_names(value: str | None) -> bool | frozenset[str]:
    """Parses ``KDCORE_DISABLE_PLUGINS``: True disables every third-party plugin; a set names the
    plugins or packages to skip (built-ins included)."""
    value = (value or "").strip()
    if value.lower() in ("", "0", "false", "no"):
        return frozenset()
    if value.lower() in _ALL:
        return True
    return frozenset(_normalize(part) for part in value.split(",") if part.strip())


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


class PluginHost:
    """One pluggy manager plus the registries its plugins filled."""

    def __init__(self, disable: str | bool | None = None) -> None:
        if disable is None:
            disable = os.environ.get(DISABLE_ENV)
        self.disabled = disable if isinstance(disable, bool) else disabled_names(disable)
        self.pm = _Manager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.methods = Registry("method")
        self.losses = Registry("loss", "losses")
        self.models = Registry("model")
        self.datasets = Registry("dataset")
        self.callbacks = Registry("callback")
        self.backends = BackendRegistry()
        self.plugins: dict[str, PluginInfo] = {}
        # a run's active callbacks from the registry, by their pluggy name: (owning plugin, callback name)
        self._registered_callbacks: dict[str, tuple[str, str]] = {}

    @property
    def hook(self):
        """pluggy's hook relay (``host.hook.kdcore_epoch_end.get_hookimpls()``); call hooks with
        :meth:`call`, which names the plugin when one raises."""
        return self.pm.hook

    def call(self, hook_name: str, **kwargs: Any) -> list[Any]:
        """Calls lifecycle hook ``hook_name`` on every implementation. An exception raised in a
        plugin's implementation (a plugin module's hook, a callback a plugin registered) becomes a
        :class:`PluginFault` naming that plugin; one raised by a callback object the run was given
        directly is the caller's own and passes unchanged."""
        caller = getattr(self.pm.hook, hook_name)
        try:
            return caller(**kwargs)
        except Exception as exc:
            codes = {_code_of(impl.function): impl.plugin_name for impl in caller.get_hookimpls()
                     if impl.plugin_name in self.plugins or impl.plugin_name in self._registered_callbacks}
            frame = exc.__traceback__
            while frame is not None and frame.tb_frame.f_code not in codes:
                frame = frame.tb_next
            if frame is None:
                raise
            name = codes[frame.tb_frame.f_code]
            raise PluginFault(self.describe(name), hook_name, exc, self._disable_name(name)) from exc

    @contextmanager
    def blame(self, registry: Registry, name: str, where: str,
              passes: tuple[type[Exception], ...] = ()) -> Iterator[None]:
        """Runs the ``with`` block as the code of the plugin that registered ``name`` in
        ``registry`` (a method's ``losses``, say): an exception becomes a :class:`PluginFault`
        naming that plugin, except the kinds in ``passes`` (how the plugin rejects a config). A
        name no plugin registered (an import path) passes exceptions on, and so does a fault that
        already names a plugin (a method's call of a registered loss)."""
        try:
            yield
        except Exception as exc:
            if name not in registry or isinstance(exc, (PluginFault, *passes)):
                raise
            plugin = registry.entry(name).plugin
            raise PluginFault(f"{self.describe(plugin)} ({registry.kind} {name!r})", where, exc,
                              self._disable_name(plugin)) from exc

    def describe(self, name: str) -> str:
        """How messages name a registered plugin or a run's callback: ``plugin 'NAME' (package P)``."""
        if name in self._registered_callbacks:
            owner, callback = self._registered_callbacks[name]
            return f"{self.describe(owner)} (callback {callback!r})"
        if name in self.plugins:
            return self.plugins[name].describe()
        return f"plugin {name!r}"

    def _disable_name(self, name: str) -> str | None:
        """The name ``--disable-plugin`` takes for the plugin ``name`` (None for a run's callback
        object or a built-in, which cannot be disabled that way)."""
        if name in self._registered_callbacks:
            name = self._registered_callbacks[name][0]
        info = self.plugins.get(name)
        return info.name if info is not None and not info.builtin else None

    # -- loading ----------------------------------------------------------------------------------

    def load(self) -> None:
        """Loads kdcore's built-ins, then every enabled third-party plugin."""
        builtin, third_party = [], []
        for ep in _entry_points():
            dist = getattr(ep, "dist", None)
            package = dist.metadata["Name"] if dist is not None else None
            is_builtin = package is not None and _normalize(package) == KDCORE_PACKAGE
            version = dist.version if dist is not None else None
            (builtin if is_builtin else third_party).append((ep, package, version))
        if not builtin:
            builtin = self._source_tree_builtins()
        for ep, package, version in builtin:
            self._load_entry_point(ep, package, version, builtin=True)
        for ep, package, version in sorted(third_party, key=lambda item: item[0].name):
            self._load_entry_point(ep, package, version, builtin=False)

    def _source_tree_builtins(self):
        warnings.warn("kdcore's entry points are not installed (is kdcore imported from a source tree?); loading "
                      "its built-in plugins directly. Install it with `pip install --no-build-isolation -e .` "
                      "so that third-party plugins are found too.", PluginWarning, stacklevel=4)
        return [(importlib.metadata.EntryPoint(name, module, ENTRY_POINT_GROUP), KDCORE_PACKAGE, None)
                for name, module in BUILTIN_PLUGINS]

    def _is_disabled(self, name: str, package: str | None, builtin: bool) -> bool:
        if self.disabled is True:
            return not builtin
        names = {_normalize(name)} | ({_normalize(package)} if package else set())
        return bool(names & self.disabled)

    def _load_entry_point(self, ep, package: str | None, version: str | None, *, builtin: bool) -> None:
        info = PluginInfo(ep.name, ep.value, package, version, builtin)
        if ep.name in self.plugins:
            warnings.warn(f"kdcore {info.describe()} has the same name as the plugin from "
                          f"{self.plugins[ep.name].package}; it is skipped", PluginWarning, stacklevel=2)
            return
        if self._is_disabled(ep.name, package, builtin):
            info.status = "disabled"
            self.plugins[info.name] = info
            return
        try:
            plugin = ep.load()
        except Exception as exc:
            self._fail(info, f"failed to import: {type(exc).__name__}: {exc}")
            return
        self._add(plugin, info)

    def register(self, plugin: object, name: str | None = None, *, package: str | None = None,
                 version: str | None = None) -> PluginInfo:
        """Registers a plugin object (a module, class instance, ...) that was not installed with an
        entry point, e.g. from a script or a test. Errors are raised rather than warned about."""
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        if name in self.plugins:
            raise ValueError(f"a plugin named {name!r} is already registered ({self.plugins[name].describe()})")
        module = getattr(plugin, "__name__", None) or f"{type(plugin).__module__}.{type(plugin).__qualname__}"
        info = PluginInfo(name, module, package, version, builtin=False)
        self._add(plugin, info, strict=True)
        return info

    def unregister(self, name: str) -> None:
        """Removes a plugin and everything it registered."""
        if name not in self.plugins:
            raise ValueError(f"unregister: no plugin named {name!r}{suggestion(name, self.plugins)}")
        info = self.plugins.pop(name)
        if info.status == "loaded":
            self.pm.unregister(name=name)
        for registry in self._registries().values():
            registry.remove_plugin(name)

    def _add(self, plugin: object, info: PluginInfo, strict: bool = False) -> None:
        try:
            self.pm.register(plugin, name=info.name)
        except Exception as exc:  # pluggy.PluginValidationError: a hook with arguments its spec lacks
            self._fail(info, f"could not be registered: {' '.join(str(exc).split())}", strict)
            return
        try:
            self._check_hook_names(plugin)
            pending = self._collect_registrations(plugin, info)
        except Exception as exc:
            self.pm.unregister(plugin)
            self._fail(info, str(exc) if isinstance(exc, _PluginProblem) else
                       f"raised while registering: {type(exc).__name__}: {exc}", strict)
            return
        self.plugins[info.name] = info
        for kind, entry in pending:
            try:
                self._registries()[kind].add(entry)
            except ValueError as exc:
                if strict:
                    self.unregister(info.name)
                    raise
                self._warn(info, str(exc))
                continue
            info.registers.setdefault(kind, []).append(entry.name)
        info.hooks = sorted(hc.name for hc in self.pm.get_hookcallers(plugin) or ()
                            if hc.name not in REGISTRATION_HOOKS)

    def _check_hook_names(self, plugin: object) -> None:
        problem = self._unknown_hooks(plugin)
        if problem:
            raise _PluginProblem(f"{problem} (kdcore/hookspecs.py lists them)")
        self.pm.check_pending()

    def _unknown_hooks(self, plugin: object) -> str | None:
        """Names the hooks a registered plugin implements that kdcore does not have, with the
        closest real names; None when there are none."""
        unknown = [hc.name for hc in self.pm.get_hookcallers(plugin) or () if hc.name not in HOOK_NAMES]
        if not unknown:
            return None
        return "implements hooks kdcore does not have: " + "; ".join(
            f"{name!r}{suggestion(name, HOOK_NAMES)}" for name in unknown)

    def _collect_registrations(self, plugin: object, info: PluginInfo) -> list[tuple[str, Entry]]:
        """Calls the plugin's registration hooks; what they register is added only if all succeed."""
        pending: list[tuple[str, Entry]] = []
        for hook_name, kind in REGISTRATION_HOOKS.items():
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                if impl.plugin is plugin:
                    register = _registrar(kind, info.name, pending)
                    impl.function(**({"register": register} if "register" in impl.argnames else {}))
        return pending

    def _registries(self) -> dict[str, Registry]:
        return {"methods": self.methods, "losses": self.losses, "backends": self.backends,
                "models": self.models, "datasets": self.datasets, "callbacks": self.callbacks}

    def _fail(self, info: PluginInfo, problem: str, strict: bool = False) -> None:
        message = f"kdcore {info.describe()} {problem}"
        if info.builtin:
            raise PluginError(message + "; kdcore's installation is broken, reinstall it")
        if strict:
            raise ValueError(message)
        info.status, info.error = "failed", problem
        self.plugins[info.name] = info
        warnings.warn(message + "; it is skipped", PluginWarning, stacklevel=2)

    def _warn(self, info: PluginInfo, message: str) -> None:
        info.warnings.append(message)
        warnings.warn(f"kdcore {info.describe()}: {message}", PluginWarning, stacklevel=2)

    # -- callbacks for one run ----------------------------------------------------------------------

    @contextmanager
    def active_callbacks(self, callbacks: Sequence[str | Mapping[str, Any] | object]) -> Iterator[list[object]]:
        """Switches on a run's callbacks for the duration of the ``with`` block.

        Each item is a registered callback's name, a mapping ``{"name": ..., **options}`` (the
        options go to the callback's factory), or a callback object. The objects are registered as
        plugins (so their hook implementations are called) and unregistered on exit; yields them.
        """
        objects = [(self._callback_object(spec), spec) for spec in callbacks]
        registered = []
        try:
            for index, (obj, spec) in enumerate(objects):
                name = f"callback-{index}-{id(obj)}"
                self.pm.register(obj, name=name)
                registered.append(name)
                self._label_callback(name, spec)
                problem = self._unknown_hooks(obj)
                if problem:
                    raise ValueError(f"callback {type(obj).__name__} {problem}")
            yield [obj for obj, _ in objects]
        finally:
            for name in registered:
                self.pm.unregister(name=name)
                self._registered_callbacks.pop(name, None)

    def _label_callback(self, name: str, spec: str | Mapping[str, Any] | object) -> None:
        """Remembers which plugin registered an active callback that came from the registry, to
        name it in errors."""
        registered = spec if isinstance(spec, str) else spec.get("name") if isinstance(spec, Mapping) else None
        if registered is not None and registered in self.callbacks:
            self._registered_callbacks[name] = (self.callbacks.entry(registered).plugin, registered)

    def _callback_object(self, spec: str | Mapping[str, Any] | object) -> object:
        if isinstance(spec, str):
            return self.callbacks.get(spec, "callbacks")({})
        if isinstance(spec, Mapping):
            if "name" not in spec:
                raise ValueError(f"callbacks: an entry given as a mapping needs a 'name' key, got keys {sorted(spec)}")
            options = {key: value for key, value in spec.items() if key != "name"}
            return self.callbacks.get(spec["name"], "callbacks")(options)
        return spec


class _PluginProblem(Exception):
    """A problem with a plugin whose message is already complete."""


def _code_of(function: Callable[..., Any]) -> Any:
    """The code object a hook implementation runs (bound methods and plain functions alike)."""
    return getattr(getattr(function, "__func__", function), "__code__", None)


def _registrar(kind: str, plugin: str, pending: list[tuple[str, Entry]]) -> Callable[..., None]:
    """The ``register`` callable handed to one plugin's registration hook."""
    if kind == "backends":
        def register_backend(backend: Backend) -> None:
            if not isinstance(backend, Backend):
                raise TypeError(f"register(backend) expects a kdcore.Backend, got {type(backend).__name__}")
            pending.append((kind, Entry(backend.name, dataclasses.replace(backend, source=plugin), plugin,
                                        backend.description)))
        return register_backend

    noun = kind[:-1] if kind != "losses" else "loss"

    def register(name: str, obj: Callable, description: str = "") -> None:
        if not isinstance(name, str) or not name or name != name.strip():
            raise TypeError(f"register(name, ...) expects a non-empty {noun} name, got {name!r}")
        if not callable(obj):
            raise TypeError(f"register({name!r}, ...) expects a callable {noun} "
                            f"{'factory' if kind != 'losses' else 'function'}, got {type(obj).__name__}")
        if not isinstance(description, str):
            raise TypeError(f"register({name!r}, ..., description=...) expects a string")
        pending.append((kind, Entry(name, obj, plugin, description)))

    return register


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    """The ``kdcore`` entry points of every installed distribution, once each (a package can be
    visible twice on ``sys.path``)."""
    seen, out = set(), []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if (ep.name, ep.value) not in seen:
            seen.add((ep.name, ep.value))
            out.append(ep)
    return out


# -- the process-wide host ------------------------------------------------------------------------

_host: PluginHost | None = None
_lock = threading.RLock()


def host() -> PluginHost:
    """The process's plugin host, loaded on first use."""
    global _host
    if _host is None:
        with _lock:
            if _host is None:
                fresh = PluginHost()
                _host = fresh  # a plugin that asks for the host while loading sees the partial one
                try:
                    fresh.load()
                except BaseException:
                    _host = None
                    raise
    return _host


def reload(disable: str | bool | None = None) -> PluginHost:
    """Discards the process's plugin host and loads a new one (``disable`` as in
    :class:`PluginHost`; None reads ``KDCORE_DISABLE_PLUGINS``)."""
    global _host
    with _lock:
        fresh = PluginHost(disable)
        fresh.load()
        _host = fresh
    return _host


def get_method(name: str) -> Callable[[Mapping[str, Any]], Any]:
    """The factory registered for method ``name``."""
    return host().methods.get(name, "get_method")


def get_loss(name: str) -> Callable[..., Any]:
    """The loss function registered as ``name``."""
    return host().losses.get(name, "get_loss")


def get_model(name: str) -> Callable[..., Any]:
    """The factory registered for model ``name``."""
    return host().models.get(name, "get_model")


def get_dataset(name: str) -> Callable[..., Any]:
    """The factory registered for dataset ``name``."""
    return host().datasets.get(name, "get_dataset")


def get_callback(name: str) -> Callable[[Mapping[str, Any]], Any]:
    """The factory registered for callback ``name``."""
    return host().callbacks.get(name, "get_callback")


def list_plugins() -> list[PluginInfo]:
    """Every plugin found, built-ins first, including disabled and failed ones."""
    return sorted(host().plugins.values(), key=lambda info: (not info.builtin, info.name))
