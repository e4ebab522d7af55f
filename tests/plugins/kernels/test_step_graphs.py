"""Decode steps replayed from captured graphs (`cuda_graphs`, core/step_graphs.py), over every
backend that can be captured: the same tokens and the same KV cache as eager steps.

On a GPU the graphs are CUDA graphs. On the CPU a stand-in keeps their one hazard: a replay
reruns the captured forward pass with the batch and plan of its capture, so whatever host-side
value a backend or a model baked in is as stale as a graph would have it, while the tensors the
graph reads hold the current step's values.
"""

from __future__ import annotations

import logging

import pytest
import torch

import cuda_emulator
import fastgen
from fastgen.config import make_config
from fastgen.engine import Engine
from fastgen.plugin_manager import load_plugins
from fastgen.step_graphs import StepGraphs, padded_size, padded_tokens
from kernel_targets import CPU, kernel_targets, target_id
from tiny_models import make_checkpoint


class RerunOnReplay:
    """Graph capture's CPU stand-in: the capture runs `fn` once; a replay runs it again, on the
    captured batch, into the first run's output."""

    def __call__(self, fn):
        output = fn()

        def replay():
            with torch.inference_mode():
                output.copy_(fn())
        return replay, output


class _EmulatedCuda(cuda_emulator.EmulatedCudaBackend):
    name = "cuda_emulated"

    @classmethod
    def unavailable_reason(cls, device):
        return cuda_emulator.available()


def capturable(name: str) -> bool:
    """Whether a registered backend takes part in graph capture (it has `graph_key`)."""
    return hasattr(load_plugins().registry.get("kernels", name).cls, "graph_key")


# (registered backend name, device, capture, model) for every backend that can be captured, third-
# party ones included: real CUDA graphs on a GPU, the stand-in on the CPU, where Triton's
# interpreter takes long enough (~45 s) for the slow step, with one model.
TARGETS = [pytest.param(name, device, None if device.type == "cuda" else RerunOnReplay, arch,
                        id=f"{target_id(name, device)}-{arch}",
                        marks=[pytest.mark.slow] if device.type == "cpu" else [])
           for name, device in kernel_targets() if capturable(name)
           for arch in (("mistral", "opt") if device.type == "cuda" else ("mistral",))]
if cuda_emulator.available() is None:
    TARGETS += [pytest.param("cuda_emulated", CPU, RerunOnReplay, arch, id=f"cuda-emulated-{arch}")
                for arch in ("mistral", "opt")]


