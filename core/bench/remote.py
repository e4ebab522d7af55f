"""`HttpTarget`: the benchmark's requests sent to a running OpenAI-compatible server.

Each request is one streamed POST /v1/completions with the prompt as token ids, greedy,
`max_tokens` and `ignore_eos` (fastgen and vLLM accept it; a server that refuses it fails every
request, which the run reports). Token arrival times are taken as in process, from the client's
clock, so the same summaries and SLA maths apply.

A streamed chunk carries text, not tokens: each chunk with text counts as one token arriving, and
the usage chunk at the end (`stream_options.include_usage`) gives the true count, so tokens a
server sent together (text held back until a character is whole) arrive with the last output.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import AsyncIterator
from urllib.parse import urlsplit

import numpy as np

from ..errors import ConfigError
from .runner import TokenUpdate
from .trace import StepTrace
from .workload import BenchRequest, checkpoint_vocabulary


class HttpTarget:
    """A server at `url` (its OpenAI base URL, e.g. http://127.0.0.1:8000/v1).

    `tokenizer_folder` is a local checkpoint of the served model: random prompts are drawn from its
    ordinary tokens. `served_model` defaults to the first model the server lists.
    """

    token_budget = None

    def __init__(self, url: str, tokenizer_folder, served_model: str | None = None,
                 api_key: str | None = None, timeout_s: float = 600.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"--url must be a server's OpenAI base URL like http://127.0.0.1:8000/v1, "
                              f"got {url!r}.")
        self.url = url.rstrip("/")
        self.tokenizer_folder = tokenizer_folder
        self.served_model = served_model
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.name = parts.netloc
        self.model_name = served_model
        self._max_model_len: int | None = None
        self._allowed: np.ndarray | None = None
        self.session = None

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def open(self) -> None:
        """Ask the server which models it serves, and read the local tokenizer."""
        try:
            with urllib.request.urlopen(urllib.request.Request(f"{self.url}/models", headers=self._headers()),
                                        timeout=30) as response:
                cards = json.load(response).get("data") or []
        except urllib.error.HTTPError as e:
            raise ConfigError(f"{self.url}/models answered {e.code} {e.reason}; check --url and "
                              f"--api-key.") from None
        except (urllib.error.URLError, OSError) as e:
            raise ConfigError(f"Cannot reach {self.url}/models ({getattr(e, 'reason', e)}); start the "
                              f"server or fix --url.") from None
        ids = [card.get("id") for card in cards]
        if self.served_model is None:
            if not ids:
                raise ConfigError(f"{self.url}/models lists no model; name one with --served-model.")
            self.served_model = ids[0]
        card = next((c for c in cards if c.get("id") == self.served_model), {})
        self.model_name = self.served_model
        self.name = f"{self.served_model} @ {urlsplit(self.url).netloc}"
        self._allowed, max_positions = checkpoint_vocabulary(self.tokenizer_folder)
        # vLLM's model card says how long a sequence may be; otherwise the checkpoint's limit.
        self._max_model_len = int(card.get("max_model_len") or max_positions)

    def allowed_token_ids(self) -> np.ndarray:
        return self._allowed

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    async def start(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(
            headers=self._headers(), connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_read=self.timeout_s))

    async def stream(self, request: BenchRequest, request_id: str) -> AsyncIterator[TokenUpdate]:
        body = {"model": self.served_model, "prompt": request.prompt_token_ids,
                "max_tokens": request.max_tokens, "temperature": 0.0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        async with self.session.post(f"{self.url}/completions", json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {_error_message(await response.text())}")
            count, usage, finish_reason = 0, None, None
            async for line in response.content:
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RuntimeError(_error_message(data.decode()))
                if chunk.get("usage"):
                    usage = chunk["usage"].get("completion_tokens")
                for choice in chunk.get("choices") or []:
                    if choice.get("text"):
                        count += 1
                        yield TokenUpdate(count)
                    finish_reason = choice.get("finish_reason") or finish_reason
            if finish_reason is None:
                return   # the runner records a stream that ended before the request finished
            yield TokenUpdate(max(count, usage or 0), True, finish_reason)

    def take_steps(self) -> list[StepTrace]:
        return []   # a server's steps are not visible from outside

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    def close(self) -> None:
        pass


def _error_message(text: str) -> str:
    """The message of an OpenAI-style error body, else the body's start."""
    try:
        return json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return text[:200]
