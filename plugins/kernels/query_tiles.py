"""Query tiles: a step's new tokens cut into runs of consecutive new tokens of one sequence, the
unit of work of the GPU attention kernels (kernels.triton's every tile, kernels.cuda's prompt
chunks). Planned once per step from the host-side lengths, so no device sync.

The order of the tiles is the order a GPU starts their blocks in. In batch order, a long causal
prompt's tiles come shortest first: the last to start are the ones that walk the most keys, and
they run on alone while the rest of the GPU has nothing left to do. Longest first (the longest
processing time rule), the short tiles fill in around the long ones at the end. In a model of the
block scheduler (benchmarks/tile_order_model.py), one 2048-token prompt of Llama-3-8B (8 KV heads,
16-token tiles, 3 blocks per SM on 132 SMs) ends at 1.12x the ideal time instead of 1.41x.
"""

from __future__ import annotations


def query_tiles(query_lens: list[int], tile_tokens: int, min_tokens: int = 1,
                context_lens: list[int] | None = None) -> tuple[list[int], list[int]]:
    """The (sequence, first new token) of each tile of up to `tile_tokens` new tokens, over the
    sequences with at least `min_tokens` new tokens: in batch order, or, given each sequence's
    cached keys (`context_lens`), the tiles that see the most keys first (ties in batch order)."""
    seq_ids, starts = [], []
    for seq, n in enumerate(query_lens):
        if n < min_tokens:
            continue
        for start in range(0, n, tile_tokens):
            seq_ids.append(seq)
            starts.append(start)
    if context_lens is None:
        return seq_ids, starts
    order = sorted(range(len(seq_ids)), key=lambda i: -tile_keys(
        context_lens[seq_ids[i]], query_lens[seq_ids[i]], starts[i], tile_tokens))
    return [seq_ids[i] for i in order], [starts[i] for i in order]


def tile_keys(context_len: int, query_len: int, start: int, tile_tokens: int) -> int:
    """Keys a causal tile's last query sees: the cached ones and the new ones up to it."""
    return context_len + min(start + tile_tokens, query_len)


def tile_bound(num_tokens: int, num_seqs: int, tile_tokens: int, min_tokens: int = 1) -> int:
    """The most tiles `num_tokens` new tokens over at most `num_seqs` sequences (each with at least
    `min_tokens`, or none) cut into: each sequence's last tile may be partial, so adds at most one."""
    seqs = min(num_seqs, num_tokens // min_tokens)
    return (num_tokens + seqs * (tile_tokens - 1)) // tile_tokens


def step_tiles(batch, tile_tokens: int, min_tokens: int = 1,
               longest_first: bool = True) -> tuple[list[int], list[int], int]:
    """query_tiles for a step, and how many of them hold tokens. A CUDA graph's padded batch
    (`batch.graph_padded`, core/step_graphs.py) gets as many tiles as its sizes can ever need, so
    that every step the graph replays launches the same grid: the tiles past the step's own are
    empty, on its last sequence, which has no new tokens."""
    seq_ids, starts = query_tiles(batch.query_lens, tile_tokens, min_tokens,
                                  batch.context_lens if longest_first else None)
    num_busy = len(seq_ids)
    if batch.graph_padded:
        empty = batch.num_seqs - 1
        if batch.query_lens[empty]:
            raise ValueError("a graph's padded batch must end with a sequence of no new tokens")
        pad = tile_bound(batch.num_tokens, empty, tile_tokens, min_tokens) - len(seq_ids)
        seq_ids += [empty] * pad
        starts += [0] * pad
    return seq_ids, starts, num_busy
