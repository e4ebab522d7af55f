"""kernels.triton compiles for GPUs this machine does not have (compile_check).

The interpreter runs in this process (tests/conftest.py sets TRITON_INTERPRET), so every check
runs in a process of its own without it, compiling with the toolchain that ships in the triton
wheel. The main suite compiles the bfloat16 launches of every benchmark case for Hopper (sm_90);
the slow step adds float16 and float32, Ampere (sm_80), and the checks that read the compiled
code (PTX, TTGIR, SASS) for one property each.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

import fastgen.plugins.kernels.triton as triton_plugin  # noqa: E402

COMPILE_CHECK = "fastgen.plugins.kernels.triton.compile_check"


def _compiling_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}
    env.update(extra)
    return env


def _run_check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", COMPILE_CHECK, *args, "--json", str(report)],
                          env=_compiling_env(), capture_output=True, text=True, timeout=600)
    return done, json.loads(report.read_text()) if report.exists() else {}


def launched_kernels() -> set[str]:
    """The kernels the backend's modules launch (`kernel[grid](...)`), read from their source."""
    names = set()
    for path in Path(triton_plugin.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                    and isinstance(node.func.value, ast.Name)):
                names.add(node.func.value.id)
    return names


def _assert_clean(done: subprocess.CompletedProcess, report: dict, arch: int,
                  every_kernel: bool = True) -> None:
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert report["arch"] == arch
    compiled = {launch["kernel"] for launch in report["launches"]}
    if every_kernel:
        assert compiled == launched_kernels(), "the benchmark cases must reach every kernel"
    for launch in report["launches"]:
        assert launch["error"] is None and launch["registers"] > 0, launch
        assert launch["spill_bytes"] == 0, launch


def test_every_kernel_compiles_for_hopper_in_bfloat16(tmp_path):
    done, report = _run_check(tmp_path, "--arch", "90", "--dtype", "bfloat16")
    _assert_clean(done, report, 90)
    # Every launch says whether the compiler may fuse into fmas, so Triton has no default to warn
    # about (3.9 does while it is unset) and none to change (3.10 turns it off).
    assert "TRITON_DEFAULT_FP_FUSION" not in done.stderr, done.stderr[-2000:]
    # Both attention paths and the split-KV reduce are among the launches.
    attention = [launch["constants"] for launch in report["launches"]
                 if launch["kernel"] == "_attention_kernel"]
    assert any("TILE_TOKENS=1," in c for c in attention) and any("TILE_TOKENS=16," in c for c in attention)
    assert any("NUM_SPLITS=1," in c for c in attention) and any("SLIDING=True" in c for c in attention)


def test_attention_with_tma_copies_compiles_for_hopper(tmp_path):
    """K/V read as TMA copies from 64-token cache blocks (`attention_tma`), which the interpreter
    runs without the compiler's say: each attention launch of Llama-3-8B's cases compiles, with
    the copies in it, and without spills."""
    done, report = _run_check(tmp_path, "--arch", "90", "--dtype", "bfloat16", "--ops", "attention",
                              "--models", "llama3-8b", "--cache-block", "64", "--tma")
    _assert_clean(done, report, 90, every_kernel=False)
    attention = [launch["constants"] for launch in report["launches"]
                 if launch["kernel"] == "_attention_kernel"]
    assert attention and all("CACHE_BLOCK=64," in c and "TMA=True," in c for c in attention)
    assert any("TILE_TOKENS=1," in c for c in attention) and any("TILE_TOKENS=16," in c for c in attention)


@pytest.mark.slow
@pytest.mark.parametrize("arch, dtypes, ops", [(90, "float16,float32", None), (80, "bfloat16", None),
                                               (86, "float32", "attention")])
def test_every_kernel_compiles_for_other_dtypes_and_ampere(tmp_path, arch, dtypes, ops):
    # sm_86 (RTX 3090) gives a program 99 KB of shared memory: float32 attention tiles of head
    # size 128 pipeline less deep there (3 stages would take 104 KB).
    done, report = _run_check(tmp_path, "--arch", str(arch), "--dtype", dtypes,
                              *(["--ops", ops] if ops else []))
    _assert_clean(done, report, arch, every_kernel=ops is None)


