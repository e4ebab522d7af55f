"""fastgen: LLM serving with ragged batches, a blocked KV cache and Dynamic SplitFuse, as pluggy plugins."""

from .config import Config
from .errors import ConfigError, FastgenError, ModelLoadError, PluginError, RequestError
from .hookspecs import hookimpl
from .request import RequestOutput, SamplingParams

__all__ = ["LLM", "Config", "SamplingParams", "RequestOutput", "hookimpl", "FastgenError",
           "ConfigError", "ModelLoadError", "PluginError", "RequestError"]


def __getattr__(name):
    # LLM pulls in torch and the engine; plugins that only need `hookimpl` should not pay for that.
    if name == "LLM":
        from .llm import LLM
        return LLM
    raise AttributeError(f"module 'fastgen' has no attribute {name!r}")
