"""How the engine makes its kernel backend: `config.cache_dir` reaches a backend whose constructor
takes `cache_dir` (kernels.cpu builds its library there), and a backend written for `cls(device)`
alone keeps working."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import types

import pytest
import torch

import fastgen
from fastgen.config import make_config
from fastgen.engine import Engine
from fastgen.errors import PluginError
from fastgen.kernels import choose_auto, make_backend
from fastgen.plugins.kernels.cpu import build as cpu_build
from fastgen.plugins.kernels.cpu.backend import CpuBackend
from fastgen.plugins.kernels.cuda import build as cuda_build
from fastgen.plugins.kernels.cuda.backend import CudaBackend
from fastgen.plugins.kernels.torch_ref.backend import TorchBackend
from fastgen.plugins.kernels.triton.backend import TritonBackend

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


class DeviceOnly(TorchBackend):
    """A third-party backend as written before `cache_dir` existed."""

    name = "device_only"

    def __init__(self, device):
        super().__init__(device)
        self.made_for = device


class Caching(TorchBackend):
    name = "caching"

    def __init__(self, device, cache_dir=None):
        super().__init__(device)
        self.cache_dir = cache_dir


class TakesKeywords(TorchBackend):
    name = "takes_keywords"

    def __init__(self, device, **options):
        super().__init__(device)
        self.options = options


def test_make_backend_passes_cache_dir_only_where_the_constructor_takes_it():
    assert make_backend(Caching, CPU, "/tmp/fastgen-cache").cache_dir == "/tmp/fastgen-cache"
    assert make_backend(Caching, CPU).cache_dir is None
    assert make_backend(TakesKeywords, CPU, "/c").options == {"cache_dir": "/c"}
    assert make_backend(DeviceOnly, CPU, "/tmp/fastgen-cache").made_for == CPU


def in_process_kernels(manager, *classes):
    @fastgen.hookimpl
    def register_kernels(register):
        for cls in classes:
            register(cls)

    manager.register(types.SimpleNamespace(register_kernels=register_kernels), name="my-kernels")
    return manager


@pytest.mark.parametrize("cache_dir", [None, "given"])
def test_engine_hands_its_cache_dir_to_the_backend(plugin_manager, tiny_llama, tmp_path, cache_dir):
    cache_dir = cache_dir and str(tmp_path / cache_dir)
    manager = in_process_kernels(plugin_manager, Caching)
    engine = Engine(make_config(model=str(tiny_llama[0]), kernels="caching", cache_dir=cache_dir,
                                num_blocks=16), manager)
    assert isinstance(engine.backend, Caching) and engine.backend.cache_dir == cache_dir


def test_engine_runs_a_backend_that_takes_only_the_device(plugin_manager, tiny_llama, tmp_path):
    manager = in_process_kernels(plugin_manager, DeviceOnly)
    engine = Engine(make_config(model=str(tiny_llama[0]), kernels="device_only",
                                cache_dir=str(tmp_path), num_blocks=16), manager)
    assert isinstance(engine.backend, DeviceOnly) and engine.backend.made_for == CPU
    engine.add_request([1, 2, 3], fastgen.SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    finished = []
    while engine.has_unfinished():
        finished += [o for o in engine.step() if o.finished]
    assert [len(o.token_ids) for o in finished] == [3]


class TakesKvCache(TorchBackend):
    name = "takes_kv_cache"
    told: tuple[int, int] | None = None

    def configure_kv_cache(self, num_kv_heads, head_dim):
        self.told = (num_kv_heads, head_dim)


def test_engine_tells_a_backend_that_asks_its_kv_cache_layout(plugin_manager, tiny_llama, tmp_path):
    manager = in_process_kernels(plugin_manager, TakesKvCache)
    engine = Engine(make_config(model=str(tiny_llama[0]), kernels="takes_kv_cache",
                                cache_dir=str(tmp_path), num_blocks=16), manager)
    _, kv_heads, head_dim = engine.model.kv_cache_spec
    assert engine.backend.told == (kv_heads, head_dim) == tuple(engine.kv_cache[0][0].shape[2:])


# --- kernels.cpu: the build goes under the engine's cache_dir ---------------------------------

needs_kernels_cpu = pytest.mark.skipif(CpuBackend.unavailable_reason(CPU) is not None,
                                       reason="kernels.cpu cannot be built here")


@needs_kernels_cpu
def test_kernels_cpu_builds_under_the_engines_cache_dir(plugin_manager, tmp_path, monkeypatch):
    """Stops at the compiler call (a real build takes a minute; see the slow test below)."""
    from torch.utils import cpp_extension

    asked = []

    def compile_nothing(**kwargs):
        asked.append(kwargs["build_directory"])
        raise RuntimeError("stopped before compiling")

    monkeypatch.setattr(cpu_build, "_loaded", {})   # as in a fresh process
    monkeypatch.setattr(cpp_extension, "load", compile_nothing)
    with pytest.raises(PluginError, match="Building the CPU kernels in .* failed"):
        Engine(make_config(kernels="cpu", cache_dir=str(tmp_path)), plugin_manager)
    assert asked == [str(tmp_path / "cpu-kernels" / cpu_build.build_key())]


def test_a_library_loaded_from_one_cache_root_serves_another(tmp_path, monkeypatch):
    """torch refuses a second registration of the same ops, so the same key loads once per process."""
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpu_build, "_loaded", {})
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: kwargs["build_directory"] + "/lib.so")
    first = cpu_build.load(str(tmp_path / "a"))
    assert first == tmp_path / "a" / "cpu-kernels" / cpu_build.build_key() / "lib.so"
    assert cpu_build.load(str(tmp_path / "b")) == first


GENERATE_IN_A_FRESH_PROCESS = """
import json, sys
import fastgen
params = fastgen.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
tokens = {}
for kernels in ("cpu", "torch"):
    llm = fastgen.LLM(model=sys.argv[1], kernels=kernels, cache_dir=sys.argv[2], num_blocks=32)
    tokens[kernels] = [o.token_ids for o in llm.generate([[5, 6, 7], list(range(3, 40))], params)]
