"""The plugin manager: in-process and entry-point plugins, clashes, allow/block lists, broken imports."""

from __future__ import annotations

import sys
import textwrap
import types

import pluggy
import pytest

import fastgen
from fastgen import PluginError
from fastgen import plugin_manager as pm_module
from fastgen.plugin_manager import PluginManager

BUILTINS = {"models.llama", "kernels.torch", "schedulers.splitfuse"}


def scheduler_class(name: str):
    return type(f"Scheduler_{name}", (), {"name": name, "schedule": lambda self, *a: None,
                                          "__init__": lambda self, config: None})


def module_plugin(module_name: str, *classes) -> types.ModuleType:
    """A plugin module, as a third-party package would write it, built in memory."""
    module = types.ModuleType(module_name)

    @fastgen.hookimpl
    def register_schedulers(register):
        for cls in classes:
            register(cls)

    module.register_schedulers = register_schedulers
    return module


def names(manager: PluginManager) -> set[str]:
    return {info.full_name for info in manager.registry.all()}


# --- in-process registration --------------------------------------------------------------------

def test_register_module_plugin(empty_plugin_manager):
    first, second = scheduler_class("fifo"), scheduler_class("lifo")
    empty_plugin_manager.register(module_plugin("my_sched", first, second), name="my-sched")
    info = empty_plugin_manager.registry.get("schedulers", "fifo")
    assert info.cls is first and info.plugin == "my-sched" and info.package == "(in-process)"
    assert empty_plugin_manager.registry.get("schedulers", "schedulers.lifo").cls is second
    assert names(empty_plugin_manager) == {"schedulers.fifo", "schedulers.lifo"}


def test_register_class_based_plugin(empty_plugin_manager):
    class Model:
        name = "toy"
        architectures = ("ToyForCausalLM",)

    class Plugin:
        @fastgen.hookimpl
        def register_models(self, register):
            register(Model)

    empty_plugin_manager.register(Plugin(), name="toy-plugin", package="toy-dist")
    info = empty_plugin_manager.registry.model_for_architecture("ToyForCausalLM")
    assert info.cls is Model and info.package == "toy-dist"
    with pytest.raises(PluginError, match="ToyForCausalLM"):
        empty_plugin_manager.registry.model_for_architecture("OtherForCausalLM")


def test_plugin_that_registers_nothing(empty_plugin_manager):
    @fastgen.hookimpl
    def register_schedulers(register):
        pass   # its dependencies are missing, say

    empty_plugin_manager.register(types.SimpleNamespace(register_schedulers=register_schedulers),
                                  name="quiet")
    assert names(empty_plugin_manager) == set()


def test_hook_register_schedulers_next_to_builtins(plugin_manager):
    plugin_manager.register(module_plugin("extra", scheduler_class("fifo")), name="extra")
    assert BUILTINS | {"schedulers.fifo"} <= names(plugin_manager)
    assert plugin_manager.registry.get("schedulers", "splitfuse").plugin == "schedulers.splitfuse"


def test_duplicate_name_names_both_plugins(plugin_manager):
    with pytest.raises(PluginError) as e:
        plugin_manager.register(module_plugin("mine", scheduler_class("splitfuse")),
                                name="my-splitfuse", package="my-dist")
    message = str(e.value)
    assert "schedulers.splitfuse" in message
    assert "my-splitfuse" in message and "my-dist" in message
    assert "'schedulers.splitfuse' (fastgen)" in message        # the one that was there first
    assert plugin_manager.registry.get("schedulers", "splitfuse").plugin == "schedulers.splitfuse"


def test_refused_plugin_leaves_no_trace(plugin_manager):
    before = names(plugin_manager)
    clashing = module_plugin("mine", scheduler_class("fifo"), scheduler_class("splitfuse"))
    with pytest.raises(PluginError):
        plugin_manager.register(clashing, name="clashing")
    assert names(plugin_manager) == before
    assert not plugin_manager.pm.is_registered(clashing)


