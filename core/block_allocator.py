"""BlockAllocator: hands out KV cache blocks from a fixed pool and takes them back."""

from __future__ import annotations


class NoFreeBlocks(RuntimeError):
    """Raised when more blocks are asked for than are free; the scheduler prevents this."""


class BlockAllocator:
    """A fixed pool of `num_blocks` KV cache blocks with a reference count per block.

    Freed blocks are reused last-freed-first, which keeps recently used cache memory warm.
    A block is free exactly when its reference count is 0.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._ref_counts = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise NoFreeBlocks(f"asked for {n} blocks, {len(self._free)} free")
        if n <= 0:
            return []
        blocks = self._free[-n:]
        del self._free[-n:]
        for b in blocks:
            self._ref_counts[b] = 1
        return blocks

    def _check_ids(self, blocks: list[int]) -> None:
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
        """Drop one owner of each block; a block with no owner left returns to the pool."""
        self._check_ids(blocks)
        for b in blocks:
            count = self._ref_counts[b]
            if count == 0:
                raise ValueError(f"block {b} is freed twice")
            self._ref_counts[b] = count - 1
            if count == 1:
                self._free.append(b)

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]
