#!/usr/bin/env bash
# Run HERE, on a machine with PyPI, before a GPU session: downloads into .whl/ the wheels of what
# fastgen needs and the GPU machine's image lacks (it has torch, triton, transformers, pytest, ...
# but not msgspec or gguf; gguf's own needs, numpy, pyyaml, requests and tqdm, are there), built
# for its Python 3.12 on x86-64 Linux. The device tool carries them with carry [".whl"], and
# scripts/gpu_session.sh installs them there. .whl/ is kept out of git through .git/info/exclude.
#
#   bash scripts/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(msgspec gguf)
PYTHON_VERSION=3.12
# The versions tested here, where this checkout's .venv has them; else PyPI's newest.
VENV_PY=.venv/bin/python

pin() {
    local version=""
    if [ -x "$VENV_PY" ]; then
        version=$("$VENV_PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null || true)
    fi
    if [ -n "$version" ]; then echo "$1==$version"; else echo "$1"; fi
}

exclude=.git/info/exclude
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"

rm -rf .whl
mkdir -p .whl
specs=()
for p in "${PACKAGES[@]}"; do specs+=("$(pin "$p")"); done
echo "gpu_wheels: downloading ${specs[*]} for CPython $PYTHON_VERSION, manylinux x86_64" >&2
# pip matches each manylinux tag exactly, so the common ones are all named.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "${specs[@]}"

ls -l .whl >&2
echo "gpu_wheels: $(du -sh .whl | cut -f1) in .whl; carry it with carry [\".whl\"]" >&2
