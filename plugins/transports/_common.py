"""What every transport does the same way: chat messages into prompt tokens, request fields into
`SamplingParams`, a stream's pieces held until they have text.

A transport declares its request body as a msgspec Struct whose sampling fields carry the names
of `SamplingParams`' fields and default to UNSET; `sampling_params(request)` takes the ones the
client gave. Chat messages decode into `Message` and `render_chat` turns them into prompt token
ids with the model's chat template.
"""

from __future__ import annotations

from typing import Any

import msgspec

from fastgen.errors import RequestError
from fastgen.request import RequestOutput, SamplingParams, TokenLogprob
from fastgen.tokenizer import apply_chat_template

Unset = msgspec.UnsetType
UNSET = msgspec.UNSET


class ContentPart(msgspec.Struct):
    """One part of a message's content in OpenAI's list form; only {"type": "text"} is served."""

    type: str
    text: str | None = None


class Message(msgspec.Struct, forbid_unknown_fields=True):
    """One chat message: `content` is a string or a list of {"type": "text", "text": ...} parts."""

    role: str
    content: str | list[ContentPart]
    name: str | None = None


def message_dicts(messages: list[Message]) -> list[dict[str, str]]:
    """The messages as the plain dicts a chat template reads; refuses content that is not text."""
    rendered = []
    for i, message in enumerate(messages):
        content = message.content
        if not isinstance(content, str):
            others = sorted({part.type for part in content if part.type != "text"})
            if others:
                raise RequestError(f"Message {i} has content of type {', '.join(others)}; only text "
                                   f"content is served, so send text parts or a string.")
            content = "\n".join(part.text or "" for part in content)
        entry = {"role": message.role, "content": content}
        if message.name is not None:
            entry["name"] = message.name
        rendered.append(entry)
    return rendered


def render_chat(tokenizer, messages: list[Message]) -> list[int]:
    """Prompt token ids of a conversation, rendered with the model's chat template.

    Every failure is a RequestError: a model without a template, non-text content, or a
    conversation the template refuses (roles out of order, ...).
    """
    if not messages:
        raise RequestError("messages is empty; send at least one message.")
    conversation = message_dicts(messages)
    try:
        return apply_chat_template(tokenizer, conversation)
    except RequestError:        # no chat template: the client should send a plain prompt
        raise
    except Exception as e:      # the template itself raised (jinja's raise_exception, ...)
        raise RequestError(f"The model's chat template rejected these messages: {e}.") from None


def sampling_params(request: Any, **overrides: Any) -> SamplingParams:
    """`SamplingParams` from the request's fields of the same names that are neither UNSET nor
    None (a field left out or sent as null takes its default), then `overrides`."""
    given = {}
    for name in SamplingParams.__struct_fields__:
        value = getattr(request, name, UNSET)
        if value is not UNSET and value is not None:
            given[name] = value
    given.update(overrides)
    return SamplingParams(**given)


class Unsent:
    """The new tokens and logprobs of a request's delta outputs not yet written to its client: an
    output that adds no text (a character split across tokens) writes nothing, and its pieces go
    with the next piece written."""

    def __init__(self, logprobs: bool) -> None:
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if logprobs else None

    def add(self, output: RequestOutput) -> None:
        self.token_ids += output.new_token_ids
        if self.logprobs is not None:
            self.logprobs += output.new_logprobs or []

    def take(self) -> tuple[list[int], list[TokenLogprob] | None]:
        taken = self.token_ids, self.logprobs
        self.token_ids, self.logprobs = [], None if self.logprobs is None else []
        return taken
