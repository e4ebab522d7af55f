"""How long a causal prompt's attention takes in batch order against longest first, in a model of a
GPU's block scheduler: `slots` blocks run at once, each next block starts on the first slot free,
and a block takes time in proportion to the keys its tile walks (query_tiles.tile_keys). A model,
not a measurement: benchmarks/attention_sweep.py times both orders on a GPU.

    python benchmarks/tile_order_model.py [--prompt 2048] [--cached 0] [--tile 16] [--kv-heads 8]
        [--sms 132] [--blocks-per-sm 3]

The defaults are kernels.triton's on Llama-3-8B; kernels.cuda's: --kv-heads 32 --tile 64
--blocks-per-sm 2.
"""

from __future__ import annotations

import argparse
import heapq

from fastgen.plugins.kernels.query_tiles import query_tiles, tile_keys


def makespan(works: list[int], slots: int) -> int:
    """When the last block ends, the blocks started in list order on the first free slot."""
    free = [0] * slots
    for work in works:
        heapq.heappush(free, heapq.heappop(free) + work)
    return max(free)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", type=int, default=2048, help="new tokens of the one sequence")
    parser.add_argument("--cached", type=int, default=0, help="its cached keys")
    parser.add_argument("--tile", type=int, default=16, help="new tokens per tile")
    parser.add_argument("--kv-heads", type=int, default=8,
                        help="blocks per tile: KV heads for kernels.triton, query heads for kernels.cuda")
    parser.add_argument("--sms", type=int, default=132, help="multiprocessors (H100, H200: 132)")
    parser.add_argument("--blocks-per-sm", type=int, default=3)
    args = parser.parse_args()
    slots = args.sms * args.blocks_per_sm
    for name, contexts in (("batch order", None), ("longest first", [args.cached])):
        seq_ids, starts = query_tiles([args.prompt], args.tile, context_lens=contexts)
        works = [tile_keys(args.cached, args.prompt, start, args.tile)
                 for start in starts for _ in range(args.kv_heads)]
        ideal = sum(works) / slots
        print(f"{name:14} {makespan(works, slots) / ideal:.2f}x the ideal "
              f"({len(works)} blocks on {slots} slots)")


if __name__ == "__main__":
    main()