def test_a_launch_over_the_shared_memory_limit_is_reported(tmp_path):
    # A dot whose operands need more shared memory than an sm_90 block has: the interpreter runs
    # it happily; the GPU would refuse the launch.
    (tmp_path / "wide_dot.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl

        @triton.jit
        def wide_dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
            m, k, n = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
            a = tl.load(a_ptr + m[:, None] * K + k[None, :])
            b = tl.load(b_ptr + k[:, None] * N + n[None, :])
            tl.store(c_ptr + m[:, None] * N + n[None, :], tl.dot(a, b))
    """))
    script = textwrap.dedent("""
        import json, torch, wide_dot
        from fastgen.plugins.kernels.triton.compile_check import Launch, compile_launches
        launches = []
        for k in (64, 2048):
            a = torch.empty(16, k, dtype=torch.bfloat16, device="meta")
            b = torch.empty(k, 64, dtype=torch.bfloat16, device="meta")
            c = torch.empty(16, 64, device="meta")
            launches.append(Launch(wide_dot.wide_dot_kernel, (a, b, c), dict(M=16, K=k, N=64), f"K={k}"))
        print(json.dumps([[r.cases, r.shared_bytes, r.problems(90)] for r in compile_launches(launches, 90)]))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=_compiling_env())
    assert done.returncode == 0, done.stderr[-4000:]
    (small_cases, small_shared, small_problems), (wide_cases, wide_shared, wide_problems) = \
        json.loads(done.stdout.strip().splitlines()[-1])
    assert small_cases == ["K=64"] and small_problems == [] and 0 < small_shared < 232448
    assert wide_cases == ["K=2048"] and wide_shared > 232448
    assert len(wide_problems) == 1 and "shared memory, over sm_90's 232448" in wide_problems[0]


