"""AsyncEngine: the Engine's step loop on a worker thread, fed and read from asyncio transports.

The forward pass never runs on the event loop: transports stay responsive while a step
computes. Requests are validated and tokenized in the caller's thread, so a bad request fails
at once with a RequestError and never reaches the engine.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import AsyncIterator

from .engine import Engine
from .errors import FastgenError
from .request import RequestOutput, SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(FastgenError):
    """The engine loop is not running (shut down, or never started)."""


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._adds: list = []
        self._aborts: list[str] = []
        # request id -> (event loop, queue) of the coroutine reading that request's outputs
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
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
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10)

    # --- requests ----------------------------------------------------------------------------

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None,
                       delta_outputs: bool = False) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as it advances; the last has `finished` set. With
        `delta_outputs`, those before the last carry only what is new (`RequestOutput`).

        Leaving the iteration early (a client that went away) aborts the request, which frees
        its blocks at the engine's next step.
        """
        if not self.alive or not self.accepting:
            state = "shutting down" if self._thread is not None else "not started"
            raise EngineDeadError(f"The engine is not accepting requests (it is {state}).")
        seq = self.engine.make_sequence(prompt, params, request_id)
        seq.delta_outputs = delta_outputs
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if seq.request_id in self._streams:
                from .errors import RequestError
                raise RequestError(f"Request id {seq.request_id!r} is already in use.")
            self._streams[seq.request_id] = (asyncio.get_running_loop(), queue)
            self._adds.append(seq)
        self._wake.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(seq.request_id)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
        self._wake.set()

    # --- the worker thread -------------------------------------------------------------------

    def _deliver(self, request_id: str, item) -> None:
        with self._lock:
            last = isinstance(item, BaseException) or item.finished
            target = self._streams.pop(request_id, None) if last else self._streams.get(request_id)
        if target is None:
            return
        loop, queue = target
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # that reader's event loop is closed: nobody will read this request
            if not last:
                with self._lock:
                    self._streams.pop(request_id, None)
                self.abort(request_id)

    def _take_commands(self) -> tuple[list, list[str]]:
        with self._lock:
            adds, self._adds = self._adds, []
            aborts, self._aborts = self._aborts, []
        return adds, aborts

    def _loop(self) -> None:
        try:
            self._serve_steps()
        except BaseException as e:  # never leave readers waiting on a thread that is gone
            log.exception("the engine loop died")
            self._stop = True
            error = EngineDeadError(f"The engine loop stopped ({type(e).__name__}: {e}); restart the server.")
            with self._lock:
                streams, self._streams = self._streams, {}
            for loop, queue in streams.values():
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, error)
                except RuntimeError:
                    pass

    def _serve_steps(self) -> None:
        engine = self.engine
        engine.use_device_here()   # this thread runs the steps: its current CUDA device is theirs
        while not self._stop:
            adds, aborts = self._take_commands()
            for seq in adds:
                engine.add_sequence(seq)
            for request_id in aborts:
                output = engine.abort_request(request_id)
                if output is not None:
                    self._deliver(request_id, output)
            if not engine.has_unfinished():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = engine.step()
            except Exception as e:  # a failed step fails its requests, not the server
                log.exception("engine step failed; aborting the requests in flight")
                error = FastgenError(f"The engine failed while serving this request ({e}); "
                                     f"retry it, and report the error if it repeats.")
                for request_id in list(engine.sequences):
                    engine.abort_request(request_id)
                    self._deliver(request_id, error)
                continue
            for output in outputs:
                self._deliver(output.request_id, output)
