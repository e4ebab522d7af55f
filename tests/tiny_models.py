"""Tiny random checkpoints made with transformers' own config classes, saved as real checkpoints.

They go through the same loading code as a downloaded model: config.json, safetensors, tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France.",
    "Ragged batches mix prompt chunks and decode tokens in one forward pass.",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber \u4f60\u597d \U0001f600 emoji and accents test.",
]

# Engine settings for the serving tests: small steps and pool, so requests really share them.
SERVE_SETTINGS = dict(token_budget=32, num_blocks=64, dtype="float32")   # 64 blocks of 16: max_model_len 1024

_LLAMA_FAMILY = dict(intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=False)
# arch -> (transformers class prefix: `{prefix}Config`, `{prefix}ForCausalLM`; settings).
ARCHS = {
    "llama": ("Llama", dict(_LLAMA_FAMILY, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128})),
    "mistral": ("Mistral", dict(_LLAMA_FAMILY, sliding_window=24)),
    "qwen2": ("Qwen2", dict(_LLAMA_FAMILY)),
    # q/k RMSNorm per head, head_dim 32 != hidden / heads, the window on layers from 1 on only.
    "qwen3": ("Qwen3", dict(_LLAMA_FAMILY, head_dim=32, use_sliding_window=True, sliding_window=24,
                            max_window_layers=1)),
    # Phi-3-mini-4k: fused qkv_proj and gate_up_proj, a window on every layer.
    "phi3": ("Phi3", dict(_LLAMA_FAMILY, sliding_window=24)),
    # Phi-3.5 / Phi-4-mini: longrope (short factors for prompts up to 28 tokens, long ones for
    # longer ones), rotary on the first 12 of 16 head dims. The factors are far apart so that a
    # wrong choice shows. No parity prompt grows past 28 while it decodes (see models/rope.py).
    "phi3-longrope": ("Phi3", dict(_LLAMA_FAMILY, partial_rotary_factor=0.75,
                                   original_max_position_embeddings=28, rope_scaling={
                                       "rope_type": "longrope",
                                       "short_factor": [1.0, 1.0, 1.2, 1.5, 2.0, 3.0],
                                       "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]})),
    # opt-125m ... 6.7b: LayerNorm before each block, ReLU, tied embeddings.
    "opt": ("OPT", dict(ffn_dim=128)),
    # opt-350m: LayerNorm after each block, token embeddings narrower than the hidden size.
    "opt-post-ln": ("OPT", dict(ffn_dim=128, do_layer_norm_before=False, word_embed_proj_dim=48)),
}
# Families whose 1-D weights (biases, norm weights) the checkpoints shift away from their init.
_SHIFTED_VECTORS = {"OPT", "Qwen3", "Phi3"}


def make_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def make_checkpoint(folder: Path, arch: str = "llama", seed: int = 0, **overrides):
    """Write a tiny random `arch` checkpoint (with tokenizer) to `folder`; return the HF model."""
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(folder)
    prefix, arch_settings = ARCHS[arch]
    config_cls = getattr(transformers, f"{prefix}Config")
    model_cls = getattr(transformers, f"{prefix}ForCausalLM")
    settings = dict(vocab_size=len(tokenizer) + 12, hidden_size=64, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=1024,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    settings.update(arch_settings)
    settings.update(overrides)
    config = config_cls(**settings)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    # Larger than default init: logits far apart keep greedy choices stable under float reordering.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
        if prefix in _SHIFTED_VECTORS:
            # Biases start at 0 and norm weights at 1: shift them, so that loading one into the
            # wrong place (or not at all) changes the tokens.
            for p in model.parameters():
                if p.dim() == 1:
                    p.add_(torch.randn_like(p), alpha=0.1)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def run_to_completion(engine, prompts, params) -> list[list[int]]:
    """Each prompt's generated token ids, from stepping `engine` until every request is done."""
    ids = [engine.add_request(p, params) for p in prompts]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    return [done[i] for i in ids]
