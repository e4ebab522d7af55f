"""Continuous (iteration-level) batching with whole prompts: the policy of Orca (OSDI '22).

Every step runs all running decodes, one token each, and then admits waiting prompts, oldest
first, each whole, while they fit the rest of the token budget, the blocks and `max_num_seqs`
running sequences; the latest admitted sequence is preempted when blocks run out. Prompts are
never split to fill a step (the difference from SplitFuse), so a step's size follows the
prompts that happen to arrive. A prompt longer than the whole budget waits until a step is
otherwise empty and then runs alone in budget-sized chunks, so it keeps the budget and is never
starved.
"""

from __future__ import annotations

from collections import deque

import fastgen
from fastgen.config import Config
from fastgen.request import Sequence
from fastgen.scheduler import StepPlan

from ._plan_builder import PlanBuilder, split_running


class ContinuousBatchingScheduler:
    name = "continuous"

    def __init__(self, config: Config) -> None:
        self.config = config

    def schedule(self, waiting: deque[Sequence], running: list[Sequence],
                 num_free_blocks: int) -> StepPlan:
        builder = PlanBuilder(self.config, running, num_free_blocks)
        decodes, prompts = split_running(running)
        builder.grow_each(decodes + prompts)
        if builder.plan.preempted:
            return builder.plan  # blocks are short: admit nothing new this step
        builder.reserve_pending(prompts)
        builder.admit_whole_prompts(waiting)
        return builder.plan


@fastgen.hookimpl
def register_schedulers(register):
    register(ContinuousBatchingScheduler)
