"""transports.http: an OpenAI-compatible HTTP API on aiohttp.

    fastgen serve --model DIR --plugin transports.http [--host 127.0.0.1] [--port 8000]

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models (and
/v1/models/{id}), GET /health, and GET /metrics (Prometheus; see metrics.py). Bodies follow
OpenAI's API; docs/serving.md lists the fields served and those refused. A field this server does
not serve yet is refused with a 400 naming it, unless it is at its neutral value (presence_penalty
0, logprobs false, ...): nothing a client asks for is silently ignored.

With an API key (config.api_key, else the FASTGEN_API_KEY environment variable), every endpoint
but GET /health requires `Authorization: Bearer KEY`; the key is compared in constant time.

Every error is a JSON body in OpenAI's shape, {"error": {"message", "type", "param", "code"}}:
400 for a bad request, 401 for a missing or wrong API key, 404 for an unknown model or path, 413
for a body over config.max_body_bytes, 503 while the engine is not accepting requests, 500 (with
a log line) for a bug.

A request is served as one engine request per choice (n per prompt; with best_of, best_of
candidates per prompt, of which the n with the highest cumulative logprob are returned); leaving
the `async for`
over `AsyncEngine.generate` aborts it, so a client that disconnects (aiohttp then cancels its
handler) gives its KV blocks back at the engine's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import signal
import sys
import time
import uuid
from typing import Any, AsyncIterator, Callable

import msgspec
from aiohttp import web

import fastgen
from fastgen.async_engine import AsyncEngine, EngineDeadError
from fastgen.config import Config
from fastgen.errors import FastgenError, RequestError
from fastgen.request import RequestOutput, SamplingParams, TokenLogprob

from ._common import UNSET, Message, Unset, Unsent, render_chat, sampling_params
from .metrics import ServerMetrics

log = logging.getLogger(__name__)

API_KEY_ENV = "FASTGEN_API_KEY"   # the API key when config.api_key is unset

_encoder = msgspec.json.Encoder()


# --- request bodies ---------------------------------------------------------------------------


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool | None = None


class _RequestFields(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Fields both endpoints take; sampling fields left out or null take SamplingParams' defaults."""

    model: str | None = None
    n: int = 1
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    # Keys are token ids as strings (JSON's way); SamplingParams checks keys and biases alike, so
    # every bad entry gets one message naming logit_bias.
    logit_bias: dict[str, Any] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class CompletionRequest(_RequestFields):
    """POST /v1/completions: `prompt` is a string, a list of strings, a list of token ids or a
    list of token-id lists."""

    prompt: str | list[str | int | list[int]]
    logprobs: int | None = None    # the chosen token's logprob and this many alternatives
    echo: bool = False             # the prompt before the completion (with logprobs: its logprobs)
    best_of: int | None = None     # sample this many per prompt, return the n most likely


class ChatRequest(_RequestFields):
    """POST /v1/chat/completions; `max_completion_tokens` is OpenAI's newer name for max_tokens."""

    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None   # alternatives per token, with logprobs true


class _Neutral:
    """The values at which a field not served yet changes nothing (a bool is never a number)."""

    def __init__(self, *values: Any) -> None:
        self.values = values
        self.default = next((v for v in values if v is not None), None)   # named in the error

    def __contains__(self, value: Any) -> bool:
        return any(value is v if v is None or isinstance(v, bool)
                   else (value == v and not isinstance(value, bool)) for v in self.values)


# OpenAI fields (and vLLM extensions) that are not served yet: refused unless at their neutral value.
UNSUPPORTED_FIELDS = {
    CompletionRequest: {"suffix": _Neutral(None, "")},
    ChatRequest: {"best_of": _Neutral(None, 1),   # a completions field: chat has no best_of
                  "tools": _Neutral(None, []),
                  "tool_choice": _Neutral(None, "none", "auto"),
                  "parallel_tool_calls": _Neutral(None, True, False),
                  "functions": _Neutral(None, []),
                  "function_call": _Neutral(None, "none", "auto"),
                  "response_format": _Neutral(None, {"type": "text"}),
                  "modalities": _Neutral(None, ["text"]),
                  "audio": _Neutral(None),
                  "prediction": _Neutral(None),
                  "reasoning_effort": _Neutral(None),
                  "web_search_options": _Neutral(None),
                  "store": _Neutral(None, False),
                  "metadata": _Neutral(None, {}),
                  "service_tier": _Neutral(None, "auto", "default")},
}


