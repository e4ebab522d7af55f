"""The query tiles both GPU attention backends plan: every new token in exactly one tile, in batch
order or longest first."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fastgen.plugins.kernels.query_tiles import query_tiles, tile_keys

# (cached keys, new tokens) per sequence.
sequences = st.lists(st.tuples(st.integers(0, 300), st.integers(1, 70)), min_size=1, max_size=8)


@given(sequences, st.sampled_from([1, 8, 16, 64]), st.sampled_from([1, 2]), st.booleans())
def test_every_new_token_is_in_one_tile_in_either_order(shapes, tile_tokens, min_tokens, longest_first):
    context_lens, query_lens = [c for c, _ in shapes], [n for _, n in shapes]
    seq_ids, starts = query_tiles(query_lens, tile_tokens, min_tokens,
                                  context_lens if longest_first else None)
    covered = sorted((s, start + i) for s, start in zip(seq_ids, starts)
                     for i in range(min(tile_tokens, query_lens[s] - start)))
    assert covered == [(s, t) for s, n in enumerate(query_lens) if n >= min_tokens for t in range(n)]
    assert all(start % tile_tokens == 0 for start in starts)
    keys = [tile_keys(context_lens[s], query_lens[s], start, tile_tokens)
            for s, start in zip(seq_ids, starts)]
    if longest_first:
        assert keys == sorted(keys, reverse=True)
        # Ties keep batch order.
        assert all((seq_ids[i], starts[i]) < (seq_ids[i + 1], starts[i + 1])
                   for i in range(len(keys) - 1) if keys[i] == keys[i + 1])
    else:
        assert list(zip(seq_ids, starts)) == sorted(zip(seq_ids, starts))


def test_a_long_prompt_after_short_ones_starts_first():
    # Two decodes and a 40-token prompt behind a 100-token context, in tiles of 16.
    seq_ids, starts = query_tiles([1, 1, 40], 16, context_lens=[50, 5, 100])
    assert list(zip(seq_ids, starts)) == [(2, 32), (2, 16), (2, 0), (0, 0), (1, 0)]
