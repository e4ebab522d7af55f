"""models.llama: the Llama-shaped families — Llama 2/3 (rope scaling), Mistral (sliding window),
Qwen2 (qkv bias), Qwen3 (per-head q/k RMSNorm, sliding window from max_window_layers on) and
Phi-3 (checkpoints with fused weights, longrope, partial rotary).

Weights are fused at load time (q/k/v into one matrix, gate/up into one) so a layer runs
three large matmuls instead of seven small ones; Phi-3 checkpoints already store them fused.
"""

from __future__ import annotations

import re
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

import fastgen
from fastgen.errors import ModelLoadError
from fastgen.kernels import linear_of

from .rope import RotaryTables
from .weights import Target, layer_target, load_weights


def _sliding_windows(hf_config, num_layers: int) -> list[int | None]:
    window = getattr(hf_config, "sliding_window", None)
    layer_types = getattr(hf_config, "layer_types", None)
    unknown = sorted(set(layer_types or ()) - {"full_attention", "sliding_attention"})
    if unknown:
        raise ModelLoadError(f"models.llama serves layer_types full_attention and sliding_attention, "
                             f"the checkpoint has {unknown[0]!r}.")
    if not window:
        return [None] * num_layers
    if layer_types is not None:   # Qwen2/3: transformers derives them from max_window_layers
        return [window if t == "sliding_attention" else None for t in layer_types]
    if getattr(hf_config, "use_sliding_window", True) is False:
        return [None] * num_layers
    return [window] * num_layers


class DecoderLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, inter: int,
                 qkv_bias: bool, o_bias: bool, qk_norm: bool, dtype: torch.dtype) -> None:
        super().__init__()
        qkv_out = (heads + 2 * kv_heads) * head_dim

        def vector(size: int, present: bool = True) -> nn.Parameter | None:
            return nn.Parameter(torch.empty(size, dtype=dtype)) if present else None

        self.input_norm = vector(hidden)
        self.qkv = nn.Parameter(torch.empty(qkv_out, hidden, dtype=dtype))
        self.qkv_bias = vector(qkv_out, qkv_bias)
        self.q_norm = vector(head_dim, qk_norm)
        self.k_norm = vector(head_dim, qk_norm)
        self.o_proj = nn.Parameter(torch.empty(hidden, heads * head_dim, dtype=dtype))
        self.o_bias = vector(hidden, o_bias)
        self.post_norm = vector(hidden)
        self.gate_up = nn.Parameter(torch.empty(2 * inter, hidden, dtype=dtype))
        self.down = nn.Parameter(torch.empty(hidden, inter, dtype=dtype))


# Checkpoint name -> (our parameter, which slice of a fused parameter: index among the parts, or
# None for the whole of it). Phi-3 checkpoints hold qkv_proj and gate_up_proj already fused.
_LAYER_WEIGHTS = {
    "input_layernorm.weight": ("input_norm", None),
    "self_attn.q_proj.weight": ("qkv", 0), "self_attn.k_proj.weight": ("qkv", 1),
    "self_attn.v_proj.weight": ("qkv", 2),
    "self_attn.q_proj.bias": ("qkv_bias", 0), "self_attn.k_proj.bias": ("qkv_bias", 1),
    "self_attn.v_proj.bias": ("qkv_bias", 2),
    "self_attn.qkv_proj.weight": ("qkv", None),
    "self_attn.q_norm.weight": ("q_norm", None), "self_attn.k_norm.weight": ("k_norm", None),
    "self_attn.o_proj.weight": ("o_proj", None), "self_attn.o_proj.bias": ("o_bias", None),
    "post_attention_layernorm.weight": ("post_norm", None),
    "mlp.gate_proj.weight": ("gate_up", 0), "mlp.up_proj.weight": ("gate_up", 1),
    "mlp.gate_up_proj.weight": ("gate_up", None),
    "mlp.down_proj.weight": ("down", None),
}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")


class LlamaForCausalLM(nn.Module):
    name = "llama"
    architectures = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                     "Phi3ForCausalLM")

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
        # attention_bias (Llama, Qwen3) puts biases on q, k, v and o; Qwen2 has them on q, k, v only.
        attention_bias = bool(getattr(c, "attention_bias", False))
        qkv_bias = c.model_type == "qwen2" or attention_bias
        qk_norm = c.model_type == "qwen3"
        self.windows = _sliding_windows(c, num_layers)
        self.embed = nn.Parameter(torch.empty(c.vocab_size, self.hidden, dtype=dtype))
        self.layers = nn.ModuleList(
            DecoderLayer(self.hidden, self.heads, self.kv_heads, self.head_dim,
                         c.intermediate_size, qkv_bias, attention_bias, qk_norm, dtype)
            for _ in range(num_layers))
        self.norm = nn.Parameter(torch.empty(self.hidden, dtype=dtype))
        self.tied = bool(getattr(c, "tie_word_embeddings", False))
        self.lm_head = None if self.tied else nn.Parameter(torch.empty(c.vocab_size, self.hidden, dtype=dtype))
        self.max_positions = c.max_position_embeddings
        self.rope: RotaryTables | None = None

    @property
    def kv_cache_spec(self) -> tuple[int, int, int]:
        return len(self.layers), self.kv_heads, self.head_dim

    @property
    def graph_safe(self) -> bool:
        # Longrope picks each sequence's factors from its prompt length, on the host.
        return self.rope is not None and self.rope.long_from is None

    def init_buffers(self) -> None:
        self.rope = RotaryTables(self.hf_config, self.head_dim, self.max_positions, self.embed.device)

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
        cos, sin = self.rope.lookup(batch)                                # [T, R/2], once per step
        residual = None
        for layer, window, (k_cache, v_cache) in zip(self.layers, self.windows, kv_cache):
            h, residual = be.rms_norm(x, layer.input_norm, self.eps, residual)
            qkv = linear(h, layer.qkv, layer.qkv_bias)
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
            q = q.view(tokens, self.heads, self.head_dim)
            k = k.view(tokens, self.kv_heads, self.head_dim)
            if layer.q_norm is not None:   # Qwen3: each head RMS-normalised before rotary
                q, k = self._norm_heads(q, layer.q_norm), self._norm_heads(k, layer.k_norm)
            q, k = be.rotary(q, k, cos, sin)
            be.write_kv(k, v.view(tokens, self.kv_heads, self.head_dim), k_cache, v_cache,
                        batch.slot_mapping)
            attn = be.attention(q, k_cache, v_cache, batch, self.scale, window)
            x = linear(attn.view(tokens, q_size), layer.o_proj, layer.o_bias)
            h, residual = be.rms_norm(x, layer.post_norm, self.eps, residual)
            x = linear(be.silu_and_mul(linear(h, layer.gate_up)), layer.down)
        idx = batch.logits_indices
        h, _ = be.rms_norm(x[idx], self.norm, self.eps, residual[idx])
        return linear(h, self.embed if self.tied else self.lm_head).float()   # [S, V]

    def _norm_heads(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # x: [T, H, D] -> [T, H, D]: the backend's rms_norm over [T * H, D] rows, one per head
        tokens, heads, dim = x.shape
        normed, _ = self.backend.rms_norm(x.reshape(tokens * heads, dim), weight, self.eps)
        return normed.view(tokens, heads, dim)


@fastgen.hookimpl
def register_models(register):
    register(LlamaForCausalLM)
