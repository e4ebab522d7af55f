"""RaggedBatch.build against the same metadata worked out token by token with plain loops."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastgen.ragged_batch import RaggedBatch
from fastgen.request import SamplingParams, Sequence

CPU = torch.device("cpu")


def make_seq(num_tokens: int, num_computed: int, block_ids: list[int], first_token: int = 0):
    """A sequence of `num_tokens` distinct tokens, the first `num_computed` of them cached."""
    seq = Sequence(f"r{first_token}", list(range(first_token, first_token + num_tokens)),
                   SamplingParams())
    seq.num_computed = num_computed
    seq.block_ids = list(block_ids)
    return seq


def expected_metadata(scheduled, block_size):
    """Everything RaggedBatch should hold, one token at a time."""
    order = [p for p in scheduled if p[1] == 1] + [p for p in scheduled if p[1] != 1]
    exp = dict(input_ids=[], positions=[], query_start_loc=[0], seq_lens=[], slot_mapping=[],
               logits_indices=[], sequences=[], sampling_seqs=[], query_lens=[], context_lens=[])
    flat = 0
    for seq, n in order:
        exp["sequences"].append(seq)
        exp["query_lens"].append(n)
        exp["context_lens"].append(seq.num_computed)
        for pos in range(seq.num_computed, seq.num_computed + n):
            exp["input_ids"].append(seq.token_ids[pos])
            exp["positions"].append(pos)
            exp["slot_mapping"].append(seq.block_ids[pos // block_size] * block_size
                                       + pos % block_size)
            flat += 1
        exp["query_start_loc"].append(flat)
        exp["seq_lens"].append(seq.num_computed + n)
        if seq.num_computed + n == len(seq.token_ids):   # computes its last pending token
            exp["logits_indices"].append(flat - 1)
            exp["sampling_seqs"].append(seq)
    width = max(len(s.block_ids) for s, _ in order)
    exp["block_tables"] = [s.block_ids + [0] * (width - len(s.block_ids)) for s, _ in order]
    exp["num_decodes"] = sum(1 for _, n in order if n == 1)
    return exp


def check(batch: RaggedBatch, exp: dict, block_size: int) -> None:
    tensors = dict(input_ids=torch.int64, positions=torch.int64, query_start_loc=torch.int32,
                   seq_lens=torch.int32, block_tables=torch.int32, slot_mapping=torch.int64,
                   logits_indices=torch.int64)
    for name, dtype in tensors.items():
        value = getattr(batch, name)
        assert value.dtype == dtype, name
        assert value.tolist() == exp[name], name
    assert batch.sequences == exp["sequences"]
    assert batch.sampling_seqs == exp["sampling_seqs"]
    assert batch.query_lens == exp["query_lens"]
    assert batch.context_lens == exp["context_lens"]
    assert batch.num_decodes == exp["num_decodes"]
    assert batch.num_tokens == len(exp["input_ids"])
    assert batch.num_seqs == len(exp["sequences"])
    assert batch.block_size == block_size


def test_mixed_batch_by_hand():
    bs = 4
    prefill = make_seq(6, 0, [7, 2], first_token=100)          # whole prompt: samples
    decode = make_seq(10, 9, [0, 5, 3], first_token=200)       # one new token: samples
    chunk = make_seq(13, 4, [1, 6, 4, 8], first_token=300)     # tokens 4..9 of 13: no sample
    one_of_prompt = make_seq(9, 5, [9, 10], first_token=400)   # a 1-token chunk mid-prompt
    scheduled = [(prefill, 6), (decode, 1), (chunk, 6), (one_of_prompt, 1)]
    batch = RaggedBatch.build(scheduled, bs, CPU)

    # Spelled out: decodes first (decode, one_of_prompt), then prefill and chunk, in plan order.
    assert batch.sequences == [decode, one_of_prompt, prefill, chunk]
    assert batch.num_decodes == 2
    assert batch.input_ids.tolist() == [209, 405, 100, 101, 102, 103, 104, 105,
                                        304, 305, 306, 307, 308, 309]
    assert batch.positions.tolist() == [9, 5, 0, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8, 9]
    assert batch.query_start_loc.tolist() == [0, 1, 2, 8, 14]
    assert batch.seq_lens.tolist() == [10, 6, 6, 10]
    # decode pos 9 -> block 3 slot 1; one_of_prompt pos 5 -> block 10 slot 1;
    # prefill 0..3 -> block 7, 4..5 -> block 2; chunk 4..7 -> block 6, 8..9 -> block 4.
    assert batch.slot_mapping.tolist() == [13, 41, 28, 29, 30, 31, 8, 9,
                                           24, 25, 26, 27, 16, 17]
    assert batch.logits_indices.tolist() == [0, 7]
    assert batch.sampling_seqs == [decode, prefill]
    assert batch.block_tables.tolist() == [[0, 5, 3, 0], [9, 10, 0, 0], [7, 2, 0, 0], [1, 6, 4, 8]]
    check(batch, expected_metadata(scheduled, bs), bs)


@st.composite
def plans(draw):
    block_size = draw(st.sampled_from([1, 2, 4, 16]))
    next_block = 0
    scheduled = []
    for i in range(draw(st.integers(1, 6))):
        num_tokens = draw(st.integers(1, 40))
        num_computed = draw(st.integers(0, num_tokens - 1))
        n = draw(st.integers(1, num_tokens - num_computed))
        blocks_needed = -(-(num_computed + n) // block_size)
        extra = draw(st.integers(0, 1))   # a block held beyond this step's needs is allowed
        blocks = list(range(next_block, next_block + blocks_needed + extra))
        next_block += len(blocks)
        scheduled.append((make_seq(num_tokens, num_computed, blocks, first_token=1000 * i), n))
    # Shuffle the pool so block ids are not in token order.
    perm = draw(st.permutations(range(next_block)))
    for seq, _ in scheduled:
        seq.block_ids = [perm[b] for b in seq.block_ids]
    return scheduled, block_size


@given(plans())
@settings(max_examples=80, deadline=None)
def test_random_plans_match_loops(plan):
    scheduled, block_size = plan
    batch = RaggedBatch.build(scheduled, block_size, CPU)
    check(batch, expected_metadata(scheduled, block_size), block_size)
    # Every new token gets its own KV slot.
    slots = batch.slot_mapping.tolist()
    assert len(set(slots)) == len(slots)


def test_build_does_not_change_the_sequences():
    seq = make_seq(5, 2, [3], first_token=0)
    RaggedBatch.build([(seq, 3)], 8, CPU)
    assert (seq.num_computed, seq.block_ids, seq.token_ids) == (2, [3], [0, 1, 2, 3, 4])


def test_block_tables_follow_blocks_across_steps_grown_freed_and_replaced():
    """A sequence's block-table row is kept from step to step and only its new blocks converted:
    each step's table must still be the sequence's blocks as they are then, when the list grew in
    place (as the engine adds blocks), when it was freed and given new blocks of the same count
    (a preemption), and when the list shrank in place."""
    block_size = 4
    seq = make_seq(40, 3, [7], first_token=0)
    other = make_seq(9, 8, [1, 2, 3], first_token=100)
    steps = []

    def step(n):
        scheduled = [(seq, n), (other, 1)]
        check(RaggedBatch.build(scheduled, block_size, CPU), expected_metadata(scheduled, block_size),
              block_size)
        steps.append(list(seq.block_ids))

    step(1)
    seq.num_computed = 4
    seq.block_ids += [9, 11]            # grown in place, as Engine schedules
    step(6)
    seq.block_ids.append(12)
    seq.num_computed = 10
    step(4)
    freed = seq.block_ids
    seq.block_ids = []                  # preempted: freed, then the same number of other blocks
    seq.block_ids += [20, 21, 22, 23]
    seq.num_computed = 0
    step(13)
    del seq.block_ids[2:]               # shrunk in place
    seq.num_computed = 2
    step(5)
    assert steps == [[7], [7, 9, 11], [7, 9, 11, 12], [20, 21, 22, 23], [20, 21]]
    assert freed == [7, 9, 11, 12]      # the freed list is the caller's; the sequence holds a new one


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tensors_land_on_the_cuda_device_with_the_hosts_values():
    # Copied from pinned staging buffers without waiting: batches built back to back must not
    # see each other's values (the pinned allocator hands a buffer out again only after its copy).
    plans = [[(make_seq(40 + i, i, list(range(i, i + 8)), first_token=100 * i), 40),
              (make_seq(9, 8, [i, i + 1], first_token=50), 1)] for i in range(20)]
    batches = [RaggedBatch.build(plan, 8, torch.device("cuda")) for plan in plans]
    for plan, batch in zip(plans, batches):
        check(batch, expected_metadata(plan, 8), 8)
        for name in ("input_ids", "positions", "query_start_loc", "seq_lens", "block_tables",
                     "slot_mapping", "logits_indices"):
            assert getattr(batch, name).device.type == "cuda", name
