"""AsyncEngine: the Engine's step loop on a worker thread, fed and read from asyncio transports.

The forward pass never runs on the event loop: transports stay responsive while a step
computes. Requests are validated and tokenized in the caller's thread, so a bad request fails
at once with a RequestError and never reaches the engine.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from typing import AsyncIterator, Callable

from .engine import Engine
from .errors import FastgenError, RequestError
from .request import RequestOutput, SamplingParams, Sequence

log = logging.getLogger(__name__)


class EngineDeadError(FastgenError):
    """The engine loop is not running (shut down, or never started)."""


class _PendingOutputs:
    """One request's outputs that its reader has not taken yet, on the reader's event loop.

    Outputs that arrive while the reader is busy are merged into one (`RequestOutput.followed_by`):
    a reader that falls behind the engine (a slow client, a loaded event loop) catches up with one
    output, one event to format and one write, instead of one per step it missed. An error is
    kept apart, after the outputs before it."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: collections.deque[RequestOutput | BaseException] = collections.deque()
        self._waiter: asyncio.Future | None = None

    def put(self, item: RequestOutput | BaseException) -> None:
        items = self._items
        if items and isinstance(item, RequestOutput) and isinstance(items[-1], RequestOutput):
            items[-1] = items[-1].followed_by(item)
        else:
            items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> RequestOutput | BaseException:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


def _ends_stream(item: RequestOutput | BaseException) -> bool:
    """A request's last item for its reader: its finished output, or an error."""
    return isinstance(item, BaseException) or item.finished


class CommandInbox:
    """New sequences and aborts for the engine's step loop, put from other threads; the loop takes
    all of them at once (`take`, which `serve_steps` calls), waiting for some while it has
    nothing to do."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._arrived = threading.Event()
        self._adds: list[Sequence] = []
        self._aborts: list[str] = []

    def add(self, seq: Sequence) -> None:
        with self._lock:
            self._adds.append(seq)
        self._arrived.set()

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
        self._arrived.set()

    def wake(self) -> None:
        """End the loop's wait without a command (it is to check whether it should stop)."""
        self._arrived.set()

    def take(self, idle: bool) -> tuple[list[Sequence], list[str]]:
        if idle:
            self._arrived.wait()
        self._arrived.clear()
        with self._lock:
            adds, self._adds = self._adds, []
            aborts, self._aborts = self._aborts, []
        return adds, aborts


