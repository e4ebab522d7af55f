"""The `fastgen` command: settings from flags and files, plugin selection and listing, errors."""

from __future__ import annotations

import json

import msgspec
import pytest

import fastgen
from fastgen import cli, plugin_manager as manager_module
from fastgen.checkpoint import resolve_dtype
from fastgen.config import Config, config_from_args, make_config
from fastgen.engine import Engine, resolve_device
from fastgen.errors import ConfigError, PluginError
from fastgen.kernels import choose_auto
from fastgen.plugins.kernels.torch_ref.backend import TorchBackend


class NeedsGpu(TorchBackend):
    name = "needs_gpu"

    @classmethod
    def unavailable_reason(cls, device):
        return "it needs a CUDA device and none is visible."


class NeedsGpuPlugin:
    @fastgen.hookimpl
    def register_kernels(self, register):
        register(NeedsGpu)


def parse(*argv: str):
    return cli.build_parser().parse_args(["serve", *argv])


def test_every_setting_is_a_flag_a_file_key_and_a_keyword(tmp_path):
    fields = [f.name for f in msgspec.structs.fields(Config)]
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for name in fields:
        assert "--" + name.replace("_", "-") in help_text
    # Non-default values for every field, once through a TOML file and once through flags.
    values = {"model": "m", "dtype": "bfloat16", "device": "cpu", "max_model_len": 77,
              "served_model_name": "x", "kernels": "k", "scheduler": "s", "transport": "t",
              "token_budget": 33, "max_num_seqs": 5, "block_size": 8, "num_blocks": 9,
              "kv_cache_gb": 0.5, "gpu_memory_utilization": 0.8, "prefix_caching": False, "cuda_graphs": True, "cuda_graph_max_tokens": 32, "overlap_steps": True, "seed": 3, "threads": 1, "cache_dir": "/c", "host": "::1",
              "port": 9, "api_key": "k", "max_body_bytes": 1000, "max_choices": 4, "engine_process": True,
              "shutdown_timeout": 2.5}
    assert sorted(values) == sorted(fields), "update this test with the new setting"
    toml = "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items())
    (tmp_path / "fastgen.toml").write_text(toml)
    from_file = config_from_args(parse("--config", str(tmp_path / "fastgen.toml")))
    def flag(name, value):   # a switch stands alone: --cuda-graphs / --no-cuda-graphs
        dashed = name.replace("_", "-")
        if isinstance(value, bool):
            return [f"--{'' if value else 'no-'}{dashed}"]
        return [f"--{dashed}", str(value)]

    flags = [a for k, v in values.items() for a in flag(k, v)]
    from_flags = config_from_args(parse(*flags))
    from_keywords = make_config(**values)
    assert msgspec.structs.asdict(from_file) == values
    assert from_flags == from_file == from_keywords


def test_cuda_graphs_is_unset_by_default_and_either_switch_or_key_sets_it(tmp_path):
    """Unset (None) is the default, on where possible; true and false come from flags, files or keywords."""
    assert Config().cuda_graphs is None and config_from_args(parse()).cuda_graphs is None
    assert config_from_args(parse("--cuda-graphs")).cuda_graphs is True
    assert config_from_args(parse("--no-cuda-graphs")).cuda_graphs is False
    (tmp_path / "off.toml").write_text("cuda_graphs = false\n")
    assert config_from_args(parse("--config", str(tmp_path / "off.toml"))).cuda_graphs is False
    assert config_from_args(parse("--config", str(tmp_path / "off.toml"), "--cuda-graphs")).cuda_graphs is True
    assert make_config(cuda_graphs=False).cuda_graphs is False and make_config(cuda_graphs=None).cuda_graphs is None
    with pytest.raises(ConfigError, match="cuda_graphs"):
        make_config(cuda_graphs="sometimes")


def test_flags_override_the_config_file(tmp_path):
    (tmp_path / "c.toml").write_text('token_budget = 64\nblock_size = 32\n')
    config = config_from_args(parse("--config", str(tmp_path / "c.toml"), "--token-budget", "128"))
    assert (config.token_budget, config.block_size) == (128, 32)


