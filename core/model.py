"""The ModelPlugin protocol, and loading a checkpoint folder into the model plugin that serves it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Iterator, Protocol

import torch

from .errors import ModelLoadError
from .kernels import KernelBackend
from .plugin_manager import PluginManager


class ModelPlugin(Protocol):
    name: ClassVar[str]
    architectures: ClassVar[tuple[str, ...]]

    def __init__(self, hf_config: Any, backend: KernelBackend, dtype: torch.dtype) -> None:
        """Build the module tree; weights are filled by load_weights (built on the meta device)."""
        ...

    @property
    def kv_cache_spec(self) -> tuple[int, int, int]:
        """(num_layers, num_kv_heads, head_dim) of the KV cache this model needs."""
        ...

    # Optional: `graph_safe: bool`, True when forward reads only the batch's tensors and sizes
    # (never its host-side lists or sequences), so a CUDA graph captured for one decode step
    # replays every other step of the same size (`cuda_graphs`). Absent means False.

    def load_weights(self, weights: Iterator[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (Hugging Face names) into parameters; return the names filled."""
        ...

    def forward(self, batch: Any, kv_cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Run one step over a RaggedBatch; logits [S, V] float32 for `batch.logits_indices` only."""
        ...


def read_hf_config(folder: Path):
    """The checkpoint's transformers config, with a clear error when the folder is not a checkpoint."""
    from transformers import AutoConfig

    config_file = folder / "config.json"
    if not folder.is_dir():
        raise ModelLoadError(f"Model folder {folder} does not exist.")
    if not config_file.is_file():
        raise ModelLoadError(f"Model folder {folder} has no config.json; give a Hugging Face "
                             f"checkpoint folder or a .gguf file.")
    try:
        json.loads(config_file.read_text())
        return AutoConfig.from_pretrained(str(folder))
    except Exception as e:   # a config class's own checks raise anything (0 heads: ZeroDivisionError)
        raise ModelLoadError(f"Cannot read {config_file}: {type(e).__name__}: {e}") from None


def iter_safetensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"Model folder {folder} has no *.safetensors weights.")
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except SafetensorError as e:   # truncated, or not safetensors at all
            raise ModelLoadError(f"Cannot read weights file {file}: {e}.") from None


def load_model(folder: Path, plugins: PluginManager, backend: KernelBackend,
               dtype: torch.dtype, device: torch.device):
    """(model, hf_config): the registered model plugin for the checkpoint's architecture, loaded."""
    hf_config = read_hf_config(folder)
    architectures = getattr(hf_config, "architectures", None) or []
    if not architectures:
        raise ModelLoadError(f"{folder / 'config.json'} names no architecture.")
    from .errors import PluginError
    try:
        info = plugins.registry.model_for_architecture(architectures[0])
    except PluginError as e:
        raise ModelLoadError(f"Unsupported architecture {architectures[0]!r} in {folder}: {e}") from None
    with torch.device("meta"):
        model = info.cls(hf_config, backend, dtype)
    model = model.to_empty(device=device)
    # Buffers (such as rotary tables) are not in checkpoints: the model recomputes them.
    if hasattr(model, "init_buffers"):
        model.init_buffers()
    loaded = model.load_weights(iter_safetensors(folder))
    missing = sorted({n for n, _ in model.named_parameters()} - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(f"Checkpoint {folder} lacks weights for {shown}.")
    model.eval()
    return model, hf_config