# --- response bodies --------------------------------------------------------------------------


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int    # prompt tokens found in the prefix cache, not computed


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(msgspec.Struct):
    """OpenAI's legacy logprobs: one entry per token; an echoed prompt's first token has none."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(msgspec.Struct, kw_only=True):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(msgspec.Struct, kw_only=True):
    """A /v1/completions answer, and each chunk of a streamed one (OpenAI uses one shape)."""

    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None | Unset = UNSET


class ChatMessage(msgspec.Struct):
    role: str
    content: str


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(msgspec.Struct):
    content: list[ChatTokenLogprob]


class ChatChoice(msgspec.Struct, kw_only=True):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletion(msgspec.Struct, kw_only=True):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(msgspec.Struct, kw_only=True):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(msgspec.Struct, kw_only=True):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None | Unset = UNSET


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "fastgen"


class ModelList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[ModelCard]


class ErrorBody(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(msgspec.Struct):
    error: ErrorBody


# --- errors -----------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered with `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def body(self) -> ErrorResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return ErrorResponse(ErrorBody(message=self.message, type=kind, param=self.param, code=self.code))

    def response(self) -> web.Response:
        return web.Response(status=self.status, body=_encoder.encode(self.body()),
                            content_type="application/json", headers=self.headers)


def _error_from(e: FastgenError, fields: tuple[str, ...] = ()) -> ApiError:
    """An ApiError for an engine error: a bad request 400, a stopped engine 503, anything else 500."""
    if isinstance(e, RequestError):
        return ApiError(400, str(e), param=e.param if e.param in fields else None)
    if isinstance(e, EngineDeadError):
        return ApiError(503, str(e), code="engine_unavailable")
    return ApiError(500, str(e))


def _validation_error(e: msgspec.ValidationError, request_type: type) -> ApiError:
    """A 400 naming the field that failed validation, e.g. `stream_options.bad` or `messages[0].role`."""
    message = str(e)
    text, _, path = message.partition(" - at `$")
    path = path.rstrip("`").lstrip(".")
    field = None
    for marker in ("unknown field `", "missing required field `"):
        if marker in text:
            field = text.split(marker, 1)[1].split("`", 1)[0]
    param = ".".join(p for p in (path, field) if p) or None
    if "unknown field" in text and not path:
        fields = ", ".join(sorted(request_type.__struct_fields__))
        return ApiError(400, f"Unrecognized request field `{field}`; the fields this endpoint "
                             f"takes are {fields}.", param=param, code="unknown_parameter")
    return ApiError(400, f"Invalid request: {message}.", param=param)


# --- reading requests -------------------------------------------------------------------------


async def _read_body(request: web.Request, limit: int) -> bytes:
    too_large = ApiError(413, f"The request body is larger than {limit} bytes; send a shorter "
                              f"prompt.", code="request_too_large")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    body = bytearray()
    while chunk := await request.content.read(2**16):
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def _decode(body: bytes, request_type: type) -> Any:
    """The body as `request_type`, after refusing fields this server does not serve yet."""
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError as e:
        raise ApiError(400, f"The request body is not valid JSON ({e}); send a JSON object.",
                       code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    for name, neutral in UNSUPPORTED_FIELDS[request_type].items():
        if name in data:
            value = data.pop(name)
            if value not in neutral:
                default = msgspec.json.encode(neutral.default).decode()
                raise ApiError(400, f"`{name}` is not supported by this server yet; leave it out "
                                    f"or set it to {default}.", param=name, code="unsupported_parameter")
    try:
        return msgspec.convert(data, request_type)
    except msgspec.ValidationError as e:
        raise _validation_error(e, request_type) from None


def _prompt_list(prompt: str | list) -> list[str | list[int]]:
    """The prompts of a completion request: one string or token-id list per prompt."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise ApiError(400, "prompt is an empty list; send a string, a list of strings, a list of "
                            "token ids or a list of token-id lists.", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [prompt]
    if all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt):
        return list(prompt)
    raise ApiError(400, "prompt mixes strings, token ids and lists; send a string, a list of "
                        "strings, a list of token ids or a list of token-id lists.", param="prompt")