def test_config_file_errors_name_the_problem(tmp_path):
    (tmp_path / "bad.toml").write_text('token_budgett = 64\n')
    with pytest.raises(ConfigError, match="token_budgett"):
        config_from_args(parse("--config", str(tmp_path / "bad.toml")))
    (tmp_path / "broken.toml").write_text('token_budget = \n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        config_from_args(parse("--config", str(tmp_path / "broken.toml")))
    (tmp_path / "typed.toml").write_text('token_budget = "many"\n')
    with pytest.raises(ConfigError, match="token_budget"):
        config_from_args(parse("--config", str(tmp_path / "typed.toml")))
    with pytest.raises(ConfigError, match=r"cuda_graph_max_tokens must be 0 \(decode steps only\) or more, got -1"):
        config_from_args(parse("--cuda-graph-max-tokens", "-1"))


def test_plugin_flag_selects_by_kind_and_rejects_unknown_names(capsys):
    args = parse("--plugin", "schedulers.splitfuse", "--plugin", "kernels.torch")
    cli._apply_plugin_flags(args)
    assert (args.scheduler, args.kernels) == ("splitfuse", "torch")
    assert cli.main(["serve", "--plugin", "kernels.nope"]) == 2
    err = capsys.readouterr().err
    assert "No plugin named kernels.nope" in err and "kernels.torch" in err
    assert cli.main(["serve", "--plugin", "models.llama"]) == 2
    assert "chosen by the checkpoint's architecture" in capsys.readouterr().err
    assert cli.main(["serve", "--plugin", "nonsense"]) == 2
    assert "KIND.NAME" in capsys.readouterr().err


def test_plugins_command_lists_kind_name_package_and_availability(capsys, monkeypatch):
    manager = manager_module.PluginManager()
    manager.load_entry_points()
    manager.register(NeedsGpuPlugin(), name="kernels.needs_gpu", package="gpu-kernels")
    manager.registry.import_errors["kernels.broken"] = 'Error importing plugin "kernels.broken": boom'
    monkeypatch.setattr(manager_module, "_manager", manager)

    assert cli.main(["plugins"]) == 0
    table, _, after = capsys.readouterr().out.partition("\n\n")
    row = {line.split()[1]: line for line in table.splitlines()[1:]}
    device = resolve_device("auto")
    auto = choose_auto([i.cls for i in manager.registry.items["kernels"].values()], device)
    assert after.strip() == f"kernels = auto (the default) runs kernels.{auto.name} on {device}"
    for name in ("models.llama", "kernels.torch", "schedulers.splitfuse", "transports.stdin"):
        assert row[name].split()[2] == "fastgen" and row[name].endswith("yes")
    assert "gpu-kernels" in row["kernels.needs_gpu"]
    assert row["kernels.needs_gpu"].endswith("no: it needs a CUDA device and none is visible.")
    assert "boom" in row["kernels.broken"]

    assert cli.main(["plugins", "--json"]) == 0
    listed = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert listed["kernels.torch"]["available"] is True
    assert listed["kernels.needs_gpu"] == {"kind": "kernels", "name": "kernels.needs_gpu",
                                           "package": "gpu-kernels", "available": False,
                                           "reason": "it needs a CUDA device and none is visible."}


def test_backend_that_cannot_run_says_why_and_what_can(tiny_llama, plugin_manager):
    plugin_manager.register(NeedsGpuPlugin(), name="kernels.needs_gpu")
    folder, _ = tiny_llama
    with pytest.raises(PluginError) as err:
        Engine(make_config(model=str(folder), kernels="needs_gpu", device="cpu"), plugins=plugin_manager)
    assert "kernels.needs_gpu cannot run on cpu: it needs a CUDA device and none is visible." in str(err.value)
    # Every backend that can run here is listed (kernels.cpu too where a C++ compiler exists).
    usable = str(err.value).split("Usable here: ")[1].rstrip(".").split(", ")
    assert "kernels.torch" in usable and "kernels.needs_gpu" not in usable


def test_generate_command_with_a_checkpoint_folder(tiny_llama, capsys):
    folder, _ = tiny_llama
    assert cli.main(["generate", "--model", str(folder), "--prompt", "The quick brown",
                     "--max-tokens", "5", "--no-chat", "--ignore-eos"]) == 0
    captured = capsys.readouterr()
    expected = fastgen.LLM(model=str(folder)).generate(
        "The quick brown", fastgen.SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert captured.out == expected.text + "\n"
    assert "[5 tokens" in captured.err and "finish_reason=length" in captured.err


def test_generate_command_reports_a_missing_model_folder(tmp_path, capsys):
    assert cli.main(["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_serve_says_what_the_defaults_resolved_to(tiny_llama):
    engine = Engine(make_config(model=str(tiny_llama[0]), device="cpu", kernels="torch",
                                num_blocks=32))
    line = cli.serving_summary(engine)
    dtype = resolve_dtype("auto", None, engine.device)   # float32, or bfloat16 on an AMX CPU
    assert line.startswith(f"fastgen: serving {engine.model_name} with transports.http, kernels.torch, "
                           f"schedulers.splitfuse on cpu in {dtype} (32 KV blocks of 16 tokens")
    # A CPU: the CPU's token budget, no graphs, nothing to overlap.
    assert line.endswith("; steps of 512 tokens and 64 sequences at most, eager steps, in turn)")
