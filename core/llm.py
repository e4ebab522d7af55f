"""LLM: the offline Python API — build an engine from keywords, generate for a list of prompts."""

from __future__ import annotations

from typing import Any

from .config import make_config
from .engine import Engine
from .request import RequestOutput, SamplingParams
from .tokenizer import apply_chat_template

Prompt = str | list[int]


class LLM:
    """`LLM(model=DIR, kernels="torch", scheduler="splitfuse", token_budget=256)`.

    Every `Config` field is a keyword.
    """

    def __init__(self, model: str | None = None, **settings: Any) -> None:
        self.engine = Engine(make_config(model=model, **settings))
        # The engine's: what was left unset filled in (the token budget), as it runs.
        self.config = self.engine.config

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | list[Prompt],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """One finished output per prompt, in prompt order. Prompts are strings or token ids: lists,
        or numpy arrays and tensors ([T] for one prompt, [B, T] for B)."""
        if getattr(prompts, "ndim", 0) > 0:   # an array or tensor of token ids
            prompts = prompts.tolist()
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and _is_token(prompts[0])):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a string, token ids, or a list of those; got "
                            f"{type(prompts).__name__}.")
        prompts = [_prompt(p) for p in prompts]
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"Got {len(params_list)} sampling params for {len(prompts)} prompts.")
        for sp in params_list:
            if not isinstance(sp, SamplingParams):
                raise TypeError(f"sampling_params must be a SamplingParams or a list of them; got "
                                f"{type(sp).__name__}.")
        # Validate every prompt before queueing any, so a bad one leaves the engine untouched.
        seqs = [self.engine.make_sequence(p, sp) for p, sp in zip(prompts, params_list)]
        for seq in seqs:
            self.engine.add_sequence(seq)
        finished: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step(finished_only=True):
                finished[out.request_id] = out
        return [finished[s.request_id] for s in seqs]

    def reset_prefix_cache(self) -> None:
        """Forget the prompts computed so far: a repeated one is computed again."""
        self.engine.reset_prefix_cache()

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | None = None) -> list[RequestOutput]:
        """Generate answers to conversations, each a list of {"role", "content"} messages."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [apply_chat_template(self.tokenizer, conv) for conv in conversations]
        return self.generate(prompts, sampling_params)


def _is_token(value: Any) -> bool:
    """A token id, or a number meant as one (the engine refuses a float with the others): a Python
    number, or a numpy scalar or 0-d tensor (what indexing an array gives)."""
    return isinstance(value, (int, float)) or getattr(value, "ndim", None) == 0


def _prompt(prompt: Any) -> Prompt:
    """A prompt as the engine takes it: a string, or a list of Python numbers (checked there)."""
    if isinstance(prompt, str):
        return prompt
    if getattr(prompt, "ndim", 0) > 0:
        return prompt.tolist()
    if isinstance(prompt, (list, tuple)):
        return [t.item() if getattr(t, "ndim", None) == 0 else t for t in prompt]
    raise TypeError(f"A prompt is a string or token ids; got {type(prompt).__name__}.")
