"""Query tiles: a step's new tokens cut into runs of consecutive new tokens of one sequence, the
unit of work of the GPU attention kernels (kernels.triton's every tile, kernels.cuda's prompt
chunks). Planned once per step from the host-side lengths, so no device sync."""

from __future__ import annotations


def query_tiles(query_lens: list[int], tile_tokens: int, min_tokens: int = 1) -> tuple[list[int], list[int]]:
    """The (sequence, first new token) of each tile of up to `tile_tokens` new tokens, over the
    sequences with at least `min_tokens` new tokens, in batch order."""
    seq_ids, starts = [], []
    for seq, n in enumerate(query_lens):
        if n < min_tokens:
            continue
        for start in range(0, n, tile_tokens):
            seq_ids.append(seq)
            starts.append(start)
    return seq_ids, starts
