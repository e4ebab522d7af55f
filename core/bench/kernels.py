"""The kernel-backend benchmark's reusable parts: shapes from real models, the inputs of each op,
the bytes and FLOPs each op must move and do, the device's ceilings, and the comparison table.

The pytest-benchmark suite that times them is `fastgen.bench.kernels_suite`; `fastgen bench
kernels` and `pytest benchmarks/kernels` both run it.
"""

from __future__ import annotations

import functools
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..checkpoint import DTYPES
from ..errors import FastgenError
from ..kernels import SamplingMetadata, configure_kv_cache, linear_of, make_backend
from ..plugin_manager import PluginInfo, load_plugins
from ..ragged_batch import RaggedBatch
from ..request import SamplingParams, Sequence
from .device_timing import DeviceTimer

OPS = ("write_kv", "attention", "rms_norm", "rotary", "silu_and_mul", "linear", "sample")
SETS = ("decode", "prefill", "mixed")
BLOCK_SIZE = 16
REFERENCE_BACKEND = "torch"

# The fields of each model's Hugging Face config.json that fix the kernels' shapes.
MODEL_CONFIGS = {
    "llama3-8b": {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
                  "intermediate_size": 14336, "vocab_size": 128256},
    "mistral-7b": {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "intermediate_size": 14336, "vocab_size": 32000, "sliding_window": 4096},
    "smollm2-135m": {"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
                     "intermediate_size": 1536, "vocab_size": 49152},
}
QUICK_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    sliding_window: int | None = None

    @classmethod
    def from_config(cls, name: str, config: dict) -> "ModelShape":
        heads = config["num_attention_heads"]
        return cls(name, config["hidden_size"], heads, config.get("num_key_value_heads", heads),
                   config.get("head_dim") or config["hidden_size"] // heads,
                   config["intermediate_size"], config["vocab_size"], config.get("sliding_window"))


MODELS = {name: ModelShape.from_config(name, cfg) for name, cfg in MODEL_CONFIGS.items()}


