"""The plugin manager: entry-point discovery, built-ins, registries, failure isolation, disabling,
run callbacks and the ``kdcore plugins`` command.

Third-party plugins are real installed distributions here: each test writes a ``.dist-info``
directory (METADATA + entry_points.txt) and the plugin's module into a temporary directory on
``sys.path``, which is exactly what ``importlib.metadata`` finds after ``pip install``.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import kdcore
from kdcore import plugins
from kdcore.backends import Backend
from kdcore.plugins import PluginError, PluginHost, PluginWarning

_unique = itertools.count()


@pytest.fixture
def install(tmp_path, monkeypatch):
    """``install(package, {entry_name: source})`` makes a distribution whose entry points load
    modules with the given sources; returns {entry_name: module name}."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def make(package: str, plugins_by_name: dict[str, str], version: str = "1.0") -> dict[str, str]:
        modules = {}
        for entry_name, source in plugins_by_name.items():
            module = f"kdcore_test_plugin_{next(_unique)}"
            (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
            modules[entry_name] = module
            monkeypatch.delitem(sys.modules, module, raising=False)
        info = tmp_path / f"{package.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        lines = "".join(f"{name} = {module}\n" for name, module in modules.items())
        (info / "entry_points.txt").write_text(f"[kdcore]\n{lines}")
        return modules

    return make


GOOD = """
    import torch, kdcore

    def mse(student_logits, teacher_logits, **options):
        return (student_logits - teacher_logits).square().sum(-1).mean()

    @kdcore.hookimpl
    def kdcore_register_losses(register):
        register("mse", mse, description="logit regression")
"""


def loaded(disable=None) -> PluginHost:
    host = PluginHost(disable)
    host.load()
    return host


def test_builtins_load_through_kdcores_entry_points():
    declared = {(ep.name, ep.value) for ep in importlib.metadata.distribution("kdcore").entry_points
                if ep.group == plugins.ENTRY_POINT_GROUP}
    assert declared == set(plugins.BUILTIN_PLUGINS)
    found = {info.name: info for info in plugins.list_plugins()}
    for name, module in plugins.BUILTIN_PLUGINS:
        info = found[name]
        assert (info.builtin, info.package, info.module, info.status) == (True, "kdcore", module, "loaded")
    assert found["kdcore.backends"].registers["backends"] == ["cuda", "cpp", "triton", "reference"]
    assert set(found["kdcore.losses"].registers["losses"]) == set(kdcore.DIVERGENCES) | {"dkd"}


def test_builtins_load_from_a_source_tree_without_entry_points(monkeypatch):
    monkeypatch.setattr(plugins, "_entry_points", lambda: [])
    with pytest.warns(PluginWarning, match="entry points are not installed"):
        host = loaded()
    assert {"cpp", "reference"} <= set(host.backends.names()) and "jsd" in host.losses


def test_builtin_losses_are_kd_loss():
    s, t = torch.randn(5, 11), torch.randn(5, 11)
    loss = plugins.get_loss("jsd")(s, t, beta=0.3, temperature=2.0)
    torch.testing.assert_close(loss, kdcore.kd_loss(s, t, divergence="jsd", beta=0.3, temperature=2.0))


@pytest.mark.parametrize("lookup, name, pattern", [
    (plugins.get_loss, "reverse_k", r"get_loss: unknown loss 'reverse_k' \(did you mean 'reverse_kl'\?\); "
                                    r"registered losses: .*forward_kl"),
    (plugins.get_method, "no-such-method", r"get_method: unknown method 'no-such-method'; registered methods:"),
    (plugins.get_callback, "x", r"get_callback: unknown callback 'x'; registered callbacks:"),
])
def test_unknown_names_list_what_exists(lookup, name, pattern):
    with pytest.raises(ValueError, match=pattern):
        lookup(name)


def test_third_party_plugin_is_discovered(install):
    install("kdcore-mse", {"mse": GOOD}, version="2.3")
    host = loaded()
    info = host.plugins["mse"]
    assert (info.package, info.version, info.builtin, info.status) == ("kdcore-mse", "2.3", False, "loaded")
    assert info.registers == {"losses": ["mse"]}
    s = torch.randn(3, 4, requires_grad=True)
    host.losses.get("mse")(s, torch.zeros(3, 4)).backward()
    torch.testing.assert_close(s.grad, 2 * s.detach() / 3)
    assert host.losses.entry("mse").description == "logit regression"


def test_plugin_that_fails_to_import_is_skipped(install):
    install("kdcore-broken", {"broken": "raise ImportError('needs libfoo')"})
    with pytest.warns(PluginWarning, match=r"plugin 'broken' \(kdcore-broken 1.0\) failed to import: "
                                           r"ImportError: needs libfoo; it is skipped"):
        host = loaded()
    assert host.plugins["broken"].status == "failed"
    assert {"cpp", "reference"} <= set(host.backends.names()) and "forward_kl" in host.losses


def test_name_clash_keeps_the_first_and_the_rest_of_the_plugin(install):
    install("kdcore-clash", {"clash": """
        import kdcore

        @kdcore.hookimpl
        def kdcore_register_losses(register):
            register("forward_kl", lambda s, t, **o: s.sum(), description="impostor")
            register("own_loss", lambda s, t, **o: s.sum())
    """})
    with pytest.warns(PluginWarning, match=r"plugin 'clash' \(kdcore-clash 1.0\): loss 'forward_kl' from plugin "
                                           r"'clash' clashes with the one registered by plugin 'kdcore.losses'"):
        host = loaded()
    assert host.losses.entry("forward_kl").plugin == "kdcore.losses"
    assert host.plugins["clash"].registers == {"losses": ["own_loss"]}
    assert "clashes" in host.plugins["clash"].warnings[0]


def test_same_plugin_name_in_two_packages(install):
    install("kdcore-first", {"dup": GOOD})
    install("kdcore-second", {"dup": GOOD})
    with pytest.warns(PluginWarning, match=r"plugin 'dup' \(kdcore-(first|second) 1.0\) has the same name"):
        host = loaded()
    assert host.plugins["dup"].status == "loaded"


@pytest.mark.parametrize("source, pattern", [
    ("""
        import kdcore
        @kdcore.hookimpl
        def kdcore_register_loss(register):
            pass
    """, r"implements hooks kdcore does not have: 'kdcore_register_loss' \(did you mean 'kdcore_register_losses'\?\)"),
    ("""
        def kdcore_epoch_ends(run, stage, epoch):  # unmarked kdcore_* functions are hooks too
            pass
    """, r"implements hooks kdcore does not have: 'kdcore_epoch_ends' \(did you mean 'kdcore_epoch_end'\?\)"),
    ("""
        import kdcore
        @kdcore.hookimpl
        def kdcore_step_end(run, stage, stepp):
            pass
    """, r"could not be registered: .*stepp"),
    ("""
        import kdcore
        @kdcore.hookimpl
        def kdcore_register_losses(register):
            register("half_done", lambda s, t: s.sum())
            raise RuntimeError("database unreachable")
    """, r"raised while registering: RuntimeError: database unreachable"),
    ("""
        import kdcore
        @kdcore.hookimpl
        def kdcore_register_methods(register):
            register("m", "not callable")
    """, r"raised while registering: TypeError: register\('m', \.\.\.\) expects a callable method factory"),
    ("""
        import kdcore
        @kdcore.hookimpl
        def kdcore_register_backends(register):
            register("cpp")
    """, r"raised while registering: TypeError: register\(backend\) expects a kdcore.Backend, got str"),
])
def test_bad_plugins_are_skipped_with_a_clear_warning(install, source, pattern):
    install("kdcore-bad", {"bad": source})
    with pytest.warns(PluginWarning, match=r"kdcore plugin 'bad' \(kdcore-bad 1.0\) " + pattern):
        host = loaded()
    assert host.plugins["bad"].status == "failed"
    assert "half_done" not in host.losses  # a registration hook that raised registers nothing
    assert host.pm.get_plugin("bad") is None
    host.pm.check_pending()  # nothing of the bad plugin is left behind


@pytest.mark.parametrize("disable, expected", [
    ("1", {"mse": "disabled", "other": "disabled"}),
    ("all", {"mse": "disabled", "other": "disabled"}),
    ("kdcore-mse", {"mse": "disabled", "other": "loaded"}),  # by package
    ("other", {"mse": "loaded", "other": "disabled"}),  # by plugin name
    ("", {"mse": "loaded", "other": "loaded"}),
])
def test_disabling(install, monkeypatch, disable, expected):
    modules = install("kdcore-mse", {"mse": GOOD})
    modules.update(install("kdcore-other", {"other": GOOD.replace('"mse"', '"mse2"')}))
    monkeypatch.setenv(plugins.DISABLE_ENV, disable)
    host = loaded()
    assert {name: host.plugins[name].status for name in expected} == expected
    for name, status in expected.items():
        assert (modules[name] in sys.modules) == (status == "loaded")  # disabled plugins are never imported
    assert host.plugins["kdcore.backends"].status == "loaded"


def test_builtin_failure_is_an_error(monkeypatch):
    monkeypatch.setattr(plugins, "BUILTIN_PLUGINS", (("kdcore.missing", "kdcore_no_such_module"),))
    monkeypatch.setattr(plugins, "_entry_points", lambda: [])
    with pytest.warns(PluginWarning), pytest.raises(PluginError, match=r"'kdcore.missing' .* failed to import"):
        loaded()


class Recorder:
    def __init__(self, options):
        self.options, self.calls = options, []

    @kdcore.hookimpl
    def kdcore_epoch_end(self, stage, epoch):
        self.calls.append((stage.name, epoch))


class CallbackPlugin:
    @kdcore.hookimpl
    def kdcore_register_callbacks(self, register):
        register("recorder", Recorder, description="records epoch ends")


def test_callbacks_are_active_only_inside_their_run():
    host = loaded()
    host.register(CallbackPlugin(), name="tests.callbacks")
    stage = kdcore.Stage("s")
    with host.active_callbacks(["recorder", {"name": "recorder", "every": 2}]) as (first, second):
        host.hook.kdcore_epoch_end(run=None, stage=stage, epoch=0)
    host.hook.kdcore_epoch_end(run=None, stage=stage, epoch=1)
    assert first.calls == second.calls == [("s", 0)]
    assert (first.options, second.options) == ({}, {"every": 2})
    assert host.pm.get_plugins() == {p for p in host.pm.get_plugins() if not isinstance(p, Recorder)}


def test_bad_callbacks():
    host = loaded()

    class Misspelled:
        @kdcore.hookimpl
        def kdcore_step_ends(self, losses):
            pass

    with pytest.raises(ValueError, match=r"'kdcore_step_ends' \(did you mean 'kdcore_step_end'\?\)"):
        with host.active_callbacks([Misspelled()]):
            pass
    assert not [p for p in host.pm.get_plugins() if isinstance(p, Misspelled)]
    with pytest.raises(ValueError, match=r"callbacks: an entry given as a mapping needs a 'name' key"):
        with host.active_callbacks([{"every": 2}]):
            pass
    with pytest.raises(ValueError, match=r"callbacks: unknown callback 'recorder'"):
        with host.active_callbacks(["recorder"]):
            pass


def test_programmatic_registration_is_strict():
    host = loaded()

    class Clashing:
        @kdcore.hookimpl
        def kdcore_register_backends(self, register):
            register(Backend("reference", ("cpu",), 0, {"kd_loss": "kdcore::kd_loss_reference"}))

    with pytest.raises(ValueError, match=r"backend 'reference' from plugin 'tests.clash' clashes with the one "
                                         r"registered by plugin 'kdcore.backends'"):
        host.register(Clashing(), name="tests.clash")
    assert "tests.clash" not in host.plugins and host.pm.get_plugin("tests.clash") is None
    with pytest.raises(ValueError, match=r"a plugin named 'kdcore.losses' is already registered"):
        host.register(Clashing(), name="kdcore.losses")


@pytest.mark.parametrize("ops, pattern", [
    ({"kd_loss": "not a qualname"}, r"ops\['kd_loss'\] must be a torch.library op's qualified name"),
    ({"kd_loss": len}, r"ops\['kd_loss'\] must be a torch.library op's qualified name"),
])
def test_backend_ops_are_op_names(ops, pattern):
    with pytest.raises(TypeError, match=pattern):
        Backend("x", ("cpu",), 0, ops)


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "kdcore", *args], capture_output=True, text=True, check=True,
                          env={**os.environ, **(env or {})})