def _put_each(batch: list[tuple[str, _PendingOutputs, object]]) -> None:
    for _, pending, item in batch:
        pending.put(item)


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()   # guards _streams
        self._inbox = CommandInbox()
        # request id -> (event loop, pending outputs) of the coroutine reading that request's outputs
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, _PendingOutputs]] = {}
        self._thread: threading.Thread | None = None
        self._stop = False
        self.accepting = True

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "AsyncEngine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="fastgen-engine", daemon=True)
            self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting; let in-flight requests finish for up to `timeout` s, abort the rest."""
        self.accepting = False
        deadline = time.monotonic() + timeout
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for request_id in list(self._streams):
            self.abort(request_id)
        while self._streams and time.monotonic() < deadline + 5:
            await asyncio.sleep(0.01)
        await self._stop_loop()

    async def _stop_loop(self) -> None:
        self._stop = True
        self._inbox.wake()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10)

    # --- requests ----------------------------------------------------------------------------

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None,
                       delta_outputs: bool = False) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as it advances; the last has `finished` set. With
        `delta_outputs`, those before the last carry only what is new (`RequestOutput`). Outputs
        of steps that ended while the caller was busy come merged into one (`_PendingOutputs`).

        Leaving the iteration early (a client that went away) aborts the request, which frees
        its blocks at the engine's next step.
        """
        if not self.alive or not self.accepting:
            state = "shutting down" if self._thread is not None else "not started"
            raise EngineDeadError(f"The engine is not accepting requests (it is {state}).")
        params = params or SamplingParams()
        token_ids = self.engine.check_request(prompt, params)
        if request_id is None:
            request_id = self.engine.next_request_id()
        pending = _PendingOutputs()
        with self._lock:
            if request_id in self._streams:
                raise RequestError(f"Request id {request_id!r} is already in use.")
            self._streams[request_id] = (asyncio.get_running_loop(), pending)
        self._submit(request_id, token_ids, params, delta_outputs)
        finished = False
        try:
            while True:
                item = await pending.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def _submit(self, request_id: str, token_ids: list[int], params: SamplingParams,
                delta_outputs: bool) -> None:
        """Hand a checked request to the engine's loop."""
        seq = self.engine.new_sequence(token_ids, params, request_id)
        seq.delta_outputs = delta_outputs
        self._inbox.add(seq)

    def abort(self, request_id: str) -> None:
        self._inbox.abort(request_id)

    # --- the worker thread -------------------------------------------------------------------

    def _deliver_all(self, items: list[tuple[str, object]]) -> None:
        """Hand (request id, output or error) pairs to their readers: one wake-up of each reader's
        event loop for them all. A wake-up per output cost about 30 us of the two threads' time
        (the loop's self-pipe write and read, a callback each): 8 ms a step for 256 streams on a
        2-core CPU, more than a decode step on a GPU."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[str, _PendingOutputs, object]]] = {}
        with self._lock:
            for request_id, item in items:
                target = (self._streams.pop(request_id, None) if _ends_stream(item)
                          else self._streams.get(request_id))
                if target is not None:
                    loop, pending = target
                    by_loop.setdefault(loop, []).append((request_id, pending, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_each, batch)
            except RuntimeError:  # that event loop is closed: nobody will read these requests
                for request_id, _, item in batch:
                    if not _ends_stream(item):
                        with self._lock:
                            self._streams.pop(request_id, None)
                        self.abort(request_id)

    def _fail_readers(self, error: BaseException) -> None:
        """End every reader's stream with `error` (the loop that served them is gone)."""
        with self._lock:
            readers = list(self._streams)
        self._deliver_all([(request_id, error) for request_id in readers])

    def _loop(self) -> None:
        try:
            serve_steps(self.engine, self._inbox.take, self._deliver_all, lambda: self._stop)
        except BaseException as e:  # never leave readers waiting on a thread that is gone
            log.exception("the engine loop died")
            self._stop = True
            self._fail_readers(EngineDeadError(
                f"The engine loop stopped ({type(e).__name__}: {e}); restart the server."))


Commands = Callable[[bool], tuple[list[Sequence], list[str]]]
Deliver = Callable[[list[tuple[str, object]]], None]


def serve_steps(engine: Engine, next_commands: Commands, deliver: Deliver,
                stopping: Callable[[], bool]) -> None:
    """Run `engine`'s steps until `stopping()`: take the new requests and aborts
    (`next_commands(idle)`, which waits for some when the engine has nothing to do: a
    `CommandInbox`'s `take`), step, and
    `deliver` (request id, output or error) pairs. A failed step fails the requests in flight,
    not the loop. The AsyncEngine's thread runs it, and so does an engine process
    (`fastgen.engine_process`)."""
    engine.use_device_here()   # this thread runs the steps: its current CUDA device is theirs
    while not stopping():
        adds, aborts = next_commands(not engine.has_unfinished())
        for seq in adds:
            engine.add_sequence(seq)
        aborted = [(request_id, engine.abort_request(request_id)) for request_id in aborts]
        deliver([(request_id, output) for request_id, output in aborted if output])
        if not engine.has_unfinished():
            continue
        try:
            outputs = engine.step()
        except Exception as e:  # a failed step fails its requests, not the server
            log.exception("engine step failed; aborting the requests in flight")
            error = FastgenError(f"The engine failed while serving this request ({e}); "
                                 f"retry it, and report the error if it repeats.")
            failed = list(engine.sequences)
            for request_id in failed:
                engine.abort_request(request_id)
            deliver([(request_id, error) for request_id in failed])
            continue
        deliver([(output.request_id, output) for output in outputs])
