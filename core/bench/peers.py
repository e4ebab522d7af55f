"""The transformers peers: the benchmark's workload through transformers on the same checkpoint.

What a user of fastgen would otherwise run, as benchmark targets (the `Target` protocol of
fastgen.bench.runner), on the same checkpoint, dtype and threads:

- `TransformersGenerateTarget`: `model.generate` with static batching, as a plain generate loop
  serves: the requests waiting when a batch starts (up to `max_batch`) are left-padded into one
  batch, which runs until its longest request is done; requests arriving meanwhile wait for the
  next batch. A streamer times every step, so TTFT and per-token latency are measured; a request
  counts as finished when its own tokens are out, although its batch computes on.
- `TransformersContinuousTarget`: transformers' continuous batching (the manager behind
  `generate_batch`), fed request by request as clients send them, streaming; where the installed
  transformers has it.

Neither reports engine steps, so tokens per step and budget utilisation are blank for them. The
helpers here (`load_hf`, `hf_generate`, `continuous_batching_config`) are shared with
benchmarks/offline_throughput.py.
"""

from __future__ import annotations

import asyncio
import gc
from typing import AsyncIterator

import numpy as np

from ..errors import ConfigError
from .runner import TokenUpdate
from .trace import StepTrace
from .workload import BenchRequest, checkpoint_vocabulary

PEERS = ("transformers",)


# --- helpers shared with benchmarks/offline_throughput.py --------------------------------------

def load_hf(folder, dtype, attn: str = "sdpa"):
    """The checkpoint as a transformers model in eval mode (`dtype` a torch dtype)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn).eval()


def generate_draws(sampling: dict | None) -> dict:
    """transformers' generation settings for greedy draws (None) or sampled ones (`sampling`'s
    temperature, top_p and top_k)."""
    if sampling:
        return dict(do_sample=True, **sampling)
    return dict(do_sample=False, temperature=None, top_p=None, top_k=None)


def hf_generate(model, input_ids, gen_len: int, streamer=None, attention_mask=None,
                sampling: dict | None = None):
    """`generate` of exactly `gen_len` tokens per row (EOS cannot end it early): greedy, or
    sampled with `sampling`'s temperature, top_p and top_k.

    input_ids: [B, P] (left-padded where `attention_mask` [B, P] says so) -> [B, gen_len]
    """
    import torch

    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                             max_new_tokens=gen_len, min_new_tokens=gen_len, pad_token_id=0,
                             streamer=streamer, **generate_draws(sampling))
    return out[:, input_ids.shape[1]:]


def has_continuous_batching(model) -> bool:
    return hasattr(model, "init_continuous_batching")


def continuous_batching_config(max_seq_len: int, max_requests: int, token_budget: int,
                               page_size: int = 256):
    """A ContinuousBatchingConfig for CPU: an explicit cache for `max_requests` sequences of up to
    `max_seq_len` tokens (nothing to infer from GPU memory) and fastgen's token budget per step."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    pages_per_request = -(-max_seq_len // page_size)
    return ContinuousBatchingConfig(
        page_size=page_size, num_blocks=pages_per_request * max_requests + 8,
        max_batch_tokens=token_budget, max_requests_per_batch=max_requests,
        allow_block_sharing=False, use_cuda_graph=False)


# --- targets -------------------------------------------------------------------------------------

class _PeerTarget:
    """What both peers share: the checkpoint, its vocabulary, the model, no steps."""

    name = ""
    token_budget = None

    def __init__(self, folder, dtype: str, threads: int | None = None, attn: str = "sdpa") -> None:
        self.folder = folder
        self.dtype = dtype
        self.threads = threads
        self.attn = attn
        self.model = None
        self.model_name = getattr(folder, "name", str(folder))

    def open(self) -> None:
        import torch

        from ..checkpoint import DTYPES

        if self.threads:
            torch.set_num_threads(self.threads)
        self._allowed, self._max_model_len = checkpoint_vocabulary(self.folder)
        self.model = load_hf(self.folder, DTYPES[self.dtype], self.attn)

    def allowed_token_ids(self) -> np.ndarray:
        return self._allowed

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    def take_steps(self) -> list[StepTrace]:
        return []

    def close(self) -> None:
        self.model = None
        gc.collect()


class _BatchStreamer:
    """A `generate` streamer (called on the worker thread) that hands each row's progress to its
    client's queue on the event loop; a row is finished once it has its own max_tokens."""

    def __init__(self, rows: list[tuple[BenchRequest, asyncio.Queue]], loop) -> None:
        self.rows = rows
        self.loop = loop
        self.calls = 0

    def put(self, value) -> None:
        self.calls += 1
        step = self.calls - 1        # the first call carries the prompt
        if step == 0:
            return
        for request, updates in self.rows:
            if step <= request.max_tokens:
                update = TokenUpdate(step, step == request.max_tokens,
                                     "length" if step == request.max_tokens else None)
                self.loop.call_soon_threadsafe(updates.put_nowait, update)

    def end(self) -> None:
        pass


