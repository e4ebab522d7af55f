"""BlockAllocator: every block has exactly the owners the callers think it has, and errors change nothing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fastgen.block_allocator import BlockAllocator, NoFreeBlocks


def snapshot(allocator: BlockAllocator):
    return allocator.num_free, [allocator.ref_count(b) for b in range(allocator.num_blocks)]


class AllocatorMachine(RuleBasedStateMachine):
    """Owners allocate, share (fork) and free blocks; a plain model tracks who owns what."""

    @initialize(num_blocks=st.integers(1, 12))
    def setup(self, num_blocks):
        self.allocator = BlockAllocator(num_blocks)
        self.owners: dict[int, list[int]] = {}   # owner -> the blocks it holds
        self.freed: list[list[int]] = []          # block lists whose owner has let go
        self.next_owner = 0
        self.cached: dict[int, int] = {}          # prefix-cache key -> block

    def owned_counts(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for blocks in self.owners.values():
            for b in blocks:
                counts[b] = counts.get(b, 0) + 1
        return counts

    def add_owner(self, blocks: list[int]) -> None:
        self.owners[self.next_owner] = blocks
        self.next_owner += 1

    @rule(n=st.integers(0, 12))
    def allocate(self, n):
        owned = self.owned_counts()
        if n > self.allocator.num_free:
            before = snapshot(self.allocator)
            with pytest.raises(NoFreeBlocks):
                self.allocator.allocate(n)
            assert snapshot(self.allocator) == before
            return
        uncached_free = self.allocator.num_free - sum(b not in owned for b in self.cached.values())
        blocks = self.allocator.allocate(n)
        assert len(blocks) == n
        assert len(set(blocks)) == n, f"the same block handed out twice in one call: {blocks}"
        assert not set(blocks) & set(owned), f"handed out blocks someone owns: {blocks}"
        assert all(0 <= b < self.allocator.num_blocks for b in blocks)
        evicted = {k for k, b in self.cached.items() if b in blocks}
        assert len(evicted) == max(0, n - uncached_free), "cached content evicted while plain blocks were free"
        for key in evicted:
            del self.cached[key]
        self.add_owner(blocks)

    @precondition(lambda self: any(self.owners.values()))
    @rule(data=st.data(), key=st.integers(0, 5))
    def cache(self, data, key):
        owner = data.draw(st.sampled_from(sorted(o for o, b in self.owners.items() if b)))
        block = data.draw(st.sampled_from(self.owners[owner]))
        self.allocator.cache(block, key)
        if key not in self.cached and block not in self.cached.values():
            self.cached[key] = block

    @rule(keys=st.lists(st.integers(0, 5), max_size=4))
    def take_cached_prefix(self, keys):
        expected = []
        for key in keys:
            if key not in self.cached:
                break
            expected.append(self.cached[key])
        before = snapshot(self.allocator)
        assert self.allocator.num_cached_prefix(keys) == len(expected)   # a look that takes nothing
        assert snapshot(self.allocator) == before
        blocks = self.allocator.cached_prefix(keys)
        assert blocks == expected
        if blocks:
            self.add_owner(blocks)

    @precondition(lambda self: self.owners)
    @rule(data=st.data())
    def share(self, data):
        owner = data.draw(st.sampled_from(sorted(self.owners)))
        blocks = self.owners[owner]
        self.allocator.share(blocks)
        self.add_owner(list(blocks))

    @precondition(lambda self: self.owners)
    @rule(data=st.data())
    def free(self, data):
        owner = data.draw(st.sampled_from(sorted(self.owners)))
        blocks = self.owners.pop(owner)
        self.allocator.free(blocks)
        self.freed.append(blocks)

    @precondition(lambda self: any(self.freed))
    @rule(data=st.data())
    def double_free(self, data):
        # Blocks nobody owns any more must not be freed again (a shared one may still have owners).
        owned = self.owned_counts()
        candidates = sorted({b for blocks in self.freed for b in blocks} - set(owned))
        if not candidates:
            return
        block = data.draw(st.sampled_from(candidates))
        before = snapshot(self.allocator)
        with pytest.raises(ValueError):
            self.allocator.free([block])
        assert snapshot(self.allocator) == before

    @invariant()
    def ref_counts_match_owners(self):
        owned = self.owned_counts()
        for b in range(self.allocator.num_blocks):
            assert self.allocator.ref_count(b) == owned.get(b, 0)

    @invariant()
    def cache_holds_what_was_cached_and_not_evicted(self):
        assert self.allocator.num_cached == len(self.cached)
        assert self.allocator.cached_prefix([]) == []

    @invariant()
    def free_plus_owned_is_pool(self):
        owned = self.owned_counts()
        assert self.allocator.num_free + len(owned) == self.allocator.num_blocks
        assert self.allocator.num_used == len(owned)


AllocatorMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30,
                                              deadline=None)
TestAllocator = AllocatorMachine.TestCase


@given(num_blocks=st.integers(1, 20), sizes=st.lists(st.integers(1, 5), max_size=10))
@settings(max_examples=60, deadline=None)
def test_everything_freed_returns_to_the_pool(num_blocks, sizes):
    allocator = BlockAllocator(num_blocks)
    held = []
    for n in sizes:
        if n <= allocator.num_free:
            held.append(allocator.allocate(n))
    for blocks in held:
        allocator.free(blocks)
    assert allocator.num_free == num_blocks
    # and the whole pool can be had again, each block once
    assert sorted(allocator.allocate(num_blocks)) == list(range(num_blocks))


def test_shared_block_stays_allocated_until_last_owner_frees():
    allocator = BlockAllocator(4)
    blocks = allocator.allocate(2)
    allocator.share(blocks)
    allocator.free(blocks)
    assert allocator.num_free == 2
    assert all(allocator.ref_count(b) == 1 for b in blocks)
    allocator.free(blocks)
    assert allocator.num_free == 4
    with pytest.raises(ValueError):
        allocator.free(blocks[:1])


def test_share_of_free_block_raises():
    allocator = BlockAllocator(3)
    with pytest.raises(ValueError):
        allocator.share([0])
    assert snapshot(allocator) == (3, [0, 0, 0])


def test_failed_share_changes_nothing():
    allocator = BlockAllocator(3)
    owned = allocator.allocate(1)
    free_block = next(b for b in range(3) if b not in owned)
    before = snapshot(allocator)
    with pytest.raises(ValueError):
        allocator.share(owned + [free_block])
    assert snapshot(allocator) == before


def test_block_ids_outside_the_pool_are_refused():
    allocator = BlockAllocator(2)
    allocator.allocate(2)
    before = snapshot(allocator)
    with pytest.raises((ValueError, IndexError)):
        allocator.free([-1])
    assert snapshot(allocator) == before


def test_pool_must_hold_a_block():
    with pytest.raises(ValueError):
        BlockAllocator(0)


def test_cached_blocks_are_handed_out_last_the_least_recently_freed_first():
    allocator = BlockAllocator(4)
    blocks = allocator.allocate(3)
    for key, block in enumerate(blocks):
        allocator.cache(block, key)
    allocator.free([blocks[1]])
    allocator.free([blocks[0], blocks[2]])      # freed: 1, then 0 and 2
    assert allocator.num_free == 4 and allocator.num_cached == 3
    (plain,) = allocator.allocate(1)
    assert plain not in blocks and allocator.num_cached == 3
    assert allocator.allocate(1) == [blocks[1]]  # the least recently freed goes first
    assert allocator.num_cached == 2
    assert allocator.cached_prefix([0, 1, 2]) == [blocks[0]]   # key 1's block is gone
    assert allocator.cached_prefix([2]) == [blocks[2]] and allocator.ref_count(blocks[2]) == 1
    assert allocator.num_free == 0


def test_only_held_blocks_are_cached_and_first_keys_stay():
    allocator = BlockAllocator(2)
    a, b = allocator.allocate(2)
    allocator.cache(a, "x")
    allocator.cache(b, "x")       # the key keeps its first block
    allocator.cache(a, "y")       # the block keeps its first key
    assert allocator.cached_prefix(["x"]) == [a] and allocator.cached_prefix(["y"]) == []
    allocator.free([a, a, b])
    with pytest.raises(ValueError, match="free"):
        allocator.cache(b, "z")