# --- answers ----------------------------------------------------------------------------------


# Byte-level BPE writes each byte as a printable character: these bytes as themselves, the
# others as chr(256 + i) in byte order.
_PRINTABLE = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)}


def _byte_level_table() -> dict[str, int]:
    """Byte-level BPE's stand-in character -> the byte it stands for."""
    table, shifted = {}, 0
    for b in range(256):
        if b in _PRINTABLE:
            table[chr(b)] = b
        else:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


class _TokenText:
    """Each token's own text as logprobs show it (a token holding part of a multi-byte character
    shows as U+FFFD), and its exact bytes where the tokenizer says them (byte-level BPE and
    SentencePiece byte-fallback tokens)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.texts: dict[int, str] = {}
        self.byte_values: dict[int, list[int]] = {}
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.byte_level = _byte_level_table() if "ByteLevel" in repr(decoder) else None

    def __call__(self, token_id: int) -> str:
        text = self.texts.get(token_id)
        if text is None:
            text = self.texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def bytes(self, token_id: int) -> list[int]:
        values = self.byte_values.get(token_id)
        if values is None:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if self.byte_level is not None and all(c in self.byte_level for c in piece):
                values = [self.byte_level[c] for c in piece]
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                values = [int(piece[3:5], 16)]
            else:
                values = list(self(token_id).encode())
            self.byte_values[token_id] = values
        return values


class _Reply:
    """How one endpoint shapes its answer: chunks while streaming, one body otherwise.

    Streaming, each chunk carries the logprobs of the tokens generated since the previous chunk.
    """

    def __init__(self, request_id: str, model: str, include_usage: bool, token_text: _TokenText,
                 logprobs: bool) -> None:
        self.id, self.model, self.created = request_id, model, int(time.time())
        self.include_usage = include_usage
        self.usage = None if include_usage else UNSET   # chunks carry "usage": null when asked for
        self.token_text = token_text
        self.logprobs = logprobs
        self.unsent: dict[int, Unsent] = {}   # choice index -> what its next chunk carries

    def start(self, index: int, output: RequestOutput) -> Any | None:
        """The chunk that opens choice `index`, if the format has one."""
        return None

    def keep(self, index: int, output: RequestOutput) -> None:
        """Keep an output's new logprobs for choice `index`'s next chunk (an output that adds no
        text yet sends none)."""
        self.unsent.setdefault(index, Unsent(logprobs=True)).add(output)

    def take_logprobs(self, index: int) -> list[TokenLogprob]:
        return self.unsent[index].take()[1] if index in self.unsent else []


class _CompletionReply(_Reply):
    """With echo, each choice starts with its prompt's text (and, with logprobs, the prompt's)."""

    def __init__(self, *args: Any, n: int, prompt_ids: list[list[int]] | None) -> None:
        super().__init__(*args)
        self.n = n
        self.echo_ids = prompt_ids            # None without echo
        self.text_offset: dict[int, int] = {}

    def _prompt_text(self, index: int) -> str:
        return self.token_text.tokenizer.decode(self.echo_ids[index // self.n], skip_special_tokens=True)

    def _prompt_entries(self, index: int, output: RequestOutput) -> list[tuple[int, TokenLogprob | None]]:
        """The echoed prompt's tokens with their logprobs; the first token has none."""
        ids = self.echo_ids[index // self.n]
        return [(ids[0], None)] + [(e.token_id, e) for e in output.prompt_logprobs or []]

    def _format(self, index: int, entries: list[tuple[int, TokenLogprob | None]]) -> CompletionLogprobs | None:
        """Logprobs of the next tokens of choice `index`, their text offsets following the last's."""
        if not self.logprobs:
            return None
        out = CompletionLogprobs([], [], [], [])
        offset = self.text_offset.get(index, 0)
        for token_id, entry in entries:
            text = self.token_text(token_id)
            out.tokens.append(text)
            out.token_logprobs.append(None if entry is None else entry.logprob)
            out.top_logprobs.append(None if entry is None else
                                    {self.token_text(t): lp for t, lp in entry.top})
            out.text_offset.append(offset)
            offset += len(text)
        self.text_offset[index] = offset
        return out

    def start(self, index: int, output: RequestOutput) -> Completion | None:
        if self.echo_ids is None:
            return None
        return self._completion(index, self._prompt_text(index), None,
                                self._format(index, self._prompt_entries(index, output)))

    def chunk(self, index: int, output: RequestOutput) -> Completion:
        entries = [(e.token_id, e) for e in self.take_logprobs(index)]
        return self._completion(index, output.new_text, output.finish_reason,
                                self._format(index, entries))

    def _completion(self, index: int, text: str, finish_reason: str | None,
                    logprobs: CompletionLogprobs | None) -> Completion:
        return Completion(id=self.id, created=self.created, model=self.model, usage=self.usage,
                          choices=[CompletionChoice(index=index, text=text, logprobs=logprobs,
                                                    finish_reason=finish_reason)])

    def usage_chunk(self, usage: Usage) -> Completion:
        return Completion(id=self.id, created=self.created, model=self.model, choices=[], usage=usage)

    def body(self, finals: dict[int, RequestOutput], usage: Usage) -> Completion:
        choices = []
        for i, out in sorted(finals.items()):
            text, entries = out.text, [(e.token_id, e) for e in out.logprobs or []]
            if self.echo_ids is not None:
                text = self._prompt_text(i) + text
                entries = self._prompt_entries(i, out) + entries
            choices.append(CompletionChoice(index=i, text=text, logprobs=self._format(i, entries),
                                            finish_reason=out.finish_reason))
        return Completion(id=self.id, created=self.created, model=self.model, usage=usage,
                          choices=choices)


class _ChatReply(_Reply):
    def start(self, index: int, output: RequestOutput) -> ChatCompletionChunk:
        return self._chunk(index, Delta(role="assistant", content=""), None, None)

    def chunk(self, index: int, output: RequestOutput) -> ChatCompletionChunk:
        return self._chunk(index, Delta(content=output.new_text or None), output.finish_reason,
                           self._logprobs(self.take_logprobs(index)))

    def _logprobs(self, entries: list[TokenLogprob]) -> ChatLogprobs | None:
        if not self.logprobs:
            return None
        text = self.token_text
        return ChatLogprobs([ChatTokenLogprob(
            text(e.token_id), e.logprob, text.bytes(e.token_id),
            [TopLogprob(text(t), lp, text.bytes(t)) for t, lp in e.top]) for e in entries])

    def _chunk(self, index: int, delta: Delta, finish_reason: str | None,
               logprobs: ChatLogprobs | None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, usage=self.usage,
                                   choices=[ChatChunkChoice(index=index, delta=delta, logprobs=logprobs,
                                                            finish_reason=finish_reason)])

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[],
                                   usage=usage)

    def body(self, finals: dict[int, RequestOutput], usage: Usage) -> ChatCompletion:
        return ChatCompletion(id=self.id, created=self.created, model=self.model, usage=usage, choices=[
            ChatChoice(index=i, message=ChatMessage(role="assistant", content=out.text),
                       logprobs=self._logprobs(out.logprobs or []), finish_reason=out.finish_reason)
            for i, out in sorted(finals.items())])


