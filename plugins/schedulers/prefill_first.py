"""Prefill-first scheduling: the policy of vLLM v0, the baseline DeepSpeed-FastGen compares to.

Whenever waiting prompts can go (blocks for the whole prompt free, fewer than `max_num_seqs`
sequences running, the prompt within the token budget) a step runs prompts only, each whole;
otherwise a step runs every running sequence's decode, one token each, and the latest admitted
sequence is preempted when blocks run out. Decodes stall while prompts are computed: that is
the latency spike SplitFuse removes. The token limit is `token_budget` (vLLM's
max_num_batched_tokens). A prompt longer than it is computed alone, in budget-sized chunks over
consecutive prompt steps, so it keeps the budget and is never starved.
"""

from __future__ import annotations

from collections import deque

import fastgen
from fastgen.config import Config
from fastgen.request import Sequence
from fastgen.scheduler import StepPlan

from ._plan_builder import prefill_or_decode


class PrefillFirstScheduler:
    name = "prefill_first"

    def __init__(self, config: Config) -> None:
        self.config = config

    def schedule(self, waiting: deque[Sequence], running: list[Sequence],
                 num_free_blocks: int) -> StepPlan:
        return prefill_or_decode(self.config, waiting, running, num_free_blocks)


@fastgen.hookimpl
def register_schedulers(register):
    register(PrefillFirstScheduler)