# Head size 64, which every kernel takes (the shared tiny models' 16 makes kernels.cuda fall back
# to the reference): a Mistral (window 24, over contexts of up to 600) and an OPT.
ARCHS = {"mistral": dict(hidden_size=128, intermediate_size=256, num_attention_heads=2,
                         num_key_value_heads=1),
         "opt": dict(hidden_size=128, ffn_dim=256, num_attention_heads=2)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """arch -> a tiny checkpoint folder, made at first use."""
    made = {}

    def get(arch):
        if arch not in made:
            made[arch] = tmp_path_factory.mktemp(f"graphs-{arch}")
            make_checkpoint(made[arch], arch, **ARCHS[arch])
        return made[arch]
    return get


@pytest.fixture
def plugins(plugin_manager):
    class Plugin:
        @fastgen.hookimpl
        def register_kernels(self, register):
            register(_EmulatedCuda)

    plugin_manager.register(Plugin(), name="kernels.cuda_emulated")
    return plugin_manager


# Prompts that finish at different steps, more of them than run at once, so decode steps shrink
# and grow across padded sizes and new sequences take blocks that finished ones gave back. The
# long one's context passes 512 keys, where the CPU's split rule starts cutting keys into parts.
PROMPT_LENS = (1, 30, 45, 520, 7, 12, 60)
MAX_TOKENS = (3, 9, 5, 24, 8, 4, 10)


def _run(folder, kernels, device, plugins, dtype, graphs, capture=None, overlap=False):
    engine = Engine(make_config(model=str(folder), kernels=kernels, device=device.type, dtype=dtype,
                                token_budget=64, max_num_seqs=5, num_blocks=64, cuda_graphs=graphs,
                                overlap_steps=overlap),
                    plugins=plugins, graph_capture=capture)
    g = torch.Generator().manual_seed(0)
    ids = [engine.add_request(torch.randint(0, 300, (n,), generator=g).tolist(),
                              fastgen.SamplingParams(max_tokens=m, temperature=0, ignore_eos=True))
           for n, m in zip(PROMPT_LENS, MAX_TOKENS)]
    done = {}
    replayed_steps = steps = 0
    while engine.has_unfinished():
        before = engine.totals.steps
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
        if engine.totals.steps > before:   # overlapped, the last call only reads the last step
            replayed_steps += engine.last_stats.graph_replayed
            steps += 1
    return engine, [done[i] for i in ids], replayed_steps, steps


# Overlapped: a step's decodes take their input tokens, on the device, from the step before it,
# which they must bring into the graph's buffers.
@pytest.mark.parametrize("overlap", [False, True], ids=["in-turn", "overlapped"])
@pytest.mark.parametrize("kernels,device,capture,arch", TARGETS)
def test_replayed_steps_give_the_eager_tokens_and_cache(checkpoints, plugins, kernels, device,
                                                        capture, arch, overlap):
    dtype = "float16" if device.type == "cuda" else "float32"
    folder = checkpoints(arch)
    eager, expected, _, _ = _run(folder, kernels, device, plugins, dtype, graphs=False, overlap=overlap)
    engine, tokens, replayed_steps, steps = _run(folder, kernels, device, plugins, dtype, graphs=True,
                                                 capture=capture and capture(), overlap=overlap)
    assert tokens == expected
    graphs = engine.step_graphs
    assert graphs.disabled_reason is None
    # Every step fits a graph: at most the budget's tokens, max_num_seqs sequences, no prompt logprobs.
    assert replayed_steps == steps == graphs.replays > graphs.captures
    decode_sizes = {size for kind, size, _ in graphs.graphs if kind == "decode"}
    assert decode_sizes <= {1, 2, 4, 8} and len(decode_sizes) >= 2
    # Decode steps of the same size with different split counts each got a graph of their own.
    assert len({key for kind, _, key in graphs.graphs if kind == "decode"}) >= 2
    # Steps with prompt chunks: every size up to the budget (64), captured at start.
    assert {size for kind, size, _ in graphs.graphs if kind == "mixed"} == {16, 32, 64}
    # Every graph leaves its logits in the one shared buffer.
    assert {step.logits.data_ptr() for step in graphs.graphs.values()} == {graphs.logits.data_ptr()}
    # The last block is the padding rows' scratch: never handed out, and the only block where the
    # two runs' caches may differ.
    scratch = eager.allocator.num_blocks - 1
    assert engine.allocator.num_blocks == scratch
    tolerance = dict(atol=1e-3, rtol=1e-3) if dtype == "float16" else dict(atol=1e-5, rtol=1e-5)
    for (k, v), (k_eager, v_eager) in zip(engine.kv_cache, eager.kv_cache):
        torch.testing.assert_close(k[:scratch], k_eager[:scratch], **tolerance)
        torch.testing.assert_close(v[:scratch], v_eager[:scratch], **tolerance)


def _one_at_a_time(engine, prompt_lens, logprobs_for=()):
    """Each prompt's tokens, its request run to the end before the next is added (so each prompt
    makes a step of its own size), and whether each step was replayed."""
    g = torch.Generator().manual_seed(1)
    tokens, replayed = [], []
    for i, n in enumerate(prompt_lens):
        params = fastgen.SamplingParams(max_tokens=3, temperature=0, ignore_eos=True,
                                        prompt_logprobs=1 if i in logprobs_for else None)
        engine.add_request(torch.randint(0, 300, (n,), generator=g).tolist(), params)
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    tokens.append(out.token_ids)
            replayed.append((engine.last_stats.num_tokens, engine.last_stats.graph_replayed))
    return tokens, replayed


@pytest.mark.skipif(cuda_emulator.available() is not None, reason="the CUDA emulator cannot run here")
def test_steps_with_prompt_chunks_are_padded_to_a_power_of_two_up_to_cuda_graph_max_tokens(
        checkpoints, plugins):
    # Prompts of 5, 20 and 100 tokens alone: steps of 5 (padded to 16), 20 (32), then 64 and 36,
    # which cuda_graph_max_tokens = 32 leaves eager. The third asks for prompt logprobs: its
    # steps sample more rows than a graph has, so they run eagerly too.
    def engine(graphs, **options):
        return Engine(make_config(model=str(checkpoints("mistral")), kernels="cuda_emulated",
                                  device="cpu", token_budget=64, max_num_seqs=4, num_blocks=32,
                                  cuda_graphs=graphs, **options),
                      plugins=plugins, graph_capture=RerunOnReplay() if graphs else None)

    expected, _ = _one_at_a_time(engine(False), (5, 20, 100, 9), logprobs_for={3})
    graphed = engine(True, cuda_graph_max_tokens=32)
    tokens, replayed = _one_at_a_time(graphed, (5, 20, 100, 9), logprobs_for={3})
    assert tokens == expected
    prompt_steps = [(n, r) for n, r in replayed if n > 1]
    assert prompt_steps == [(5, True), (20, True), (64, False), (36, False), (9, False)]
    assert {(kind, size) for kind, size, _ in graphed.step_graphs.graphs} == {
        ("decode", n) for n in (1, 2, 4)} | {("mixed", 16), ("mixed", 32)}
    # Decode steps only.
    decodes_only = engine(True, cuda_graph_max_tokens=0)
    tokens, replayed = _one_at_a_time(decodes_only, (5, 20), logprobs_for=())
    assert tokens == expected[:2]
    assert [r for n, r in replayed] == [n == 1 for n, _ in replayed]
    assert decodes_only.step_graphs.mixed is None


@pytest.mark.skipif(cuda_emulator.available() is not None, reason="the CUDA emulator cannot run here")
def test_the_engine_captures_every_size_at_start_in_the_scratch_block(checkpoints, plugins):
    engine = Engine(make_config(model=str(checkpoints("mistral")), kernels="cuda_emulated",
                                device="cpu", max_num_seqs=5, num_blocks=16, cuda_graphs=True),
                    plugins=plugins, graph_capture=RerunOnReplay())
    graphs = engine.step_graphs
    # Padded sizes up to max_num_seqs' (8) and up to the token budget (512), each with the plan
    # of short contexts: no split.
    assert {(kind, size) for kind, size, _ in graphs.graphs} == (
        {("decode", n) for n in (1, 2, 4, 8)} | {("mixed", n) for n in (16, 32, 64, 128, 256, 512)})
    assert [key for kind, _, key in graphs.graphs if kind == "decode"] == [1] * 4
    assert [key[-1] for kind, _, key in graphs.graphs if kind == "mixed"] == [1] * 6
    assert graphs.captures == 10 and graphs.replays == 0
    assert engine.allocator.num_free == 15
    # The padding rows and the stand-in steps wrote into the scratch block and nowhere else.
    for k, v in engine.kv_cache:
        assert not k[:15].any() and not v[:15].any()
        assert k[15].any() and v[15].any()


def test_a_backend_that_falls_back_while_captured_turns_graphs_off(tmp_path, plugins, caplog):
    if cuda_emulator.available() is not None:
        pytest.skip(f"the CUDA emulator cannot run here: {cuda_emulator.available()}")
    # Head size 16 has no kernels.cuda kernel: its attention runs the reference, whose plan is
    # made on the host from that step's lengths, so the capture must not be kept.
    make_checkpoint(tmp_path, "llama")
    with caplog.at_level(logging.WARNING, logger="fastgen.step_graphs"):
        engine, tokens, replayed_steps, _ = _run(tmp_path, "cuda_emulated", CPU, plugins, "float32",
                                                 graphs=True, capture=RerunOnReplay())
    _, expected, _, _ = _run(tmp_path, "torch", CPU, plugins, "float32", graphs=False)
    assert tokens == expected
    assert replayed_steps == 0 and not engine.step_graphs.graphs
    assert "took a path that cannot be replayed" in engine.step_graphs.disabled_reason
    assert "cuda_graphs: off from now on" in caplog.text


def test_cuda_graphs_say_why_they_are_off(tiny_llama, caplog):
    folder = tiny_llama[0]
    with caplog.at_level(logging.WARNING, logger="fastgen.engine"):
        engine = Engine(make_config(model=str(folder), kernels="torch", device="cpu", num_blocks=8,
                                    cuda_graphs=True))
    assert engine.step_graphs is None and engine.allocator.num_blocks == 8
    assert "every step runs eagerly: CUDA graphs need a CUDA device, and the engine runs on cpu" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastgen.engine"):
        engine = Engine(make_config(model=str(folder), kernels="torch", device="cpu", num_blocks=8,
                                    cuda_graphs=True), graph_capture=RerunOnReplay())
    assert engine.step_graphs is None
    assert "kernels.torch cannot be captured in CUDA graphs (it has no graph_key)" in caplog.text


def test_cuda_graphs_by_default_are_quietly_off_where_they_cannot_run(tiny_llama, caplog):
    folder = tiny_llama[0]
    assert make_config().cuda_graphs is None
    with caplog.at_level(logging.DEBUG, logger="fastgen.engine"):
        on_cpu = Engine(make_config(model=str(folder), kernels="torch", device="cpu", num_blocks=8))
        uncapturable = Engine(make_config(model=str(folder), kernels="torch", device="cpu",
                                          num_blocks=8), graph_capture=RerunOnReplay())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "CUDA graphs need a CUDA device" in caplog.text   # at debug level only
    for engine in (on_cpu, uncapturable):
        assert engine.step_graphs is None and engine.allocator.num_blocks == 8
        engine.add_request([5, 6, 7], fastgen.SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
        while engine.has_unfinished():
            engine.step()
            assert engine.last_stats.graph_replayed == 0


@pytest.mark.skipif(cuda_emulator.available() is not None, reason="the CUDA emulator cannot run here")
def test_cuda_graphs_by_default_are_on_where_they_can_run_and_false_turns_them_off(checkpoints, plugins):
    def engine(**graphs):
        return Engine(make_config(model=str(checkpoints("mistral")), kernels="cuda_emulated",
                                  device="cpu", max_num_seqs=2, num_blocks=16, **graphs),
                      plugins=plugins, graph_capture=RerunOnReplay())

    by_default = engine()
    assert by_default.step_graphs is not None and by_default.step_graphs.captures > 0
    assert by_default.allocator.num_blocks == 15   # the last block is the graphs' scratch
    turned_off = engine(cuda_graphs=False)
    assert turned_off.step_graphs is None and turned_off.allocator.num_blocks == 16


def test_a_model_that_plans_on_the_host_is_not_captured(tmp_path):
    # Longrope chooses each sequence's rotary factors from its prompt length, on the host.
    make_checkpoint(tmp_path, "phi3-longrope")
    engine = Engine(make_config(model=str(tmp_path), kernels="torch", device="cpu", num_blocks=8))
    assert engine.model.graph_safe is False
    reason = StepGraphs.unavailable_reason(engine.model, type("Capturable", (), {"graph_key": 1}))
    assert reason == ("models.llama does not say its forward pass reads only the batch's tensors "
                      "(graph_safe)")


def test_padded_token_counts():
    assert [padded_tokens(n, 512) for n in (2, 16, 17, 33, 100, 256, 257, 500, 512)] == [
        16, 16, 32, 64, 128, 256, 512, 512, 512]
    assert [padded_tokens(n, 48) for n in (17, 33, 48)] == [32, 48, 48]


def test_padded_sizes():
    assert [padded_size(n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17, 64, 65)] == [
        1, 2, 4, 4, 8, 8, 16, 16, 24, 64, 72]
