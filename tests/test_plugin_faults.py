"""An exception in a plugin's code during a run names the plugin, its package and where it raised;
the CLI adds the plugin's frames and how to run without it. A caller's own callback objects raise
unchanged."""

from __future__ import annotations

import pytest
import yaml

import kdcore
from engine_helpers import classification_config
from kdcore import cli


class FaultyHooks:
    """A plugin whose epoch hook fails."""

    @kdcore.hookimpl
    def kdcore_epoch_end(self, epoch):
        raise RuntimeError(f"the plugin broke at epoch {epoch}")


class BrokenLosses(kdcore.Method):
    def losses(self, batch, outputs, ctx):
        return {"kd": outputs.student.sum() * (1 / 0)}


class BrokenMethodPlugin:
    @kdcore.hookimpl
    def kdcore_register_methods(self, register):
        register("broken_losses", BrokenLosses)


@pytest.fixture
def registered():
    host = kdcore.plugins.host()
    names = []

    def register(obj, name):
        host.register(obj, name, package="kdcore-faulty", version="1.2")
        names.append(name)

    yield register
    for name in names:
        host.unregister(name)


def test_a_failing_hook_names_its_plugin(tmp_path, registered, capsys):
    registered(FaultyHooks(), "faulty")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(classification_config(tmp_path / "run", method={"name": "supervised"})))
    assert cli.main(["distill", str(path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == ("kdcore distill: plugin 'faulty' (kdcore-faulty 1.2) raised in kdcore_epoch_end: RuntimeError: "
                      "the plugin broke at epoch 0")
    assert err[1] == "Traceback (the plugin's frames):"
    assert "test_plugin_faults.py" in err[2] and "kdcore/engine" not in "\n".join(err)
    assert err[-2] == "RuntimeError: the plugin broke at epoch 0"
    assert err[-1] == "(to run without this plugin: kdcore --disable-plugin faulty distill ...)"


def test_a_failing_method_names_its_plugin(tmp_path, registered):
    registered(BrokenMethodPlugin(), "broken")
    config = classification_config(tmp_path / "run", method={"name": "broken_losses"})
    with pytest.raises(kdcore.plugins.PluginFault, match=r"^plugin 'broken' \(kdcore-faulty 1.2\) \(method "
                                                         r"'broken_losses'\) raised in losses: ZeroDivisionError") as caught:
        kdcore.Distiller(config, console=False).fit()
    assert isinstance(caught.value.__cause__, ZeroDivisionError) and caught.value.name == "broken"


class CallbackPlugin:
    """A plugin that registers a callback whose epoch hook fails."""

    @kdcore.hookimpl
    def kdcore_register_callbacks(self, register):
        register("boom", lambda options: FaultyHooks())


def test_a_failing_registered_callback_names_the_plugin_that_registered_it(tmp_path, registered):
    registered(CallbackPlugin(), "callbacks_pkg")
    config = classification_config(tmp_path / "run", method={"name": "supervised"}, callbacks=["boom"])
    with pytest.raises(kdcore.plugins.PluginFault, match=r"^plugin 'callbacks_pkg' \(kdcore-faulty 1.2\) \(callback "
                                                         r"'boom'\) raised in kdcore_epoch_end: RuntimeError") as caught:
        kdcore.Distiller(config, console=False).fit()
    assert caught.value.name == "callbacks_pkg"


def test_a_callback_object_of_the_caller_raises_unchanged(tmp_path):
    class Mine(Exception):
        pass

    class RaisesMine:
        @kdcore.hookimpl
        def kdcore_step_end(self):
            raise Mine

    with pytest.raises(Mine):
        kdcore.Distiller(classification_config(tmp_path, method={"name": "supervised"}), console=False,
                         callbacks=[RaisesMine()]).fit()


class PlanFails(kdcore.Method):
    def plan(self, config):
        raise RuntimeError("no plan")


class FactoryFails(kdcore.Method):
    def __init__(self, config):
        raise KeyError("option")


class TeacherLogitsFails(kdcore.Method):
    def teacher_logits(self, outputs):
        raise RuntimeError("no reference")

    def losses(self, batch, outputs, ctx):
        return {"ce": outputs.student.logsumexp(-1).mean()}


class MoreBrokenMethods:
    @kdcore.hookimpl
    def kdcore_register_methods(self, register):
        register("plan_fails", PlanFails)
        register("factory_fails", FactoryFails)
        register("teacher_logits_fails", TeacherLogitsFails)


@pytest.mark.parametrize("method, where", [("plan_fails", "plan"), ("factory_fails", "its factory"),
                                           ("teacher_logits_fails", "teacher_logits")])
def test_every_call_of_a_methods_code_names_its_plugin(tmp_path, registered, teacher, method, where):
    registered(MoreBrokenMethods(), "more_broken")
    config = classification_config(tmp_path / "run", method={"name": method}, teachers=[teacher])
    with pytest.raises(kdcore.plugins.PluginFault, match=rf"^plugin 'more_broken' \(kdcore-faulty 1.2\) \(method "
                                                         rf"'{method}'\) raised in {where}: "):
        kdcore.Distiller(config, console=False).fit()
