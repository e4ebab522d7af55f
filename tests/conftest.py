"""Shared fixtures: tiny random checkpoints built once per session, and isolated plugin managers.

Without a GPU, kernels.triton runs under Triton's interpreter. TRITON_INTERPRET is set here, once,
before any test module is collected: triton decides at a kernel's decoration whether to interpret,
and the test targets (kernel_targets.py) ask at collection whether kernels.triton can run on the
CPU. With a GPU it stays unset, so Triton compiles and runs on the GPU alone.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tiny_models import SERVE_SETTINGS, make_checkpoint  # noqa: E402

ARCHS = ("llama", "mistral", "qwen2")   # llama3 rope scaling, sliding window 24, qkv bias


def _checkpoint(tmp_path_factory, arch: str):
    folder = tmp_path_factory.mktemp(f"tiny-{arch}")
    model = make_checkpoint(folder, arch)
    return folder, model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """(folder, transformers model) of a tiny random Llama with llama3 rope scaling."""
    return _checkpoint(tmp_path_factory, "llama")


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory):
    """(folder, transformers model) of a tiny random Mistral with sliding_window 24."""
    return _checkpoint(tmp_path_factory, "mistral")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    """(folder, transformers model) of a tiny random Qwen2 (biases on q, k, v)."""
    return _checkpoint(tmp_path_factory, "qwen2")


@pytest.fixture(scope="session", params=ARCHS)
def tiny_checkpoint(request):
    """Each tiny architecture in turn: (arch, folder, transformers model)."""
    folder, model = request.getfixturevalue(f"tiny_{request.param}")
    return request.param, folder, model


@pytest.fixture
def plugin_manager():
    """A fresh PluginManager with the installed entry points loaded, shared with nothing else."""
    from fastgen.plugin_manager import PluginManager

    manager = PluginManager()
    manager.load_entry_points()
    return manager


@pytest.fixture
def empty_plugin_manager():
    """A fresh PluginManager with nothing registered."""
    from fastgen.plugin_manager import PluginManager

    return PluginManager()


@pytest.fixture(scope="module")
def engine(tiny_llama):
    """An Engine on the tiny Llama with SERVE_SETTINGS, one per test module."""
    from fastgen.config import make_config
    from fastgen.engine import Engine

    return Engine(make_config(model=str(tiny_llama[0]), **SERVE_SETTINGS))


@pytest.fixture(scope="module")
def llm(tiny_llama):
    """The offline LLM on the tiny Llama with SERVE_SETTINGS: the reference for served outputs."""
    from fastgen import LLM

    return LLM(model=str(tiny_llama[0]), **SERVE_SETTINGS)
