"""The query tiles both GPU attention backends plan: every new token in exactly one tile, in batch
order or longest first."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from fastgen.plugins.kernels.query_tiles import query_tiles, step_tiles, tile_bound, tile_keys
from fastgen.ragged_batch import RaggedBatch

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


@given(st.lists(st.integers(0, 70), min_size=1, max_size=12), st.sampled_from([1, 8, 16, 64]),
       st.sampled_from([1, 2]))
def test_the_tile_bound_holds_for_every_split_of_the_tokens(query_lens, tile_tokens, min_tokens):
    """No batch of up to T tokens over up to B sequences has more tiles than tile_bound(T, B): what a
    graph's padded plan lists, so every step of its size fits the captured grid."""
    tiles, _ = query_tiles(query_lens, tile_tokens, min_tokens)
    bound = tile_bound(sum(query_lens), len(query_lens), tile_tokens, min_tokens)
    assert len(tiles) <= bound
    # The bound is reached: every sequence with a partial last tile of one token (when they fit).
    seqs = min(len(query_lens), sum(query_lens) // min_tokens)
    if seqs and min_tokens == 1:
        worst = [1] * (seqs - 1) + [sum(query_lens) - (seqs - 1)]
        assert len(query_tiles(worst, tile_tokens, min_tokens)[0]) == bound


def _padded_batch(query_lens, context_lens):
    """The host side of a graph's padded batch: the step's lengths, then the sink's and an empty one."""
    tokens = sum(query_lens)
    return RaggedBatch(input_ids=torch.zeros(tokens), positions=None, query_start_loc=None,
                       seq_lens=None, block_tables=None, slot_mapping=None, logits_indices=None,
                       query_lens=query_lens, context_lens=context_lens, num_decodes=0,
                       block_size=16, sequences=[], sampling_seqs=[], graph_padded=True)


def test_a_graphs_padded_batch_lists_the_bound_of_tiles_the_extra_ones_empty():
    # 3 sequences, a sink of 15 tokens and the empty one: 64 tokens over 4 sequences with tokens.
    seq_ids, starts, busy = step_tiles(_padded_batch([1, 32, 16, 15, 0], [9, 0, 5, 0, 0]), 16)
    assert len(seq_ids) == len(starts) == tile_bound(64, 4, 16) == 7
    assert busy == 5 and seq_ids[busy:] == [4, 4] and starts[busy:] == [0, 0]
    assert sorted(zip(seq_ids[:busy], starts[:busy])) == [(0, 0), (1, 0), (1, 16), (2, 0), (3, 0)]
