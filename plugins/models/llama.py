"""models.llama: the Llama family — Llama 2/3 (rope scaling), Mistral (sliding window), Qwen2 (qkv bias).

Weights are fused at load time (q/k/v into one matrix, gate/up into one) so a layer runs
three large matmuls instead of seven small ones.
"""

from __future__ import annotations

import math
import re
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

import fastgen
from fastgen.errors import ModelLoadError
from fastgen.kernels import linear_of

from .weights import Target, layer_target, load_weights


def rope_inv_freq(hf_config, head_dim: int) -> tuple[torch.Tensor, int]:
    """(inverse frequencies [R/2] float32, R rotated dims) from the config's rope settings."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    params.update(getattr(hf_config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    rot = int(head_dim * params.get("partial_rotary_factor",
                                    getattr(hf_config, "partial_rotary_factor", 1.0)))
    inv_freq = 1.0 / (theta ** (torch.arange(0, rot, 2, dtype=torch.int64).float() / rot))
    if rope_type == "default":
        return inv_freq, rot
    if rope_type == "linear":
        return inv_freq / params["factor"], rot
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, params), rot
    raise ModelLoadError(f"Rope type {rope_type!r} is not supported by models.llama; "
                         f"supported: default, linear, llama3.")


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    factor = params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    blend = (old_len / wavelen - low) / (high - low)
    blended = (1 - blend) * scaled / factor + blend * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def _sliding_windows(hf_config, num_layers: int) -> list[int | None]:
    window = getattr(hf_config, "sliding_window", None)
    layer_types = getattr(hf_config, "layer_types", None)
    if not window:
        return [None] * num_layers
    if layer_types is not None:
        return [window if t == "sliding_attention" else None for t in layer_types]
    if getattr(hf_config, "use_sliding_window", True) is False:
        return [None] * num_layers
    return [window] * num_layers


class DecoderLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, inter: int,
                 qkv_bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        qkv_out = (heads + 2 * kv_heads) * head_dim
        self.input_norm = nn.Parameter(torch.empty(hidden, dtype=dtype))
        self.qkv = nn.Parameter(torch.empty(qkv_out, hidden, dtype=dtype))
        self.qkv_bias = nn.Parameter(torch.empty(qkv_out, dtype=dtype)) if qkv_bias else None
        self.o_proj = nn.Parameter(torch.empty(hidden, heads * head_dim, dtype=dtype))
        self.post_norm = nn.Parameter(torch.empty(hidden, dtype=dtype))
        self.gate_up = nn.Parameter(torch.empty(2 * inter, hidden, dtype=dtype))
        self.down = nn.Parameter(torch.empty(hidden, inter, dtype=dtype))


# Checkpoint name -> (our parameter, which slice of a fused parameter: index among the parts).
_LAYER_WEIGHTS = {
    "input_layernorm.weight": ("input_norm", None),
    "self_attn.q_proj.weight": ("qkv", 0), "self_attn.k_proj.weight": ("qkv", 1),
    "self_attn.v_proj.weight": ("qkv", 2),
    "self_attn.q_proj.bias": ("qkv_bias", 0), "self_attn.k_proj.bias": ("qkv_bias", 1),
    "self_attn.v_proj.bias": ("qkv_bias", 2),
    "self_attn.o_proj.weight": ("o_proj", None),
    "post_attention_layernorm.weight": ("post_norm", None),
    "mlp.gate_proj.weight": ("gate_up", 0), "mlp.up_proj.weight": ("gate_up", 1),
    "mlp.down_proj.weight": ("down", None),
}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")


class LlamaForCausalLM(nn.Module):
    name = "llama"
    architectures = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

    def __init__(self, hf_config, backend, dtype: torch.dtype) -> None:
        super().__init__()
        c = hf_config
        if getattr(c, "mlp_bias", False):
            raise ModelLoadError("Llama checkpoints with mlp_bias are not supported yet.")
        if getattr(c, "hidden_act", "silu") != "silu":
            raise ModelLoadError(f"models.llama needs hidden_act silu, the checkpoint has {c.hidden_act!r}.")
        self.backend = backend
        self.linear = linear_of(backend)   # the backend's matmul path, else F.linear
        self.hf_config = c
        self.hidden = c.hidden_size
        self.heads = c.num_attention_heads
        self.kv_heads = getattr(c, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(c, "head_dim", None) or self.hidden // self.heads
        self.eps = c.rms_norm_eps
        self.scale = self.head_dim ** -0.5
        num_layers = c.num_hidden_layers
        qkv_bias = c.model_type == "qwen2" or bool(getattr(c, "attention_bias", False))
        self.windows = _sliding_windows(c, num_layers)
        self.embed = nn.Parameter(torch.empty(c.vocab_size, self.hidden, dtype=dtype))
        self.layers = nn.ModuleList(
            DecoderLayer(self.hidden, self.heads, self.kv_heads, self.head_dim,
                         c.intermediate_size, qkv_bias, dtype) for _ in range(num_layers))
        self.norm = nn.Parameter(torch.empty(self.hidden, dtype=dtype))
        self.tied = bool(getattr(c, "tie_word_embeddings", False))
        self.lm_head = None if self.tied else nn.Parameter(torch.empty(c.vocab_size, self.hidden, dtype=dtype))
        self.max_positions = c.max_position_embeddings
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None

    @property
    def kv_cache_spec(self) -> tuple[int, int, int]:
        return len(self.layers), self.kv_heads, self.head_dim

    def init_buffers(self) -> None:
        inv_freq, _ = rope_inv_freq(self.hf_config, self.head_dim)
        positions = torch.arange(self.max_positions, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq).to(self.embed.device)    # [P, R/2]
        self.cos, self.sin = freqs.cos(), freqs.sin()

    def load_weights(self, weights: Iterator[tuple[str, torch.Tensor]]) -> set[str]:
        qkv = [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim]
        parts = {"qkv": qkv, "qkv_bias": qkv, "gate_up": [self.layers[0].down.shape[1]] * 2}
        return load_weights(weights, self._target, parts)

    def _target(self, name: str) -> Target | None:
        if name == "model.embed_tokens.weight":
            return "embed", self.embed, None
        if name == "model.norm.weight":
            return "norm", self.norm, None
        if name == "lm_head.weight":
            return ("lm_head", self.lm_head, None) if self.lm_head is not None else None
        return layer_target(name, _LAYER_NAME, self.layers, _LAYER_WEIGHTS)

    @torch.inference_mode()
    def forward(self, batch, kv_cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        be, linear = self.backend, self.linear
        tokens = batch.num_tokens
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        x = F.embedding(batch.input_ids, self.embed)                      # [T, E]
        cos, sin = self.cos[batch.positions], self.sin[batch.positions]   # [T, R/2], once per step
        residual = None
        for layer, window, (k_cache, v_cache) in zip(self.layers, self.windows, kv_cache):
            h, residual = be.rms_norm(x, layer.input_norm, self.eps, residual)
            qkv = linear(h, layer.qkv, layer.qkv_bias)
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
            q = q.view(tokens, self.heads, self.head_dim)
            k = k.view(tokens, self.kv_heads, self.head_dim)
            q, k = be.rotary(q, k, cos, sin)
            be.write_kv(k, v.view(tokens, self.kv_heads, self.head_dim), k_cache, v_cache,
                        batch.slot_mapping)
            attn = be.attention(q, k_cache, v_cache, batch, self.scale, window)
            x = linear(attn.view(tokens, q_size), layer.o_proj)
            h, residual = be.rms_norm(x, layer.post_norm, self.eps, residual)
            x = linear(be.silu_and_mul(linear(h, layer.gate_up)), layer.down)
        idx = batch.logits_indices
        h, _ = be.rms_norm(x[idx], self.norm, self.eps, residual[idx])
        return linear(h, self.embed if self.tied else self.lm_head).float()   # [S, V]


@fastgen.hookimpl
def register_models(register):
    register(LlamaForCausalLM)
