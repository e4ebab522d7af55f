"""Engine: the synchronous step loop — schedule, build the ragged batch, run the model, sample."""

from __future__ import annotations

import functools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import torch

from .block_allocator import BlockAllocator
from .config import Config
from .detokenizer import IncrementalDetokenizer
from .errors import FastgenError, PluginError, RequestError
from .kernels import (AUTO, SamplingMetadata, choose_auto, configure_kv_cache, cuda_unavailable_reason,
                      make_backend)
from .kv_memory import (CPU_KV_CACHE_GB, GiB, GpuMemory, check_kv_cache_fits, default_token_budget,
                        gpu_kv_cache_bytes, step_reserve_bytes)
from .logits_processors import apply_logits_processors
from .logprobs import PromptLogprobPlan, SampledLogprobs, extend_for_prompt_logprobs
from .model import load_model
from .plugin_manager import PluginManager, load_plugins
from .ragged_batch import RaggedBatch
from .scheduler import StepPlan
from .staging import HostCopy, staged
from .request import (FinishReason, RequestMetrics, RequestOutput, SamplingParams, Sequence,
                      SequenceStatus)
from .request_intake import RequestIntake
from .step_graphs import Capture, CudaGraphCapture, StepGraphs
from .tokenizer import load_tokenizer

log = logging.getLogger(__name__)

@dataclass
class StepStats:
    """What one step did and where its time went (seconds)."""

    num_tokens: int = 0
    num_seqs: int = 0
    num_decodes: int = 0
    num_preempted: int = 0
    num_cached_tokens: int = 0  # prompt tokens admitted sequences found in the prefix cache
    num_running: int = 0        # sequences running after the step (finished ones gone)
    num_waiting: int = 0        # sequences waiting after the step (preempted ones included)
    blocks_used: int = 0
    blocks_free: int = 0
    schedule_s: float = 0.0     # scheduler, block growth, batch metadata: host work before the model
    forward_s: float = 0.0      # the backend's attention plan and the model's forward pass
    graph_replayed: bool = False   # the forward pass was a CUDA graph's replay
    sample_s: float = 0.0       # sampling, including the copy of the tokens to the host
    postprocess_s: float = 0.0  # appending tokens, stop checks, detokenization

    @property
    def host_s(self) -> float:
        return self.schedule_s + self.postprocess_s


@dataclass
class EngineTotals:
    steps: int = 0
    tokens: int = 0
    cached_tokens: int = 0   # prompt tokens taken from the prefix cache instead of computed
    preemptions: int = 0
    time: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("schedule_s", "forward_s", "sample_s", "postprocess_s"), 0.0))

    def add(self, stats: StepStats) -> None:
        self.steps += 1
        self.tokens += stats.num_tokens
        self.cached_tokens += stats.num_cached_tokens
        self.preemptions += stats.num_preempted
        for key in self.time:
            self.time[key] += getattr(stats, key)


@dataclass
class LaunchedStep:
    """A step queued on the device whose sampled tokens the host has not read yet."""

    batch: RaggedBatch
    tokens: torch.Tensor            # [S] on the device: the next step's awaited inputs come from it
    host_tokens: HostCopy           # the same, on their way to the host
    sampled_logprobs: SampledLogprobs
    stats: StepStats


