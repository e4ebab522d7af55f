"""transports.stdin: requests as JSON lines on stdin, answers as JSON lines on stdout.

Each input line is one request:

    {"id": "a", "prompt": "Hello", "max_tokens": 32, "temperature": 0}

`prompt` is a string or a list of token ids; `messages` ([{"role": ..., "content": ...}, ...])
may come instead and is rendered with the model's chat template. The sampling fields are those of
`fastgen.SamplingParams` (max_tokens, temperature, top_p, top_k, min_p, seed, stop,
stop_token_ids, ignore_eos, presence_penalty, frequency_penalty, repetition_penalty, logit_bias,
logprobs, prompt_logprobs, cumulative_logprob); a field left out takes its default there.
`logit_bias` is {"<token id>": bias, ...} with biases in [-100, 100], added to the logits before
sampling (-100 bans a token, +100 forces it, greedy requests included). `id` (a string or an integer) is echoed
on every line that answers the request; it is optional when requests are sent one at a time.

A finished request gets one line:

    {"id": "a", "text": "...", "token_ids": [...], "finish_reason": "stop",
     "usage": {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7,
               "prompt_tokens_details": {"cached_tokens": 0}}}

With "logprobs": N, the finished line (or each stream line, for its tokens) also has "logprobs":
one {"token_id", "logprob", "top": [[token id, logprob], ...]} per generated token; with
"prompt_logprobs": N, the finished line has "prompt_logprobs", the same for each prompt token
after the first. With "cumulative_logprob": true (or with logprobs), the finished line has
"cumulative_logprob", the sum of the generated tokens' log-probabilities.

With "stream": true, each new piece of text gets {"id", "text", "token_ids", "finished": false}
(the piece and the token ids it came from), and the last line, with "finished": true, also has
finish_reason and usage. A line that cannot be served gets {"id": <its id, or null when it cannot
be read>, "error": "<what is wrong>"} and serving goes on.

Requests are served concurrently, so answers come in the order requests finish: match them by id.
At the end of input the transport lets the requests in flight finish, writes their answers and
returns.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import stat
import sys
import threading
from typing import Any, Awaitable, BinaryIO, Callable

import msgspec

import fastgen
from fastgen.async_engine import AsyncEngine
from fastgen.config import Config
from fastgen.errors import FastgenError, RequestError
from fastgen.request import RequestOutput, SamplingParams, TokenLogprob

from ._common import UNSET, Message, Unset, Unsent, render_chat, sampling_params

log = logging.getLogger(__name__)

LINE_LIMIT = 64 * 2**20   # bytes; a longer input line is answered with an error and skipped
_CHUNK = 2**16

class StdinRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One input line. Sampling fields left UNSET take `SamplingParams`' defaults."""

    id: str | int | None = None
    prompt: str | list[int] | None = None
    messages: list[Message] | None = None
    stream: bool = False
    max_tokens: int | Unset = UNSET
    temperature: float | Unset = UNSET
    top_p: float | Unset = UNSET
    top_k: int | Unset = UNSET
    seed: int | None | Unset = UNSET
    stop: str | list[str] | Unset = UNSET
    stop_token_ids: list[int] | Unset = UNSET
    ignore_eos: bool | Unset = UNSET
    min_p: float | Unset = UNSET
    presence_penalty: float | Unset = UNSET
    frequency_penalty: float | Unset = UNSET
    repetition_penalty: float | Unset = UNSET
    logprobs: int | None | Unset = UNSET
    prompt_logprobs: int | None | Unset = UNSET
    # Values are checked by SamplingParams, so a bad key or bias gets its message naming logit_bias.
    logit_bias: dict[str, Any] | Unset = UNSET
    cumulative_logprob: bool | Unset = UNSET

    def sampling_params(self) -> SamplingParams:
        return sampling_params(self)


_decoder = msgspec.json.Decoder(StdinRequest)
_encoder = msgspec.json.Encoder()


def _with_logprobs(line: dict, out: RequestOutput, logprobs: list[TokenLogprob] | None) -> dict:
    """The line, with `logprobs` (of the line's tokens) when the request asked for them."""
    if logprobs is not None:
        line["logprobs"] = logprobs
    if out.prompt_logprobs is not None and out.finished:
        line["prompt_logprobs"] = out.prompt_logprobs
    if out.cumulative_logprob is not None and out.finished:
        line["cumulative_logprob"] = out.cumulative_logprob
    return line