def _sse(item: Any) -> bytes:
    return b"data: " + _encoder.encode(item) + b"\n\n"


_ABORTED = "The server shut down before this request finished; send it again."


async def _merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice index, output) from several engine requests as they come.

    Closing this iterator (or cancelling its reader) closes a lone stream, or cancels the readers
    of several, which leaves their `async for` over `AsyncEngine.generate` and so aborts the
    requests not finished.
    """
    if len(streams) == 1:   # the usual request: no task and queue between the engine and the reply
        async with contextlib.aclosing(streams[0]) as stream:
            async for output in stream:
                yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for output in stream:
                queue.put_nowait((index, output))
        except Exception as e:
            queue.put_nowait((index, e))
        finally:
            queue.put_nowait((index, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# --- the application --------------------------------------------------------------------------


class OpenAIServer:
    """The request handlers, around one AsyncEngine."""

    def __init__(self, engine: AsyncEngine, config: Config) -> None:
        self.engine = engine
        self.config = config
        self.api_key = config.api_key or os.environ.get(API_KEY_ENV) or None
        self.model_name = engine.engine.model_name
        self.created = int(time.time())
        self.in_flight: set[str] = set()   # engine request ids being served
        self.metrics = ServerMetrics(engine.engine)
        self.token_text = _TokenText(engine.engine.tokenizer)

    def authenticate(self, request: web.Request) -> None:
        """Refuse a request without the API key with a 401 (nothing to check when none is set)."""
        if self.api_key is None:
            return
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(401, "This server requires an API key; send it as `Authorization: Bearer "
                                "KEY`.", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"),
                                   self.api_key.encode("utf-8", "surrogateescape")):
            raise ApiError(401, "Incorrect API key provided; send the key the server was started "
                                "with.", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    # --- small endpoints ---------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        ok = self.engine.alive and self.engine.accepting
        return web.json_response({"status": "ok" if ok else "unavailable"}, status=200 if ok else 503)

    async def prometheus_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": self.metrics.content_type})

    def _card(self) -> ModelCard:
        return ModelCard(id=self.model_name, created=self.created)

    async def models(self, request: web.Request) -> web.Response:
        return _json(ModelList(data=[self._card()]))

    async def model(self, request: web.Request) -> web.Response:
        self._check_model(request.match_info["model"])
        return _json(self._card())

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(404, f"The model `{model}` does not exist; this server serves "
                                f"`{self.model_name}`.", param="model", code="model_not_found")

    # --- completions -------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = _decode(await _read_body(request, self.config.max_body_bytes), CompletionRequest)
        self._check_model(body.model)
        prompts = _prompt_list(body.prompt)
        prompt_ids = await self._off_loop(lambda: [self.engine.engine.tokenize(p) for p in prompts],
                                          "prompt")
        logprobs = {"logprobs": body.logprobs,
                    "prompt_logprobs": body.logprobs if body.echo else None}
        params = self._params(body, prompt_ids, body.max_tokens, "max_tokens", "prompt", logprobs)
        reply = _CompletionReply(f"cmpl-{uuid.uuid4().hex}", self.model_name, self._include_usage(body),
                                 self.token_text, body.logprobs is not None, n=body.n,
                                 prompt_ids=prompt_ids if body.echo else None)
        return await self._serve(request, body, reply, prompt_ids, params)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = _decode(await _read_body(request, self.config.max_body_bytes), ChatRequest)
        self._check_model(body.model)
        prompt = await self._off_loop(lambda: render_chat(self.engine.engine.tokenizer, body.messages),
                                      "messages")
        max_tokens, name = body.max_tokens, "max_tokens"
        if body.max_completion_tokens is not None:
            max_tokens, name = body.max_completion_tokens, "max_completion_tokens"
        if max_tokens is None:   # OpenAI's chat default: up to the context length
            max_tokens = max(1, self.engine.engine.max_model_len - len(prompt))
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs set to true.", param="top_logprobs")
        logprobs = {"logprobs": (body.top_logprobs or 0) if body.logprobs else None}
        params = self._params(body, [prompt], max_tokens, name, "messages", logprobs)
        reply = _ChatReply(f"chatcmpl-{uuid.uuid4().hex}", self.model_name, self._include_usage(body),
                           self.token_text, bool(body.logprobs))
        return await self._serve(request, body, reply, [prompt], params)

    async def _off_loop(self, work: Callable[[], Any], param: str) -> Any:
        """Tokenizing and templating a long prompt takes a while: keep it off the event loop."""
        try:
            return await asyncio.get_running_loop().run_in_executor(None, work)
        except RequestError as e:
            raise ApiError(400, str(e), param=param) from None

    @staticmethod
    def _include_usage(body: _RequestFields) -> bool:
        if body.stream_options is not None and not body.stream:
            raise ApiError(400, "stream_options is only allowed when stream is true.",
                           param="stream_options")
        return bool(body.stream and body.stream_options and body.stream_options.include_usage)

    @staticmethod
    def _candidates(body: _RequestFields) -> int:
        """Engine requests per prompt: best_of when the client gave it (completions), else n."""
        return getattr(body, "best_of", None) or body.n

    def _params(self, body: _RequestFields, prompt_ids: list[list[int]], max_tokens: int | None,
                max_tokens_name: str, prompt_name: str, logprobs: dict[str, int | None]) -> SamplingParams:
        if body.n < 1:
            raise ApiError(400, f"n must be at least 1, got {body.n}.", param="n")
        best_of = getattr(body, "best_of", None)
        if best_of is not None and best_of < body.n:
            raise ApiError(400, f"best_of must be at least n, got best_of={best_of} and n={body.n}.",
                           param="best_of")
        if best_of is not None and best_of > 1 and body.stream:
            raise ApiError(400, "best_of cannot be streamed, since the best completions are known "
                                "only at the end; set stream to false or best_of to 1.", param="best_of")
        candidates, name = (best_of, "best_of") if best_of is not None else (body.n, "n")
        if candidates * len(prompt_ids) > self.config.max_choices:
            raise ApiError(400, f"This request asks for {candidates * len(prompt_ids)} completions "
                                f"({name}={candidates} for each of {len(prompt_ids)} prompts); at most "
                                f"{self.config.max_choices} are served per request.", param=name)
        overrides = dict(logprobs) if max_tokens is None else {**logprobs, "max_tokens": max_tokens}
        if candidates > body.n:   # best_of ranks the candidates by it
            overrides["cumulative_logprob"] = True
        try:
            params = sampling_params(body, **overrides)
            params.check_vocab(self.engine.engine.hf_config.vocab_size)
        except RequestError as e:
            # The chat API calls it max_completion_tokens when the client did, and its logprobs
            # count top_logprobs.
            names = {"max_tokens": max_tokens_name, "prompt_logprobs": "logprobs"}
            if isinstance(body, ChatRequest):
                names["logprobs"] = "top_logprobs"
            param = names.get(e.param, e.param)
            message = str(e).replace(e.param or "", param, 1) if param else str(e)
            raise _error_from(RequestError(message, param), tuple(body.__struct_fields__)) from None
        limit = self.engine.engine.max_model_len
        for ids in prompt_ids:
            if not ids:
                raise ApiError(400, "The prompt is empty; give at least one token.", param=prompt_name)
            if len(ids) + params.max_tokens > limit:
                raise ApiError(400, f"This model's maximum context length is {limit} tokens, but "
                                    f"{len(ids) + params.max_tokens} were requested ({len(ids)} in "
                                    f"the prompt, {params.max_tokens} for the completion); shorten "
                                    f"the prompt or lower {max_tokens_name}.",
                               param=prompt_name, code="context_length_exceeded")
        return params

    # --- running the engine requests ---------------------------------------------------------

    async def _serve(self, request: web.Request, body: _RequestFields, reply: _Reply,
                     prompt_ids: list[list[int]], params: SamplingParams) -> web.StreamResponse:
        """One engine request per candidate: candidate p * c + i is prompt p's i-th sample (c is
        best_of, else n); with a seed, sample i uses seed + i, so candidate 0 is what n=1 gives.
        Without best_of the candidates are the choices."""
        candidates = self._candidates(body)
        jobs = []
        for p, ids in enumerate(prompt_ids):
            for i in range(candidates):
                choice = params
                if params.seed is not None and i:
                    choice = msgspec.structs.replace(params, seed=(params.seed + i) % 2**63)
                jobs.append((f"{reply.id}-{len(jobs)}", ids, choice))
        streams = [self.metrics.timed(self.engine.generate(ids, choice, request_id, delta_outputs=True))
                   for request_id, ids, choice in jobs]
        ids_here = {request_id for request_id, _, _ in jobs}
        self.in_flight |= ids_here
        try:
            async with contextlib.aclosing(_merge(streams)) as outputs:
                if body.stream:
                    return await self._stream(request, reply, outputs, prompt_ids)
                finals: dict[int, RequestOutput] = {}
                async for index, output in outputs:
                    if output.finished:
                        if output.finish_reason == "abort":
                            raise ApiError(503, _ABORTED, code="engine_unavailable")
                        finals[index] = output
        except FastgenError as e:
            raise _error_from(e) from None
        finally:
            self.in_flight -= ids_here
        usage = _usage(prompt_ids, finals)   # every candidate's tokens, as OpenAI counts best_of
        if candidates > body.n:
            finals = _most_likely(finals, body.n, candidates)
        return _json(reply.body(finals, usage))

    async def _stream(self, request: web.Request, reply: _Reply,
                      outputs: AsyncIterator[tuple[int, RequestOutput]],
                      prompt_ids: list[list[int]]) -> web.StreamResponse:
        """Server-sent events. The response starts with the first output, so an error before
        it (the engine shutting down, ...) still gets its own status code."""
        response: web.StreamResponse | None = None
        started: set[int] = set()
        finals: dict[int, RequestOutput] = {}
        try:
            async for index, output in outputs:
                if response is None:
                    response = web.StreamResponse(headers={
                        "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                        "X-Accel-Buffering": "no"})
                    await response.prepare(request)
                if output.finish_reason == "abort":
                    raise ApiError(503, _ABORTED, code="engine_unavailable")
                if index not in started:
                    started.add(index)
                    if (first := reply.start(index, output)) is not None:
                        await response.write(_sse(first))
                if output.finished:
                    finals[index] = output
                reply.keep(index, output)
                if output.finished or output.new_text:
                    await response.write(_sse(reply.chunk(index, output)))
            if response is None:
                raise ApiError(500, "The engine ended this request without an answer; see the server log.")
            if reply.include_usage:
                await response.write(_sse(reply.usage_chunk(_usage(prompt_ids, finals))))
        except (FastgenError, ApiError) as e:
            if response is None:
                raise
            error = e if isinstance(e, ApiError) else _error_from(e)
            if error.status >= 500:
                log.warning("stream %s ended early: %s", reply.id, error.message)
            try:
                await response.write(_sse(error.body()))
            except ConnectionError:
                return response
        except ConnectionError:   # the client went away: leaving the loop aborts its requests
            return response
        with contextlib.suppress(ConnectionError):
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        return response


def _most_likely(finals: dict[int, RequestOutput], n: int, candidates: int) -> dict[int, RequestOutput]:
    """best_of: of prompt p's candidates (p * candidates + i), the n with the highest cumulative
    logprob, most likely first, as choices p * n + j."""
    chosen = {}
    for p in range(len(finals) // candidates):
        group = [finals[p * candidates + i] for i in range(candidates)]
        group.sort(key=lambda out: -out.cumulative_logprob)   # stable: a tie keeps sample order
        chosen.update((p * n + j, out) for j, out in enumerate(group[:n]))
    return chosen


def _usage(prompt_ids: list[list[int]], finals: dict[int, RequestOutput]) -> Usage:
    """Each prompt counts once, however many choices it has (choices p * per_prompt + i); its
    cached tokens are the fewest any of its choices found, the prompt's first computation."""
    prompt = sum(len(ids) for ids in prompt_ids)
    completion = sum(len(out.token_ids) for out in finals.values())
    per_prompt = len(finals) // len(prompt_ids)
    cached = sum(min(finals[p * per_prompt + i].num_cached_tokens for i in range(per_prompt))
                 for p in range(len(prompt_ids)))
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


