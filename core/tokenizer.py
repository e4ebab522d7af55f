"""Loading a checkpoint's tokenizer and the token ids that end generation."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ModelLoadError, RequestError


def _as_set(value) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, (list, tuple)) else {int(value)}


def load_tokenizer(folder: Path, hf_config):
    """(tokenizer, end-of-sequence token ids) for a checkpoint folder."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as e:
        raise ModelLoadError(f"Model folder {folder} has no usable tokenizer "
                             f"(tokenizer.json or tokenizer.model): {e}") from None
    eos = _as_set(getattr(hf_config, "eos_token_id", None)) | _as_set(tokenizer.eos_token_id)
    generation_config = folder / "generation_config.json"
    if generation_config.is_file():
        eos |= _as_set(json.loads(generation_config.read_text()).get("eos_token_id"))
    return tokenizer, eos


def apply_chat_template(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat prompt, ending where the assistant's answer starts."""
    if not getattr(tokenizer, "chat_template", None):
        raise RequestError("This model's tokenizer has no chat template; send a plain prompt instead.",
                           param="messages")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    # transformers 5 returns a BatchEncoding here, older versions a plain list.
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
