"""Attention over a ragged batch in one launch, reading K/V from the blocked cache through block tables.

Work is cut into tiles: a tile is up to `tile_tokens` consecutive new tokens of one sequence (a
decode is a tile of one token). One program handles one tile for one KV head, with the query heads
of that head's group packed next to the tile's tokens along the M axis (row m: token m // G, head
m % G), so grouped-query heads read each K/V block once. It walks the keys the tile may see (causal,
and from the window's start with a sliding window) with an online softmax in float32: first the
steps every row of the tile sees whole, without masks, then the masked ones (the diagonal, the
window's edge). Each step's block ids are loaded a step ahead, so the pipeliner keeps the next
steps' K/V copies in flight while a step computes.

With a cache block of at least a step's keys (a `block_size` of 64, say), each step's keys lie in
one block: its id is one number, and on sm_90 and later the step's K and V can be read as TMA
copies (`tma`), one box of [keys a step, head size] each, issued by one thread through a tensor
descriptor of the cache, instead of a gather whose addresses every thread works out.

Split-KV (flash-decoding): when the tiles are too few to fill the GPU and the contexts are long,
each tile's key range is cut into `num_splits` parts run by separate programs; each writes its
unnormalised output with its running max and sum, and a reduce kernel combines them.

The tiles and the split count are planned once per step in `plan_attention`, not per layer. A
step with prompt chunks lists its tiles longest first (query_tiles.py), and a tile's KV heads are
adjacent in launch order, so the blocks that walk the most keys start first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastgen.staging import staged

from ..query_tiles import step_tiles
from ..split_kv import MIN_SPLIT_KEYS, plan_splits
from ._tiling import FP_FUSION, interpreted, max_shared_bytes, next_power_of_2

LOG2E = 1.4426950408889634
MAX_GRID_TILES = 65535
# A cache of this many elements or more is addressed with 64-bit offsets; smaller ones with 32-bit
# offsets, which take fewer instructions for each key's address (NVIDIA sm_90 SASS).
LARGE_CACHE_ELEMENTS = 2 ** 31


@dataclass
class AttentionPlan:
    num_tiles: int
    # [W] int32: the sequence each tile belongs to, and its first token counted within the
    # sequence's new tokens. None in a decode-only step, where tile i is sequence i's one token:
    # the kernel knows that without reading them, and the step copies nothing to the device.
    tile_seq: torch.Tensor | None
    tile_start: torch.Tensor | None
    tile_tokens: int             # new tokens per tile (1 when the step holds only decodes)
    num_splits: int              # key-range splits per tile; 1 = no split-KV
    query_start_loc: torch.Tensor   # [B+1] int32
    seq_lens: torch.Tensor          # [B] int32
    block_tables: torch.Tensor      # [B, max_blocks] int32
    block_size: int
    # Launch settings; None: chosen by paged_attention from the head size and the device.
    block_n: int | None = None      # keys per step of a program's loop
    num_warps: int | None = None
    num_stages: int | None = None   # software pipelining depth of that loop (Triton's default: 3)
    tma: bool = False               # K/V steps as TMA copies (sm_90+; steps inside a cache block)
    graph_padded: bool = False      # planned for a CUDA graph's padded batch: tiles padded too


def plan_attention(batch, tile_tokens: int | None = None, num_splits: int | None = None,
                   split_min_keys: int = MIN_SPLIT_KEYS, kv_heads: int = 1,
                   block_n: int | None = None, num_warps: int | None = None,
                   num_stages: int | None = None, longest_tiles_first: bool = True,
                   tma: bool = False) -> AttentionPlan:
    """Tiles for every sequence's new tokens and the split count, from the host-side metadata;
    the launch settings given, if any, are kept for paged_attention. `kv_heads`: the model's KV
    heads per layer, each tile's programs without a split. `longest_tiles_first`: the tiles that walk
    the most keys start first (query_tiles.py), else batch order."""
    query_lens = batch.query_lens
    if tile_tokens is None:
        # GPU: 16 tokens times the query group fill a 16-128 row tile. Interpreter: fewer,
        # larger tiles.
        tile_tokens = 64 if interpreted(batch.seq_lens.device) else 16
    # A decode-only step needs no room for more tokens in a tile: the M axis holds just the group.
    decode_only = max(query_lens) == 1
    tokens = 1 if decode_only else tile_tokens
    tile_seq = tile_start = None
    if decode_only:
        num_tiles = num_busy = len(query_lens)
    else:
        seq_ids, starts, num_busy = step_tiles(batch, tokens, longest_first=longest_tiles_first)
        num_tiles = len(seq_ids)
        tile_seq, tile_start = staged(seq_ids + starts, torch.int32, batch.seq_lens.device).split(
            [num_tiles, num_tiles])
    if num_tiles > MAX_GRID_TILES:
        raise ValueError(f"{num_tiles} attention tiles in one step; a launch takes at most "
                         f"{MAX_GRID_TILES} (a CUDA grid's second dimension): lower max_num_seqs or "
                         f"the token budget")
    if num_splits is None:
        # Counted without a graph's empty tiles, which end at once: the split eager steps get.
        num_splits = plan_splits(batch, num_busy * kv_heads, split_min_keys)
    return AttentionPlan(
        num_tiles=num_tiles, tile_seq=tile_seq, tile_start=tile_start,
        tile_tokens=tokens, num_splits=max(1, num_splits),
        query_start_loc=batch.query_start_loc, seq_lens=batch.seq_lens,
        block_tables=batch.block_tables, block_size=batch.block_size,
        block_n=block_n, num_warps=num_warps, num_stages=num_stages, tma=tma,
        graph_padded=batch.graph_padded)


def decode_only(plan: AttentionPlan) -> bool:
    """The step holds decodes only: tile i is sequence i's one token, and the plan lists no tiles
    (what a CUDA graph of the step can replay). Not `tile_tokens == 1`: a step with prompt chunks
    may have one-token tiles too, listed."""
    return plan.tile_seq is None


@triton.jit
def _block_ids(table_ptr, step, cols, hi, BLOCK_N: tl.constexpr, CACHE_BLOCK: tl.constexpr,
               LARGE_CACHE: tl.constexpr, TMA: tl.constexpr):
    """Where step `step`'s keys lie in the cache: [N] the block of each key (block 0 for a key at
    or past `hi`) when a step may cross blocks; one block id when a cache block holds whole steps;
    with TMA, the row of the step's first key in the cache seen as [blocks x block size, KV heads
    x head size]. int64 only where a cache's offsets need it (a TMA coordinate is 32 bits)."""
    first = step * BLOCK_N
    if CACHE_BLOCK % BLOCK_N == 0:
        block = tl.load(table_ptr + first // CACHE_BLOCK, mask=first < hi, other=0)
        if TMA:
            block = block * CACHE_BLOCK + first % CACHE_BLOCK
    else:
        keys = first + cols
        block = tl.load(table_ptr + keys // CACHE_BLOCK, mask=keys < hi, other=0)
    if LARGE_CACHE and not TMA:
        block = block.to(tl.int64)
    return block


@triton.jit
def _attend(acc, running_max, running_sum, q, keys, block, k_cache_ptr, v_cache_ptr, slot_off,
            q_pos, hi, scale_log2, window, stride_cb, stride_cs, head_off,
            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
            CACHE_BLOCK: tl.constexpr, MASKED: tl.constexpr, SLIDING: tl.constexpr,
            FP32_DOT: tl.constexpr, TMA: tl.constexpr):
    """One step of the online softmax over BLOCK_N keys, which lie where `block` says
    (_block_ids). Unmasked, every row sees every key (the caller's promise): no key range check, no
    -inf to guard. `slot_off`: each key's offset within its block (slot and KV head), the same
    every step when steps hold whole blocks; else worked out here. With TMA the caches are tensor
    descriptors and `head_off` the KV head's first column."""
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    if MASKED:
        key_ok = keys < hi
    if TMA:
        # A box copy has no per-key mask: keys at or past `hi` in the step's block are read as they
        # are, whatever an earlier owner of the block left there; their scores are dropped below.
        k = k_cache_ptr.load([block, head_off])
    else:
        if BLOCK_N % CACHE_BLOCK != 0:
            slot_off = (keys % CACHE_BLOCK) * stride_cs + head_off
        # K and V share a layout (paged_attention checks): one row offset addresses both.
        rows = (block * stride_cb + slot_off)[:, None] + d[None, :]
        if MASKED:
            kv_mask = key_ok[:, None] & d_ok[None, :]
        else:
            kv_mask = d_ok[None, :]
        k = tl.load(k_cache_ptr + rows, mask=kv_mask, other=0.0)          # [N, D]
    if FP32_DOT:
        scores = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        scores = tl.dot(q, tl.trans(k))
    # Scores stay unscaled; the running max is in log2 units for exp2. Scaling a row's max (the
    # scale is positive) gives the max of its scaled scores, and each score's scale and shift
    # below is one fma.
    if MASKED:
        visible = key_ok[None, :] & (keys[None, :] <= q_pos[:, None])
        if SLIDING:
            visible = visible & (keys[None, :] > q_pos[:, None] - window)
        scores = tl.where(visible, scores, float("-inf"))
    new_max = tl.maximum(running_max, tl.max(scores, axis=1) * scale_log2)
    if MASKED:
        # A row that has seen no visible key yet keeps max -inf: subtract 0 instead, to get 0, not NaN.
        new_max_safe = tl.where(new_max == float("-inf"), 0.0, new_max)
    else:
        new_max_safe = new_max
    alpha = tl.exp2(running_max - new_max_safe)
    p = tl.exp2(scores * scale_log2 - new_max_safe[:, None])
    running_sum = running_sum * alpha + tl.sum(p, axis=1)
    if TMA:
        v = v_cache_ptr.load([block, head_off])
        if MASKED:
            # A weight of 0 does not drop a non-finite value (0 x inf is NaN), and a block's
            # earlier owner may have left one (a model that overflowed in float16).
            v = tl.where(key_ok[:, None], v, 0.0)
    else:
        v = tl.load(v_cache_ptr + rows, mask=kv_mask, other=0.0)
    if FP32_DOT:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, new_max, running_sum


# The step's sizes and metadata (views at offsets into one staging buffer) are not specialised on:
# see _tiling.py.
@triton.jit(do_not_specialize=["num_tokens", "stride_bt"],
            do_not_specialize_on_alignment=["tile_seq_ptr", "tile_start_ptr", "query_start_loc_ptr",
                                            "seq_lens_ptr", "block_tables_ptr"])
def _attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_max_ptr, part_sum_ptr,
        tile_seq_ptr, tile_start_ptr, query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
        scale_log2, window, num_tokens, num_heads,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_cb, stride_cs, stride_ch, stride_bt,
        GROUP: tl.constexpr, TILE_TOKENS: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
        CACHE_BLOCK: tl.constexpr, NUM_SPLITS: tl.constexpr, SLIDING: tl.constexpr,
        FP32_DOT: tl.constexpr, TILES_LISTED: tl.constexpr, LARGE_CACHE: tl.constexpr,
        TMA: tl.constexpr):
    # KV heads vary fastest in launch order: a tile's heads start together, in the plan's order.
    kv_head = tl.program_id(0)
    tile = tl.program_id(1)
    split = tl.program_id(2)
    if TILES_LISTED:
        seq = tl.load(tile_seq_ptr + tile)
        start = tl.load(tile_start_ptr + tile)
    else:
        seq = tile
        start = 0
    q_begin = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_begin
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    token = start + rows // GROUP                          # within the sequence's new tokens
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < TILE_TOKENS * GROUP) & (token < q_len)
    q_pos = context + token                                # [M] each row's position
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    flat = (q_begin + token).to(tl.int64)
    q = tl.load(q_ptr + flat[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # Keys [lo, hi): up to the tile's last token (causal), from the window start of its first,
    # walked in steps of BLOCK_N keys from a multiple of BLOCK_N (the mask drops those below lo).
    last = tl.minimum(start + TILE_TOKENS, q_len) - 1      # the tile's last token
    hi = context + last + 1
    lo = 0
    if SLIDING:
        lo = tl.maximum(context + start - window + 1, 0)
    step_lo = lo // BLOCK_N
    per_split = tl.cdiv(tl.cdiv(hi, BLOCK_N) - step_lo, NUM_SPLITS)
    first_step = step_lo + split * per_split
    end_step = tl.minimum(first_step + per_split, tl.cdiv(hi, BLOCK_N))
    # Steps every row sees whole, [a, b), need no mask: keys up to the first token's position,
    # from the window start of the last token's.
    full_lo = 0
    if SLIDING:
        full_lo = tl.maximum(tl.cdiv(context + last - window + 1, BLOCK_N), 0)
    a = tl.minimum(tl.maximum(full_lo, first_step), end_step)
    b = tl.minimum(tl.maximum((context + start + 1) // BLOCK_N, a), end_step)

    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    cols = tl.arange(0, BLOCK_N)
    # A TMA copy is addressed by (row, column) in the cache seen as 2-D: the head's first column.
    head_off = kv_head * (HEAD_DIM if TMA else stride_ch)
    # Each key's offset within its block: the same every step when steps hold whole blocks.
    slot_off = (cols % CACHE_BLOCK) * stride_cs + head_off
    table = block_tables_ptr + seq * stride_bt
    # Each step's block ids are loaded a step ahead and carried: a K/V load whose address comes
    # from a load in its own step is one Triton's pipeliner issues only after the step's work, so
    # no copy would overlap a product (seen in the sm_90 TTGIR, Triton 3.6 and 3.9).
    block = _block_ids(table, a, cols, hi, BLOCK_N, CACHE_BLOCK, LARGE_CACHE, TMA)
    for step in range(a, b):
        next_block = _block_ids(table, step + 1, cols, hi, BLOCK_N, CACHE_BLOCK, LARGE_CACHE, TMA)
        acc, running_max, running_sum = _attend(
            acc, running_max, running_sum, q, step * BLOCK_N + cols, block, k_cache_ptr,
            v_cache_ptr, slot_off, q_pos, hi, scale_log2, window, stride_cb, stride_cs, head_off,
            BLOCK_N, BLOCK_D, HEAD_DIM, CACHE_BLOCK, False, SLIDING, FP32_DOT, TMA)
        block = next_block
    # The masked steps: [first_step, a) below the window's edge and [b, end_step) at the diagonal.
    num_below = a - first_step
    masked_step = tl.where(num_below > 0, first_step, b)
    block = _block_ids(table, masked_step, cols, hi, BLOCK_N, CACHE_BLOCK, LARGE_CACHE, TMA)
    for i in range(0, num_below + end_step - b):
        step = masked_step
        masked_step = tl.where(i + 1 < num_below, first_step + i + 1, b + i + 1 - num_below)
        next_block = _block_ids(table, masked_step, cols, hi, BLOCK_N, CACHE_BLOCK, LARGE_CACHE, TMA)
        acc, running_max, running_sum = _attend(
            acc, running_max, running_sum, q, step * BLOCK_N + cols, block, k_cache_ptr,
            v_cache_ptr, slot_off, q_pos, hi, scale_log2, window, stride_cb, stride_cs, head_off,
            BLOCK_N, BLOCK_D, HEAD_DIM, CACHE_BLOCK, True, SLIDING, FP32_DOT, TMA)
        block = next_block

    store_mask = row_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS == 1:
        out = acc / tl.where(running_sum == 0.0, 1.0, running_sum)[:, None]
        tl.store(out_ptr + flat[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        # Partials: [splits, T, H, D] outputs and [splits, T, H] max and sum, all contiguous.
        row = (split * num_tokens + flat) * num_heads + head
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=store_mask)
        tl.store(part_max_ptr + row, running_max, mask=row_ok)
        tl.store(part_sum_ptr + row, running_sum, mask=row_ok)


@triton.jit(do_not_specialize=["num_tokens"])
def _reduce_splits_kernel(part_out_ptr, part_max_ptr, part_sum_ptr, out_ptr, num_tokens, num_heads,
                          stride_ot, stride_oh,
                          NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                          HEAD_DIM: tl.constexpr):
    token = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < NUM_SPLITS
    row = (s * num_tokens + token) * num_heads + head     # [S]
    maxes = tl.load(part_max_ptr + row, mask=s_ok, other=float("-inf"))
    sums = tl.load(part_sum_ptr + row, mask=s_ok, other=0.0)
    top = tl.max(maxes, axis=0)      # finite: every query sees at least its own key
    weights = tl.where(s_ok & (maxes > float("-inf")), tl.exp2(maxes - top), 0.0)
    total = tl.sum(weights * sums, axis=0)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    parts = tl.load(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :],
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(parts * weights[:, None], axis=0) / total
    tl.store(out_ptr + token * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty),
             mask=d_ok)


def pipeline_stages(block_m: int, block_n: int, block_d: int, itemsize: int,
                    shared_limit: int | None) -> int:
    """Triton's default depth, 3 (two steps' keys and values in flight besides the one in use),
    unless that would not fit the shared memory a program may use (float32 with head size 128 on
    a 100 KB GPU: RTX 3090, 4090): then 2. Counted as Q plus every stage's K and V tile: what the
    compiler takes in 16 bits, more than it takes in float32 (sm_86: 104 KB of 128 counted)."""
    needs = (block_m + 2 * 3 * block_n) * block_d * itemsize
    return 3 if shared_limit is None or needs <= shared_limit else 2


def tma_unfit_reason(k_cache: torch.Tensor, block_n: int, block_d: int) -> str | None:
    """Why the attention cannot read `k_cache` in TMA copies of `block_n` keys, or None."""
    num_blocks, block_size, kv_heads, dim = k_cache.shape
    if block_d != dim:
        return f"a copy spans one head, and head size {dim} is not a power of 2 of at least 16"
    if block_size % block_n:
        return (f"a step's {block_n} keys must lie in one cache block, and a block holds "
                f"{block_size} tokens: use a block_size that is a multiple of {block_n}")
    if not k_cache.is_contiguous():
        return f"the copies address the cache as one [blocks x block size, heads x head size] " \
               f"matrix, which needs it contiguous (strides {k_cache.stride()})"
    if k_cache.device.type == "cuda" and torch.cuda.get_device_capability(k_cache.device)[0] < 9:
        return "TMA copies need an sm_90 GPU or later (Hopper, Blackwell)"
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return f"this Triton ({triton.__version__}) has no tensor descriptors: Triton 3.4 or later has"
    return None


MAX_KEPT_DESCRIPTORS = 256


def cache_descriptors(k_cache: torch.Tensor, v_cache: torch.Tensor, block_n: int, block_d: int,
                      kept: dict | None = None):
    """Tensor descriptors of the K and V caches seen as [blocks x block size, KV heads x head size]
    matrices, each copy a [block_n, head size] box; ValueError where the cache does not allow them.
    `kept`: descriptors made before, by the caches' addresses, shape, dtype and keys a step (16 us
    for the pair on the host, every layer of every step, saved). A descriptor keeps its cache's
    memory alive, so no other cache can take that address while its entry is kept; whoever owns
    `kept` (a backend, with its engine) lets the memory go with it."""
    key = (k_cache.data_ptr(), v_cache.data_ptr(), k_cache.device, tuple(k_cache.shape),
           k_cache.dtype, block_n)
    found = kept.get(key) if kept is not None else None
    if found is not None:
        return found
    reason = tma_unfit_reason(k_cache, block_n, block_d)
    if reason:
        raise ValueError(f"kernels.triton attention cannot read the KV cache in TMA copies: {reason}")
    from triton.tools.tensor_descriptor import TensorDescriptor

    num_blocks, block_size, kv_heads, dim = k_cache.shape
    shape = [num_blocks * block_size, kv_heads * dim]
    found = tuple(TensorDescriptor(cache.view(shape), shape, [shape[1], 1], [block_n, dim])
                  for cache in (k_cache, v_cache))
    if kept is not None and k_cache.device.type != "meta":   # meta tensors all sit at address 0
        if len(kept) >= MAX_KEPT_DESCRIPTORS:
            kept.clear()
        kept[key] = found
    return found


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    plan: AttentionPlan, scale: float, window: int | None,
                    descriptors: dict | None = None) -> torch.Tensor:
    """q: [T, H, D] (last dim contiguous); caches: [num_blocks, block_size, Hkv, D] -> [T, H, D].
    `descriptors`: where the caches' TMA descriptors are kept between calls (cache_descriptors)."""
    tokens, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    cache_strides = k_cache.stride()
    if v_cache.stride() != cache_strides or v_cache.shape != k_cache.shape:
        raise ValueError(f"kernels.triton attention reads K and V at the same offsets: the caches must "
                         f"share a shape and strides, got {tuple(k_cache.shape)} {cache_strides} and "
                         f"{tuple(v_cache.shape)} {v_cache.stride()}")
    group = heads // kv_heads
    out = torch.empty(tokens, heads, dim, dtype=q.dtype, device=q.device)
    splits = plan.num_splits
    if splits > 1:
        part_out = torch.empty(splits, tokens, heads, dim, dtype=torch.float32, device=q.device)
        part_max = torch.empty(splits, tokens, heads, dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
    else:
        part_out = part_max = part_sum = out   # unused: the kernel writes `out` directly
    # tl.dot needs at least 16 rows; a decode tile is just the group's heads.
    block_m = max(16, next_power_of_2(plan.tile_tokens * group))
    block_d = max(16, next_power_of_2(dim))
    block_n = plan.block_n or (64 if block_d <= 64 or interpreted(q.device) else 32)
    num_warps = plan.num_warps or (4 if block_m * block_d <= 64 * 128 else 8)
    stages = plan.num_stages or pipeline_stages(block_m, block_n, block_d, q.element_size(),
                                                max_shared_bytes(q.device))
    k_source, v_source = k_cache, v_cache
    if plan.tma:
        k_source, v_source = cache_descriptors(k_cache, v_cache, block_n, block_d, descriptors)
    grid = (kv_heads, plan.num_tiles, splits)
    # A decode-only step's kernel reads no tiles: any int32 tensor stands in for them.
    listed = not decode_only(plan)
    tile_seq = plan.tile_seq if listed else plan.seq_lens
    tile_start = plan.tile_start if listed else plan.seq_lens
    _attention_kernel[grid](
        q, k_source, v_source, out, part_out, part_max, part_sum,
        tile_seq, tile_start, plan.query_start_loc, plan.seq_lens, plan.block_tables,
        scale * LOG2E, window or 0, tokens, heads,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *cache_strides[:3], plan.block_tables.stride(0),
        GROUP=group, TILE_TOKENS=plan.tile_tokens, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=block_d, HEAD_DIM=dim, CACHE_BLOCK=plan.block_size, NUM_SPLITS=splits,
        SLIDING=window is not None, FP32_DOT=q.dtype == torch.float32, TILES_LISTED=listed,
        LARGE_CACHE=k_cache.numel() >= LARGE_CACHE_ELEMENTS, TMA=plan.tma,
        num_warps=num_warps, num_stages=stages, enable_fp_fusion=FP_FUSION)
    if splits > 1:
        _reduce_splits_kernel[(tokens, heads)](
            part_out, part_max, part_sum, out, tokens, heads, out.stride(0), out.stride(1),
            NUM_SPLITS=splits, BLOCK_S=next_power_of_2(splits), BLOCK_D=block_d,
            HEAD_DIM=dim, enable_fp_fusion=FP_FUSION)
    return out