def _json(item: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=_encoder.encode(item), content_type="application/json")


@web.middleware
async def _errors(request: web.Request, handler) -> web.StreamResponse:
    """Every failure as OpenAI's error body; a bug is a 500 and a log line, never a traceback page."""
    try:
        return await handler(request)
    except ApiError as e:
        return e.response()
    except web.HTTPException as e:
        if e.status < 400:
            raise
        message = {404: f"There is no {request.path}; the endpoints are /v1/completions, "
                        f"/v1/chat/completions, /v1/models, /health and /metrics.",
                   405: f"{request.method} is not allowed on {request.path}."}.get(e.status, e.reason)
        return ApiError(e.status, message).response()
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return ApiError(500, "The server failed while handling this request; see the server log.").response()


SERVER_KEY = web.AppKey("fastgen_openai_server", OpenAIServer)


@web.middleware
async def _authenticate(request: web.Request, handler) -> web.StreamResponse:
    """The API key check, for every path but GET /health (a load balancer's probe has no key)."""
    if not (request.path == "/health" and request.method in ("GET", "HEAD")):
        request.app[SERVER_KEY].authenticate(request)
    return await handler(request)


def make_app(engine: AsyncEngine, config: Config) -> web.Application:
    """The aiohttp application serving `engine`; `HttpTransport` runs it, tests can too.

    While the application runs (from its startup to its cleanup), its metrics observe the engine.
    """
    server = OpenAIServer(engine, config)
    app = web.Application(middlewares=[_errors, _authenticate], client_max_size=config.max_body_bytes)
    app[SERVER_KEY] = server
    app.router.add_post("/v1/completions", server.completions)
    app.router.add_post("/v1/chat/completions", server.chat_completions)
    app.router.add_get("/v1/models", server.models)
    app.router.add_get("/v1/models/{model}", server.model)
    app.router.add_get("/health", server.health)
    app.router.add_get("/metrics", server.prometheus_metrics)

    async def observe(app: web.Application) -> None:
        server.metrics.register()

    async def stop_observing(app: web.Application) -> None:
        server.metrics.unregister()

    app.on_startup.append(observe)
    app.on_cleanup.append(stop_observing)
    return app


