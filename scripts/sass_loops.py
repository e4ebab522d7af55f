"""The instruction mix of a CUDA kernel's loops that load from global memory, read from the SASS of
an object compiled without a GPU (`python -m fastgen.plugins.kernels.cuda.build --check DIR`), with
the cuobjdump that ships in the triton wheel:

    python scripts/sass_loops.py DIR/attention.cu.o 'attention_kernelI13__nv_bfloat16Li128ELi4E'

A loop is a backward branch's span; the counts are static (one pass through the span), so divide
by the keys (or elements) one pass takes to compare two versions of a kernel per unit of work.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

from fastgen.plugins.kernels.triton.compile_check import _cuda_tool

KINDS = ("SHFL", "FFMA", "HFMA2", "LDG", "MUFU", "IMAD", "BAR")


def functions(sass: str) -> dict[str, list[tuple[int, str]]]:
    """Each function's (address, instruction) pairs."""
    found = {}
    for chunk in re.split(r"\n\s*Function : ", sass)[1:]:
        name = chunk.split("\n", 1)[0].strip()
        found[name] = [(int(a, 16), s.strip()) for a, s in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", chunk)]
    return found


def loops(instructions: list[tuple[int, str]]) -> list[tuple[int, int, list[str]]]:
    """(start, end, instructions) of each backward branch's span that holds a global load (LDG,
    or UTMALDG: a TMA copy)."""
    spans = []
    for address, text in instructions:
        # A loop closes with a predicated branch back; an unpredicated one jumps back from code
        # placed after the function's end (Triton's retries of a TMA barrier wait).
        target = re.search(r"^@!?U?P\w+\s+BRA 0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < address:
            start = int(target.group(1), 16)
            body = [t for a, t in instructions if start <= a <= address]
            if any(re.search(r"(^|\s)(UTMA)?LDG", t) for t in body):
                spans.append((start, address, body))
    return spans


def _count(kind: str, body: list[str]) -> int:
    return sum(bool(re.search(r"(^|\s)" + kind, t)) for t in body)


def print_loops(instructions: list[tuple[int, str]], kinds: tuple[str, ...] = KINDS) -> None:
    """A line per loop: its span, its length and the count of each of `kinds` in it."""
    for start, end, body in loops(instructions):
        counts = ", ".join(f"{k} {_count(k, body)}" for k in kinds)
        print(f"  loop {start:#06x}-{end:#06x}: {len(body)} instructions; {counts}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("object")
    parser.add_argument("kernel", help="a regular expression the kernel's mangled name matches")
    args = parser.parse_args(argv)
    tool = _cuda_tool("cuobjdump")
    if tool is None:
        print("cuobjdump was not found (it ships in the triton wheel).", file=sys.stderr)
        return 2
    sass = subprocess.run([tool, "-sass", args.object], capture_output=True, text=True, check=True).stdout
    matched = {n: i for n, i in functions(sass).items() if re.search(args.kernel, n)}
    if not matched:
        print(f"no kernel matches {args.kernel!r}", file=sys.stderr)
        return 1
    for name, instructions in matched.items():
        print(name)
        print_loops(instructions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
