"""Attention over a ragged batch, reading keys and values from the blocked KV cache.

Sequences with one new token (decodes) run together as one batched call; each sequence with
several new tokens (a prompt chunk) runs on its own. Everything derived from the batch metadata
(which blocks to read, the masks) is built once per step in `AttentionPlan`, not per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class ChunkPlan:
    q_start: int
    q_len: int
    context_len: int          # cached tokens before this step
    blocks: torch.Tensor      # [nb] block ids covering the sequence's keys
    masks: dict = field(default_factory=dict)   # sliding window -> [q_len, L] bool, or None


@dataclass
class AttentionPlan:
    num_decodes: int
    decode_slots: torch.Tensor | None       # [D, L] the cache slot of each decode's keys 0..L-1
    decode_seq_lens: torch.Tensor | None    # [D]
    chunks: list[ChunkPlan]
    decode_masks: dict = field(default_factory=dict)   # sliding window -> [D, 1, 1, L] bool


def plan_attention(batch) -> AttentionPlan:
    bs = batch.block_size
    d = batch.num_decodes
    decode_slots = decode_seq_lens = None
    if d:
        longest = max(c + 1 for c in batch.context_lens[:d])
        blocks = batch.block_tables[:d, :-(-longest // bs)].long()
        decode_seq_lens = batch.seq_lens[:d].long()
        keys = torch.arange(blocks.shape[1] * bs, device=blocks.device)
        slots = blocks.repeat_interleave(bs, dim=1) * bs + keys % bs
        # Keys past a decode's end (the rest of its last block, the blocks a shorter row of the
        # table is padded with) hold whatever a block's earlier owner left there, NaN or inf
        # perhaps, which a weight of 0 does not drop (0 x inf is NaN): they read its first key
        # instead, which the mask hides. Read slot by slot, the gather costs what reading whole
        # blocks did (this machine), and zeroing the slots after it cost 35 us a layer.
        decode_slots = torch.where(keys[None, :] < decode_seq_lens[:, None], slots, slots[:, :1])
    chunks = []
    start = d
    for i in range(d, batch.num_seqs):
        q_len, ctx = batch.query_lens[i], batch.context_lens[i]
        nb = -(-(ctx + q_len) // bs)
        chunks.append(ChunkPlan(start, q_len, ctx, batch.block_tables[i, :nb].long()))
        start += q_len
    return AttentionPlan(d, decode_slots, decode_seq_lens, chunks)


def _gather(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """cache [N, bs, Hkv, D], blocks [nb] -> [Hkv, nb*bs, D]"""
    # index_select, not cache[blocks]: advanced indexing takes a much slower path (bf16 above all).
    kv = cache.index_select(0, blocks).flatten(0, 1)    # [L, Hkv, D]
    return kv.transpose(0, 1)


def _gather_slots(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache [N, bs, Hkv, D], slots [D, L] -> [D, Hkv, L, D]"""
    kv = cache.flatten(0, 1).index_select(0, slots.flatten()).view(*slots.shape, *cache.shape[2:])
    return kv.transpose(1, 2)


def _decode_mask(plan: AttentionPlan, window: int | None, length: int) -> torch.Tensor:
    mask = plan.decode_masks.get(window)
    if mask is None:
        keys = torch.arange(length, device=plan.decode_seq_lens.device)
        mask = keys[None, :] < plan.decode_seq_lens[:, None]                       # [D, L]
        if window is not None:
            mask &= keys[None, :] > (plan.decode_seq_lens[:, None] - 1 - window)
        mask = mask[:, None, None, :]
        plan.decode_masks[window] = mask
    return mask


def _chunk_mask(chunk: ChunkPlan, window: int | None, device) -> torch.Tensor | None:
    """None means plain causal attention over exactly the new tokens (SDPA's is_causal)."""
    if window is None and chunk.context_len == 0:
        return None
    if window not in chunk.masks:
        q_pos = torch.arange(chunk.q_len, device=device)[:, None] + chunk.context_len
        k_pos = torch.arange(chunk.context_len + chunk.q_len, device=device)[None, :]
        mask = k_pos <= q_pos
        if window is not None:
            mask &= k_pos > q_pos - window
        chunk.masks[window] = mask
    return chunk.masks[window]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    plan: AttentionPlan, scale: float, window: int | None) -> torch.Tensor:
    """q: [T, H, D] -> [T, H, D]; caches: [num_blocks, block_size, Hkv, D]."""
    out = torch.empty_like(q)
    heads, kv_heads, dim = q.shape[1], k_cache.shape[2], q.shape[2]
    d = plan.num_decodes
    if d:
        # Each decode's query heads of one group share a key head: treat the group as the query axis.
        k = _gather_slots(k_cache, plan.decode_slots)            # [D, Hkv, L, Dh]
        v = _gather_slots(v_cache, plan.decode_slots)
        mask = _decode_mask(plan, window, k.shape[2])
        qd = q[:d].view(d, kv_heads, heads // kv_heads, dim)     # [D, Hkv, G, Dh]
        o = F.scaled_dot_product_attention(qd, k, v, attn_mask=mask, scale=scale)
        out[:d] = o.reshape(d, heads, dim)
    for chunk in plan.chunks:
        length = chunk.context_len + chunk.q_len
        k = _gather(k_cache, chunk.blocks)[:, :length]           # [Hkv, L, Dh]
        v = _gather(v_cache, chunk.blocks)[:, :length]
        qc = q[chunk.q_start:chunk.q_start + chunk.q_len].transpose(0, 1)   # [H, n, Dh]
        mask = _chunk_mask(chunk, window, q.device)
        o = F.scaled_dot_product_attention(qc[None], k[None], v[None], attn_mask=mask,
                                           is_causal=mask is None, scale=scale, enable_gqa=True)
        out[chunk.q_start:chunk.q_start + chunk.q_len] = o[0].transpose(0, 1)
    return out