def test_same_plugin_name_twice(empty_plugin_manager):
    empty_plugin_manager.register(module_plugin("a", scheduler_class("a")), name="dup")
    with pytest.raises(PluginError, match="dup"):
        empty_plugin_manager.register(module_plugin("b", scheduler_class("b")), name="dup")


@pytest.mark.parametrize("bad, why", [
    (lambda: object(), "register the class itself"),
    (lambda: type("NoName", (), {}), "without a `name`"),
])
def test_register_validates_what_it_is_given(empty_plugin_manager, bad, why):
    item = bad()
    with pytest.raises(PluginError, match=why) as e:
        empty_plugin_manager.register(module_plugin("bad", item), name="bad-plugin")
    assert "bad-plugin" in str(e.value)


def test_model_without_architectures_is_refused(empty_plugin_manager):
    class Model:
        name = "noarch"

    class Plugin:
        @fastgen.hookimpl
        def register_models(self, register):
            register(Model)

    with pytest.raises(PluginError, match="architectures"):
        empty_plugin_manager.register(Plugin(), name="noarch-plugin")


def test_mistyped_hook_fails_loudly(empty_plugin_manager):
    @fastgen.hookimpl
    def register_schedulerz(register):
        pass

    with pytest.raises((PluginError, pluggy.PluginValidationError), match="register_schedulerz"):
        empty_plugin_manager.register(types.SimpleNamespace(register_schedulerz=register_schedulerz),
                                      name="typo")


def test_unknown_kind(empty_plugin_manager):
    with pytest.raises(PluginError, match="schedulers"):
        empty_plugin_manager.registry.get("widgets", "x")


# --- entry points: allow and block lists, broken plugins ----------------------------------------

def fresh(monkeypatch, **env) -> PluginManager:
    monkeypatch.delenv("FASTGEN_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("FASTGEN_BLOCK_PLUGINS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    manager = PluginManager()
    manager.load_entry_points()
    return manager


def test_builtins_load_through_entry_points(monkeypatch):
    assert BUILTINS <= names(fresh(monkeypatch))


def test_load_plugins_allow_list(monkeypatch):
    manager = fresh(monkeypatch, FASTGEN_LOAD_PLUGINS=" schedulers.splitfuse , kernels.torch ")
    assert names(manager) == {"schedulers.splitfuse", "kernels.torch"}


def test_empty_allow_list_loads_none(monkeypatch):
    assert names(fresh(monkeypatch, FASTGEN_LOAD_PLUGINS="")) == set()


def test_block_list(monkeypatch):
    manager = fresh(monkeypatch, FASTGEN_BLOCK_PLUGINS="schedulers.splitfuse")
    assert "schedulers.splitfuse" not in names(manager)
    assert {"models.llama", "kernels.torch"} <= names(manager)
    with pytest.raises(PluginError, match="No plugin named schedulers.splitfuse") as err:
        manager.registry.get("schedulers", "splitfuse")
    assert "splitfuse" not in str(err.value).split("installed schedulers:")[1]


class BrokenEntryPoint:
    name = "broken.plugin"
    group = "fastgen"
    value = "broken_plugin_module"
    dist = types.SimpleNamespace(name="broken-dist")

    def load(self):
        raise ImportError("No module named 'some_missing_dependency'")


def test_broken_plugin_is_reported_and_the_rest_load(monkeypatch, capsys):
    real = pm_module._entry_points
    monkeypatch.setattr(pm_module, "_entry_points", lambda: [BrokenEntryPoint()] + real())
    manager = fresh(monkeypatch)
    message = manager.registry.import_errors["broken.plugin"]
    assert message.startswith('Error importing plugin "broken.plugin"')
    assert "broken-dist" in message and "some_missing_dependency" in message
    assert 'Error importing plugin "broken.plugin"' in capsys.readouterr().err
    assert BUILTINS <= names(manager)


def test_blocked_broken_plugin_is_not_imported(monkeypatch):
    real = pm_module._entry_points
    monkeypatch.setattr(pm_module, "_entry_points", lambda: [BrokenEntryPoint()] + real())
    manager = fresh(monkeypatch, FASTGEN_BLOCK_PLUGINS="broken.plugin")
    assert "broken.plugin" not in manager.registry.import_errors
    assert BUILTINS <= names(manager)


def test_installed_package_entry_point(tmp_path, monkeypatch):
    """A real distribution on sys.path, with a `fastgen` entry point, is found and registered."""
    (tmp_path / "fastgen_test_fifo.py").write_text(textwrap.dedent("""
        import fastgen

        class FifoScheduler:
            name = "fifo"
            def __init__(self, config): pass

        @fastgen.hookimpl
        def register_schedulers(register):
            register(FifoScheduler)
    """))
    dist_info = tmp_path / "fastgen_test_fifo-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: fastgen-test-fifo\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[fastgen]\nschedulers.fifo = fastgen_test_fifo\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fastgen_test_fifo", raising=False)

    manager = fresh(monkeypatch)
    info = manager.registry.get("schedulers", "fifo")
    assert info.plugin == "schedulers.fifo" and info.package == "fastgen-test-fifo"
    assert BUILTINS <= names(manager)