def _id_of(line: bytes) -> str | int | None:
    """The id of a line that failed validation, when the line is JSON with a usable id."""
    try:
        data = msgspec.json.decode(line)
    except msgspec.DecodeError:
        return None
    request_id = data.get("id") if isinstance(data, dict) else None
    return request_id if isinstance(request_id, (str, int)) and not isinstance(request_id, bool) else None


def _invalid_request_message(error: msgspec.ValidationError) -> str:
    message = str(error)
    if "unknown field" in message and " - at `" not in message:   # a top-level field
        fields = ", ".join(StdinRequest.__struct_fields__)
        return f"Invalid request: {message}; the fields are {fields}."
    return f"Invalid request: {message}."


# --- reading lines without blocking the event loop --------------------------------------------


class _BlockingReads:
    """Runs a blocking read on a daemon thread, so a read still waiting at exit holds nothing up.

    (A read in the default executor would keep `asyncio.run` and the interpreter from exiting
    until the terminal sends a line.)
    """

    def __init__(self, read: Callable[[], bytes]) -> None:
        self._read = read
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._work, name="fastgen-stdin", daemon=True).start()

    def _work(self) -> None:
        while True:
            loop, future = self._jobs.get()
            if future is None:
                return
            try:
                result, error = self._read(), None
            except Exception as e:
                result, error = b"", e
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:   # the event loop is closed: nobody is reading any more
                return

    async def __call__(self) -> bytes:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._jobs.put((loop, future))
        return await future

    def close(self) -> None:
        self._jobs.put((None, None))


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if not future.done():
        future.set_exception(error) if error is not None else future.set_result(result)


class _LineReader:
    """Lines of a byte stream read chunk by chunk; `readline()` gives b"" at the end of input and
    None in place of a line longer than LINE_LIMIT (which is skipped)."""

    def __init__(self, read_chunk: Callable[[], Awaitable[bytes | str]], close: Callable[[], None]) -> None:
        self._read_chunk = read_chunk
        self.close = close
        self._buffer = bytearray()
        self._eof = False

    async def readline(self) -> bytes | None:
        too_long = False
        scanned = 0
        while True:
            end = self._buffer.find(b"\n", scanned)
            if end != -1:
                line = bytes(self._buffer[:end + 1])
                del self._buffer[:end + 1]
                return None if too_long or len(line) > LINE_LIMIT else line
            if self._eof:
                line = bytes(self._buffer)
                self._buffer.clear()
                return None if too_long or len(line) > LINE_LIMIT else line
            if len(self._buffer) > LINE_LIMIT:
                self._buffer.clear()
                too_long = True
            scanned = len(self._buffer)
            chunk = await self._read_chunk()
            if isinstance(chunk, str):
                chunk = chunk.encode()
            self._eof = not chunk
            self._buffer += chunk


def _pipe_fd(file) -> int | None:
    """The file's descriptor when it is a pipe or socket the event loop can watch, else None."""
    if sys.platform == "win32":
        return None
    try:
        fd = file.fileno()
        mode = os.fstat(fd).st_mode
    except (AttributeError, OSError, ValueError):   # io.BytesIO, a closed file, ...
        return None
    return fd if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) else None


async def open_line_reader(file) -> _LineReader:
    """Read `file` from the event loop: pipes and sockets through the loop itself, anything else
    (a terminal, a regular file, an in-memory file) through blocking reads on a helper thread."""
    fd = _pipe_fd(file)
    if fd is None:
        reads = _BlockingReads(lambda: file.readline(LINE_LIMIT + 1))
        return _LineReader(reads, reads.close)
    loop = asyncio.get_running_loop()
    stream = asyncio.StreamReader(limit=_CHUNK, loop=loop)
    # A duplicate descriptor: closing the pipe transport must not close the caller's file.
    pipe = os.fdopen(os.dup(fd), "rb", buffering=0)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stream), pipe)

    def close() -> None:
        transport.close()
        try:   # the duplicate shares the file status flags: give the caller its blocking fd back
            os.set_blocking(fd, True)
        except OSError:
            pass

    return _LineReader(lambda: stream.read(_CHUNK), close)


# --- the transport ----------------------------------------------------------------------------


