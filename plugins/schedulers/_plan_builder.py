"""PlanBuilder: the bookkeeping every scheduler here shares while it fills one step's plan.

A scheduler decides the order; the builder keeps the rules of `Scheduler.schedule`: the token
budget, `max_num_seqs` sequences per step, and blocks. A running sequence that needs blocks when
none are free takes them from the latest admitted sequences, preempting them (itself last); a
waiting one is admitted only when the blocks of all its pending tokens are free, and keeps them
reserved for its later chunks. `prefill_or_decode` is the step of vLLM v0 (whole prompts when
any fit, else decodes), shared by the prefill-first and static schedulers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from fastgen.config import Config
from fastgen.request import Sequence
from fastgen.scheduler import StepPlan


def is_decode(seq: Sequence) -> bool:
    """One pending token, past the prompt: a step computes it and samples the next."""
    return seq.num_pending == 1 and seq.num_computed >= seq.prompt_len


def to_compute(seq: Sequence) -> int:
    """A waiting sequence's tokens that admitting it computes: its pending ones after those the
    prefix cache holds (`Sequence.num_found_cached`)."""
    return seq.num_pending - seq.num_found_cached


def admissible(waiting: Iterable[Sequence]) -> Iterator[Sequence]:
    """The waiting sequences a step may admit, oldest first: not those whose next blocks another
    sequence is computing (`Sequence.waits_for_prefix`), which are admitted once they are cached."""
    return (seq for seq in waiting if not seq.waits_for_prefix)


def split_running(running: list[Sequence]) -> tuple[list[Sequence], list[Sequence]]:
    """(decodes, prompts still being computed), each in admission order."""
    decodes = [s for s in running if is_decode(s)]
    return decodes, [s for s in running if not is_decode(s)]


class PlanBuilder:
    """One step's plan, built up from running sequences to grow and waiting ones to admit."""

    def __init__(self, config: Config, running: list[Sequence], num_free_blocks: int) -> None:
        self.plan = StepPlan()
        self.budget = config.token_budget
        self.free = num_free_blocks
        self.block_size = config.block_size
        self.max_num_seqs = config.max_num_seqs
        self.num_running = len(running)   # sequences holding blocks once the step is applied
        self._victims = list(running)     # admission order: the latest admitted is preempted first
        self._taken: dict[int, tuple[int, int]] = {}   # id(seq) -> (tokens, new blocks) this step
        self._preempted: set[int] = set()

    @property
    def full(self) -> bool:
        """No token or sequence slot is left in this step."""
        return self.budget == 0 or len(self.plan.scheduled) == self.max_num_seqs

    def grow(self, seq: Sequence, n: int) -> bool:
        """Schedule running `seq` for `n` tokens, preempting the latest admitted sequences until
        its new blocks are free. False when `seq` itself had to be preempted."""
        need = seq.blocks_needed(n, self.block_size)
        while need > self.free:
            if self._preempt_latest() is seq:
                return False
        self.plan.scheduled.append((seq, n))
        self._taken[id(seq)] = (n, need)
        self.budget -= n
        self.free -= need
        return True

    def grow_each(self, seqs: Iterable[Sequence]) -> None:
        """Grow running sequences in order, each by as many pending tokens as the budget allows."""
        for seq in seqs:
            if self.full:
                break
            if id(seq) not in self._preempted:
                self.grow(seq, min(seq.num_pending, self.budget))

    def reserve_pending(self, seqs: Iterable[Sequence]) -> None:
        """Keep the blocks these running sequences' pending tokens still need from admissions."""
        for seq in seqs:
            if id(seq) not in self._preempted:
                _, need = self._taken.get(id(seq), (0, 0))
                self.free -= seq.blocks_needed(seq.num_pending, self.block_size) - need

    def admit(self, seq: Sequence, n: int) -> bool:
        """Schedule waiting `seq` for `n` tokens if the blocks for all its pending tokens are free;
        they stay reserved for its later chunks."""
        whole = seq.blocks_needed(seq.num_pending, self.block_size)
        if whole > self.free:
            return False
        self.plan.scheduled.append((seq, n))
        self.budget -= n
        self.free -= whole
        self.num_running += 1
        return True

    def admit_whole_prompts(self, waiting: Iterable[Sequence]) -> None:
        """Admit waiting prompts oldest first, each whole, while `max_num_seqs` sequences would
        still be running; stop at the first that does not fit, so none overtakes it. A prompt
        longer than the whole budget goes only into an otherwise empty step, and alone: its
        budget-sized chunks fill the steps until its last, so it is never starved. A prompt
        whose next blocks another sequence is computing (`waits_for_prefix`) waits for them."""
        for seq in admissible(waiting):
            if self.full or self.num_running >= self.max_num_seqs:
                break
            n = to_compute(seq)
            if n > self.budget:
                if self.plan.scheduled:
                    break
                n = self.budget
            if not self.admit(seq, n):
                break

    def _preempt_latest(self) -> Sequence:
        victim = self._victims.pop()
        if id(victim) in self._taken:
            n, need = self._taken.pop(id(victim))
            self.plan.scheduled.remove((victim, n))
            self.budget += n
            self.free += need
        self._preempted.add(id(victim))
        self.plan.preempted.append(victim)
        # At most: blocks it shares with running sequences (a cached prefix) stay held; the
        # engine fits the plan to what its preemptions actually free.
        self.free += len(victim.block_ids)
        self.num_running -= 1
        return victim


def prefill_or_decode(config: Config, waiting: Iterable[Sequence], running: list[Sequence],
                      num_free_blocks: int) -> StepPlan:
    """A step of prompts only when any can go, else a step of decodes only (vLLM v0).

    Prompts: one that is being computed in chunks (it was longer than the budget) goes on first,
    then waiting prompts are admitted whole (`PlanBuilder.admit_whole_prompts`) as long as the
    running decodes keep the blocks for their next token, so the decode step that follows does
    not have to preempt what was just computed. Decodes: every running sequence, one token each,
    within the budget, preempting the latest admitted when blocks run out.
    """
    builder = PlanBuilder(config, running, num_free_blocks)
    decodes, prompts = split_running(running)
    builder.grow_each(prompts)
    if builder.plan.preempted:
        return builder.plan
    builder.reserve_pending(running)
    builder.admit_whole_prompts(waiting)
    if builder.plan.scheduled:
        return builder.plan
    builder = PlanBuilder(config, running, num_free_blocks)
    builder.grow_each(decodes)
    return builder.plan