@dataclass(frozen=True)
class BatchShape:
    """One step's sequences as (cached tokens, new tokens) pairs; decodes have one new token."""

    name: str
    kind: str                                  # decode | prefill | mixed
    sequences: tuple[tuple[int, int], ...]

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.sequences)

    def blocks(self, block_size: int) -> int:
        """The cache blocks of `block_size` tokens the shape's sequences hold."""
        return sum(-(-(c + n) // block_size) for c, n in self.sequences)


def decode(batch: int, context: int) -> BatchShape:
    return BatchShape(f"decode_b{batch}_ctx{context}", "decode", ((context, 1),) * batch)


def prefill(tokens: int, cached: int = 0) -> BatchShape:
    return BatchShape(f"prefill_{tokens}_cached{cached}", "prefill", ((cached, tokens),))


def mixed(budget: int, decodes: int, decode_context: int, chunk_cached: int = 0) -> BatchShape:
    """Dynamic SplitFuse: the decodes first, then one prompt chunk filling the token budget."""
    chunk = budget - decodes
    return BatchShape(f"mixed_{budget}_d{decodes}x{decode_context}_chunk{chunk}_cached{chunk_cached}",
                      "mixed", ((decode_context, 1),) * decodes + ((chunk_cached, chunk),))


FULL_SHAPES = {
    "decode": [decode(b, c) for b in (1, 16, 64, 256) for c in (128, 1024, 8192)],
    "prefill": [prefill(t, cached) for t in (128, 512, 2048) for cached in (0, 2048)],
    "mixed": [mixed(512, 16, 1024), mixed(2048, 64, 2048, chunk_cached=2048)],
}
# Seconds on a CPU: so that CI runs every op on every backend on every change.
QUICK_SHAPES = {
    "decode": [decode(4, 128)],
    "prefill": [prefill(64), prefill(64, cached=64)],
    "mixed": [mixed(64, 4, 128)],
}


def shape_set(quick: bool, sets=SETS, models=None) -> list[tuple[ModelShape, BatchShape]]:
    """The (model, batch) pairs to run; the quick set uses the small model and small batches."""
    models = models or ([QUICK_MODEL] if quick else list(MODELS))
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    return [(MODELS[m], s) for m in models for kind in sets for s in shapes[kind]]


# --- bytes and FLOPs -------------------------------------------------------------------------

@dataclass(frozen=True)
class Cost:
    bytes: int      # bytes an ideal kernel reads and writes in device memory
    flops: int      # floating-point operations that matter (0: the op is judged by bytes only)


def _attended_keys(cached: int, new: int, window: int | None) -> tuple[int, int]:
    """(distinct keys read, query-key pairs computed) for one sequence's new tokens, causal.

    The query at position p sees keys 0..p, or only the last `window` of them.
    """
    def visible_sum(lo: int, hi: int) -> int:      # sum of p + 1 for p in [lo, hi)
        return (hi - lo) * (lo + hi + 1) // 2

    total = cached + new
    if window is None or window >= total:
        return total, visible_sum(cached, total)
    # Queries before position window - 1 see all keys before them; from there on, exactly `window`.
    edge = min(max(window - 1, cached), total)
    pairs = visible_sum(cached, edge) + (total - edge) * window
    first_key = max(0, cached - window + 1)
    return total - first_key, pairs


def op_cost(op: str, model: ModelShape, shape: BatchShape, dtype: torch.dtype) -> Cost:
    """Analytic bytes and FLOPs of one op on one step, each tensor counted once.

    With e = bytes per element, T new tokens, S sampling sequences, H/Hkv query/key heads of D dims,
    E hidden size, I intermediate size, V vocabulary:
      attention     Q read and O written (2*T*H*D*e) plus every cached and new key and value the step
                    reads (2*keys*Hkv*D*e, keys counted per sequence within its window); FLOPs
                    4*H*D per query-key pair actually computed (QK^T and PV, causal pairs only: a
                    chunk of n new tokens after c cached ones does sum(c+1..c+n) pairs, not n*(c+n));
                    softmax is not counted.
      write_kv      keys and values read and written to the cache (4*T*Hkv*D*e) plus the int64 slots.
      rms_norm      x and residual read, normed and new residual written, weight read: (4*T*E + E)*e.
      rotary        q and k read and written (2*T*(H+Hkv)*D*e), float32 cos and sin read (2*T*D/2*4).
      silu_and_mul  [T, 2I] read, [T, I] written: 3*T*I*e.
      linear        the MLP's fused gate and up projection, the largest matmul of a layer: x [T, E]
                    and the weight [2I, E] read, [T, 2I] written, (T*E + 2I*E + T*2I)*e; FLOPs
                    2*T*E*2I. Through the backend's optional `linear` op, else torch's F.linear.
      sample        float32 logits read once (S*V*4) and the int64 tokens written.
    """
    e = torch.finfo(dtype).bits // 8
    t, heads, kv, d = shape.num_tokens, model.num_heads, model.num_kv_heads, model.head_dim
    if op == "attention":
        keys = pairs = 0
        for cached, new in shape.sequences:
            k, p = _attended_keys(cached, new, model.sliding_window)
            keys, pairs = keys + k, pairs + p
        return Cost(2 * t * heads * d * e + 2 * keys * kv * d * e, 4 * pairs * heads * d)
    if op == "write_kv":
        return Cost(4 * t * kv * d * e + 8 * t, 0)
    if op == "rms_norm":
        return Cost((4 * t * model.hidden_size + model.hidden_size) * e, 0)
    if op == "rotary":
        return Cost(2 * t * (heads + kv) * d * e + 2 * t * (d // 2) * 4, 0)
    if op == "silu_and_mul":
        return Cost(3 * t * model.intermediate_size * e, 0)
    if op == "linear":
        e_in, e_out = model.hidden_size, 2 * model.intermediate_size
        return Cost((t * e_in + e_out * e_in + t * e_out) * e, 2 * t * e_in * e_out)
    if op == "sample":
        s = len(shape.sequences)
        return Cost(s * model.vocab_size * 4 + s * 8, 0)
    raise FastgenError(f"Unknown kernel op {op!r}; the ops are {', '.join(OPS)}.")


# --- building an op's inputs -----------------------------------------------------------------

# A typical chat setting, so that sampling runs its temperature, top-k and top-p paths.
SAMPLING = SamplingParams(temperature=0.7, top_k=50, top_p=0.9)


@dataclass
class KernelCase:
    """One backend x dtype x model x batch x op; `build()` makes its inputs and returns the call."""

    backend: PluginInfo
    device: torch.device
    dtype: str
    model: ModelShape
    shape: BatchShape
    op: str
    block_size: int = BLOCK_SIZE      # tokens per KV cache block the attention ops read and write
    cost: Cost = field(init=False)

    def __post_init__(self) -> None:
        self.cost = op_cost(self.op, self.model, self.shape, DTYPES[self.dtype])

    @property
    def id(self) -> str:
        # Cache blocks of the default size go unnamed, so ids compare with earlier runs'.
        blocks = f"-block{self.block_size}" if self.block_size != BLOCK_SIZE else ""
        return f"{self.backend.name}-{self.dtype}-{self.model.name}-{self.shape.name}-{self.op}{blocks}"

    @property
    def group(self) -> str:
        """What pytest-benchmark groups by: the same work on every backend."""
        return f"{self.op} {self.model.name} {self.shape.name} {self.dtype}"

    def info(self) -> dict:
        return {"backend": self.backend.name, "package": self.backend.package, "op": self.op,
                "model": self.model.name, "shape": self.shape.name, "set": self.shape.kind,
                "dtype": self.dtype, "device": str(self.device), "tokens": self.shape.num_tokens,
                "block_size": self.block_size,
                "bytes": self.cost.bytes, "flops": self.cost.flops,
                "threads": torch.get_num_threads() if self.device.type == "cpu" else None}

    def footprint_bytes(self) -> int:
        """A generous estimate of the memory the case needs, to skip what cannot fit."""
        e = torch.finfo(DTYPES[self.dtype]).bits // 8
        m = self.model
        cache = 2 * self.shape.blocks(self.block_size) * self.block_size * m.num_kv_heads * m.head_dim * e
        if self.op not in ("attention", "write_kv"):
            cache = 0
        # Gathering backends copy the context (twice, to be safe), unfused attention holds the
        # scores, and outputs and temporaries take about as much as the inputs.
        longest = max(c + n for c, n in self.shape.sequences)
        scores = m.num_heads * max(n for _, n in self.shape.sequences) * longest * 4
        if self.op == "attention":
            return 3 * cache + scores + 2 * (2 * self.shape.num_tokens * m.num_heads * m.head_dim * e)
        return 3 * cache + 2 * self.cost.bytes

    def build(self, backend=None) -> Callable[[], object]:
        """The timed call on fresh inputs; `backend` (default: a new one of the case's class on
        its device) lets a caller drive an instance of its own, as the Triton compile check does."""
        return self._setup(backend)[0]

    def outputs(self, backend=None) -> dict[str, torch.Tensor]:
        """What one call computes, on fresh inputs (every backend gets the same ones), by name: the
        op's results; for write_kv the cache rows it wrote; for sample the drawn tokens and
        the rows' kept sets under the reference's top-k / top-p rule, which the draws must lie in."""
        run, collect = self._setup(backend)
        return collect(run())

    def _setup(self, backend) -> tuple[Callable[[], object], Callable[[object], dict]]:
        """The call, and how to name what it returns (see `outputs`)."""
        torch.manual_seed(0)
        backend = backend if backend is not None else make_backend(self.backend.cls, self.device)
        dtype, dev, m = DTYPES[self.dtype], self.device, self.model
        t = self.shape.num_tokens

        def randn(*shape, dt=dtype):
            return torch.randn(*shape, dtype=dt, device=dev)

        if self.op == "rms_norm":
            x, residual, weight = randn(t, m.hidden_size), randn(t, m.hidden_size), randn(m.hidden_size)
            return (lambda: backend.rms_norm(x, weight, 1e-5, residual),
                    lambda r: {"normed": r[0], "residual": r[1]})
        if self.op == "rotary":
            q, k = randn(t, m.num_heads, m.head_dim), randn(t, m.num_kv_heads, m.head_dim)
            angles = torch.rand(t, m.head_dim // 2, device=dev) * 100
            cos, sin = angles.cos(), angles.sin()
            return lambda: backend.rotary(q, k, cos, sin), lambda r: {"q": r[0], "k": r[1]}
        if self.op == "silu_and_mul":
            x = randn(t, 2 * m.intermediate_size)
            return lambda: backend.silu_and_mul(x), lambda r: {"out": r}
        if self.op == "linear":
            # Scaled as trained weights are, so outputs stay near 1 and sums in another order
            # stay within the fp32 tolerance of --check.
            x = randn(t, m.hidden_size)
            weight = randn(2 * m.intermediate_size, m.hidden_size) * m.hidden_size ** -0.5
            linear = linear_of(backend)
            return lambda: linear(x, weight), lambda r: {"out": r}

        batch = build_batch(self.shape, dev, self.block_size)
        if self.op == "sample":
            logits = randn(len(batch.sampling_seqs), m.vocab_size, dt=torch.float32)
            meta = SamplingMetadata.build(batch.sampling_seqs, dev)
            return lambda: backend.sample(logits, meta), lambda r: {"tokens": r, "kept": kept_tokens(logits, meta)}
        cache_shape = (self.shape.blocks(self.block_size), self.block_size, m.num_kv_heads, m.head_dim)
        k_cache, v_cache = randn(*cache_shape), randn(*cache_shape)
        if self.op == "write_kv":
            key, value = randn(t, m.num_kv_heads, m.head_dim), randn(t, m.num_kv_heads, m.head_dim)
            slots = batch.slot_mapping

            def written(_):
                rows = (-1, m.num_kv_heads, m.head_dim)
                return {"keys": k_cache.view(rows)[slots], "values": v_cache.view(rows)[slots]}

            return lambda: backend.write_kv(key, value, k_cache, v_cache, slots), written
        if self.op == "attention":
            # prepare() runs once per step and attention once per layer: it is not timed.
            configure_kv_cache(backend, m.num_kv_heads, m.head_dim)
            batch.attn_metadata = backend.prepare(batch)
            q = randn(t, m.num_heads, m.head_dim)
            scale = m.head_dim ** -0.5
            return (lambda: backend.attention(q, k_cache, v_cache, batch, scale, m.sliding_window),
                    lambda r: {"out": r})
        raise FastgenError(f"Unknown kernel op {self.op!r}; the ops are {', '.join(OPS)}.")


def kept_tokens(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """[S, V] bool: the tokens each row may draw under the reference's rule: a greedy row its
    largest logit's, a sampled row those its top-k and top-p cuts keep after its temperature."""
    from ..plugins.kernels.torch_ref.sampling import top_k_top_p_filter

    greedy = meta.temperatures == 0
    temperatures = torch.where(greedy, 1.0, meta.temperatures)
    kept = top_k_top_p_filter(logits / temperatures[:, None], meta) > float("-inf")
    return torch.where(greedy[:, None], logits == logits.amax(dim=-1, keepdim=True), kept)


def build_batch(shape: BatchShape, device: torch.device, block_size: int = BLOCK_SIZE) -> RaggedBatch:
    """The RaggedBatch of a shape, every sequence sampling, its blocks of `block_size` tokens
    scattered over the cache in a random order as they are after a while of serving."""
    order = torch.randperm(shape.blocks(block_size), generator=torch.Generator().manual_seed(0)).tolist()
    pairs, used = [], 0
    for i, (cached, new) in enumerate(shape.sequences):
        seq = Sequence(f"bench-{i}", [0] * (cached + new), SAMPLING)
        seq.num_computed = cached
        blocks = -(-(cached + new) // block_size)
        seq.block_ids, used = order[used:used + blocks], used + blocks
        pairs.append((seq, new))
    return RaggedBatch.build(pairs, block_size, device)


def device_name(device: torch.device) -> str:
    """What a run's results were measured on, for tables that compare runs: the GPU's name, or the
    CPU's model and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{model}, {threads} thread{'s' if threads != 1 else ''}"


# --- timing and the device's ceilings --------------------------------------------------------

def call_times(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    """Seconds of `repeats` calls of `fn` after one untimed call: device time on a GPU (without
    the host's launch time, on a cold L2 cache: `device_timing`), wall time elsewhere."""
    fn()
    if device.type == "cuda":
        timer = DeviceTimer(fn, device)
        for _ in range(repeats):
            timer()
        return timer.device_times
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def best_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """The fastest of `repeats` timed calls (call_times): a ceiling's probe."""
    return min(call_times(fn, device, repeats))


def median_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """The median of `repeats` timed calls (call_times): a kernel's time."""
    return statistics.median(call_times(fn, device, repeats))


@dataclass(frozen=True)
class Ceilings:
    copy_gbps: float                  # device memory copy: (read + write) bytes / s / 1e9
    matmul_tflops: dict[str, float]   # square matmul rate per dtype (see measure_ceilings)

    def as_dict(self) -> dict:
        return {"copy_gbps": self.copy_gbps, "matmul_tflops": dict(self.matmul_tflops)}


@functools.cache
def measure_ceilings(device: torch.device, dtypes: tuple[str, ...], quick: bool) -> Ceilings:
    """Probe the device once per process: a large tensor copy and an n x n matmul per dtype.

    Copy bytes are counted as read + write (STREAM's convention); the matmul does 2*n^3 FLOPs.
    A dtype's matmul ceiling is the faster of its own matmul and a float32 one: a kernel can always
    compute in float32 (CPUs without bfloat16 units do a bfloat16 matmul far slower than that).
    """
    cuda = device.type == "cuda"
    copy_mib = 1024 if cuda else (64 if quick else 256)
    src = torch.empty(copy_mib << 18, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    copy_s = best_time(lambda: dst.copy_(src), device, repeats=10 if cuda else 5)
    del src, dst
    n = 8192 if cuda else (512 if quick else 1024)
    rates = {}
    for name in ("float32", *(d for d in dtypes if d != "float32")):
        a = torch.randn(n, n, dtype=DTYPES[name], device=device)
        b = torch.randn(n, n, dtype=DTYPES[name], device=device)
        rate = 2 * n ** 3 / best_time(lambda: a @ b, device, repeats=10 if cuda else 3) / 1e12
        rates[name] = max(rate, rates.get("float32", 0.0))
    return Ceilings(2 * (copy_mib << 20) / copy_s / 1e9, {d: rates[d] for d in dtypes})


def achieved(cost: Cost, seconds: float, ceilings: Ceilings, dtype: str) -> dict:
    """Rates and fractions of the device's ceilings for one timed op; `pct_ceiling` is the
    fraction of whichever roof the op is closer to (its bound)."""
    gbps = cost.bytes / seconds / 1e9
    tflops = cost.flops / seconds / 1e12
    pct_bw = 100 * gbps / ceilings.copy_gbps
    pct_mm = 100 * tflops / ceilings.matmul_tflops[dtype] if cost.flops else 0.0
    return {"seconds": seconds, "gbps": gbps, "tflops": tflops, "pct_bandwidth": pct_bw,
            "pct_matmul": pct_mm, "pct_ceiling": max(pct_bw, pct_mm),
            "bound": "compute" if pct_mm > pct_bw else "memory",
            "ceiling_copy_gbps": ceilings.copy_gbps,
            "ceiling_matmul_tflops": ceilings.matmul_tflops[dtype]}


# --- choosing what to run --------------------------------------------------------------------

def _names(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    parts = value.split(",") if isinstance(value, str) else value
    return [p.strip() for p in parts if p.strip()]


def _check(kind: str, chosen: list[str], known) -> list[str]:
    unknown = [c for c in chosen if c not in known]
    if unknown:
        raise FastgenError(f"Unknown {kind} {', '.join(unknown)}; choose from {', '.join(known)}.")
    return chosen


@dataclass
class Selection:
    """What one benchmark run covers, validated: backends from the plugin registry."""

    device: torch.device
    dtypes: list[str]
    backends: list[PluginInfo]
    unavailable: dict[str, str]       # backend name -> why it cannot run on the device
    ops: list[str]
    pairs: list[tuple[ModelShape, BatchShape]]
    quick: bool
    block_size: int = BLOCK_SIZE

    @classmethod
    def from_options(cls, *, backends=None, ops=None, models=None, sets=None, quick=False,
                     device="auto", dtypes=None, block_size=None, registry=None) -> "Selection":
        from ..engine import resolve_device

        dev = resolve_device(device or "auto")
        registry = registry or load_plugins().registry
        names = _names(backends)
        # Named backends must exist (the registry's error lists the installed ones) and run here.
        chosen = [registry.get("kernels", n) for n in names] or list(registry.items["kernels"].values())
        unavailable = {}
        for info in chosen:
            reason = info.cls.unavailable_reason(dev)
            if reason is not None:
                if names:
                    raise FastgenError(f"kernels.{info.name} cannot run on {dev}: {reason}")
                unavailable[info.name] = reason
        dtype_names = _check("dtype", _names(dtypes), list(DTYPES)) or (
            ["bfloat16"] if dev.type == "cuda" else ["float32"])
        if block_size is not None and block_size < 1:
            raise FastgenError(f"block size {block_size}: a KV cache block holds at least 1 token.")
        return cls(dev, dtype_names, [i for i in chosen if i.name not in unavailable], unavailable,
                   _check("op", _names(ops), OPS) or list(OPS),
                   shape_set(quick, _check("shape set", _names(sets), SETS) or SETS,
                             _check("model", _names(models), list(MODELS)) or None),
                   quick, block_size or BLOCK_SIZE)

    def cases(self) -> list[KernelCase]:
        return [KernelCase(b, self.device, dt, m, s, op, self.block_size) for b in self.backends
                for dt in self.dtypes for m, s in self.pairs for op in self.ops]


# --- the comparison table --------------------------------------------------------------------

def format_seconds(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def format_number(x: float) -> str:
    """Three significant digits, so slow and fast backends both read in one column."""
    return f"{x:.3g}" if x >= 0.01 else f"{x:.1e}"


@dataclass
class ResultGrid:
    """pytest-benchmark's JSON of the suite as cases x backends."""

    backends: list[str]                    # the reference first
    cases: dict[tuple, dict[str, dict]]    # (op, model, shape, dtype) -> backend -> extra_info
    ceilings: dict[str, tuple]             # dtype -> (device, copy GB/s, matmul TFLOP/s)

    @classmethod
    def from_json(cls, results: dict) -> "ResultGrid":
        cases: dict[tuple, dict[str, dict]] = {}
        backends: list[str] = []
        ceilings: dict[str, tuple] = {}
        for bench in results.get("benchmarks", []):
            info = bench["extra_info"]
            if "seconds" not in info:   # run with --benchmark-disable: nothing was timed
                continue
            if info["backend"] not in backends:
                backends.append(info["backend"])
            key = (info["op"], info["model"], info["shape"], info["dtype"])
            cases.setdefault(key, {})[info["backend"]] = info
            ceilings[info["dtype"]] = (info["device"], info["ceiling_copy_gbps"], info["ceiling_matmul_tflops"])
        backends.sort(key=lambda b: (b != REFERENCE_BACKEND, b))
        # In the op set's order, then by model, shape and dtype.
        order = sorted(cases, key=lambda k: (OPS.index(k[0]) if k[0] in OPS else len(OPS), *k))
        return cls(backends, {k: cases[k] for k in order}, ceilings)


def format_table(results: dict, notes: list[str] = ()) -> str:
    """One markdown table from pytest-benchmark's JSON: a row per op x model x shape x dtype,
    per backend its median time, GB/s, TFLOP/s and % of the nearer ceiling, and its speedup
    over the torch reference."""
    grid = ResultGrid.from_json(results)
    backends, rows, ceilings = grid.backends, grid.cases, grid.ceilings
    lines = []
    for dtype, (device, gbps, tflops) in sorted(ceilings.items()):
        lines.append(f"ceilings on {device}, {dtype}: copy {gbps:.1f} GB/s, matmul {tflops:.3f} TFLOP/s")
    checked = [info for case in rows.values() for info in case.values() if "check_ok" in info]
    if checked:
        differ = sum(not info["check_ok"] for info in checked)
        agree = f"{len(checked) - differ} of {len(checked)} case(s) agree"
        differs = f", {differ} differ (marked beside their times; the notes say how)" if differ else ""
        lines.append(f"checked against {REFERENCE_BACKEND} on the same inputs: {agree}{differs}")
    # GPU runs time the device alone (DeviceTimer) and the host's launch cost apart from it.
    launches = any(info.get("host_seconds") is not None for case in rows.values() for info in case.values())
    if launches:
        lines.append("time: device time, kernels back to back on a cold L2 (`fastgen.bench.device_timing`); "
                     "launch: host time to queue the call (a CUDA graph replays without it)")
    lines += [f"note: {n}" for n in notes]
    header = ["op", "model", "shape", "dtype"]
    for b in backends:
        header += [f"{b} time", f"{b} GB/s", f"{b} TFLOP/s", f"{b} % roof"]
        header += [f"{b} launch"] if launches else []
        if b != REFERENCE_BACKEND and REFERENCE_BACKEND in backends:
            header.append(f"{b} vs {REFERENCE_BACKEND}")
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * 4 + "---:|" * (len(header) - 4)]
    for key in rows:
        cells = list(key)
        ref = rows[key].get(REFERENCE_BACKEND)
        for b in backends:
            r = rows[key].get(b)
            if r is None:
                cells += ["-"] * (5 if launches else 4)
            else:
                wrong = " (differs)" if r.get("check_ok") is False else ""
                # The host could not queue the call ahead of the GPU: its time includes the host's.
                waits = " (host waits)" if r.get("host_waits") else ""
                cells += [format_seconds(r["seconds"]) + wrong + waits, format_number(r["gbps"]),
                          format_number(r["tflops"]) if r["flops"] else "-",
                          f"{format_number(r['pct_ceiling'])}% {r['bound'][:3]}"]
                if launches:
                    host = r.get("host_seconds")
                    cells.append(format_seconds(host) if host is not None else "-")
            if b != REFERENCE_BACKEND and REFERENCE_BACKEND in backends:
                cells.append(f"{format_number(ref['seconds'] / r['seconds'])}x" if r and ref else "-")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)