def test_the_check_refuses_to_run_under_the_interpreter():
    done = subprocess.run([sys.executable, "-m", COMPILE_CHECK, "--ops", "rms_norm"],
                          env=_compiling_env(TRITON_INTERPRET="1"), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert "run it with TRITON_INTERPRET unset" in done.stderr


# Run in a process of its own (no interpreter) before a test's script: `cc` the compile check,
# `target` Hopper (sm_90) and `backend` Triton's compiler for it.
HOPPER = """
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from fastgen.plugins.kernels.triton import compile_check as cc

target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
"""


def _printed_compiling_for_hopper(script: str) -> str:
    """What `script` prints, run after HOPPER in a process that compiles."""
    done = subprocess.run([sys.executable, "-c", HOPPER + textwrap.dedent(script)],
                          env=_compiling_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


# What the compiled code looks like (SASS and TTGIR read for one property each: 5-8 s a check):
# the slow step's, as the compile check of every launch above is the main suite's.
@pytest.mark.slow
def test_rotary_rounds_each_16bit_product_on_hopper():
    # Compiled for a GPU, a 16-bit product and the sum after it fuse into one fma (rounded once)
    # unless the launch turns fusion off; the reference rounds each, and where the products
    # cancel the two differ by many ulps (3359 of 6144 fp16 values on an H200). The interpreter
    # does not fuse, so only the compiled code can show it.
    printed = _printed_compiling_for_hopper("""
        for dtype in ("float16", "bfloat16"):
            launch = cc.record_cases([dtype], models=["smollm2-135m"], sets=["decode"],
                                     ops=["rotary"])[0]
            ptx = cc.compile_launch(launch, target, backend).asm["ptx"]
            print(dtype, launch.kernel.__name__, "fma" in ptx, ".rn.f16" in ptx or ".rn.bf16" in ptx)
    """)
    assert printed.split() == ["float16", "_rotary_kernel", "False", "True",
                               "bfloat16", "_rotary_kernel", "False", "True"], printed


@pytest.mark.slow   # reads the compiled code, as the test above
def test_attention_keeps_the_next_keys_in_flight_while_a_step_computes_on_hopper():
    # The pipeliner's async copies of K/V are waited for with `num` groups left in flight. A K/V
    # address that comes from a load in its own loop step (the block table) was issued only after
    # the step's products, and each step waited for all copies (num = 0): no copy overlapped a
    # product. Carried a step ahead, the block ids leave the copies of later steps in flight.
    printed = _printed_compiling_for_hopper("""
        import re

        for kind in ("decode", "prefill"):
            launch = next(l for l in cc.record_cases(["bfloat16"], models=["llama3-8b"],
                                                     sets=[kind], ops=["attention"])
                          if l.kernel.__name__ == "_attention_kernel")
            ttgir = cc.compile_launch(launch, target, backend).asm["ttgir"]
            print(kind, ",".join(re.findall(r"ttg.async_wait[^{]*[{]num = (\\d+)", ttgir)))
    """)
    for line in printed.splitlines():
        kind, waits = line.split()
        # Two key loops (steps every row sees whole, then the masked ones), each waiting with
        # copies left in flight; a drain (num = 0) after each.
        in_flight = [int(n) for n in waits.split(",") if int(n) > 0]
        assert len(in_flight) == 2, f"{kind}: async_wait nums {waits}"
    assert len(printed.splitlines()) == 2, printed


@pytest.mark.slow   # reads the compiled code, as the tests above
@pytest.mark.parametrize("shape", ["prefill_2048_cached0", "decode_b64_ctx1024"])
def test_attention_addresses_keys_with_few_integer_instructions_on_hopper(shape):
    # Each key's K and V rows were addressed apart, in 64-bit arithmetic, with the slot within its
    # block recomputed every step: 66-74 IMADs in the loop over keys every row sees whole (of
    # 309-410 instructions, sm_90 SASS). K and V now share one 32-bit offset (64-bit only for a
    # cache of 2**31 elements or more) whose slot part is computed once: 14-20.
    script = Path(__file__).parents[3] / "scripts" / "triton_sass_loops.py"
    done = subprocess.run([sys.executable, str(script), shape], env=_compiling_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    loops = [line for line in done.stdout.splitlines() if line.strip().startswith("loop ")]
    assert len(loops) == 2, done.stdout   # the unmasked key loop, then the masked one
    imads = int(loops[0].split("IMAD ")[1].split(",")[0])
    assert imads <= 32, loops[0]
    assert "spilled bytes 0" in done.stdout


def test_steps_of_any_size_reuse_each_compiled_kernel():
    # Triton compiles a variant per combination of integer arguments equal to 1 or divisible by 16
    # and of pointers aligned to 16 bytes. A step's sizes and metadata views change from step to
    # step; specialised on, they started new compiles in a running server whenever a size first
    # reached such a value. Driven over steps of many sizes, each kernel must compile once per
    # launch setting (its constexprs and options), on CPU tensors as a GPU's would be laid out.
    printed = _printed_compiling_for_hopper("""
        import collections, sys
        sys.path[:0] = ["tests", "tests/plugins/kernels"]
        import torch
        from fastgen import SamplingParams
        from fastgen.plugins.kernels.triton.backend import TritonBackend
        from kernel_batches import ragged_batch
        from sampling_inputs import metadata, random_logits

        be = TritonBackend(torch.device("cpu"))
        be.configure_kv_cache(2, 64)
        heads, kv_heads, dim, hidden = 8, 2, 64, 256
        k_cache, v_cache = torch.randn(96, 16, kv_heads, dim), torch.randn(96, 16, kv_heads, dim)
        steps = [[(5, 1)] * n for n in (1, 2, 3, 4, 15, 16, 17)] + [
            [(0, 16)], [(0, 17)], [(3, 1), (0, 32)], [(3, 1)] * 2 + [(10, 7)], [(100, 1)] * 7 + [(0, 9)],
            [(40, 1), (200, 1), (0, 33)]]
        launches = []
        for shapes in steps:
            batch = ragged_batch(shapes, 16, 96)
            t = batch.num_tokens
            qkv = torch.randn(t, (heads + 2 * kv_heads) * dim)
            q, k, v = (x.view(t, -1, dim) for x in qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], -1))
            x, w = torch.randn(t, hidden), torch.randn(hidden)
            batch.attn_metadata = be.prepare(batch)
            with cc.recorded_launches(launches, str(shapes)):
                be.rms_norm(x, w, 1e-5, x)
                q, k = be.rotary(q, k, torch.randn(t, dim // 2), torch.randn(t, dim // 2))
                be.write_kv(k, v, k_cache, v_cache, batch.slot_mapping)
                be.attention(q, k_cache, v_cache, batch, 0.1)
                be.silu_and_mul(torch.randn(t, 2 * hidden))
        for rows, top_k in ((1, 5), (3, 40), (16, 7), (17, 64)):
            params = [SamplingParams(temperature=0.8, top_k=top_k, top_p=0.9, seed=i) for i in range(rows)]
            with cc.recorded_launches(launches, f"sample {rows}"):
                be.sample(random_logits(rows, 1000), metadata(params), torch.Generator().manual_seed(0))
        variants = collections.defaultdict(set)
        for launch in launches:
            signature, constexprs, attrs, options = cc._specialise(launch, backend)
            setting = (launch.kernel.__name__, repr(sorted(launch.kwargs.items())))
            variants[setting].add((repr(sorted(constexprs.items())), repr(sorted(attrs.items()))))
        print(len(variants), sorted({name for name, _ in variants}))
        for (name, setting), found in variants.items():
            if len(found) > 1:
                print("VARIANTS", name, setting, len(found))
    """)
    assert "VARIANTS" not in printed, printed
    count, names = printed.split(" ", 1)
    assert "_attention_kernel" in names and "_threshold_kernel" in names and "_gumbel_argmax_kernel" in names