# --- the transport ----------------------------------------------------------------------------


class HttpTransport:
    """Serves the OpenAI-compatible API on config.host:config.port until SIGINT or SIGTERM."""

    name = "http"

    def __init__(self, engine: AsyncEngine, config: Config) -> None:
        self.engine = engine
        self.config = config
        self.app = make_app(engine, config)
        self.url: str | None = None
        self._runner: web.AppRunner | None = None

    def run(self) -> None:
        """Serve until SIGINT/SIGTERM; then finish the requests in flight and shut the engine down."""
        asyncio.run(self._serve_until_signal())

    async def start(self) -> str:
        """Listen (port 0 picks a free port); returns the URL served."""
        # handler_cancellation: a client that disconnects cancels its handler, which aborts its requests.
        self._runner = web.AppRunner(self.app, handler_cancellation=True, shutdown_timeout=5.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port)
        try:
            await site.start()
        except OSError as e:
            await self._runner.cleanup()
            raise FastgenError(f"Cannot listen on {self.config.host}:{self.config.port} "
                               f"({e.strerror}); choose another --host or --port.") from None
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        return self.url

    async def stop(self, timeout: float | None = None) -> None:
        """Stop listening, let requests in flight finish for up to `timeout` s (then abort them),
        shut the engine down and close the connections. Stopping twice is harmless."""
        await self._stop_listening()
        if self._runner is not None:
            await self.engine.shutdown(self.config.shutdown_timeout if timeout is None else timeout)
            await self._runner.cleanup()
            self._runner = None

    async def _stop_listening(self) -> None:
        if self._runner is not None:
            for site in list(self._runner.sites):
                await site.stop()

    def abort_all(self) -> None:
        for request_id in list(self.app[SERVER_KEY].in_flight):
            self.engine.abort(request_id)

    async def _serve_until_signal(self) -> None:
        url = await self.start()
        auth = ("API key required" if self.app[SERVER_KEY].api_key else
                f"no API key required (set --api-key or {API_KEY_ENV} to require one)")
        print(f"fastgen: listening on {url} (OpenAI API at {url}/v1, metrics at {url}/metrics); "
              f"{auth}; Ctrl-C stops", file=sys.stderr, flush=True)
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()

        def on_signal() -> None:
            if stopping.is_set():   # a second signal: abort what is still running
                print("fastgen: aborting the requests in flight", file=sys.stderr, flush=True)
                self.abort_all()
            stopping.set()

        signals = (signal.SIGINT, signal.SIGTERM)
        for sig in signals:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not main thread
                loop.add_signal_handler(sig, on_signal)
        try:
            await stopping.wait()
            await self._stop_listening()
            print(f"fastgen: shutting down; {self.engine.num_in_flight} requests in flight get up to "
                  f"{self.config.shutdown_timeout:g} s to finish (signal again to abort them)", file=sys.stderr,
                  flush=True)
            await self.stop()
        finally:
            for sig in signals:
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.remove_signal_handler(sig)


@fastgen.hookimpl
def register_transports(register):
    register(HttpTransport)
