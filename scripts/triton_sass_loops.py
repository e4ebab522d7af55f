"""The instruction mix of kernels.triton's attention loops at one of the kernel benchmark's cases,
compiled for a GPU on a machine without one (Triton's own toolchain: `compile_check`), read from
its SASS as scripts/sass_loops.py reads kernels.cuda's:

    python scripts/triton_sass_loops.py prefill_2048_cached0 [--model llama3-8b] [--arch 90]
        [--block-n 64] [--warps 8] [--tile 32] [--stages 3] [--block-size 64 [--tma]]

The launch settings default to the backend's own for that case. Each loop is a backward branch's
span holding a global load (the key loops: the unmasked one, then the masked one); the counts are
static, one pass, so divide by the keys a pass takes (BLOCK_N) to compare settings per key.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)   # compiled, not interpreted, launches

from sass_loops import functions, print_loops  # noqa: E402

KINDS = ("HGMMA", "HMMA", "MUFU", "FFMA", "FMUL", "IMAD", "LDGSTS", "LDG", "UTMALDG", "LDS", "SHFL",
         "BAR")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", help="a kernel benchmark shape, e.g. prefill_2048_cached0")
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--block-n", type=int)
    parser.add_argument("--warps", type=int)
    parser.add_argument("--tile", type=int, help="new tokens per prompt tile")
    parser.add_argument("--stages", type=int)
    parser.add_argument("--block-size", type=int, help="tokens per KV cache block (default: 16)")
    parser.add_argument("--tma", action="store_true", help="K/V as TMA copies (needs --block-size "
                        "a multiple of the keys a step)")
    args = parser.parse_args(argv)

    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    from fastgen.plugins.kernels.triton import compile_check
    from fastgen.plugins.kernels.triton.backend import TritonBackend

    TritonBackend.attention_block_n, TritonBackend.attention_num_warps = args.block_n, args.warps
    TritonBackend.tile_tokens, TritonBackend.attention_num_stages = args.tile, args.stages
    launches = [launch for launch in compile_check.record_cases([args.dtype], models=[args.model],
                                                                ops=["attention"], arch=args.arch,
                                                                cache_block=args.block_size,
                                                                tma=args.tma)
                if f"-{args.shape}-attention" in launch.case
                and launch.kernel.__name__ == "_attention_kernel"]
    if not launches:
        print(f"no attention launch for shape {args.shape!r} of {args.model}", file=sys.stderr)
        return 1
    launch = launches[0]
    target = GPUTarget("cuda", args.arch, 32)
    kernel = compile_check.compile_launch(launch, target, make_backend(target))
    registers, spills, _ = compile_check._resource_usage(kernel.asm["cubin"])
    settings = {k: v for k, v in launch.kwargs.items() if k.isupper() or k.startswith("num_")}
    print(f"{launch.case}: {settings}")
    print(f"registers {registers}, spilled bytes {spills}, shared bytes {kernel.metadata.shared}")
    sass = compile_check.cuobjdump(kernel.asm["cubin"], "-sass")
    if sass is None:
        print("cuobjdump was not found (it ships in the triton wheel).", file=sys.stderr)
        return 2
    for instructions in functions(sass).values():
        print_loops(instructions, KINDS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
