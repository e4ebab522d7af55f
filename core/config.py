"""The one settings tree: Python keywords, TOML keys and CLI flags all come from `Config`.

A new setting is added here, once, with its default and its description; `LLM(**kw)`,
`--config FILE` and `fastgen serve --flag` pick it up from this class.
"""

from __future__ import annotations

import argparse
import tomllib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from .errors import ConfigError

MAX_THREADS = 1024   # past any CPU's cores; torch starts every thread asked for (a million crash it)


def _doc(text: str) -> msgspec.Meta:
    return msgspec.Meta(description=text)


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    # What to serve.
    model: Annotated[str | None, _doc(
        "checkpoint folder (config.json, *.safetensors, tokenizer) or a .gguf file; "
        "empty: the built-in demo model, SmolLM2-135M-Instruct")] = None
    dtype: Annotated[Literal["auto", "float32", "bfloat16", "float16"], _doc(
        "dtype of weights, activations and the KV cache; auto: on a CPU bfloat16 where it has bf16 "
        "matrix instructions (AMX, AVX512-BF16), else float32; on a GPU the "
        "checkpoint's own 16-bit dtype, else bfloat16 (float16 where the GPU has no bfloat16)")] = "auto"
    device: Annotated[str, _doc("torch device to run on: auto, cpu, cuda, cuda:1, ...")] = "auto"
    max_model_len: Annotated[int | None, _doc(
        "longest sequence (prompt + generated) accepted; default: the model's own limit")] = None
    served_model_name: Annotated[str | None, _doc(
        "name clients use for the model; default: the checkpoint's folder name")] = None

    # Which plugins do the work (each is the NAME of a KIND.NAME plugin).
    kernels: Annotated[str, _doc(
        "kernel backend plugin (kernels.NAME), or auto: the fastest backend that is ready on the "
        "device without a build (on a GPU kernels.triton, else kernels.cuda once built; on a CPU "
        "kernels.cpu once built; else kernels.torch)")] = "auto"
    scheduler: Annotated[str, _doc("scheduler plugin (schedulers.NAME)")] = "splitfuse"
    transport: Annotated[str, _doc("transport plugin used by `fastgen serve` (transports.NAME)")] = "http"

    # Scheduling.
    token_budget: Annotated[int | None, _doc(
        "tokens computed per forward pass (SplitFuse keeps every step at this size); unset: 512 "
        "on a CPU, and on a GPU 2048 where a step that size leaves the KV cache most of the "
        "memory (else 512)")] = None
    max_num_seqs: Annotated[int | None, _doc(
        "most sequences in one step (decode steps of that many are captured as CUDA graphs at "
        "start); unset: 64 on a CPU, 256 on a GPU")] = None

    # KV cache.
    block_size: Annotated[int, _doc("tokens per KV cache block")] = 16
    num_blocks: Annotated[int | None, _doc(
        "KV cache blocks; default: as many as kv_cache_gb holds")] = None
    kv_cache_gb: Annotated[float | None, _doc(
        "GiB given to the KV cache when num_blocks is unset; unset: 1 on a CPU, and on a GPU what "
        "gpu_memory_utilization leaves once the model is loaded")] = None
    gpu_memory_utilization: Annotated[float, _doc(
        "share of the GPU's memory the engine may hold (weights, KV cache, activations, CUDA "
        "graphs) when it sizes the KV cache itself (kv_cache_gb and num_blocks unset); what other "
        "processes hold counts against it")] = 0.9
    prefix_caching: Annotated[bool, _doc(
        "keep the KV blocks of computed prompts (and answers) after their requests end, and let "
        "a new request whose tokens begin the same way start from them instead of computing "
        "them again (whole blocks; not for requests asking for prompt logprobs)")] = True

    # Runtime.
    cuda_graphs: Annotated[bool | None, _doc(
        "replay steps from CUDA graphs: decode steps of up to max_num_seqs sequences, captured at "
        "start per padded batch size, and steps with prompt chunks of up to cuda_graph_max_tokens "
        "tokens, captured at start per padded token count (GPU backends that support it: "
        "kernels.triton, kernels.cuda); unset: on wherever the device, backend and model allow it")] = None
    cuda_graph_max_tokens: Annotated[int | None, _doc(
        "with cuda_graphs, the largest step with prompt chunks replayed from a graph (tokens are "
        "padded to a power of two or this size); 0: decode steps only; unset: token_budget")] = None
    overlap_steps: Annotated[bool | None, _doc(
        "launch each step before reading the previous step's sampled tokens, so that the host's "
        "scheduling and postprocessing overlap the device's work; a sequence that stops on a "
        "token read late has computed one token more, which is dropped; unset: on for a GPU, off "
        "on a CPU (where the forward pass runs as it is launched: nothing would overlap)")] = None
    seed: Annotated[int, _doc("seed for sampling requests that bring no seed of their own")] = 0
    threads: Annotated[int | None, _doc("CPU threads for torch; default: torch's choice")] = None
    cache_dir: Annotated[str | None, _doc(
        "where converted checkpoints and compiled kernel backends are kept; default: $XDG_CACHE_HOME/fastgen or ~/.cache/fastgen")] = None

    # Serving.
    host: Annotated[str, _doc("address a network transport binds")] = "127.0.0.1"
    port: Annotated[int, _doc("port a network transport listens on")] = 8000
    api_key: Annotated[str | None, _doc(
        "when set, a network transport requires `Authorization: Bearer KEY` (also from the "
        "FASTGEN_API_KEY environment variable)")] = None
    max_body_bytes: Annotated[int, _doc(
        "largest request body a network transport accepts (larger: 413)")] = 16 * 2**20
    max_choices: Annotated[int, _doc("most completions one HTTP request may start (prompts x n)")] = 128
    engine_process: Annotated[bool, _doc(
        "run the engine's steps in a process of its own, so that a transport's work (parsing, "
        "formatting, socket writes) and the engine's host work run on two cores instead of taking "
        "turns on one interpreter; for many concurrent streams where the host, not the device, "
        "bounds the tokens a second")] = False
    shutdown_timeout: Annotated[float, _doc(
        "seconds requests in flight get to finish after SIGINT/SIGTERM before they are aborted")] = 30.0

    def __post_init__(self) -> None:
        for name in ("block_size", "max_body_bytes", "max_choices"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.cuda_graph_max_tokens is not None and self.cuda_graph_max_tokens < 0:
            raise ConfigError(f"cuda_graph_max_tokens must be 0 (decode steps only) or more, got "
                              f"{self.cuda_graph_max_tokens}.")
        for name in ("token_budget", "max_num_seqs", "num_blocks", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}.")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be at least 2 (a prompt token and an answer), "
                              f"got {self.max_model_len}.")
        if self.kv_cache_gb is not None and not self.kv_cache_gb > 0:
            raise ConfigError(f"kv_cache_gb must be more than 0, got {self.kv_cache_gb}.")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization must be more than 0 and at most 1, got "
                              f"{self.gpu_memory_utilization}.")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in [0, 65535] (0: any free port), got {self.port}.")
        if not self.shutdown_timeout >= 0:   # also refuses NaN
            raise ConfigError(f"shutdown_timeout must be 0 or more seconds, got {self.shutdown_timeout}.")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be in [0, 2**63), as a request's is, got {self.seed}.")
        if self.threads is not None and self.threads > MAX_THREADS:
            raise ConfigError(f"threads must be at most {MAX_THREADS}, got {self.threads}.")


