"""The torch reference backend: every op of the set in plain PyTorch, on CPU or CUDA."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastgen.kernels import SamplingMetadata, cuda_unavailable_reason

from .attention import paged_attention, plan_attention
from .sampling import sample


class TorchBackend:
    name = "torch"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @classmethod
    def unavailable_reason(cls, device: torch.device | None) -> str | None:
        if device is not None and device.type == "cuda":
            cuda_reason = cuda_unavailable_reason()
            return None if cuda_reason is None else f"{cuda_reason}."
        return None

    @classmethod
    def auto_rank(cls, device: torch.device, cache_dir: str | None = None) -> int:
        return 0   # the floor of `kernels = auto`: runs on every device, nothing to build

    def prepare(self, batch):
        return plan_attention(batch)

    def write_kv(self, key, value, k_cache, v_cache, slot_mapping) -> None:
        # key, value: [T, Hkv, D]; caches: [N, bs, Hkv, D]
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, key)
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, value)

    def attention(self, q, k_cache, v_cache, batch, scale, sliding_window=None):
        return paged_attention(q, k_cache, v_cache, batch.attn_metadata, scale, sliding_window)

    def rms_norm(self, x, weight, eps, residual=None):
        # x: [T, E]. Normalised in float32 and scaled in the input dtype, as the reference models do.
        if residual is not None:
            x = x + residual
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * normed.to(x.dtype), x

    def rotary(self, q, k, cos, sin, is_neox=True):
        # q: [T, H, D], k: [T, Hkv, D], cos/sin: [T, R/2]
        return _rotate(q, cos, sin, is_neox), _rotate(k, cos, sin, is_neox)

    def silu_and_mul(self, x):
        # x: [T, 2I] -> [T, I]
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    def sample(self, logits: torch.Tensor, meta: SamplingMetadata,
               generator: torch.Generator | None = None) -> torch.Tensor:
        return sample(logits, meta, generator)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    rot = cos.shape[-1] * 2
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    x_rot = x[..., :rot]
    if is_neox:
        x1, x2 = x_rot.chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:  # gpt-j: interleaved pairs
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    if rot == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., rot:]), dim=-1)