class StdinTransport:
    """Serves JSON-line requests from `stdin` until it ends; answers go to `stdout`.

    `stdin` and `stdout` are binary file objects (default: the process's own); tests pass pipes
    or in-memory files.
    """

    name = "stdin"

    def __init__(self, engine: AsyncEngine, config: Config, *,
                 stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> None:
        self.engine = engine
        self.config = config
        self.stdin = stdin if stdin is not None else sys.stdin.buffer
        self.stdout = stdout if stdout is not None else sys.stdout.buffer
        self._tasks: set[asyncio.Task] = set()
        self._ids_in_flight: set[str | int] = set()
        self._output_closed = False

    def run(self) -> None:
        """Serve until the end of stdin, finish the requests in flight, shut the engine down."""
        asyncio.run(self.serve())

    async def serve(self) -> None:
        """`run()` for a caller already inside an event loop."""
        reader = await open_line_reader(self.stdin)
        try:
            while not self._output_closed:
                line = await reader.readline()
                if line is None:
                    self._write_error(None, f"The line is longer than {LINE_LIMIT} bytes; "
                                            f"send shorter requests.")
                elif not line:
                    break
                else:
                    self._handle_line(line)
        finally:
            reader.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.engine.shutdown()

    # --- one line ----------------------------------------------------------------------------

    def _handle_line(self, line: bytes) -> None:
        """Validate a line and start a task serving it; the next line is read at once."""
        line = line.strip()
        if not line:
            return
        try:
            request = _decoder.decode(line)
        except msgspec.ValidationError as e:
            return self._write_error(_id_of(line), _invalid_request_message(e))
        except msgspec.DecodeError as e:
            return self._write_error(None, f"The line is not valid JSON ({e}); "
                                           f"send one JSON object per line.")
        try:
            prompt = self._prompt(request)
            params = request.sampling_params()
        except FastgenError as e:
            return self._write_error(request.id, str(e))
        if request.id is not None:
            if request.id in self._ids_in_flight:
                return self._write_error(request.id, f"Request id {request.id!r} is already in "
                                                     f"flight; give each request its own id.")
            self._ids_in_flight.add(request.id)
        task = asyncio.create_task(self._serve_request(request, prompt, params))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _prompt(self, request: StdinRequest) -> str | list[int]:
        if (request.prompt is None) == (request.messages is None):
            raise RequestError('Give exactly one of "prompt" (a string or a list of token ids) '
                               'and "messages" (a list of {"role", "content"} objects).')
        if request.prompt is not None:
            return request.prompt
        return render_chat(self.engine.engine.tokenizer, request.messages)

    async def _serve_request(self, request: StdinRequest, prompt: str | list[int],
                             params: SamplingParams) -> None:
        try:
            unsent = Unsent(params.logprobs is not None)
            async for out in self.engine.generate(prompt, params, delta_outputs=True):
                unsent.add(out)
                if not out.finished:
                    if request.stream and out.new_text:
                        token_ids, logprobs = unsent.take()
                        self._write(_with_logprobs({"id": request.id, "text": out.new_text,
                                                    "token_ids": token_ids, "finished": False},
                                                   out, logprobs))
                    continue
                if request.stream:
                    token_ids, logprobs = unsent.take()
                    self._write(_with_logprobs({"id": request.id, "text": out.new_text,
                                                "token_ids": token_ids, "finished": True,
                                                "finish_reason": out.finish_reason,
                                                "usage": out.usage}, out, logprobs))
                else:
                    self._write(_with_logprobs({"id": request.id, "text": out.text,
                                                "token_ids": out.token_ids,
                                                "finish_reason": out.finish_reason,
                                                "usage": out.usage}, out, out.logprobs))
        except FastgenError as e:   # RequestError (prompt too long, ...), EngineDeadError, a failed step
            self._write_error(request.id, str(e))
        except Exception as e:
            log.exception("request %r failed", request.id)
            self._write_error(request.id, f"The request failed inside the engine "
                                          f"({type(e).__name__}: {e}); see the server log.")
        finally:
            self._ids_in_flight.discard(request.id)

    # --- output (event loop thread only) -----------------------------------------------------

    def _write_error(self, request_id: str | int | None, message: str) -> None:
        self._write({"id": request_id, "error": message})

    def _write(self, line: dict) -> None:
        if self._output_closed:
            return
        try:
            self.stdout.write(_encoder.encode(line) + b"\n")
            self.stdout.flush()
        except (OSError, ValueError) as e:   # the reader went away (broken pipe, closed file)
            self._output_closed = True
            log.warning("stdout is closed (%s); aborting the %d requests in flight",
                        e, len(self._tasks))
            for task in self._tasks:
                task.cancel()


@fastgen.hookimpl
def register_transports(register):
    register(StdinTransport)