print(json.dumps(tokens))
"""


@pytest.mark.slow
@needs_kernels_cpu
def test_llm_with_a_cache_dir_builds_kernels_cpu_there(tiny_llama, tmp_path):
    # A fresh process: this one may already hold the library from the default cache.
    done = subprocess.run([sys.executable, "-c", GENERATE_IN_A_FRESH_PROCESS, str(tiny_llama[0]),
                           str(tmp_path)], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    tokens = json.loads(done.stdout.strip().splitlines()[-1])
    assert tokens["cpu"] == tokens["torch"]
    key = cpu_build.build_key()
    assert (tmp_path / "cpu-kernels" / key / f"fastgen_cpu_{key}.so").exists()


# --- kernels = auto: the highest-ranked backend that is ready on the device --------------------

class Unranked(TorchBackend):
    name = "unranked"
    auto_rank = None   # a backend that never offers itself


def ranked(name: str, rank: int | None, reason: str | None = None) -> type:
    return type(name, (TorchBackend,), {
        "name": name, "auto_rank": classmethod(lambda cls, device, cache_dir=None: rank),
        "unavailable_reason": classmethod(lambda cls, device: reason)})


def test_auto_takes_the_highest_rank_among_backends_that_run_here():
    low, high = ranked("low", 1), ranked("high", 5)
    elsewhere = ranked("elsewhere", 99, reason="needs a GPU")
    declines = ranked("declines", None)
    assert choose_auto([low, high, elsewhere, declines, Unranked], CPU) is high
    assert choose_auto([ranked("first", 3), ranked("second", 3)], CPU).name == "first"


def test_auto_with_no_backend_offering_itself_names_the_installed_ones():
    with pytest.raises(PluginError, match=r"no installed kernel backend offers itself for cpu.*"
                                          r"kernels\.unranked, kernels\.declines"):
        choose_auto([Unranked, ranked("declines", None)], CPU)


def test_engine_with_auto_runs_the_ranked_plugin(plugin_manager, tiny_llama):
    manager = in_process_kernels(plugin_manager, ranked("favourite", 1000))
    engine = Engine(make_config(model=str(tiny_llama[0]), num_blocks=16), manager)
    assert make_config().kernels == "auto" and engine.backend.name == "favourite"


def test_auto_takes_kernels_cpu_only_once_it_is_built(tmp_path, monkeypatch):
    """Choosing must never start the minute-long build: unbuilt, the reference serves."""
    monkeypatch.setattr(cpu_build, "_loaded", {})   # as in a fresh process
    classes = [CpuBackend, TorchBackend]
    assert choose_auto(classes, CPU, str(tmp_path)) is TorchBackend
    library = cpu_build.build_dir(str(tmp_path))
    library.mkdir(parents=True)
    (library / f"fastgen_cpu_{library.name}.so").write_bytes(b"")
    expected = CpuBackend if CpuBackend.unavailable_reason(CPU) is None else TorchBackend
    assert choose_auto(classes, CPU, str(tmp_path)) is expected
    assert choose_auto(classes, torch.device("meta"), str(tmp_path)) is TorchBackend


def test_on_cuda_auto_ranks_kernels_triton_over_a_built_kernels_cuda_over_the_reference(
        tmp_path, monkeypatch, caplog):
    """The ranks alone, which need no GPU: kernels.triton at once, kernels.cuda only once built."""
    monkeypatch.setattr(cuda_build, "_loaded", None)   # as in a fresh process
    cache = str(tmp_path)
    assert TritonBackend.auto_rank(CUDA, cache) > TorchBackend.auto_rank(CUDA, cache)
    with caplog.at_level(logging.INFO, logger="fastgen.plugins.kernels.cuda"):
        assert CudaBackend.auto_rank(CUDA, cache) is None
    assert "python -m fastgen.plugins.kernels.cuda.build" in caplog.text
    library = cuda_build.build_dir(cache)
    library.mkdir(parents=True)
    (library / f"fastgen_cuda_{library.name}.so").write_bytes(b"")
    assert TritonBackend.auto_rank(CUDA, cache) > CudaBackend.auto_rank(CUDA, cache) > \
        TorchBackend.auto_rank(CUDA, cache)
    # Neither offers itself off a CUDA device: Triton only interprets on a CPU.
    assert TritonBackend.auto_rank(CPU, cache) is None and CudaBackend.auto_rank(CPU, cache) is None


def test_on_cuda_auto_takes_kernels_triton_else_a_built_kernels_cuda(tmp_path, monkeypatch):
    """choose_auto over the registered built-ins, as if this machine had a GPU, then as if Triton
    could not run (not installed), then without kernels.cuda's build."""
    for cls in (CudaBackend, TritonBackend, TorchBackend):
        monkeypatch.setattr(cls, "unavailable_reason", classmethod(lambda cls, device: None))
    monkeypatch.setattr(cuda_build, "_loaded", None)
    monkeypatch.setattr(cpu_build, "_loaded", {})
    classes = [TorchBackend, CudaBackend, CpuBackend, TritonBackend]
    assert choose_auto(classes, CUDA, str(tmp_path)) is TritonBackend
    monkeypatch.setattr(cuda_build, "_loaded", tmp_path / "lib.so")   # loaded in this process
    assert choose_auto(classes, CUDA, str(tmp_path)) is TritonBackend
    monkeypatch.setattr(TritonBackend, "unavailable_reason",
                        classmethod(lambda cls, device: "no triton"))
    assert choose_auto(classes, CUDA, str(tmp_path)) is CudaBackend
    monkeypatch.setattr(cuda_build, "_loaded", None)
    assert choose_auto(classes, CUDA, str(tmp_path)) is TorchBackend
    assert choose_auto(classes, CPU, str(tmp_path)) is TorchBackend


@pytest.mark.parametrize("missing", ["build", "gpu"])
def test_the_device_setting_and_every_gpu_backend_give_one_reason_cuda_cannot_run(
        tiny_llama, monkeypatch, missing):
    """One phrasing for a missing CUDA build or GPU, the fix included, wherever CUDA is asked for
    (kernels.torch and kernels.triton once said a third thing, without the fix)."""
    if missing == "build":
        monkeypatch.setattr(torch.version, "cuda", None)
        expected = "has no CUDA support; install a CUDA build of torch"
    else:
        monkeypatch.setattr(torch.version, "cuda", "12.4")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        expected = "torch sees no CUDA GPU; check the NVIDIA driver and CUDA_VISIBLE_DEVICES"
    for backend in (TorchBackend, TritonBackend, CudaBackend):
        assert expected in backend.unavailable_reason(CUDA), backend.name
    with pytest.raises(fastgen.FastgenError, match=f"Device 'cuda': .*{expected}, or use --device cpu"):
        fastgen.LLM(model=str(tiny_llama[0]), device="cuda")