def resolve_device(name: str) -> torch.device:
    """The torch device `name` (a `device` setting) names, once it is known to run here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise FastgenError(f"Unknown device {name!r}; use auto, cpu or cuda[:N].")
    if device.type == "cuda":
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise FastgenError(f"Device {name!r}: {reason}, or use --device cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise FastgenError(f"Device {name!r}: this machine has {torch.cuda.device_count()} CUDA "
                               f"GPUs (cuda:0 to cuda:{torch.cuda.device_count() - 1}).")
    return device


def overlap_steps_on(config: Config, device: torch.device) -> bool:
    """Whether steps overlap: as set, or unset, on a GPU (measured on the H200, 2026-11-28: 1.27
    to 1.48x the tokens/s of steps in turn with CUDA graphs, docs/benchmarks.md) and not on a
    CPU, where a forward pass runs as it is launched and an output would only come a step later."""
    return device.type == "cuda" if config.overlap_steps is None else config.overlap_steps


def default_max_num_seqs(device: torch.device) -> int:
    """Sequences a step may hold when unset: 64 on a CPU, where a step's time grows with each
    sequence's matmul rows; 256 on a GPU (vLLM's default), where a decode step of 256 sequences
    costs little more than one of 64 (the weights are read once a step either way) and a GPU-sized
    KV cache holds them: more requests decode at once, and only a step's own padding waits."""
    return 256 if device.type == "cuda" else 64


