"""Every hook of the plugin contract is documented in docs/plugins.md and exercised here."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path

import pytest

import fastgen
from fastgen.config import make_config
from fastgen.engine import Engine
from fastgen.plugins.kernels.torch_ref.backend import TorchBackend
from fastgen.plugins.models.llama import LlamaForCausalLM
from fastgen.scheduler import StepPlan
from tiny_models import run_to_completion

ROOT = Path(__file__).resolve().parents[2]
GREEDY = fastgen.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
PROMPTS = [[5, 6, 7], list(range(10, 50)), [42]]


def hook_names(manager) -> list[str]:
    return sorted(name for name in vars(manager.hook) if not name.startswith("_"))


@pytest.fixture(scope="module")
def reference(tiny_llama):
    folder, _ = tiny_llama
    return run_to_completion(Engine(make_config(model=str(folder), token_budget=16)), PROMPTS, GREEDY)


def test_every_hook_is_documented_and_tested(plugin_manager):
    docs = (ROOT / "docs" / "plugins.md").read_text()
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    names = hook_names(plugin_manager)
    assert len(names) >= 6
    for name in names:
        assert re.search(rf"^## {name}$", docs, re.M), f"docs/plugins.md has no section for {name}"
        assert f"def test_hook_{name}(" in tests, f"no test_hook_{name} in tests/"


def test_hook_register_models(tiny_llama, tmp_path, empty_plugin_manager, reference):
    folder, _ = tiny_llama
    variant = tmp_path / "variant"
    shutil.copytree(folder, variant)
    config = json.loads((variant / "config.json").read_text())
    config["architectures"] = ["TinyVariantForCausalLM"]
    (variant / "config.json").write_text(json.dumps(config))

    class Variant(LlamaForCausalLM):
        name = "tiny_variant"
        architectures = ("TinyVariantForCausalLM",)

    class Plugin:
        @fastgen.hookimpl
        def register_models(self, register):
            register(Variant)

    pm = empty_plugin_manager
    pm.register(Plugin(), name="models.tiny_variant")
    for module in ("kernels.torch_ref", "schedulers.splitfuse"):
        pm.register(__import__(f"fastgen.plugins.{module}", fromlist=["_"]), name=module)
    engine = Engine(make_config(model=str(variant), token_budget=16), plugins=pm)
    assert type(engine.model) is Variant
    assert pm.registry.get("models", "tiny_variant").plugin == "models.tiny_variant"
    assert run_to_completion(engine, PROMPTS, GREEDY) == reference


def test_hook_register_kernels(tiny_llama, plugin_manager, reference):
    calls = {"rms_norm": 0}

    class Counting(TorchBackend):
        name = "counting"

        def rms_norm(self, x, weight, eps, residual=None):
            calls["rms_norm"] += 1
            return super().rms_norm(x, weight, eps, residual)

    class Plugin:
        @fastgen.hookimpl
        def register_kernels(self, register):
            register(Counting)

    plugin_manager.register(Plugin(), name="kernels.counting")
    folder, _ = tiny_llama
    engine = Engine(make_config(model=str(folder), kernels="counting", token_budget=16),
                    plugins=plugin_manager)
    assert run_to_completion(engine, PROMPTS, GREEDY) == reference
    layers = engine.model.kv_cache_spec[0]
    assert calls["rms_norm"] == engine.totals.steps * (2 * layers + 1)


def test_hook_register_schedulers(tiny_llama, plugin_manager, reference):
    plans = []

    class OneAtATime:
        name = "one_at_a_time"

        def __init__(self, config):
            self.block_size = config.block_size

        def schedule(self, waiting, running, num_free_blocks):
            seq = running[0] if running else waiting[0]
            plans.append(seq.num_pending)
            return StepPlan(scheduled=[(seq, seq.num_pending)])

    class Plugin:
        @fastgen.hookimpl
        def register_schedulers(self, register):
            register(OneAtATime)

    plugin_manager.register(Plugin(), name="schedulers.one_at_a_time")
    folder, _ = tiny_llama
    engine = Engine(make_config(model=str(folder), scheduler="one_at_a_time"), plugins=plugin_manager)
    assert run_to_completion(engine, PROMPTS, GREEDY) == reference
    # Whole prompts in one step each, then one-token decodes: the plugin really made the plans.
    assert plans[0] == len(PROMPTS[0]) and plans.count(1) >= len(PROMPTS) * (GREEDY.max_tokens - 1)


def test_hook_register_transports(tiny_llama, monkeypatch, reference):
    from fastgen import cli, plugin_manager as manager_module

    received = []

    class Collect:
        name = "collect"

        def __init__(self, engine, config):
            self.engine = engine

        def run(self):
            async def main():
                for prompt in PROMPTS:
                    async for out in self.engine.generate(prompt, GREEDY):
                        if out.finished:
                            received.append(out.token_ids)
                await self.engine.shutdown()
            asyncio.run(main())

    class Plugin:
        @fastgen.hookimpl
        def register_transports(self, register):
            register(Collect)

    manager = manager_module.PluginManager()
    manager.load_entry_points()
    manager.register(Plugin(), name="transports.collect")
    monkeypatch.setattr(manager_module, "_manager", manager)
    folder, _ = tiny_llama
    assert cli.main(["serve", "--model", str(folder), "--plugin", "transports.collect",
                     "--token-budget", "16"]) == 0
    assert received == reference


def test_hook_on_step_finished(tiny_llama, plugin_manager, reference):
    seen = []

    class Plugin:
        @fastgen.hookimpl
        def on_step_finished(self, engine, stats):
            seen.append(stats)

    plugin_manager.register(Plugin(), name="observer.steps")
    folder, _ = tiny_llama
    engine = Engine(make_config(model=str(folder), token_budget=16), plugins=plugin_manager)
    assert run_to_completion(engine, PROMPTS, GREEDY) == reference
    assert len(seen) == engine.totals.steps
    # Each prompt token once, each generated token but the last fed back once.
    expected = sum(len(p) for p in PROMPTS) + len(PROMPTS) * (GREEDY.max_tokens - 1)
    assert sum(s.num_tokens for s in seen) == expected
    assert all(s.num_tokens <= 16 for s in seen)
    assert all(s.forward_s > 0 for s in seen)


def test_hook_on_request_finished(tiny_llama, plugin_manager, reference):
    finished = []

    class Plugin:
        @fastgen.hookimpl
        def on_request_finished(self, engine, output):
            finished.append(output)

    plugin_manager.register(Plugin(), name="observer.requests")
    folder, _ = tiny_llama
    engine = Engine(make_config(model=str(folder), token_budget=16), plugins=plugin_manager)
    assert run_to_completion(engine, PROMPTS, GREEDY) == reference
    assert sorted(o.token_ids for o in finished) == sorted(reference)
    assert {o.finish_reason for o in finished} == {"length"}
    aborted = engine.add_request([1, 2, 3], GREEDY)
    engine.abort_request(aborted)
    assert finished[-1].request_id == aborted and finished[-1].finish_reason == "abort"
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_a_step_that_only_preempts_is_observed(tiny_llama, plugin_manager, reference):
    seen = []

    class PreemptOnce:
        """Runs one request at a time, but preempts it once right after its prompt."""
        name = "preempt_once"

        def __init__(self, config):
            self.preempted = False

        def schedule(self, waiting, running, num_free_blocks):
            if running and running[0].num_generated == 1 and not self.preempted:
                self.preempted = True
                return StepPlan(preempted=[running[0]])
            seq = running[0] if running else waiting[0]
            return StepPlan(scheduled=[(seq, seq.num_pending)])

    class Plugin:
        @fastgen.hookimpl
        def register_schedulers(self, register):
            register(PreemptOnce)

        @fastgen.hookimpl
        def on_step_finished(self, engine, stats):
            seen.append(stats)

    plugin_manager.register(Plugin(), name="schedulers.preempt_once")
    folder, _ = tiny_llama
    engine = Engine(make_config(model=str(folder), scheduler="preempt_once"), plugins=plugin_manager)
    assert run_to_completion(engine, PROMPTS, GREEDY) == reference
    only_preempted = [s for s in seen if s.num_preempted]
    assert len(only_preempted) == 1 and only_preempted[0].num_tokens == 0
    assert only_preempted[0].num_waiting == len(PROMPTS)   # the victim is back in the queue
    assert engine.totals.preemptions == 1 and engine.totals.steps == len(seen)