# --- observer hooks reach in-process plugins ----------------------------------------------------

class Recorder:
    def __init__(self) -> None:
        self.steps = []
        self.finished = []

    @fastgen.hookimpl
    def on_step_finished(self, engine, stats):
        self.steps.append((engine, stats))

    @fastgen.hookimpl
    def on_request_finished(self, engine, output):
        self.finished.append(output)


@pytest.fixture
def recorded_engine(tiny_llama, plugin_manager):
    from fastgen.config import make_config
    from fastgen.engine import Engine

    recorder = Recorder()
    plugin_manager.register(recorder, name="recorder")
    engine = Engine(make_config(model=str(tiny_llama[0]), device="cpu", token_budget=8),
                    plugins=plugin_manager)
    return engine, recorder


def run_all(engine):
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    return outputs


def test_hook_on_step_finished(recorded_engine):
    engine, recorder = recorded_engine
    engine.add_request(list(range(1, 20)), fastgen.SamplingParams(max_tokens=3, ignore_eos=True))
    run_all(engine)
    # 19 prompt tokens at 8 a step, then two decodes
    assert [s.num_tokens for _, s in recorder.steps] == [8, 8, 3, 1, 1]
    assert all(e is engine for e, _ in recorder.steps)
    assert recorder.steps[-1][1] is engine.last_stats
    assert engine.totals.steps == len(recorder.steps)


def test_hook_on_request_finished(recorded_engine):
    engine, recorder = recorded_engine
    params = fastgen.SamplingParams(max_tokens=2, ignore_eos=True)
    kept = engine.add_request([1, 2, 3], params)
    aborted = engine.add_request([4, 5, 6], params)
    engine.abort_request(aborted)
    finals = [o for o in run_all(engine) if o.finished]
    assert [(o.request_id, o.finish_reason) for o in recorder.finished] == [
        (aborted, "abort"), (kept, "length")]
    assert recorder.finished[1] == finals[0]


def test_unregister_removes_the_plugin_and_what_it_registered(empty_plugin_manager):
    from fastgen.plugins.schedulers.splitfuse import SplitFuseScheduler

    class Plugin:
        @fastgen.hookimpl
        def register_schedulers(self, register):
            register(SplitFuseScheduler)

    manager = empty_plugin_manager
    manager.register(Plugin(), name="schedulers.mine", package="mine")
    assert manager.registry.get("schedulers", "splitfuse").plugin == "schedulers.mine"
    manager.unregister("schedulers.mine")
    with pytest.raises(PluginError, match="No plugin named schedulers.splitfuse"):
        manager.registry.get("schedulers", "splitfuse")
    assert "schedulers.mine" not in manager.packages
    manager.register(Plugin(), name="schedulers.mine", package="mine")   # and it can come back
