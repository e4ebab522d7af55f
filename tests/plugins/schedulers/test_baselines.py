"""The baseline schedulers (prefill_first, continuous, static): the same tokens as SplitFuse, and
each one's defining behaviour, checked on its plans with the conformance suite's model-free
driver. The contract every scheduler keeps is in test_conformance.py; SplitFuse's own promises
are tested there too.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from test_conformance import Arrival, Simulation, workloads

import fastgen
from fastgen.config import Config
from fastgen.plugin_manager import load_plugins
from fastgen.request import SamplingParams

SCHEDULERS = ("splitfuse", "prefill_first", "continuous", "static")
BASELINES = SCHEDULERS[1:]


def scheduler(name: str):
    return load_plugins().registry.get("schedulers", name).cls


# --- end to end on the tiny model: every scheduler, the same greedy tokens ----------------------

NEW_TOKENS = 24
# 1-token and block-edge prompts, two longer than the token budget of 64 (computed in chunks).
PROMPT_LENS = (1, 5, 17, 40, 70, 130, 9, 33)


@pytest.fixture(scope="module")
def greedy_reference(tiny_llama):
    folder, model = tiny_llama
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist()
               for n in PROMPT_LENS]
    expected = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 min_new_tokens=NEW_TOKENS, max_new_tokens=NEW_TOKENS)
        expected.append(out[0, len(prompt):].tolist())
    return str(folder), prompts, expected


@pytest.mark.parametrize("num_blocks", [None, 10], ids=["roomy-pool", "tiny-pool"])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_scheduler_gives_the_same_greedy_tokens(greedy_reference, name, num_blocks):
    folder, prompts, expected = greedy_reference
    llm = fastgen.LLM(model=folder, scheduler=name, token_budget=64, device="cpu",
                      num_blocks=num_blocks, dtype="float32")   # transformers' dtype
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    assert [o.token_ids for o in llm.generate(prompts, params)] == expected
    # 10 blocks of 16 tokens hold the 130-token prompt and its answer, but not much beside it.
    assert (llm.engine.totals.preemptions > 0) == (num_blocks is not None)
    assert llm.engine.allocator.num_free == llm.engine.allocator.num_blocks


# --- each baseline's defining behaviour, on its plans ---------------------------------------------

@dataclass(frozen=True)
class Item:
    """One (sequence, tokens) entry of a plan, with the sequence's state when it was planned."""

    request_id: str
    n: int
    num_computed: int
    num_pending: int
    prompt_len: int

    @property
    def is_decode(self) -> bool:
        return self.num_pending == 1 and self.num_computed >= self.prompt_len

    @property
    def is_split(self) -> bool:
        return self.n < self.num_pending


class RecordingSimulation(Simulation):
    """The conformance driver, keeping every plan and the step each request started and finished in."""

    def __init__(self, scheduler_cls, config: Config) -> None:
        super().__init__(scheduler_cls, config)
        self.plans: list[list[Item]] = []
        self.start_step: dict[str, int] = {}
        self.finish_step: dict[str, int] = {}

    def step(self) -> None:
        super().step()
        for seq in self.finished:
            self.finish_step.setdefault(seq.request_id, self.steps - 1)

    def check_plan(self, plan) -> None:
        super().check_plan(plan)
        self.observe(plan)
        self.plans.append([Item(s.request_id, n, s.num_computed, s.num_pending, s.prompt_len)
                           for s, n in plan.scheduled])
        for seq, _ in plan.scheduled:
            self.start_step.setdefault(seq.request_id, self.steps)

    def observe(self, plan) -> None:
        """Checks that need the state before the plan is applied."""


RUN = settings(max_examples=60, deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("name", BASELINES)
@given(workload=workloads())
@RUN
def test_baselines_never_split_a_prompt_that_fits_the_budget(name, workload):
    config, arrivals = workload
    sim = RecordingSimulation(scheduler(name), config)
    sim.run(arrivals)
    # a prompt is split only when it is longer than the budget, and then runs alone
    for items in sim.plans:
        for item in items:
            if item.is_split:
                assert items == [item] and item.n == config.token_budget, items


@given(workload=workloads())
@RUN
def test_prefill_first_never_mixes_prompts_and_decodes(workload):
    config, arrivals = workload
    sim = RecordingSimulation(scheduler("prefill_first"), config)
    sim.run(arrivals)
    for items in sim.plans:
        kinds = {item.is_decode for item in items}
        assert len(kinds) == 1, f"prompt tokens and decodes in one step: {items}"


def test_prefill_first_stalls_decodes_for_a_new_prompt():
    config = Config(block_size=4, num_blocks=64, token_budget=16, max_num_seqs=4)
    sim = RecordingSimulation(scheduler("prefill_first"), config)
    sim.run([Arrival(0, 3, 6), Arrival(2, 5, 2)])
    assert [[(i.request_id, i.n) for i in items] for items in sim.plans[:4]] == [
        [("req-0", 3)], [("req-0", 1)],
        [("req-1", 5)],                          # req-0's decode waits for the prompt
        [("req-0", 1), ("req-1", 1)]]


def test_continuous_fuses_whole_prompts_with_decodes():
    config = Config(block_size=4, num_blocks=64, token_budget=16, max_num_seqs=4)
    sim = RecordingSimulation(scheduler("continuous"), config)
    sim.run([Arrival(0, 3, 6), Arrival(2, 5, 2), Arrival(2, 12, 2)])
    assert [[(i.request_id, i.n) for i in items] for items in sim.plans[:4]] == [
        [("req-0", 3)], [("req-0", 1)],
        [("req-0", 1), ("req-1", 5)],           # req-2's 12 would not fit whole: not split
        [("req-0", 1), ("req-1", 1), ("req-2", 12)]]


class StaticBatchCheck(RecordingSimulation):
    """Fails when a request starts while a request of an earlier batch has not finished."""

    def __init__(self, scheduler_cls, config: Config) -> None:
        super().__init__(scheduler_cls, config)
        self.batch: set[str] = set()     # requests waiting when the batch in flight was formed
        self.members: set[str] = set()   # ... and those of them that have started

    def observe(self, plan) -> None:
        finished = {s.request_id for s in self.finished}
        for seq, _ in plan.scheduled:
            rid = seq.request_id
            if rid in self.start_step:
                continue
            if self.members <= finished:   # nothing of the last batch is left: a new one forms
                self.batch = {s.request_id for s in self.waiting}
                self.members = set()
            assert rid in self.batch, (f"{rid} started while {self.members - finished} of the "
                                       f"batch in flight had not finished")
            self.members.add(rid)
            assert len(self.members) <= self.config.max_num_seqs


@given(workload=workloads())
@RUN
def test_static_admits_nothing_new_until_its_batch_has_finished(workload):
    config, arrivals = workload
    sim = StaticBatchCheck(scheduler("static"), config)
    sim.run(arrivals)


def test_static_recomputes_a_preempted_member_before_a_new_request():
    # A pool of 12 tokens: the batch of two 4-token prompts outgrows it as they decode.
    config = Config(block_size=2, num_blocks=6, token_budget=16, max_num_seqs=4)
    sim = StaticBatchCheck(scheduler("static"), config)
    sim.run([Arrival(0, 4, 7), Arrival(0, 4, 7), Arrival(1, 2, 2)])
    preemptions = {s.request_id: s.num_preemptions for s in sim.finished}
    assert preemptions["req-0"] == 0 and preemptions["req-1"] > 0
    # req-2 arrived while the batch ran and starts only after all of it, req-1 recomputed included
    assert sim.start_step["req-2"] > max(sim.finish_step["req-0"], sim.finish_step["req-1"])
