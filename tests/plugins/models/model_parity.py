"""Helpers of the model parity tests: a model plugin's greedy tokens against transformers' generate.

The token budget is small, so long prompts are split over several steps and fused with other
sequences' decodes; a tiny KV pool forces preemption and recomputation. Neither may change a token.
Each family's test module builds its tiny checkpoints and runs these checks on them.
"""

from __future__ import annotations

import pytest
import torch

import fastgen
from fastgen import SamplingParams
from kernel_targets import kernel_targets, target_id
from tiny_models import make_checkpoint

NEW_TOKENS = 8
# 1-token and block-edge prompts, chunks split over 2-5 steps; more prompts than max_num_seqs.
PROMPT_LENS = (1, 2, 7, 16, 17, 33, 64, 65, 130, 300)
# float32: the reference is. A KV cache of its own size: on a GPU the default takes most of it.
SETTINGS = dict(token_budget=64, max_num_seqs=8, dtype="float32", kv_cache_gb=1.0)
# The interpreter runs every kernel program in numpy: minutes, not seconds, for all the models.
SLOW_TARGETS = {("triton", "cpu")}


def kernel_params() -> list:
    """(backend, device) for every registered kernel backend on every device here where it runs:
    on a GPU machine the GPU backends are checked against transformers (on the CPU) too."""
    return [pytest.param(name, device.type, id=target_id(name, device),
                         marks=[pytest.mark.slow] if (name, device.type) in SLOW_TARGETS else [])
            for name, device in kernel_targets()]


KERNELS = kernel_params()


class StepRecorder:
    """An in-process observer plugin: what every engine step computed."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int, int]] = []   # (num_decodes, num_tokens, num_seqs)

    @fastgen.hookimpl
    def on_step_finished(self, engine, stats):
        self.steps.append((stats.num_decodes, stats.num_tokens, stats.num_seqs))


def random_prompts(vocab_size: int, lengths, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]


def transformers_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' n greedy tokens after `prompt`, EOS sampled like any token as fastgen's
    ignore_eos does: generation does not stop there (eos_token_id=None), and EOS is not suppressed
    (min_new_tokens would mask it, and the tokens after a masked EOS differ from fastgen's)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=n, eos_token_id=None)
    assert out.shape[1] == len(prompt) + n
    return out[0, len(prompt):].tolist()


def reference_continuations(model) -> tuple[list[list[int]], list[list[int]]]:
    """(the PROMPT_LENS prompts, transformers' greedy continuations of NEW_TOKENS each)."""
    prompts = random_prompts(model.config.vocab_size, PROMPT_LENS)
    return prompts, [transformers_greedy(model, p, NEW_TOKENS) for p in prompts]


def generate(llm, prompts, new_tokens=NEW_TOKENS):
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    recorder = StepRecorder()
    llm.engine.plugins.register(recorder, name="test-step-recorder")
    try:
        outputs = llm.generate(prompts, params)
    finally:
        llm.engine.plugins.pm.unregister(name="test-step-recorder")
    return outputs, recorder.steps


def assert_greedy_parity(llm, prompts, expected) -> None:
    """`llm` continues `prompts` with `expected`, in steps that fused decodes with prompt chunks
    within SETTINGS, and without preemption."""
    outputs, steps = generate(llm, prompts)

    assert [o.token_ids for o in outputs] == expected
    assert all(o.finish_reason == "length" for o in outputs)
    assert all(tokens <= SETTINGS["token_budget"] and seqs <= SETTINGS["max_num_seqs"]
               for _, tokens, seqs in steps)
    mixed = [s for s in steps if 0 < s[0] < s[1]]    # decodes and prompt chunks in one step
    assert mixed, f"no step fused decodes with prompt chunks: {steps}"
    assert llm.engine.totals.preemptions == 0
    assert llm.engine.allocator.num_free == llm.engine.allocator.num_blocks


def assert_parity_with_preemption(folder, model, kernels: str, device: str) -> None:
    """Greedy parity on the checkpoint in `folder` (transformers' `model`) with a KV pool too small
    for every sequence's growth, so that sequences are preempted and recomputed."""
    # 10 blocks of 16 hold all these prompts (9 blocks) but not their growth by 12 tokens each:
    # decodes crossing into a new block preempt the latest admitted sequence, which recomputes
    # its prompt and the tokens it had generated.
    prompts = random_prompts(model.config.vocab_size, (10, 14, 15, 30, 47, 60), seed=1)
    expected = [transformers_greedy(model, p, 12) for p in prompts]
    llm = fastgen.LLM(model=str(folder), num_blocks=10, kernels=kernels, device=device, **SETTINGS)
    outputs, _ = generate(llm, prompts, new_tokens=12)

    assert llm.engine.totals.preemptions > 0
    assert [o.token_ids for o in outputs] == expected
    assert llm.engine.allocator.num_free == llm.engine.allocator.num_blocks


def checkpoint_fixtures(*archs: str):
    """A test module's fixtures over tiny checkpoints of `archs`, one at a time:
    `checkpoint` (arch, folder, transformers model) and `reference` (arch, folder, prompts,
    transformers' greedy continuations). Use: `checkpoint, reference = checkpoint_fixtures(...)`."""

    @pytest.fixture(scope="module", params=archs, name="checkpoint")
    def checkpoint(request, tmp_path_factory):
        folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
        return request.param, folder, make_checkpoint(folder, request.param)

    @pytest.fixture(scope="module", name="reference")
    def reference(checkpoint):
        arch, folder, model = checkpoint
        return (arch, folder, *reference_continuations(model))

    return checkpoint, reference
