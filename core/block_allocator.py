"""BlockAllocator: hands out KV cache blocks from a fixed pool and takes them back, and keeps the
blocks of known prefixes for reuse (prefix caching)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable


class NoFreeBlocks(RuntimeError):
    """Raised when more blocks are asked for than are free; the scheduler prevents this."""


class BlockAllocator:
    """A fixed pool of `num_blocks` KV cache blocks with a reference count per block.

    A block is free exactly when its reference count is 0. Freed blocks are reused
    last-freed-first, which keeps recently used cache memory warm.

    Prefix caching: a held block whose tokens are known (a full block of a sequence) can be
    `cache`d under a key that names its content and everything before it (`block_keys`). Freed,
    it keeps its content and stays findable by `cached_prefix` until it is handed out again;
    `allocate` takes never-cached blocks first, then evicts cached ones, the least recently freed
    first. Cached free blocks count as free.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._ref_counts = [0] * num_blocks
        self._cached_free: OrderedDict[int, None] = OrderedDict()   # free, content kept: oldest first
        self._key_of: dict[int, Hashable] = {}     # block -> the key it is cached under
        self._block_of: dict[Hashable, int] = {}   # key -> block

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._cached_free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks findable by their key, held or free."""
        return len(self._block_of)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise NoFreeBlocks(f"asked for {n} blocks, {self.num_free} free")
        if n <= 0:
            return []
        take = min(n, len(self._free))
        blocks = self._free[len(self._free) - take:]
        del self._free[len(self._free) - take:]
        for _ in range(n - take):   # evict cached content, the least recently freed first
            block, _ = self._cached_free.popitem(last=False)
            del self._block_of[self._key_of.pop(block)]
            blocks.append(block)
        for b in blocks:
            self._ref_counts[b] = 1
        return blocks

    def _check_ids(self, blocks: Iterable[int]) -> None:
        for b in blocks:
            if not 0 <= b < self.num_blocks:
                raise ValueError(f"block {b} is not in the pool of {self.num_blocks} blocks")

    def share(self, blocks: list[int]) -> None:
        """Add an owner to blocks that are already allocated (a fork shares its prefix)."""
        self._check_ids(blocks)
        for b in blocks:  # check all before changing any, so a refused call changes nothing
            if self._ref_counts[b] == 0:
                raise ValueError(f"block {b} is free and cannot be shared")
        for b in blocks:
            self._ref_counts[b] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one owner of each block; a block with no owner left returns to the pool (to the
        cached part, content kept, when it is cached)."""
        self._check_ids(blocks)
        for b in blocks:
            count = self._ref_counts[b]
            if count == 0:
                raise ValueError(f"block {b} is freed twice")
            self._ref_counts[b] = count - 1
            if count == 1:
                if b in self._key_of:
                    self._cached_free[b] = None
                else:
                    self._free.append(b)

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    # --- prefix caching ----------------------------------------------------------------------

    def cache(self, block: int, key: Hashable) -> None:
        """Make held `block` findable under `key`. A key already cached keeps its first block;
        a block already cached keeps its first key (its content cannot change while held)."""
        self._check_ids([block])
        if self._ref_counts[block] == 0:
            raise ValueError(f"block {block} is free: only a held block's content is known")
        if key in self._block_of or block in self._key_of:
            return
        self._block_of[key] = block
        self._key_of[block] = key

    def cached_prefix(self, keys: Iterable[Hashable]) -> list[int]:
        """The cached blocks of the longest run of `keys` from the first, each now held once more
        by the caller (who frees them as any other)."""
        blocks = self._leading_cached(keys)
        for b in blocks:
            if self._ref_counts[b] == 0:
                del self._cached_free[b]
            self._ref_counts[b] += 1
        return blocks

    def num_cached_prefix(self, keys: Iterable[Hashable]) -> int:
        """How many of `keys`, from the first, are cached: what `cached_prefix` would give now,
        taking nothing."""
        return len(self._leading_cached(keys))

    def _leading_cached(self, keys: Iterable[Hashable]) -> list[int]:
        """The blocks cached under `keys`, from the first up to the first key not cached."""
        blocks = []
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def forget_cached(self) -> None:
        """Empty the prefix cache: no block is findable any more, the free ones are plain free."""
        self._free.extend(self._cached_free)
        self._cached_free.clear()
        self._key_of.clear()
        self._block_of.clear()
