"""The KernelBackend protocol: the op set every backend implements over a RaggedBatch.

Models call only these ops (plus plain torch linear algebra), so a backend is swapped without
touching a model. The torch reference backend (`kernels.torch`) is the ground truth.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Protocol

import torch
import torch.nn.functional as F

from .errors import PluginError
from .request import Sequence
from .staging import staged


@dataclass
class SamplingMetadata:
    """Per sampling sequence parameters, as tensors on the device. S = sampling sequences."""

    temperatures: torch.Tensor   # [S] float32; 0 = greedy
    top_k: torch.Tensor          # [S] int64; 0 = off
    top_p: torch.Tensor          # [S] float32; 1 = off
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool
    generators: list[torch.Generator | None]   # [S] per-request seeded generators
    # The largest top_k among the rows that filter (temperature > 0, top-k or top-p) when each of
    # them has a top-k (0: no row filters), so no kept set reaches past a row's top_k_bound largest
    # logits; None when a row filters by top-p alone. A host-side bound: samplers use it without
    # reading the device.
    top_k_bound: int | None = None

    @classmethod
    def build(cls, seqs: list[Sequence], device: torch.device) -> "SamplingMetadata":
        params = [s.params for s in seqs]
        # Two transfers: [temperatures | top_p] in float32, top_k in int64.
        temperatures, top_p = staged([p.temperature for p in params] + [p.top_p for p in params],
                                     torch.float32, device).split([len(params), len(params)])
        return cls(
            temperatures=temperatures,
            top_k=staged([p.top_k for p in params], torch.int64, device),
            top_p=top_p,
            all_greedy=all(p.temperature == 0 for p in params),
            any_top_k=any(p.top_k > 0 for p in params),
            any_top_p=any(p.top_p < 1 for p in params),
            generators=[s.generator for s in seqs],
            top_k_bound=_top_k_bound(params),
        )


def _top_k_bound(params: list) -> int | None:
    filtering = [p for p in params if p.temperature > 0 and (p.top_k > 0 or p.top_p < 1)]
    if any(p.top_k <= 0 for p in filtering):
        return None
    return max((p.top_k for p in filtering), default=0)


# How close a backend's outputs must come to the reference's on the same inputs, (atol, rtol) by
# dtype: fp16 rounds to about 1e-3 and accumulation orders differ between backends; bf16 keeps 8
# bits of mantissa, so results differ by an ulp of the output. The conformance tests and
# `fastgen bench kernels --check` both hold backends to it.
REFERENCE_TOLERANCE = {torch.float32: (2e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
# On a GPU, float32 results also differ by the order of tiled and warp-level sums.
GPU_FLOAT32_TOLERANCE = (1e-4, 1e-4)


def cuda_unavailable_reason() -> str | None:
    """Why torch cannot run on a CUDA GPU here, None when it can: one phrasing for the `device`
    setting and for every backend that needs a GPU. The build is checked first, as a CPU-only
    build answers no to every later question and its fix is another install, not a driver."""
    if torch.version.cuda is None:
        return (f"this torch build ({torch.__version__}) has no CUDA support; install a CUDA build "
                f"of torch")
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU; check the NVIDIA driver and CUDA_VISIBLE_DEVICES"
    return None


def reference_tolerance(dtype: torch.dtype, on_gpu: bool) -> tuple[float, float]:
    """(atol, rtol) within which a backend's result of `dtype` must match the reference's."""
    return GPU_FLOAT32_TOLERANCE if on_gpu and dtype == torch.float32 else REFERENCE_TOLERANCE[dtype]


class KernelBackend(Protocol):
    name: ClassVar[str]

    def __init__(self, device: torch.device, cache_dir: str | None = None) -> None:
        """Made once per engine for `device`. `cache_dir` is optional in the protocol: a backend
        that builds or keeps files (a compiled library) takes it and keeps them under that root
        (None: $XDG_CACHE_HOME/fastgen or ~/.cache/fastgen, as `Config.cache_dir`); a backend
        that keeps nothing may take `device` alone (see `make_backend`)."""
        ...

    @classmethod
    def unavailable_reason(cls, device: torch.device | None) -> str | None:
        """None when the backend can run on `device` (None: on this machine at all); else why not."""
        ...

    # Optional: `auto_rank(device, cache_dir) -> int | None`, a classmethod. With `kernels = "auto"`
    # the engine takes the backend of highest rank on its device; None, or no such method, means
    # "never chosen automatically" (choose_auto below). A backend ranks itself only where it is
    # measured faster than the reference and ready at once: choosing must never start a build.

    # Optional: `linear(x, weight, bias=None)`, F.linear's contract ([T, K] x [N, K] -> [T, N]). Models
    # take it through linear_of() below, so a backend without one runs torch's F.linear.

    # Optional: `graph_key(metadata) -> Hashable | None`, for `cuda_graphs` (core/step_graphs.py).
    # Given prepare()'s result for a graph's padded batch, it returns everything in it that the
    # ops would bake into a CUDA graph besides the batch's tensors (kernels.triton: the split
    # count, and with prompt chunks the number of tiles), or None when this step cannot be
    # captured. It is asked again after a capture, so a result that an op changed while running
    # (a fallback that planned on the host) turns graphs off. The ops must then read lengths and
    # block tables from the batch's tensors only, never sync with the host, and allocate only
    # through torch. A backend with graph_key alone is captured for decode-only steps.
    #
    # Optional with it: `graph_inputs(metadata) -> dict[str, torch.Tensor]`, for steps with prompt
    # chunks too: the tensors of prepare()'s result (a dataclass) that a graph reads besides the
    # batch's, by field name; each replay copies the step's into the captured plan's. Such a
    # backend plans a batch with `graph_padded` set so that every step of the batch's sizes gets
    # the same launches: its tile lists padded to the most those sizes need
    # (plugins/kernels/query_tiles.step_tiles), the extra tiles pointing at the batch's last
    # sequence, which has no new tokens. The padded batch's tokens after the step's belong to the
    # sequence before it (a causal prompt of their own over the scratch block): attention must
    # compute or skip them, never read another sequence's keys for them.

    # Optional: `configure_kv_cache(num_kv_heads, head_dim)`, called once the model is loaded and
    # before the first prepare(), with the KV cache's layout (every layer's is the same). A
    # backend whose plan depends on how many programs a step launches (kernels.triton's split-KV
    # count, which the heads multiply) reads it here; configure_kv_cache() below calls it.

    def prepare(self, batch: Any) -> Any:
        """Derive once per step whatever the attention op needs from the batch metadata."""
        ...

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """key, value: [T, Hkv, D]; caches: [num_blocks, block_size, Hkv, D]; slot_mapping: [T]."""
        ...

    def attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  batch: Any, scale: float, sliding_window: int | None = None) -> torch.Tensor:
        """q: [T, H, D] -> [T, H, D]. Causal within each sequence over its cached and new keys,
        grouped-query heads (H a multiple of Hkv); with a window, query at position p sees keys at
        positions > p - window."""
        ...

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, E]. With a residual, normalises x + residual. Returns (normed, new residual)."""
        ...

    def rotary(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               is_neox: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, H, D], k: [T, Hkv, D], cos/sin: [T, R/2] for the first R dims of each head."""
        ...

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, 2I] -> silu(x[:, :I]) * x[:, I:]: [T, I]."""
        ...

    def sample(self, logits: torch.Tensor, meta: SamplingMetadata,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """logits: [S, V] float32 -> next token ids [S] int64 (greedy, temperature, top-k, top-p)."""
        ...


def make_backend(cls: type, device: torch.device, cache_dir: str | None = None) -> KernelBackend:
    """Construct a registered backend class, passing `cache_dir` only to a constructor that takes
    it (by name or **kwargs), so backends written for `cls(device)` keep working."""
    params = inspect.signature(cls).parameters.values()
    if any(p.name == "cache_dir" or p.kind is p.VAR_KEYWORD for p in params):
        return cls(device, cache_dir=cache_dir)
    return cls(device)


def linear_of(backend: Any) -> Callable[..., torch.Tensor]:
    """The backend's `linear` op, else torch's F.linear: the matmuls stay plain torch linear
    algebra unless a backend has a faster path for them (kernels.cpu does, for few rows)."""
    return getattr(backend, "linear", F.linear)


def configure_kv_cache(backend: Any, num_kv_heads: int, head_dim: int) -> None:
    """Tell the backend its KV cache's layout, if it asks for it (the optional hook above)."""
    configure = getattr(backend, "configure_kv_cache", None)
    if configure is not None:
        configure(num_kv_heads, head_dim)


AUTO = "auto"


def choose_auto(classes: list[type], device: torch.device, cache_dir: str | None = None) -> type:
    """The backend class `kernels = "auto"` runs: of those that can run on `device` and rank
    themselves there, the highest rank (the first registered wins a tie)."""
    ranked = []
    for cls in classes:
        rank_of = getattr(cls, "auto_rank", None)
        if rank_of is None or cls.unavailable_reason(device) is not None:
            continue
        rank = rank_of(device, cache_dir)
        if rank is not None:
            ranked.append((rank, -len(ranked), cls))
    if not ranked:
        names = ", ".join(f"kernels.{c.name}" for c in classes) or "none"
        raise PluginError(f"kernels = auto: no installed kernel backend offers itself for {device}; "
                          f"name one (installed: {names}).")
    return max(ranked, key=lambda r: r[:2])[2]
