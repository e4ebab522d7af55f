"""The engine's step loop in a process of its own (`engine_process = true`).

In one process, the engine's thread and the transport's event loop take turns on one GIL: a
step's host work (scheduling, the batch, detokenizing, outputs) and the transport's (parsing,
formatting, socket writes) add up, and at many concurrent streams that sum, not the device,
bounds the tokens a second. With the engine in a child process they run on two cores.

The serving process keeps what a transport reads (`EngineFront`: the tokenizer, the model's
facts, the settings as the engine resolved them) and checks each request there, so a bad request
never crosses. Requests and aborts go to the child over a pipe; each step's outputs come back in
one message, with the observer hooks' events of that step, which the serving process replays on
its own plugin manager (the metrics of `transports.http` register there). Plugins installed
as packages load in the child as they would in one process; a plugin registered by hand in the
serving process does not reach the child.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import msgspec

import fastgen

from .async_engine import AsyncEngine, CommandInbox, EngineDeadError, serve_steps
from .config import Config
from .errors import FastgenError
from .plugin_manager import PluginManager
from .request import RequestOutput, SamplingParams
from .request_intake import RequestIntake
from .tokenizer import load_tokenizer

log = logging.getLogger(__name__)


class EngineFacts(msgspec.Struct):
    """What the child tells the serving process once its engine is built."""

    config: Config          # with what the engine resolved filled in (step sizes)
    model_name: str
    checkpoint: str         # the folder the tokenizer loads from
    hf_config: object       # the model's configuration (a transformers PretrainedConfig)
    max_model_len: int
    summary: str            # `fastgen serve`'s line on what the engine runs
    occupancy: tuple[int, int, int, int]   # `Engine.occupancy()`: every block free


class EngineFront(RequestIntake):
    """The engine as a transport in the serving process sees it: the facts of `Engine` that
    transports read, request checks (`RequestIntake`), the latest occupancy the child reported,
    and a plugin manager of its own for observers (no plugins loaded: the child's run theirs)."""

    def __init__(self, facts: EngineFacts) -> None:
        super().__init__()
        self.config = facts.config
        self.model_name = facts.model_name
        self.max_model_len = facts.max_model_len
        self.summary = facts.summary
        self.hf_config = facts.hf_config
        self.tokenizer, self.eos_token_ids = load_tokenizer(Path(facts.checkpoint), self.hf_config)
        self.plugins = PluginManager()
        self._occupancy = facts.occupancy

    def occupancy(self) -> tuple[int, int, int, int]:
        """(running, waiting, KV blocks used, KV blocks free) as the child last reported them."""
        return self._occupancy


class EngineProcess(AsyncEngine):
    """An AsyncEngine whose Engine runs in a child process; transports use it as they use one.

    Building it starts the child and waits until its engine is built (the model loaded, graphs
    captured); an engine that fails to build raises its error here. `start()` starts the thread
    that reads the child's outputs. The child is spawned, so it imports the main module again: a
    script that makes an EngineProcess keeps its work under `if __name__ == "__main__":`."""

    def __init__(self, config: Config) -> None:
        context = multiprocessing.get_context("spawn")   # a forked CUDA or torch runtime is unsafe
        self._conn, child_conn = context.Pipe()
        config = msgspec.structs.replace(config, engine_process=True)
        self._process = context.Process(
            target=_child_main, args=(config, child_conn, logging.getLogger().getEffectiveLevel()),
            name="fastgen-engine", daemon=True)
        self._process.start()
        child_conn.close()
        self._send_lock = threading.Lock()
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            self._process.join(5)
            raise FastgenError(f"The engine process exited while starting (exit code "
                               f"{self._process.exitcode}); its log above says why. (A script that "
                               f"makes an EngineProcess needs `if __name__ == '__main__':` around "
                               f"its work: the child imports the script's module again.)") from None
        if kind == "failed":
            self._process.join(5)
            raise FastgenError(payload)
        super().__init__(EngineFront(payload))
        # request id -> prompt token ids, of the requests in flight: a running request's outputs
        # come without theirs (`_to_wire`).
        self._prompts: dict[str, list[int]] = {}

    def _loop(self) -> None:
        """Read the child's messages: outputs and their hook events, until it stops or dies."""
        front = self.engine
        reason = "it exited"
        try:
            while True:
                kind, *payload = self._conn.recv()
                if kind == "stopped":
                    return
                if kind == "dead":
                    reason = payload[0]
                    break
                items, events = payload
                items = [(request_id, self._from_wire(request_id, item)) for request_id, item in items]
                for event, data, occupancy in events:
                    front._occupancy = occupancy
                    if event == "step":
                        front.plugins.hook.on_step_finished(engine=front, stats=data)
                    else:
                        front.plugins.hook.on_request_finished(engine=front, output=data)
                self._deliver_all(items)
        except (EOFError, OSError):
            if self._stop:
                return
            self._process.join(1)
            reason = f"it exited with code {self._process.exitcode}"
        except BaseException as e:   # never leave readers waiting on a thread that is gone
            log.exception("reading the engine process's outputs failed")
            reason = f"{type(e).__name__}: {e}"
        self._stop = True
        log.error("the engine process stopped: %s", reason)
        self._fail_readers(EngineDeadError(
            f"The engine process stopped ({reason}); restart the server."))

    def _from_wire(self, request_id: str, item) -> RequestOutput | BaseException:
        if type(item) is tuple:   # a running request's delta output, as `_to_wire` wrote it
            new_token_ids, new_text, new_logprobs, cumulative_logprob, num_cached_tokens = item
            return RequestOutput(
                request_id=request_id, prompt_token_ids=self._prompts[request_id], token_ids=[],
                text="", new_text=new_text, new_token_ids=new_token_ids, new_logprobs=new_logprobs,
                cumulative_logprob=cumulative_logprob, num_cached_tokens=num_cached_tokens)
        self._prompts.pop(request_id, None)   # a finished output or an error: the request's last
        return item

    def _send(self, message: tuple) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except OSError:   # the child is gone: the reader thread fails every request
            pass

    def _submit(self, request_id: str, token_ids: list[int], params: SamplingParams,
                delta_outputs: bool) -> None:
        self._prompts[request_id] = token_ids
        self._send(("add", request_id, token_ids, params, delta_outputs, time.monotonic()))

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    async def _stop_loop(self) -> None:
        self._stop = True
        self._send(("stop",))
        loop = asyncio.get_running_loop()
        if self._thread is not None:
            await loop.run_in_executor(None, self._thread.join, 10)
        await loop.run_in_executor(None, self._process.join, 10)
        if self._process.is_alive():
            self._process.kill()
        self._conn.close()


# --- the child ---------------------------------------------------------------------------------

def _child_main(config: Config, conn, log_level: int) -> None:
    from .cli import serving_summary
    from .engine import Engine

    # Ctrl-C reaches the whole process group: the serving process decides when the engine stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Whatever the engine's side prints (a plugin, a library's progress bar) is diagnostics: it
    # goes to stderr, never into a transport's answers on stdout (transports.stdin).
    os.dup2(2, 1)
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        engine = Engine(config)
    except FastgenError as e:
        conn.send(("failed", str(e)))
        return
    except Exception as e:
        log.exception("the engine failed to start")
        conn.send(("failed", f"The engine failed to start: {type(e).__name__}: {e}"))
        return
    conn.send(("ready", EngineFacts(
        config=engine.config, model_name=engine.model_name, checkpoint=str(engine.checkpoint),
        hf_config=engine.hf_config, max_model_len=engine.max_model_len,
        summary=serving_summary(engine), occupancy=engine.occupancy())))
    _StepServer(engine, conn).run()


def _to_wire(item: RequestOutput | BaseException):
    """A running request's delta output (the most of what crosses, one a request and step) as a
    tuple of what it carries: its other fields are empty, and the serving process has its prompt.
    A RequestOutput pickled whole cost 7 us to write and read, the tuple under 1 us (256 outputs
    of 32-token prompts, this machine). Anything else crosses as it is."""
    if (type(item) is RequestOutput and not item.finished and not item.token_ids
            and item.prompt_logprobs is None):
        return (item.new_token_ids, item.new_text, item.new_logprobs, item.cumulative_logprob,
                item.num_cached_tokens)
    return item


class _StepServer:
    """The child's side of the pipe: requests in, each step's outputs and hook events out.

    A thread of its own takes the serving process's messages as they come: a long prompt is
    larger than the pipe's buffer, and the server's send would otherwise wait (its event loop
    with it) until the step in progress ended."""

    def __init__(self, engine, conn) -> None:
        self.engine = engine
        self.conn = conn
        self.events: list[tuple[str, object, tuple[int, int, int, int]]] = []
        self.stopping = False
        self._server_gone = False
        self.inbox = CommandInbox()
        engine.plugins.register(self, name="engine-process-relay")
        threading.Thread(target=self._receive, name="fastgen-engine-commands", daemon=True).start()

    def run(self) -> None:
        try:
            serve_steps(self.engine, self.inbox.take, self.deliver, lambda: self.stopping)
        except OSError:   # the serving process is gone: nobody to serve
            return
        except BaseException as e:
            log.exception("the engine loop died")
            self.conn.send(("dead", f"{type(e).__name__}: {e}"))
            return
        if not self._server_gone:
            self.conn.send(("stopped",))

    def _receive(self) -> None:
        try:
            while True:
                kind, *args = self.conn.recv()
                if kind == "add":
                    request_id, token_ids, params, delta_outputs, arrival_time = args
                    seq = self.engine.new_sequence(token_ids, params, request_id)
                    seq.delta_outputs, seq.arrival_time = delta_outputs, arrival_time
                    self.inbox.add(seq)
                elif kind == "abort":
                    self.inbox.abort(args[0])
                elif kind == "stop":
                    self.stopping = True
                    self.inbox.wake()
                    return
        except (EOFError, OSError):   # the serving process is gone: stop serving
            self._server_gone = self.stopping = True
            self.inbox.wake()

    def deliver(self, items: list[tuple[str, object]]) -> None:
        if items or self.events:
            # One pickle: a finished output in both lists is written once.
            self.conn.send(("outputs", [(request_id, _to_wire(item)) for request_id, item in items],
                            self.events))
            self.events = []

    @fastgen.hookimpl
    def on_step_finished(self, engine, stats) -> None:
        if engine is self.engine:
            self.events.append(("step", stats, engine.occupancy()))

    @fastgen.hookimpl
    def on_request_finished(self, engine, output: RequestOutput) -> None:
        if engine is self.engine:
            self.events.append(("request", output, engine.occupancy()))
