"""Serving benchmark: every scheduler under the same load; the script form of `fastgen bench serve`.

    python benchmarks/serving.py --preset cpu --schedulers splitfuse,prefill_first \
        --clients 1,4,16 --prompt-mean 520 --gen-mean 12 [--model DIR] [--json FILE] \
        [--peers transformers] [--plot FILE.png]
    python benchmarks/serving.py --url http://127.0.0.1:8000/v1 --model DIR --clients 1,4,16

Takes the flags of `fastgen bench serve --help`; see docs/benchmarks.md for what it measures.
"""

from __future__ import annotations

import sys

from fastgen.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "serve", *sys.argv[1:]]))