class Engine(RequestIntake):
    def __init__(self, config: Config, plugins: PluginManager | None = None,
                 graph_capture: Capture | None = None) -> None:
        """`graph_capture` records and replays steps when `config.cuda_graphs` is on (by
        default wherever it can be): CUDA graphs unless given (tests give a stand-in that runs on
        the CPU)."""
        from .checkpoint import DTYPES, resolve_checkpoint, resolve_dtype

        super().__init__()
        self.config = config
        self.plugins = plugins or load_plugins()
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = resolve_device(config.device)
        self.use_device_here()
        dtype_name = resolve_dtype(config.dtype, config.model, self.device)
        if dtype_name != config.dtype:
            log.info("dtype = %s: %s on %s", config.dtype, dtype_name, self.device)
        self.dtype = DTYPES[dtype_name]
        self.backend = self._make_backend()

        self.checkpoint = resolve_checkpoint(config.model, config.cache_dir, dtype_name)
        self.model, self.hf_config = load_model(self.checkpoint, self.plugins, self.backend,
                                                self.dtype, self.device)
        # The settings with what they left unset and the model decides filled in: every reader
        # (the scheduler, transports' metrics, benchmarks) sees the numbers the engine runs with.
        self.config = config = self._with_step_sizes(config)
        scheduler_cls = self.plugins.registry.get("schedulers", config.scheduler).cls
        self.scheduler = scheduler_cls(config)
        self.tokenizer, self.eos_token_ids = load_tokenizer(self.checkpoint, self.hf_config)
        self.model_name = config.served_model_name or Path(config.model or "SmolLM2-135M-Instruct").stem

        self.kv_cache = self._allocate_kv_cache()
        configure_kv_cache(self.backend, *self.model.kv_cache_spec[1:])
        num_blocks = len(self.kv_cache[0][0])
        capture = graph_capture or CudaGraphCapture()
        use_graphs = self._use_step_graphs(capture, num_blocks)
        # With graphs, the last block is the padding rows' scratch block, never handed out.
        self.allocator = BlockAllocator(num_blocks - use_graphs)
        pool_tokens = self.allocator.num_blocks * config.block_size
        model_limit = getattr(self.hf_config, "max_position_embeddings", None) or pool_tokens
        self.max_model_len = min(config.max_model_len or model_limit, model_limit, pool_tokens)
        self.step_graphs = StepGraphs(
            self.model, self.backend, self.kv_cache, config.max_num_seqs,
            -(-self.max_model_len // config.block_size), config.block_size,
            scratch_block=num_blocks - 1, device=self.device, capture=capture,
            max_tokens=(config.token_budget if config.cuda_graph_max_tokens is None
                        else config.cuda_graph_max_tokens)) if use_graphs else None
        if self.step_graphs is not None:
            self.step_graphs.capture_ahead()
        self.overlap_steps = overlap_steps_on(config, self.device)
        if self.overlap_steps and self.device.type != "cuda":   # asked for on a CPU
            log.warning("overlap_steps on %s: a step's forward pass runs as it is launched, so "
                        "nothing overlaps, and each output comes a step later.", self.device)

        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.sequences: dict[str, Sequence] = {}
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.totals = EngineTotals()
        self.last_stats = StepStats()
        self._in_flight: LaunchedStep | None = None   # with overlap_steps: launched, tokens unread

    # --- setup -------------------------------------------------------------------------------

    def use_device_here(self) -> None:
        """Make the engine's GPU the calling thread's current CUDA device: Triton launches, CUDA
        graphs and new streams go to the current device, not to their tensors' (cuda:1 would
        otherwise run on cuda:0). Each thread that runs steps calls it. Plain `cuda` means the
        current device, whichever it is; a no-op off a GPU."""
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)

    def _make_backend(self):
        if self.config.kernels == AUTO:
            infos = list(self.plugins.registry.items["kernels"].values())
            cls = choose_auto([i.cls for i in infos], self.device, self.config.cache_dir)
            log.info("kernels = auto: kernels.%s on %s", cls.name, self.device)
            return make_backend(cls, self.device, self.config.cache_dir)
        info = self.plugins.registry.get("kernels", self.config.kernels)
        reason = info.cls.unavailable_reason(self.device)
        if reason:
            usable = [i.full_name for i in self.plugins.registry.items["kernels"].values()
                      if not i.cls.unavailable_reason(self.device)]
            raise PluginError(f"kernels.{info.name} cannot run on {self.device}: {reason} "
                              f"Usable here: {', '.join(usable) or 'none'}.")
        return make_backend(info.cls, self.device, self.config.cache_dir)

    def _use_step_graphs(self, capture: Capture, num_blocks: int) -> bool:
        """Whether steps run from CUDA graphs: not turned off, and possible here. Asked for
        (True), it warns why not; by default (None) it is on wherever possible and quietly off
        elsewhere (a CPU, a backend or model that cannot be captured)."""
        if self.config.cuda_graphs is False:
            return False
        device_reason = getattr(capture, "unavailable_reason", lambda device: None)(self.device)
        reason = device_reason or StepGraphs.unavailable_reason(self.model, self.backend)
        if reason is None and num_blocks < 2:
            reason = "the KV cache has a single block, and the graphs need one of their own"
        if reason and self.config.cuda_graphs:
            log.warning("cuda_graphs is on, but every step runs eagerly: %s.", reason)
        elif reason:
            log.debug("cuda_graphs (default): every step runs eagerly: %s.", reason)
        return reason is None

    def _with_step_sizes(self, config: Config) -> Config:
        """`config` with its step sizes: as set, or unset, the device's default sequences a step
        (default_max_num_seqs) and the device's and the model's token budget (core/kv_memory.py)."""
        sizes = {}
        if config.max_num_seqs is None:
            sizes["max_num_seqs"] = default_max_num_seqs(self.device)
        if config.token_budget is None:
            sizes["token_budget"] = default_token_budget(
                self.hf_config, sizes.get("max_num_seqs", config.max_num_seqs),
                self.dtype.itemsize, self._gpu_memory)
        if not sizes:
            return config
        log.info("on %s by default: %s", self.device, ", ".join(f"{k} {v}" for k, v in sizes.items()))
        return msgspec.structs.replace(config, **sizes)

    @functools.cached_property
    def _gpu_memory(self) -> GpuMemory | None:
        """The GPU's memory with the model loaded (None off a GPU), measured when a default first
        needs it: nothing the engine allocates on the GPU comes between the two that do."""
        if self.device.type != "cuda":
            return None
        return GpuMemory.measure(self.device, self.config.gpu_memory_utilization)

    def _allocate_kv_cache(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        layers, kv_heads, head_dim = self.model.kv_cache_spec
        bs = self.config.block_size
        per_block = 2 * layers * bs * kv_heads * head_dim * self.dtype.itemsize
        num_blocks = self.config.num_blocks or max(1, self._kv_cache_bytes() // per_block)
        check_kv_cache_fits(num_blocks * per_block, num_blocks, bs, self.device)
        shape = (num_blocks, bs, kv_heads, head_dim)
        # Zeroed, though attention keeps a slot that holds none of a sequence's keys out of its
        # output whatever the slot holds (docs/plugins.md): a block's first use is the same each run.
        return [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                 torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in range(layers)]

    def _kv_cache_bytes(self) -> int:
        """As kv_cache_gb says; unset, 1 GiB on a CPU and on a GPU what gpu_memory_utilization
        leaves with the model loaded (core/kv_memory.py)."""
        if self.config.kv_cache_gb is not None:
            return int(self.config.kv_cache_gb * GiB)
        if self.device.type != "cuda":
            return int(CPU_KV_CACHE_GB * GiB)
        reserve = step_reserve_bytes(self.hf_config, self.config.token_budget,
                                     self.config.max_num_seqs, self.dtype.itemsize)
        size = gpu_kv_cache_bytes(self._gpu_memory, reserve)
        log.info("KV cache: %.1f GiB (gpu_memory_utilization %s; %.1f GiB kept for activations)",
                 size / GiB, self.config.gpu_memory_utilization, reserve / GiB)
        return size

    # --- requests ----------------------------------------------------------------------------

    def new_sequence(self, token_ids: list[int], params: SamplingParams,
                     request_id: str | None = None) -> Sequence:
        seq = super().new_sequence(token_ids, params, request_id)
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        return seq

    def add_sequence(self, seq: Sequence) -> None:
        if seq.request_id in self.sequences:
            raise RequestError(f"Request id {seq.request_id!r} is already in use; give each request "
                               f"its own id.")
        self.sequences[seq.request_id] = seq
        self.detokenizers[seq.request_id] = IncrementalDetokenizer(
            self.tokenizer, seq.token_ids, seq.params.stop)
        self.waiting.append(seq)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        seq = self.make_sequence(prompt, params, request_id)
        self.add_sequence(seq)
        return seq.request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        seq = self.sequences.get(request_id)
        if seq is None:
            return None
        self._dequeue(seq)
        return self._finish(seq, FinishReason.ABORT)

    def _dequeue(self, seq: Sequence) -> None:
        """Take `seq` out of `waiting` or `running`, whichever holds it."""
        (self.waiting if seq.status is SequenceStatus.WAITING else self.running).remove(seq)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (benchmarks call it so that a repeated prompt is computed
        again); the blocks of running sequences stay theirs."""
        self.allocator.forget_cached()

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def occupancy(self) -> tuple[int, int, int, int]:
        """(running sequences, waiting sequences, KV blocks used, KV blocks free), now."""
        return len(self.running), len(self.waiting), self.allocator.num_used, self.allocator.num_free

    # --- the step ----------------------------------------------------------------------------

    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Run one forward pass; return an output for every request that advanced or finished, or
        with `finished_only` for the finished ones alone. A running request's output copies its
        tokens so far (unless it asked for delta outputs), a cost that grows with its length every
        step: a caller that keeps only the last outputs (LLM.generate) has them not built. A
        finished output's `new_text` is all the text no output handed out before.

        With `overlap_steps`, a step is launched before the previous one's tokens are read, and
        the outputs returned are the previous step's: the host schedules and postprocesses while
        the device computes."""
        if not self.has_unfinished() and self._in_flight is None:
            return []
        stats = StepStats()
        t0 = time.perf_counter()
        plan = self._schedule(stats)
        outputs: list[RequestOutput] = []
        if plan.scheduled and self._in_flight is not None and not self._can_overlap(plan):
            outputs = self._complete(self._take_in_flight(), finished_only)
            plan.scheduled = [(seq, n) for seq, n in plan.scheduled if not seq.is_finished]
        if not plan.scheduled:
            if plan.preempted:   # a step that only preempted still counts its preemptions
                stats.schedule_s = time.perf_counter() - t0
                self._record(stats)
            return outputs + self._complete(self._take_in_flight(), finished_only)
        launched = self._launch(plan, stats, t0)   # its awaited inputs come from the step in flight
        previous, self._in_flight = self._in_flight, launched
        outputs += self._complete(previous, finished_only)   # read while `launched` computes
        if not self.overlap_steps:
            outputs += self._complete(self._take_in_flight(), finished_only)
        return outputs

    def _schedule(self, stats: StepStats) -> StepPlan:
        """The scheduler's plan for the next step, its preemptions applied. A sequence whose
        awaited token is certainly its last (by length) is not offered to the scheduler."""
        running = self.running
        if self._in_flight is not None:
            running = [seq for seq in running if not self._ends_when_read(seq)]
        if self.config.prefix_caching:
            self._find_cached_prefixes()
        plan = self.scheduler.schedule(self.waiting, running, self.allocator.num_free)
        self._preempt(plan.preempted)
        if plan.preempted:
            self._fit_to_free_blocks(plan)
        stats.num_preempted = len(plan.preempted)
        if not plan.scheduled and not plan.preempted and self._in_flight is None:
            raise FastgenError(f"Scheduler {self.config.scheduler!r} scheduled nothing with "
                               f"{len(self.waiting)} waiting and {len(self.running)} running.")
        return plan

    def _fit_to_free_blocks(self, plan: StepPlan) -> None:
        """Drop what of the plan the free blocks cannot hold. A scheduler counts the blocks of the
        sequences it preempts as freed, but a block that a preempted sequence shares with one that
        keeps running (a cached prefix) stays held. A running sequence left out keeps its blocks
        and grows a later step; a waiting one stays waiting, and those after it too (none
        overtakes it). An admission is counted as if every block of its cached prefix came out of
        the free pool."""
        bs, free = self.config.block_size, self.allocator.num_free
        kept, admitting = [], True
        for seq, n in plan.scheduled:
            waiting = seq.status is SequenceStatus.WAITING
            if waiting and not admitting:
                continue
            need = -(-(seq.num_found_cached + n) // bs) if waiting else seq.blocks_needed(n, bs)
            if need <= free:
                kept.append((seq, n))
                free -= need
            elif waiting:
                admitting = False
        if len(kept) < len(plan.scheduled):
            log.debug("plan: %d of %d scheduled sequences left out, their blocks still shared with "
                      "running ones", len(plan.scheduled) - len(kept), len(plan.scheduled))
            plan.scheduled = kept

    def _ends_when_read(self, seq: Sequence) -> bool:
        """Whether the tokens `seq` awaits take it to max_tokens or max_model_len."""
        if not seq.num_awaiting:
            return False
        length = len(seq.token_ids) + seq.num_awaiting
        return length - seq.prompt_len >= seq.params.max_tokens or length >= self.max_model_len

    @staticmethod
    def _can_overlap(plan: StepPlan) -> bool:
        """Penalties read a sequence's tokens on the host: with one awaited, the step waits."""
        return not any(seq.num_awaiting and seq.params.penalized for seq, _ in plan.scheduled)

    def _launch(self, plan: StepPlan, stats: StepStats, t0: float) -> LaunchedStep:
        """Grow the plan's sequences, build the batch and queue its forward pass and sampling;
        the sampled tokens are read later (`_complete`)."""
        scheduled = self._admit_and_grow(plan.scheduled, stats)
        batch = RaggedBatch.build(scheduled, self.config.block_size, self.device)
        if batch.awaited_rows:
            self._fill_awaited(batch)
        sampling = SamplingMetadata.build(batch.sampling_seqs, self.device)
        prompt_logprobs = extend_for_prompt_logprobs(batch)
        t1 = time.perf_counter()
        logits = self._forward(batch, stats)
        t2 = time.perf_counter()
        tokens, sampled_logprobs = self._sample(batch, logits, sampling, prompt_logprobs)
        for seq, n in zip(batch.sequences, batch.query_lens):
            seq.num_computed += n
        for seq in batch.sampling_seqs:
            seq.num_awaiting += 1
        stats.num_tokens, stats.num_seqs, stats.num_decodes = (
            batch.num_tokens, batch.num_seqs, batch.num_decodes)
        stats.schedule_s, stats.forward_s, stats.sample_s = t1 - t0, t2 - t1, time.perf_counter() - t2
        return LaunchedStep(batch, tokens, HostCopy(tokens), sampled_logprobs, stats)

    def _fill_awaited(self, batch: RaggedBatch) -> None:
        """Put the step in flight's sampled tokens, on the device, into the decodes that await them."""
        previous = self._in_flight
        row_of = {id(seq): row for row, seq in enumerate(previous.batch.sampling_seqs)}
        rows = batch.awaited_rows
        sources = [row_of[id(batch.sequences[i])] for i in rows]
        n = len(rows)
        if rows[-1] == n - 1 and sources == list(range(sources[0], sources[0] + n)):
            # The usual decode step: the last step's samplers, in the same order, come first.
            batch.input_ids[:n] = previous.tokens[sources[0]:sources[0] + n]
            return
        index = staged(rows + sources, torch.int64, self.device)
        batch.input_ids[index[:n]] = previous.tokens[index[n:]].to(batch.input_ids.dtype)

    def _take_in_flight(self) -> LaunchedStep | None:
        launched, self._in_flight = self._in_flight, None
        return launched

    def _complete(self, launched: LaunchedStep | None, finished_only: bool) -> list[RequestOutput]:
        """Read a launched step's tokens (waiting for the device), append them, check stops."""
        if launched is None:
            return []
        t0 = time.perf_counter()
        next_tokens = launched.host_tokens.tolist()
        launched.sampled_logprobs.record(next_tokens)
        t1 = time.perf_counter()
        if self.config.prefix_caching:   # before stops free the blocks: they stay findable
            self._cache_computed_blocks(launched.batch.sequences)
        outputs = self._postprocess(launched.batch, next_tokens, finished_only)
        stats = launched.stats
        stats.sample_s += t1 - t0
        stats.postprocess_s = time.perf_counter() - t1
        self._record(stats)
        return outputs

    def _forward(self, batch: RaggedBatch, stats: StepStats) -> torch.Tensor:
        """logits [S + R, V]: replayed from a CUDA graph where one serves the step, else the
        model's forward pass over the backend's plan for the step."""
        if self.step_graphs is not None:
            logits = self.step_graphs.run(batch)
            if logits is not None:
                stats.graph_replayed = True
                return logits
        batch.attn_metadata = self.backend.prepare(batch)
        return self.model.forward(batch, self.kv_cache)

    def _sample(self, batch: RaggedBatch, logits: torch.Tensor, sampling: SamplingMetadata,
                prompt_logprobs: PromptLogprobPlan) -> tuple[torch.Tensor, SampledLogprobs]:
        """logits: [S + R, V], the sampling rows then the prompt-logprob rows -> next tokens [S] on
        the device, and the rows whose sampled tokens' log-probabilities are recorded once read.
        Records the prompt log-probabilities that sequences asked for."""
        seqs = batch.sampling_seqs
        logits, extra = logits[:len(seqs)], logits[len(seqs):]
        if prompt_logprobs:
            prompt_logprobs.record(extra)
        sampled_logprobs = SampledLogprobs(logits, seqs)   # before processing: the model's own
        logits = apply_logits_processors(logits, seqs)
        return self.backend.sample(logits, sampling, self.generator), sampled_logprobs

    def _record(self, stats: StepStats) -> None:
        stats.num_running, stats.num_waiting = len(self.running), len(self.waiting)
        stats.blocks_used, stats.blocks_free = self.allocator.num_used, self.allocator.num_free
        self.totals.add(stats)
        self.last_stats = stats
        self.plugins.hook.on_step_finished(engine=self, stats=stats)

    def _preempt(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            self.running.remove(seq)
            self.allocator.free(seq.block_ids)
            seq.block_ids = []
            seq.num_computed = 0
            seq.num_cached_blocks = 0
            seq.status = SequenceStatus.WAITING
            seq.num_preemptions += 1
        # Back to the front, oldest first, so they resume before newer requests.
        for seq in sorted(seqs, key=lambda s: s.seq_index, reverse=True):
            self.waiting.appendleft(seq)

    def _admit_and_grow(self, scheduled: list[tuple[Sequence, int]],
                        stats: StepStats) -> list[tuple[Sequence, int]]:
        """Admit the plan's waiting sequences (each starting from its cached prefix, if any) and
        give every scheduled sequence the blocks its tokens need; the plan with each sequence's
        tokens to compute now (fewer where a cached prefix covers them)."""
        bs = self.config.block_size
        now = time.monotonic()
        grown = []
        for seq, n in scheduled:
            if seq.status is SequenceStatus.WAITING:
                self.waiting.remove(seq)
                self.running.append(seq)
                seq.status = SequenceStatus.RUNNING
                if seq.first_scheduled_time is None:
                    seq.first_scheduled_time = now
                if self.config.prefix_caching:
                    n = self._start_from_cached_prefix(seq, n, stats)
            need = seq.blocks_needed(n, bs)
            if need:   # most steps of a decode need none
                seq.block_ids += self.allocator.allocate(need)
            grown.append((seq, n))
        return grown

    def _find_cached_prefixes(self) -> None:
        """Set `num_found_cached` on the waiting sequences, oldest first, whose tokens after their
        cached prefix still fit the token budget: those the step may admit. Set `waits_for_prefix`
        on those among them whose next block a sequence ahead of them computes (a running prompt,
        or a waiting one this step may admit): n completions of one prompt, or requests that
        arrive together with the same system prompt. Held back until it is cached, each computes
        only what is its own."""
        if not self.waiting:
            return
        budget, bs = self.config.token_budget, self.config.block_size
        computing = self._prompt_blocks_in_flight()
        for seq in self.waiting:
            if budget <= 0:
                break
            keys = self._reusable_keys(seq)
            found = self.allocator.num_cached_prefix(keys)
            seq.num_found_cached = found * bs
            seq.waits_for_prefix = found < len(keys) and keys[found] in computing
            if seq.waits_for_prefix:
                continue
            budget -= seq.num_pending - seq.num_found_cached
            computing.update(keys[found:])

    def _prompt_blocks_in_flight(self) -> set[bytes]:
        """The keys of the blocks that running sequences' prompts have yet to put in the prefix
        cache (computed later, or in a step whose tokens are not yet read)."""
        bs = self.config.block_size
        computing: set[bytes] = set()
        for seq in self.running:
            prompt_blocks = (seq.prompt_len - 1) // bs
            if seq.num_cached_blocks < prompt_blocks:
                computing.update(seq.block_keys(prompt_blocks, bs)[seq.num_cached_blocks:])
        return computing

    def _reusable_keys(self, seq: Sequence) -> list[bytes]:
        """The prefix-cache keys of the blocks `seq` may start from: every whole block before its
        last token, which is always computed (its logits give the next token); none for a request
        asking for prompt logprobs, which need the whole prompt's logits."""
        if seq.params.prompt_logprobs is not None:
            return []
        bs = self.config.block_size
        return seq.block_keys((len(seq.token_ids) - 1) // bs, bs)

    def _start_from_cached_prefix(self, seq: Sequence, n: int, stats: StepStats) -> int:
        """Give a sequence being admitted (no blocks, nothing computed) the cached blocks of its
        longest cached prefix, as computed; the tokens of its `n` planned that are left to do.
        The scheduler planned its blocks as if none were cached: it needs no more than that."""
        seq.num_found_cached = 0
        seq.waits_for_prefix = False
        blocks = self.allocator.cached_prefix(self._reusable_keys(seq))
        seq.num_cached_blocks = len(blocks)
        if not blocks:
            return n
        seq.block_ids = blocks
        seq.num_computed = len(blocks) * self.config.block_size
        stats.num_cached_tokens += seq.num_computed
        if seq.num_preemptions == 0:
            seq.num_cached_prompt_tokens = seq.num_computed
        return min(n, seq.num_pending)

    def _cache_computed_blocks(self, seqs: list[Sequence]) -> None:
        """Put the whole blocks the sequences have computed in the prefix cache."""
        bs = self.config.block_size
        for seq in seqs:
            whole = min(seq.num_computed, len(seq.token_ids)) // bs
            if whole > seq.num_cached_blocks and not seq.is_finished:
                keys = seq.block_keys(whole, bs)
                for i in range(seq.num_cached_blocks, whole):
                    self.allocator.cache(seq.block_ids[i], keys[i])
                seq.num_cached_blocks = whole

    def _postprocess(self, batch: RaggedBatch, next_tokens: list[int],
                     finished_only: bool = False) -> list[RequestOutput]:
        outputs = []
        now = time.monotonic()
        for seq, token in zip(batch.sampling_seqs, next_tokens):
            if seq.is_finished:   # aborted, or stopped by a token read after this step's launch
                continue
            seq.num_awaiting -= 1
            seq.token_ids.append(token)
            if seq.first_token_time is None:
                seq.first_token_time = now
            reason = self._check_stop(seq, token)
            if reason is not None:
                self._dequeue(seq)   # preempted while its token was on the device, it waits
                outputs.append(self._finish(seq, reason))
            elif not finished_only:
                outputs.append(self._output(seq))
        return outputs

    def _check_stop(self, seq: Sequence, token: int) -> FinishReason | None:
        params = seq.params
        hit_stop_string = self.detokenizers[seq.request_id].add(token)
        if hit_stop_string or token in params.stop_token_ids:
            return FinishReason.STOP
        if not params.ignore_eos and token in seq.eos_token_ids:
            return FinishReason.STOP
        if seq.num_generated >= params.max_tokens or len(seq.token_ids) >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _output(self, seq: Sequence, finished: bool = False) -> RequestOutput:
        detok = self.detokenizers[seq.request_id]
        new_text = detok.take_new_text(finished)
        sent, seq.num_sent = seq.num_sent, seq.num_generated
        whole = finished or not seq.delta_outputs
        wants_logprobs = seq.params.logprobs is not None
        return RequestOutput(request_id=seq.request_id, prompt_token_ids=seq.prompt_token_ids,
                             token_ids=seq.output_token_ids if whole else [],
                             text=(detok.text if finished else detok.text[:detok.emitted]) if whole else "",
                             new_text=new_text, new_token_ids=seq.token_ids[seq.prompt_len + sent:],
                             new_logprobs=seq.logprobs[sent:] if wants_logprobs else None,
                             finished=finished,
                             finish_reason=seq.finish_reason.value if seq.finish_reason else None,
                             metrics=self._metrics(seq) if finished else None,
                             logprobs=list(seq.logprobs) if wants_logprobs and whole else None,
                             prompt_logprobs=(seq.prompt_logprobs
                                              if seq.params.prompt_logprobs is not None else None),
                             cumulative_logprob=(seq.cumulative_logprob
                                                 if seq.params.records_logprobs else None),
                             num_cached_tokens=seq.num_cached_prompt_tokens)

    @staticmethod
    def _metrics(seq: Sequence) -> RequestMetrics:
        return RequestMetrics(arrival_time=seq.arrival_time, first_scheduled_time=seq.first_scheduled_time,
                              first_token_time=seq.first_token_time, finished_time=time.monotonic(),
                              num_preemptions=seq.num_preemptions)

    def _finish(self, seq: Sequence, reason: FinishReason) -> RequestOutput:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.allocator.free(seq.block_ids)
        seq.block_ids = []
        output = self._output(seq, finished=True)
        del self.sequences[seq.request_id]
        del self.detokenizers[seq.request_id]
        self.plugins.hook.on_request_finished(engine=self, output=output)
        return output