def config_fields() -> list[msgspec.structs.FieldInfo]:
    return list(msgspec.structs.fields(Config))


def make_config(base: Config | None = None, **overrides: Any) -> Config:
    """A validated Config from keywords, on top of `base` (or the defaults)."""
    values = msgspec.structs.asdict(base) if base is not None else {}
    unknown = sorted(set(overrides) - {f.name for f in config_fields()})
    if unknown:
        known = ", ".join(f.name for f in config_fields())
        raise ConfigError(f"Unknown setting {', '.join(unknown)}; the settings are: {known}.")
    values.update({k: v for k, v in overrides.items()})
    try:
        return msgspec.convert(values, Config, strict=False)
    except msgspec.ValidationError as e:
        # A check of __post_init__'s ends its message with a period already; msgspec's own do not.
        raise ConfigError(f"Invalid setting: {str(e).rstrip('.')}.") from None


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The settings in a TOML or JSON file, as a plain dict (validated when merged)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"Cannot read config file {path}: {e.strerror}.") from None
    try:
        data = msgspec.json.decode(raw) if path.suffix == ".json" else tomllib.loads(raw.decode())
    except (msgspec.DecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise ConfigError(f"Config file {path} is not valid {kind}: {e}.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a table of settings.")
    return data


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(the type argparse should parse, whether None is allowed) for a field's annotation."""
    if typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        non_none = [a for a in args if a is not type(None)]
        return non_none[0], len(non_none) < len(args)
    return tp, False


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One `--flag` per Config field; unset flags stay absent so file values are not overridden."""
    group = parser.add_argument_group("settings (also keys of --config FILE)")
    for field in config_fields():
        tp, _ = _base_type(field.type)
        description = ""
        if typing.get_origin(field.type) is Annotated:
            for meta in typing.get_args(field.type)[1:]:
                if isinstance(meta, msgspec.Meta) and meta.description:
                    description = meta.description
        flag = "--" + field.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": field.name, "default": argparse.SUPPRESS,
                                  "help": f"{description} (default: {field.default})"}
        if typing.get_origin(tp) is Literal:
            kwargs["choices"] = list(typing.get_args(tp))
        elif tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction   # --flag / --no-flag
        elif tp in (int, float):
            kwargs["type"] = tp
        group.add_argument(flag, **kwargs)


def config_from_args(args: argparse.Namespace) -> Config:
    """Defaults, then --config FILE, then the flags given on the command line."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_config_file(args.config))
    names = {f.name for f in config_fields()}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return make_config(**values)