async def _updates(updates: asyncio.Queue) -> AsyncIterator[TokenUpdate]:
    """A request's updates until it finishes; an exception put in the queue is raised."""
    while True:
        update = await updates.get()
        if isinstance(update, BaseException):
            raise update
        yield update
        if update.finished:
            return


class TransformersGenerateTarget(_PeerTarget):
    """transformers `generate`, static batches of up to `max_batch` waiting requests."""

    name = "transformers generate"

    def __init__(self, folder, dtype: str, threads: int | None = None, max_batch: int = 64,
                 attn: str = "sdpa") -> None:
        super().__init__(folder, dtype, threads, attn)
        self.max_batch = max_batch
        self.batches: list[list[int]] = []     # the workload indices of each batch run, in order
        self.waiting: list[tuple[BenchRequest, asyncio.Queue]] = []
        self.wake: asyncio.Event | None = None
        self.worker: asyncio.Task | None = None

    async def start(self) -> None:
        self.waiting = []
        self.wake = asyncio.Event()
        self.worker = asyncio.create_task(self._serve())

    async def stream(self, request: BenchRequest, request_id: str) -> AsyncIterator[TokenUpdate]:
        updates: asyncio.Queue = asyncio.Queue()
        self.waiting.append((request, updates))
        self.wake.set()
        async for update in _updates(updates):
            yield update

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            self.wake.clear()
            # Let the clients that send in this same instant (all of them at the start, or those
            # whose requests ended with the last batch) join the batch, as a server's queue would.
            for _ in range(8):
                await asyncio.sleep(0)
            while self.waiting:
                batch, self.waiting = self.waiting[:self.max_batch], self.waiting[self.max_batch:]
                self.batches.append([request.index for request, _ in batch])
                try:
                    await asyncio.to_thread(self._generate, batch, loop)
                except Exception as e:  # each request of the batch reports it
                    for _, updates in batch:
                        updates.put_nowait(RuntimeError(f"generate failed: {type(e).__name__}: {e}"))
                for _ in range(8):
                    await asyncio.sleep(0)

    def _generate(self, batch: list[tuple[BenchRequest, asyncio.Queue]], loop) -> None:
        import torch

        width = max(request.prompt_len for request, _ in batch)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)     # [B, P], left-padded
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (request, _) in enumerate(batch):
            input_ids[row, width - request.prompt_len:] = torch.tensor(request.prompt_token_ids)
            mask[row, width - request.prompt_len:] = 1
        gen_len = max(request.max_tokens for request, _ in batch)
        hf_generate(self.model, input_ids, gen_len, _BatchStreamer(batch, loop), mask)

    async def stop(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
            await asyncio.gather(self.worker, return_exceptions=True)
            self.worker = None


class TransformersContinuousTarget(_PeerTarget):
    """transformers' continuous batching manager, one streamed request per client request."""

    name = "transformers continuous"

    def __init__(self, folder, dtype: str, threads: int | None = None, max_requests: int = 64,
                 token_budget: int = 512, max_seq_len: int = 2048, attn: str = "sdpa") -> None:
        super().__init__(folder, dtype, threads, attn)
        self.max_requests = max_requests
        self.cb_token_budget = token_budget
        self.max_seq_len = max_seq_len
        self.manager = None

    def open(self) -> None:
        super().open()
        if not has_continuous_batching(self.model):
            raise ConfigError("This transformers has no continuous batching (generate_batch); "
                              "upgrade transformers or leave this peer out.")

    async def start(self) -> None:
        import logging

        from transformers import GenerationConfig

        # Its CPU notes (no psutil, EOS disabled) are noise here; a request's failure still
        # reaches the run through its output's error.
        logging.getLogger("ContinuousBatchingLogger").setLevel(logging.CRITICAL)

        generation = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0,
                                      max_new_tokens=self.max_seq_len)
        config = continuous_batching_config(min(self.max_seq_len, self._max_model_len),
                                            self.max_requests, self.cb_token_budget)
        self.manager = self.model.init_continuous_batching(generation_config=generation,
                                                           continuous_batching_config=config)
        self.manager.start()

    async def stream(self, request: BenchRequest, request_id: str) -> AsyncIterator[TokenUpdate]:
        results: asyncio.Queue = asyncio.Queue()
        # The handler goes in before the request, so no output can miss it.
        self.manager.register_result_handler(request_id, results.put_nowait)
        self.manager.add_request(request.prompt_token_ids, request_id=request_id,
                                 max_new_tokens=request.max_tokens, streaming=True, eos_token_id=-1)
        while True:
            output = await results.get()
            if output.error is not None:
                raise RuntimeError(f"continuous batching failed: {output.error}")
            finished = output.is_finished()
            yield TokenUpdate(len(output.generated_tokens), finished, "length" if finished else None)
            if finished:
                return

    async def stop(self) -> None:
        if self.manager is not None:
            manager, self.manager = self.manager, None
            await asyncio.to_thread(manager.stop, block=True, timeout=10)
            manager.destroy()
