"""Rotary position tables of the Llama-shaped families: cos and sin per position for the rope
types their checkpoints use (default, linear, llama3, longrope), and each step's rows of them.

LongRoPE (Phi-3.5, Phi-4-mini) has two sets of frequencies: short factors for sequences within
`original_max_position_embeddings` (O), long ones past it. transformers' `generate` encodes a
sequence with the short set while it is at most O tokens long and, at the step it grows past O,
recomputes its whole cache with the long set. fastgen does not recompute a running sequence, so it
takes the set once per sequence, from its prompt: a prompt longer than O runs on the long factors
throughout, a shorter one on the short factors, past O too. Greedy tokens are transformers' for
every sequence but one whose prompt fits in O and whose generation grows past it: from there on
fastgen continues with the short factors (as transformers would with long_factor = short_factor).
Each sequence's choice is fixed, so chunked prompts and preempted sequences recompute the same keys.
"""

from __future__ import annotations

import math

import torch

from fastgen.errors import ModelLoadError

SUPPORTED = ("default", "linear", "llama3", "longrope")


def rope_parameters(hf_config) -> dict:
    """The config's rope settings in one dict (transformers 5 `rope_parameters`, older
    `rope_scaling` and top-level `rope_theta` / `partial_rotary_factor` alike)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    params.update(getattr(hf_config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params.setdefault("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


class RotaryTables:
    """cos and sin [P, R/2] float32 for positions 0..P-1, rotating the first R dims of each head
    (R = head_dim * partial_rotary_factor); for longrope the short rows, then the long ones."""

    def __init__(self, hf_config, head_dim: int, num_positions: int, device: torch.device) -> None:
        params = rope_parameters(hf_config)
        rope_type = params["rope_type"]
        if rope_type not in SUPPORTED:
            raise ModelLoadError(f"Rope type {rope_type!r} is not supported by models.llama; "
                                 f"supported: {', '.join(SUPPORTED)}.")
        self.num_positions = num_positions
        self.rotary_dims = int(head_dim * params["partial_rotary_factor"])
        exponents = torch.arange(0, self.rotary_dims, 2, dtype=torch.int64).float() / self.rotary_dims
        powers = params["rope_theta"] ** exponents                       # [R/2]
        scale = 1.0
        self.long_from: int | None = None   # longrope: O, the longest prompt on the short factors
        if rope_type == "longrope":
            scale, self.long_from = _longrope_scale(hf_config, params)
            inv_freqs = [1.0 / (torch.tensor(params[key], dtype=torch.float32) * powers)
                         for key in ("short_factor", "long_factor")]
        else:
            inv_freq = 1.0 / powers
            if rope_type == "linear":
                inv_freq = inv_freq / params["factor"]
            elif rope_type == "llama3":
                inv_freq = _llama3_inv_freq(inv_freq, params)
            inv_freqs = [inv_freq]
        positions = torch.arange(num_positions, dtype=torch.float32)
        freqs = torch.cat([torch.outer(positions, f) for f in inv_freqs]).to(device)   # [kP, R/2]
        # longrope scales cos and sin alike (its attention factor), as transformers does.
        self.cos, self.sin = freqs.cos() * scale, freqs.sin() * scale

    def lookup(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, R/2] of the batch's tokens, once per step."""
        rows = batch.positions
        if self.long_from is not None:
            long = [seq.prompt_len > self.long_from for seq in batch.sequences]
            if any(long):   # the long rows follow the short ones
                per_token = torch.tensor(long).repeat_interleave(torch.tensor(batch.query_lens))
                rows = rows + self.num_positions * per_token.to(rows.device, non_blocking=True)
        return self.cos[rows], self.sin[rows]


def _longrope_scale(hf_config, params: dict) -> tuple[float, int]:
    """(attention factor scaling cos and sin, O) as transformers derives them."""
    original = params.get("original_max_position_embeddings",
                          getattr(hf_config, "original_max_position_embeddings", None))
    if original is None:
        raise ModelLoadError("A longrope checkpoint needs original_max_position_embeddings in its "
                             "config.json.")
    factor = params.get("factor")
    if factor is None:   # Phi-3: the ratio of the extended to the pretrained length
        factor = hf_config.max_position_embeddings / original
    scale = params.get("attention_factor")
    if scale is None:
        scale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return scale, original


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
