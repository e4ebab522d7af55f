"""The Scheduler protocol: which sequences run in the next step, and how many tokens each."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from .config import Config
from .request import Sequence


@dataclass
class StepPlan:
    """One step's decision.

    `scheduled`: (sequence, number of its pending tokens to compute now), decodes first.
    A waiting sequence that appears here is admitted. `preempted`: running sequences whose
    blocks the engine frees before the step; they go back to the front of the waiting queue
    and are recomputed later.
    """

    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler(Protocol):
    name: ClassVar[str]

    # config.token_budget and max_num_seqs are set: the engine fills in their defaults before it
    # makes the scheduler.
    def __init__(self, config: Config) -> None: ...

    def schedule(self, waiting: deque[Sequence], running: list[Sequence],
                 num_free_blocks: int) -> StepPlan:
        """Plan the next step.

        `waiting`: sequences not holding blocks, oldest first (preempted ones are put back at the
        front). `running`: sequences holding blocks, in admission order. `num_free_blocks`: blocks
        the allocator can hand out now. The plan must not need more blocks than are free plus
        those of the sequences it preempts (`Sequence.blocks_needed` counts them), and must not
        schedule a sequence it preempts. Called only when some sequence is waiting or running.

        A waiting sequence's leading `num_found_cached` tokens are in the prefix cache: admitted,
        it computes only the tokens after them, at most the `n` planned, so a plan that counts
        `num_pending - num_found_cached` for it fills the step's budget. Counting its blocks for
        all its pending tokens stays safe: a found block can be evicted before the admission, and
        a free cached one comes out of the free pool.

        A waiting sequence with `waits_for_prefix` set shares its next uncached blocks with a
        sequence ahead of it that computes them (a running prompt, or a waiting one the engine
        expects this step to admit): admitted a step after they are cached, it starts from them
        instead of computing them again. The built-in schedulers pass over it (letting later
        sequences go); a scheduler that admits it anyway computes those blocks twice, as without
        prefix caching.
        """
        ...
