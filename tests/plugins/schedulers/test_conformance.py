"""Every registered scheduler, driven by a model-free copy of the engine loop, keeps the contract.

The simulation does what `Engine.step` does with a plan (preempt, admit, grow blocks through the
BlockAllocator, advance `num_computed`, append a token when a sequence has computed all it had),
with a fake token instead of a forward pass, and checks after every step: the budget and the
sequence limit hold, no block has two owners, every token is computed exactly once plus once per
preemption that dropped it, and every request finishes exactly once with all blocks returned.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastgen.block_allocator import BlockAllocator
from fastgen.config import Config
from fastgen.plugin_manager import load_plugins
from fastgen.request import SamplingParams, Sequence, SequenceStatus

SCHEDULERS = sorted(load_plugins().registry.items["schedulers"])
FAKE_TOKEN = 7


@pytest.fixture(params=SCHEDULERS, ids=[f"schedulers.{n}" for n in SCHEDULERS])
def scheduler_cls(request):
    return load_plugins().registry.get("schedulers", request.param).cls


@dataclass
class Arrival:
    step: int
    prompt_len: int
    max_tokens: int


class Simulation:
    """Engine.step without a model: the scheduler's plans applied to sequences and a block pool."""

    def __init__(self, scheduler_cls, config: Config) -> None:
        self.config = config
        self.scheduler = scheduler_cls(config)
        self.allocator = BlockAllocator(config.num_blocks)
        self.max_model_len = config.num_blocks * config.block_size   # what Engine derives
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.finished: list[Sequence] = []
        self.computed: dict[str, list[int]] = {}       # request id -> times each position computed
        self.expected: dict[str, list[int]] = {}       # ... and how often it should have been
        self.preemptions = 0
        self.recomputed_tokens = 0
        self.steps = 0

    def add(self, request_id: str, prompt_len: int, max_tokens: int) -> None:
        seq = Sequence(request_id, [FAKE_TOKEN] * prompt_len,
                       SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        self.computed[request_id] = []
        self.expected[request_id] = []
        self.waiting.append(seq)

    def check_plan(self, plan) -> None:
        cfg = self.config
        seqs = [s for s, _ in plan.scheduled]
        assert len({id(s) for s in seqs}) == len(seqs), "a sequence scheduled twice in one step"
        assert plan.num_tokens <= cfg.token_budget, f"{plan.num_tokens} tokens > token_budget"
        assert len(seqs) <= cfg.max_num_seqs, f"{len(seqs)} sequences > max_num_seqs"
        running, waiting = {id(s) for s in self.running}, {id(s) for s in self.waiting}
        preempted = {id(s) for s in plan.preempted}
        assert len(preempted) == len(plan.preempted), "a sequence preempted twice"
        assert preempted <= running, "preempted a sequence that is not running"
        assert not preempted & {id(s) for s in seqs}, "scheduled a sequence it preempts"
        for seq, n in plan.scheduled:
            assert id(seq) in running | waiting, f"scheduled unknown/finished {seq}"
            assert 1 <= n <= seq.num_pending, f"{seq} scheduled for {n} tokens"
        # Blocks: what the plan needs must be free, counting the preempted sequences' blocks.
        freed = sum(len(s.block_ids) for s in plan.preempted)
        need = sum(s.blocks_needed(n, cfg.block_size) for s, n in plan.scheduled)
        assert need <= self.allocator.num_free + freed, (
            f"plan needs {need} blocks, {self.allocator.num_free} free + {freed} preempted")

    def step(self) -> None:
        plan = self.scheduler.schedule(self.waiting, self.running, self.allocator.num_free)
        self.check_plan(plan)
        assert plan.scheduled or plan.preempted, (
            f"scheduled nothing with {len(self.waiting)} waiting and {len(self.running)} running")
        self.steps += 1
        # preempt, as Engine._preempt
        for seq in plan.preempted:
            self.running.remove(seq)
            self.allocator.free(seq.block_ids)
            seq.block_ids = []
            counts = self.expected[seq.request_id]
            for pos in range(seq.num_computed):
                counts[pos] += 1          # its KV is gone: these positions are computed again
            self.recomputed_tokens += seq.num_computed
            seq.num_computed = 0
            seq.status = SequenceStatus.WAITING
            seq.num_preemptions += 1
            self.preemptions += 1
        for seq in sorted(plan.preempted, key=lambda s: s.seq_index, reverse=True):
            self.waiting.appendleft(seq)
        # admit and grow, as Engine._admit_and_grow (allocate raises NoFreeBlocks on a bad plan)
        for seq, n in plan.scheduled:
            if seq.status is SequenceStatus.WAITING:
                self.waiting.remove(seq)
                self.running.append(seq)
                seq.status = SequenceStatus.RUNNING
            seq.block_ids += self.allocator.allocate(seq.blocks_needed(n, self.config.block_size))
        # the "forward pass": record which positions got computed
        for seq, n in plan.scheduled:
            done = self.computed[seq.request_id]
            for pos in range(seq.num_computed, seq.num_computed + n):
                if pos == len(done):
                    done.append(0)
                    self.expected[seq.request_id].append(1)
                done[pos] += 1
        # launch and complete, as Engine._launch and _postprocess do: sample when the last pending
        # token was computed
        for seq, n in plan.scheduled:
            seq.num_computed += n
            if seq.num_pending:
                continue
            seq.token_ids.append(FAKE_TOKEN)
            if (seq.num_generated >= seq.params.max_tokens
                    or len(seq.token_ids) >= self.max_model_len):
                self.running.remove(seq)
                seq.status = SequenceStatus.FINISHED
                self.allocator.free(seq.block_ids)
                seq.block_ids = []
                self.finished.append(seq)
        self.check_state()

    def check_state(self) -> None:
        bs = self.config.block_size
        owner: dict[int, str] = {}
        for seq in self.running:
            for b in seq.block_ids:
                assert b not in owner, f"block {b} owned by {owner[b]} and {seq.request_id}"
                owner[b] = seq.request_id
            assert len(seq.block_ids) >= -(-seq.num_computed // bs), f"{seq} lacks KV blocks"
        assert all(not s.block_ids and s.num_computed == 0 for s in self.waiting)
        assert self.allocator.num_used == len(owner), "blocks held by nobody (a leak)"
        for b in owner:
            assert self.allocator.ref_count(b) == 1

    def run(self, arrivals: list[Arrival]) -> None:
        pending = sorted(enumerate(arrivals), key=lambda ia: ia[1].step)
        clock = 0
        total = sum(a.prompt_len + a.max_tokens for a in arrivals)
        limit = 50 + 20 * total   # generous, but a livelock (preemption ping-pong) fails
        while pending or self.waiting or self.running:
            while pending and pending[0][1].step <= clock:
                i, a = pending.pop(0)
                self.add(f"req-{i}", a.prompt_len, a.max_tokens)
            if self.waiting or self.running:
                self.step()
                assert self.steps <= limit, f"no end after {self.steps} steps"
            clock += 1


@st.composite
def workloads(draw):
    block_size = draw(st.sampled_from([1, 2, 4, 16]))
    # Tiny pools included: a pool of 2 tokens serves one 1-token prompt at a time.
    num_blocks = draw(st.integers(max(1, -(-2 // block_size)), 16))
    pool = num_blocks * block_size
    config = Config(block_size=block_size, num_blocks=num_blocks,
                    token_budget=draw(st.sampled_from([1, 2, 3, 8, 16, 64])),
                    max_num_seqs=draw(st.integers(1, 6)))
    longest = min(pool - 1, 80)       # Engine refuses prompts of max_model_len or more
    arrivals = draw(st.lists(st.builds(Arrival, step=st.integers(0, 6),
                                       prompt_len=st.integers(1, longest),
                                       max_tokens=st.integers(1, 3 * block_size + 8)),
                             min_size=1, max_size=10))
    return config, arrivals


@given(workload=workloads())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_scheduler_contract(scheduler_cls, workload):
    config, arrivals = workload
    sim = Simulation(scheduler_cls, config)
    sim.run(arrivals)

    ids = [s.request_id for s in sim.finished]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(len(arrivals))), "lost or duplicated"
    assert sim.allocator.num_free == config.num_blocks
    for seq in sim.finished:
        i = int(seq.request_id.split("-")[1])
        a = arrivals[i]
        assert seq.num_generated == min(a.max_tokens, sim.max_model_len - a.prompt_len)
        # every token but the last generated one went through a forward pass, exactly as often
        # as preemption made necessary
        assert len(sim.computed[seq.request_id]) == len(seq.token_ids) - 1
        assert sim.computed[seq.request_id] == sim.expected[seq.request_id], seq.request_id
    if sim.preemptions == 0:
        assert sim.recomputed_tokens == 0
        assert all(c == 1 for counts in sim.computed.values() for c in counts)


def test_preemption_does_not_lose_requests(scheduler_cls):
    """Two sequences that together outgrow a tiny pool both finish, and the pool comes back."""
    config = Config(block_size=2, num_blocks=6, token_budget=16, max_num_seqs=4)
    sim = Simulation(scheduler_cls, config)
    sim.run([Arrival(0, 4, 7), Arrival(0, 4, 7)])
    assert sorted(s.request_id for s in sim.finished) == ["req-0", "req-1"]
    assert all(s.num_generated == 7 for s in sim.finished)
    assert sim.allocator.num_free == config.num_blocks


# --- what SplitFuse promises beyond the contract -----------------------------------------------

def splitfuse():
    return load_plugins().registry.get("schedulers", "splitfuse").cls


def test_splitfuse_fills_the_budget_with_decodes_first_then_a_split_prompt():
    config = Config(block_size=4, num_blocks=64, token_budget=8, max_num_seqs=4)
    sim = Simulation(splitfuse(), config)
    sim.add("short", 3, 6)
    sim.step()                                    # the short prompt, whole
    sim.add("long", 30, 1)
    short, long_ = sim.running[0], sim.waiting[0]
    plan = sim.scheduler.schedule(sim.waiting, sim.running, sim.allocator.num_free)
    assert plan.scheduled == [(short, 1), (long_, 7)]   # a decode, then the budget's rest
    while len(sim.finished) < 2:
        sim.step()
        assert sum(sim.computed["long"]) <= 30
    # 30 prompt tokens as 7, 7, 7, 7 and 2, each beside one of short's decodes: no step idles.
    assert sim.computed["long"] == [1] * 30
    assert sim.steps == 1 + 5


def test_splitfuse_preempts_the_latest_admitted_when_blocks_run_out():
    config = Config(block_size=2, num_blocks=6, token_budget=16, max_num_seqs=4)
    sim = Simulation(splitfuse(), config)
    sim.add("first", 4, 7)
    sim.add("second", 4, 7)
    while sim.waiting or sim.running:
        sim.step()
    preemptions = {s.request_id: s.num_preemptions for s in sim.finished}
    assert preemptions["first"] == 0 and preemptions["second"] > 0
    assert sim.recomputed_tokens > 0
    assert sorted(s.request_id for s in sim.finished) == ["first", "second"]


# --- end to end on the tiny model: aborts return every block ------------------------------------

@pytest.fixture(scope="module")
def abort_engine(tiny_llama):
    from fastgen.config import make_config
    from fastgen.engine import Engine

    def make(scheduler: str) -> Engine:
        return Engine(make_config(model=str(tiny_llama[0]), scheduler=scheduler, device="cpu",
                                  token_budget=16, max_num_seqs=3, num_blocks=12))
    return make


def held_blocks(engine) -> int:
    """Blocks the engine's sequences hold, each once (prompts with a common beginning share the
    prefix cache's blocks), after checking each block's reference count is its holders'."""
    holders: dict[int, int] = {}
    for seq in engine.sequences.values():
        for b in seq.block_ids:
            holders[b] = holders.get(b, 0) + 1
    assert all(engine.allocator.ref_count(b) == n for b, n in holders.items())
    return len(holders)


def test_abort_returns_every_block(scheduler_cls, abort_engine):
    engine = abort_engine(scheduler_cls.name)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    ids = [engine.add_request(list(range(1, n + 1)), params) for n in (5, 40, 9, 23, 30, 2)]
    for _ in range(4):
        engine.step()
    running = [s.request_id for s in engine.running]
    waiting = [s.request_id for s in engine.waiting]
    assert running and waiting, "the workload should leave some running and some waiting"
    assert engine.allocator.num_used == held_blocks(engine) > 0

    # abort one running (holding blocks) and one waiting
    out = engine.abort_request(running[-1])
    assert out.finished and out.finish_reason == "abort"
    assert engine.abort_request(waiting[0]).finish_reason == "abort"
    assert engine.abort_request(running[-1]) is None         # already gone
    assert engine.abort_request("no-such-request") is None
    assert engine.allocator.num_used == held_blocks(engine)

    finished = {running[-1], waiting[0]}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                assert out.request_id not in finished, "finished twice"
                finished.add(out.request_id)
                assert out.finish_reason == "length" and len(out.token_ids) == 20
            # abort mid-flight, from whatever is running now
            if len(finished) == 3 and engine.running:
                victim = engine.running[0].request_id
                engine.abort_request(victim)
                finished.add(victim)
        assert engine.allocator.num_used == held_blocks(engine)
    assert finished == set(ids)
    assert engine.allocator.num_free == engine.allocator.num_blocks
    assert not engine.sequences
