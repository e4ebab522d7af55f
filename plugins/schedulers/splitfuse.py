"""Dynamic SplitFuse (DeepSpeed-FastGen): every step computes up to a fixed token budget.

Decodes go first, one token each; the rest of the budget is filled with prompt chunks, so long
prompts are split across steps and short ones are fused into a step with other work. A new
prompt is admitted only when the blocks for its whole prompt can be had. When a running
sequence needs a block and none is free, the latest admitted sequence is preempted.
"""

from __future__ import annotations

from collections import deque

import fastgen
from fastgen.config import Config
from fastgen.request import Sequence
from fastgen.scheduler import StepPlan

from ._plan_builder import PlanBuilder, admissible, to_compute


class SplitFuseScheduler:
    name = "splitfuse"

    def __init__(self, config: Config) -> None:
        self.config = config

    def schedule(self, waiting: deque[Sequence], running: list[Sequence],
                 num_free_blocks: int) -> StepPlan:
        builder = PlanBuilder(self.config, running, num_free_blocks)
        decodes = [s for s in running if s.num_pending == 1]
        chunks = [s for s in running if s.num_pending > 1]
        builder.grow_each(decodes + chunks)
        if builder.plan.preempted:
            return builder.plan  # blocks are short: admit nothing new this step
        # The unscheduled rest of running prompts keeps its blocks from new admissions.
        builder.reserve_pending(chunks)
        for seq in admissible(waiting):
            if builder.full:
                break
            if not builder.admit(seq, min(to_compute(seq), builder.budget)):
                break  # first come, first served: no overtaking the oldest waiting prompt
        return builder.plan


@fastgen.hookimpl
def register_schedulers(register):
    register(SplitFuseScheduler)
