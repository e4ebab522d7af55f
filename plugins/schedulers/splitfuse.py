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


class SplitFuseScheduler:
    name = "splitfuse"

    def __init__(self, config: Config) -> None:
        self.token_budget = config.token_budget
        self.max_num_seqs = config.max_num_seqs
        self.block_size = config.block_size

    def schedule(self, waiting: deque[Sequence], running: list[Sequence],
                 num_free_blocks: int) -> StepPlan:
        plan = StepPlan()
        budget = self.token_budget
        free = num_free_blocks
        victims = list(running)           # admission order: the latest admitted is preempted first
        taken: dict[int, tuple[int, int]] = {}   # id(seq) -> (tokens, new blocks) this step
        preempted: set[int] = set()

        def preempt_latest() -> Sequence:
            nonlocal budget, free
            victim = victims.pop()
            if id(victim) in taken:
                n, need = taken.pop(id(victim))
                plan.scheduled.remove((victim, n))
                budget += n
                free += need
            preempted.add(id(victim))
            plan.preempted.append(victim)
            free += len(victim.block_ids)
            return victim

        decodes = [s for s in running if s.num_pending == 1]
        chunks = [s for s in running if s.num_pending > 1]
        for seq in decodes + chunks:
            if budget == 0 or len(plan.scheduled) == self.max_num_seqs:
                break
            if id(seq) in preempted:
                continue
            n = min(seq.num_pending, budget)
            need = seq.blocks_needed(n, self.block_size)
            while need > free and preempt_latest() is not seq:
                pass
            if id(seq) in preempted:
                continue
            plan.scheduled.append((seq, n))
            taken[id(seq)] = (n, need)
            budget -= n
            free -= need

        if plan.preempted:
            return plan  # blocks are short: admit nothing new this step
        # The unscheduled rest of running prompts keeps its blocks from new admissions.
        for seq in chunks:
            n, need = taken.get(id(seq), (0, 0))
            free -= seq.blocks_needed(seq.num_pending, self.block_size) - need
        for seq in waiting:
            if budget == 0 or len(plan.scheduled) == self.max_num_seqs:
                break
            whole = seq.blocks_needed(seq.num_pending, self.block_size)
            if whole > free:
                break  # first come, first served: no overtaking the oldest waiting prompt
            n = min(seq.num_pending, budget)
            plan.scheduled.append((seq, n))
            budget -= n
            free -= whole
        return plan


@fastgen.hookimpl
def register_schedulers(register):
    register(SplitFuseScheduler)
