"""Static (request-level) batching: a `generate` loop over one batch at a time, as in
FasterTransformer or Hugging Face `model.generate` behind a simple server.

When no batch is in flight, up to `max_num_seqs` waiting requests, oldest first, whose prompts'
blocks fit together become the batch. The batch is prefilled (whole prompts packed into steps of
at most `token_budget` tokens; a prompt longer than that in budget-sized chunks, alone) and then
decoded in lockstep, one token per member per step, until every member has finished; only then
is the next batch formed. Members that finish early leave their slots idle. When the pool is too
small for the batch's growth the latest admitted member is preempted; it stays in the batch and
is recomputed before any new request is admitted.
"""

from __future__ import annotations

from collections import deque

import fastgen
from fastgen.config import Config
from fastgen.request import Sequence
from fastgen.scheduler import StepPlan

from ._plan_builder import prefill_or_decode


class StaticBatchingScheduler:
    name = "static"

    def __init__(self, config: Config) -> None:
        self.config = config
        self.batch: list[Sequence] = []   # the batch in flight; every running sequence is in it

    def schedule(self, waiting: deque[Sequence], running: list[Sequence],
                 num_free_blocks: int) -> StepPlan:
        self.batch = [s for s in self.batch if not s.is_finished]
        if not self.batch:
            self.batch = self._form_batch(waiting, num_free_blocks)
        members = {id(s) for s in self.batch}
        return prefill_or_decode(self.config, [s for s in waiting if id(s) in members],
                                 running, num_free_blocks)

    def _form_batch(self, waiting: deque[Sequence], num_free_blocks: int) -> list[Sequence]:
        batch, free = [], num_free_blocks
        for seq in waiting:
            need = seq.blocks_needed(seq.num_pending, self.config.block_size)
            if len(batch) == self.config.max_num_seqs or need > free:
                break
            batch.append(seq)
            free -= need
        return batch


@fastgen.hookimpl
def register_schedulers(register):
    register(StaticBatchingScheduler)