def test_plugins_command(install, tmp_path):
    install("kdcore-mse", {"mse": GOOD}, version="2.3")
    install("kdcore-broken", {"broken": "raise ImportError('needs libfoo')"})
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    listing = {p["name"]: p for p in json.loads(run_cli("plugins", "--json", env=env).stdout)}
    assert listing["mse"]["package"] == "kdcore-mse" and listing["mse"]["registers"] == {"losses": ["mse"]}
    assert listing["broken"]["status"] == "failed" and "needs libfoo" in listing["broken"]["error"]
    assert listing["kdcore.backends"]["builtin"] is True
    table = run_cli("plugins", env=env)
    assert "mse  [kdcore-mse 2.3, third-party]" in table.stdout and "losses: mse" in table.stdout
    assert "failed: failed to import: ImportError: needs libfoo" in table.stdout
    assert "PluginWarning" in table.stderr
    quiet = {p["name"]: p["status"] for p in json.loads(run_cli("--disable-plugins", "plugins", "--json",
                                                                 env=env).stdout)}
    assert quiet["mse"] == quiet["broken"] == "disabled" and quiet["kdcore.losses"] == "loaded"
    some = {p["name"]: p["status"] for p in json.loads(run_cli("--disable-plugin", "broken", "plugins", "--json",
                                                                env=env).stdout)}
    assert some["mse"] == "loaded" and some["broken"] == "disabled"


def test_a_broken_plugin_never_breaks_import_kdcore(install, tmp_path):
    install("kdcore-broken", {"broken": "raise SyntaxError('oops')"})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    code = "import torch, kdcore; print(float(kdcore.kd_loss(torch.zeros(2, 3), torch.zeros(2, 3))))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip() == "0.0"
    assert "plugin 'broken' (kdcore-broken 1.0) failed to import: SyntaxError: oops" in done.stderr
