"""models.opt: Meta's OPT family (facebook/opt-125m ... 6.7b, and opt-350m's post-LayerNorm layout).

Where OPT differs from Llama: learned positional embeddings (looked up at position + 2, an offset
kept from fairseq), LayerNorm with a bias, biases on every projection, a ReLU MLP without a gate,
and in opt-350m LayerNorm after each block instead of before it, with token embeddings narrower
than the hidden size (projected in and out). Attention and the KV cache go through the kernel
backend; q/k/v are fused into one matrix at load time.
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

from .weights import Target, attr_target, layer_target, load_weights

# The activations OPT checkpoints use, by their transformers (ACT2FN) names.
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}
POSITION_OFFSET = 2
LAYER_NORM_EPS = 1e-5   # transformers' OPT keeps nn.LayerNorm's default


def _param(*shape: int, dtype: torch.dtype, present: bool = True) -> nn.Parameter | None:
    return nn.Parameter(torch.empty(*shape, dtype=dtype)) if present else None


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """x: [T, E]; weight and bias are None where the config has no elementwise affine."""
    return F.layer_norm(x, x.shape[-1:], weight, bias, LAYER_NORM_EPS)


class DecoderLayer(nn.Module):
    def __init__(self, hidden: int, ffn: int, bias: bool, affine: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.attn_norm = _param(hidden, dtype=dtype, present=affine)
        self.attn_norm_bias = _param(hidden, dtype=dtype, present=affine)
        self.qkv = _param(3 * hidden, hidden, dtype=dtype)
        self.qkv_bias = _param(3 * hidden, dtype=dtype, present=bias)
        self.out_proj = _param(hidden, hidden, dtype=dtype)
        self.out_bias = _param(hidden, dtype=dtype, present=bias)
        self.mlp_norm = _param(hidden, dtype=dtype, present=affine)
        self.mlp_norm_bias = _param(hidden, dtype=dtype, present=affine)
        self.fc1 = _param(ffn, hidden, dtype=dtype)
        self.fc1_bias = _param(ffn, dtype=dtype, present=bias)
        self.fc2 = _param(hidden, ffn, dtype=dtype)
        self.fc2_bias = _param(hidden, dtype=dtype, present=bias)


# Checkpoint name within a layer -> (our attribute, part of the fused parameter or None).
_LAYER_WEIGHTS = {
    "self_attn_layer_norm.weight": ("attn_norm", None),
    "self_attn_layer_norm.bias": ("attn_norm_bias", None),
    "self_attn.q_proj.weight": ("qkv", 0), "self_attn.k_proj.weight": ("qkv", 1),
    "self_attn.v_proj.weight": ("qkv", 2),
    "self_attn.q_proj.bias": ("qkv_bias", 0), "self_attn.k_proj.bias": ("qkv_bias", 1),
    "self_attn.v_proj.bias": ("qkv_bias", 2),
    "self_attn.out_proj.weight": ("out_proj", None), "self_attn.out_proj.bias": ("out_bias", None),
    "final_layer_norm.weight": ("mlp_norm", None), "final_layer_norm.bias": ("mlp_norm_bias", None),
    "fc1.weight": ("fc1", None), "fc1.bias": ("fc1_bias", None),
    "fc2.weight": ("fc2", None), "fc2.bias": ("fc2_bias", None),
}
# Checkpoint name below the decoder -> our attribute.
_DECODER_WEIGHTS = {
    "embed_tokens.weight": "embed", "embed_positions.weight": "positions",
    "project_in.weight": "project_in", "project_out.weight": "project_out",
    "final_layer_norm.weight": "final_norm", "final_layer_norm.bias": "final_norm_bias",
}
# Checkpoints saved from OPTForCausalLM say `model.decoder.`; older ones, saved from OPTModel,
# say `decoder.`.
_LAYER_NAME = re.compile(r"(?:model\.)?decoder\.layers\.(\d+)\.(.+)")
_DECODER_NAME = re.compile(r"(?:model\.)?decoder\.(.+)")


class OPTForCausalLM(nn.Module):
    name = "opt"
    architectures = ("OPTForCausalLM",)

    def __init__(self, hf_config, backend, dtype: torch.dtype) -> None:
        super().__init__()
        c = hf_config
        act = getattr(c, "activation_function", "relu")
        if act not in ACTIVATIONS:
            raise ModelLoadError(f"models.opt serves activation_function {' or '.join(ACTIVATIONS)}, "
                                 f"the checkpoint has {act!r}.")
        self.activation = ACTIVATIONS[act]
        self.backend = backend
        self.linear = linear_of(backend)   # the backend's matmul path, else F.linear
        self.hidden = c.hidden_size
        self.heads = c.num_attention_heads
        self.head_dim = self.hidden // self.heads
        self.scale = self.head_dim ** -0.5
        self.pre_norm = bool(c.do_layer_norm_before)
        bias = bool(getattr(c, "enable_bias", True))
        affine = bool(getattr(c, "layer_norm_elementwise_affine", True))
        embed_dim = getattr(c, "word_embed_proj_dim", None) or self.hidden
        self.embed = _param(c.vocab_size, embed_dim, dtype=dtype)
        self.positions = _param(c.max_position_embeddings + POSITION_OFFSET, self.hidden, dtype=dtype)
        # opt-350m: token embeddings of word_embed_proj_dim, projected to and from the hidden size.
        projected = embed_dim != self.hidden
        self.project_in = _param(self.hidden, embed_dim, dtype=dtype, present=projected)
        self.project_out = _param(embed_dim, self.hidden, dtype=dtype, present=projected)
        self.layers = nn.ModuleList(DecoderLayer(self.hidden, c.ffn_dim, bias, affine, dtype)
                                    for _ in range(c.num_hidden_layers))
        # Post-LN layers end normalised already; pre-LN ones get a final LayerNorm.
        self.has_final_norm = self.pre_norm and not getattr(c, "_remove_final_layer_norm", False)
        self.final_norm = _param(self.hidden, dtype=dtype, present=self.has_final_norm and affine)
        self.final_norm_bias = _param(self.hidden, dtype=dtype, present=self.has_final_norm and affine)
        self.tied = bool(getattr(c, "tie_word_embeddings", True))
        self.lm_head = _param(c.vocab_size, embed_dim, dtype=dtype, present=not self.tied)

    @property
    def kv_cache_spec(self) -> tuple[int, int, int]:
        return len(self.layers), self.heads, self.head_dim

    def load_weights(self, weights: Iterator[tuple[str, torch.Tensor]]) -> set[str]:
        qkv = [self.hidden] * 3
        return load_weights(weights, self._target, {"qkv": qkv, "qkv_bias": qkv})

    def _target(self, name: str) -> Target | None:
        if name == "lm_head.weight":   # tied checkpoints may carry a copy of the embeddings
            return None if self.tied else attr_target(name, self, "lm_head")
        if _LAYER_NAME.fullmatch(name):
            return layer_target(name, _LAYER_NAME, self.layers, _LAYER_WEIGHTS)
        decoder = _DECODER_NAME.fullmatch(name)
        if decoder is None or decoder.group(1) not in _DECODER_WEIGHTS:
            return None
        return attr_target(name, self, _DECODER_WEIGHTS[decoder.group(1)])

    graph_safe = True   # forward reads only the batch's tensors and sizes

    @torch.inference_mode()
    def forward(self, batch, kv_cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        be, linear = self.backend, self.linear
        tokens = batch.num_tokens
        x = F.embedding(batch.input_ids, self.embed)                          # [T, E_embed]
        if self.project_in is not None:
            x = linear(x, self.project_in)                                  # [T, E]
        x = x + F.embedding(batch.positions + POSITION_OFFSET, self.positions)
        for layer, (k_cache, v_cache) in zip(self.layers, kv_cache):
            h = layer_norm(x, layer.attn_norm, layer.attn_norm_bias) if self.pre_norm else x
            qkv = linear(h, layer.qkv, layer.qkv_bias)
            q, k, v = (t.view(tokens, self.heads, self.head_dim) for t in qkv.split(self.hidden, dim=-1))
            be.write_kv(k, v, k_cache, v_cache, batch.slot_mapping)
            attn = be.attention(q, k_cache, v_cache, batch, self.scale)       # [T, H, D]
            x = x + linear(attn.reshape(tokens, self.hidden), layer.out_proj, layer.out_bias)
            if not self.pre_norm:
                x = layer_norm(x, layer.attn_norm, layer.attn_norm_bias)
            h = layer_norm(x, layer.mlp_norm, layer.mlp_norm_bias) if self.pre_norm else x
            x = x + linear(self.activation(linear(h, layer.fc1, layer.fc1_bias)),
                             layer.fc2, layer.fc2_bias)
            if not self.pre_norm:
                x = layer_norm(x, layer.mlp_norm, layer.mlp_norm_bias)
        x = x[batch.logits_indices]                                           # [S, E]
        if self.has_final_norm:
            x = layer_norm(x, self.final_norm, self.final_norm_bias)
        if self.project_out is not None:
            x = linear(x, self.project_out)                                 # [S, E_embed]
        return linear(x, self.embed if self.tied else self.lm_head).float()   # [S, V]


@fastgen.hookimpl
def register_models(register):
    register(OPTForCausalLM)
