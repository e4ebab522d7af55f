"""Random-weight Llama checkpoints of named real shapes, for measuring speed where no real
checkpoint can be had (a GPU machine without internet). They are saved as a downloaded model is
(config.json, safetensors, tokenizer), so fastgen and transformers load them the usual way; the
weights are noise, so only the timings mean anything, never the text.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

# transformers LlamaConfig fields of each shape.
SHAPES = {
    # Llama-3.2-1B: GQA 32/8 heads of 64, llama3 RoPE scaling, tied embeddings.
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                     max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True,
                     rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # SmolLM2-135M (fastgen's demo model): 30 thin layers, 9/3 heads of 64.
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                         max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True),
    # A forward pass of next to nothing, for timing the host's work around it (stream_overhead.py).
    "llama-micro": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                        num_attention_heads=1, num_key_value_heads=1, head_dim=64, vocab_size=512,
                        max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False),
    # Seconds on a CPU: for checking the benchmark's machinery, not for numbers.
    "llama-tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=4096,
                       max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False),
}
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


def save_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer with one token per id of the model, so every id decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"t{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)


def make_random_checkpoint(shape: str, dtype: torch.dtype, device: torch.device | str = "cpu",
                           folder: Path | None = None, seed: int = 0) -> Path:
    """Save a random-weight Llama of `shape` (a key of SHAPES) in `dtype` to `folder` (default: a
    new temporary folder, the caller's to remove) and return the folder. The weights are drawn on
    `device`: a GPU draws a 1B model's in a moment, a CPU takes seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder or tempfile.mkdtemp(prefix=f"fastgen-random-{shape}-"))
    config = LlamaConfig(bos_token_id=SPECIAL_TOKENS.index("<s>"), eos_token_id=SPECIAL_TOKENS.index("</s>"),
                         **SHAPES[shape])
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    model.save_pretrained(folder, safe_serialization=True)
    save_tokenizer(folder, config.vocab_size)
    del model
    return folder


@contextmanager
def temporary_random_checkpoint(shape: str, dtype: torch.dtype,
                                device: torch.device | str = "cpu") -> Iterator[Path]:
    """make_random_checkpoint's folder, removed when the block ends."""
    folder = make_random_checkpoint(shape, dtype, device)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
