#!/usr/bin/env bash
# A GPU session's checks and measurements (issue 5) in one command, run by the device tool in the
# repository root, with the wheels that scripts/gpu_wheels.sh put in .whl/ (carry [".whl"]):
#
#   bash scripts/gpu_session.sh [tests] [kernels] [e2e] [steps] [serve] [sweep] [profile]
#                                                                            none: all seven
#
#   tests    the GPU cases (-k "cuda and not emulated") of tests/plugins/kernels and of the
#            Llama-family parity tests: the conformance suite on cuda (kernels.torch, .triton and
#            .cuda against kernels.torch), kernels.cuda's GPU tests, greedy parity with
#            transformers for every backend on the GPU, the kernel benchmark's device timer, and
#            the ragged batch's copy from pinned memory; overlap_steps against steps in turn;
#            prefix-cached prompts against transformers; the KV cache sized to the GPU
#   kernels  fastgen bench kernels --check, full shapes, over the backends that run on the device
#            (each case also checked against kernels.torch on its inputs); one run
#            per model shape, llama3-8b then smollm2-135m, so a timeout costs that model's rows only
#   e2e      benchmarks/offline_throughput.py on random-weight smollm2-135m in bf16, greedy: the
#            GPU backends beside transformers generate, prefill and decode tokens/s, and kernels.triton
#            and .cuda with cuda_graphs on (`triton+graphs`) and with overlap_steps besides
#            (`triton+graphs+overlap`, as the defaults serve on a GPU); then llama-1b sampled
#            (temperature 0.7, top-k 50, top-p 0.9, two timed runs): the GPU backends with
#            graphs, and with overlap_steps
#   steps    benchmarks/step_profile.py on the e2e models, as the engine's GPU defaults run them:
#            each op group's device time in a prompt step and a decode step of 32 sequences
#            (where a step's time goes: which kernels to fuse or tune next); into summary.md
#   serve    benchmarks/stream_overhead.py on random smollm2-135m with the GPU defaults: 64 and
#            256 concurrent streams through `fastgen serve` (SSE) and through the AsyncEngine
#            alone, each with the engine's steps in the serving process and in one of their own
#            (`engine_process`); tokens/s and the host's CPU time per token (is serving
#            host-bound, and does a process of its own for the engine lift it?); into summary.md
#   sweep    benchmarks/attention_sweep.py: kernels.triton's attention over its launch settings
#            and split-KV counts, beside kernels.cuda's and torch's SDPA on the same work
#            (llama3-8b shapes), to choose its defaults and tune the split rule
#   profile  benchmarks/profile_attention.py under Nsight Compute (ncu, where it can read the
#            counters): kernels.triton's, kernels.cuda's and SDPA's kernels on a 2048-token prompt
#            and an 8192-key decode: throughput against the peaks, occupancy, warp stalls
#
# A session has 15 minutes of device time in all, the machine's start (1-2 minutes) and its idle
# time counted, so the steps share ONE call: the whole command ends within GPU_SESSION_BUDGET_S
# seconds (default 570), in the order above, what matters most first. Each part runs under its
# own `timeout` and a failing one does not stop the next; each gets at most its cap and what the
# floors of the later steps leave it; a part that gets no time is reported as skipped. Give the
# machine back right after (the device tool's give_back). What comes back under $OUT (8 files,
# the device tool's most, all rewritten after every part, so what was done survives a kill):
#   summary.md   versions, each part's result and time, the test summary, the tables
#   session.log  everything printed        tests.xml  pytest's junit report
#   kernels.json pytest-benchmark JSON of all model shapes      kernels.md  its tables
#   e2e.json     offline_throughput's JSON per model             e2e.md      its tables
#   sweep.md     the attention settings' table
# ncu's report goes to session.log whole, and its main lines to summary.md (8 files at most).
#
# Dry run on a CPU machine, to check this script: FASTGEN_DEVICE=cpu bash scripts/gpu_session.sh
# runs the same steps with tiny shapes and quick modes over the backends that run on the CPU,
# with $OUT a new temporary folder when unset.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

DEVICE=${FASTGEN_DEVICE:-cuda}
DRY=0
[ "$DEVICE" = cpu ] && DRY=1
BUDGET_S=${GPU_SESSION_BUDGET_S:-570}
RESERVE_S=15                     # for the last summary and the tool's copy of $OUT
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-session-out.XXXXXX")}
mkdir -p "$OUT"
LOG=$OUT/session.log
: > "$LOG"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-session-work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
# A fixed place, so that a second call on the same warm machine finds kernels.cuda's build cached
# (its cache key follows the source folder).
SITE=${GPU_SESSION_SITE:-${TMPDIR:-/tmp}/fastgen-gpu-session/site}
export PYTHONUNBUFFERED=1

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ "$DRY" = 1 ] && [ -x .venv/bin/python ]; then PY=$REPO/.venv/bin/python
else PY=python3
fi

STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(tests kernels e2e steps serve sweep profile)
for s in "${STEPS[@]}"; do
    case $s in tests|kernels|e2e|steps|serve|sweep|profile) ;; *) echo "gpu_session: unknown step '$s'; the steps are tests, kernels, e2e, steps, serve, sweep, profile" >&2; exit 2 ;; esac
done

# Seconds: each step's cap (all its parts together), and the floor that the parts before it leave
# it; the setup's parts have caps of their own.
# (The 2026-11-27 H200 session's parts took: setup 25, tests 128, kernels 93 + 90, e2e 90 for
# smollm2-135m, sweep 38 for four shapes. The 2026-11-28 H100 session's: setup 53 (the cuda build
# 23, the crash diagnosis 27), tests cut at 150 with 526 of 535 done (112 s for all 535 on the
# warm machine, Triton's cache filled), kernels 37 + 37, e2e 120 for smollm2-135m and llama-1b
# cut at 40 (42 s alone at one repeat without kernels.torch), sweep 64 for five shapes, profile 17.)
# The 2026-11-28 H200 session's (tests, e2e, kernels, sweep in that order): setup 46, tests cut
# at 200 with 500 of 562 done (the other 62 took 32 s on the warm machine), e2e 63 for
# smollm2-135m (eight rows) and 42 for llama-1b (four rows, one run), kernels 32 + 28, sweep 49.
# The 2026-11-28 second H200 session's (tests, e2e, sweep): setup 46, tests cut at 250 with 526
# done (the 38 left took 30 s on the warm machine), e2e 57 + 48 + 36 (the budget-2048 rows),
# sweep 64 for six shapes.
# The sweep's cap grew with its rows (tile order, a 128-key prompt setting, then 64-token cache
# blocks with and without TMA copies: 17 prompt and 9 decode settings a shape): it rewrites its
# table after each shape, so a cut keeps the shapes done.
declare -A CAP=([tests]=250 [kernels]=110 [e2e]=240 [steps]=90 [serve]=200 [sweep]=140 [profile]=60)
# The profile keeps no floor: it gets what the other steps leave, and runs alone in a second call
# on the still warm machine (`bash scripts/gpu_session.sh profile`) where they leave too little.
declare -A FLOOR=([tests]=90 [kernels]=75 [e2e]=60 [steps]=40 [serve]=50 [sweep]=45 [profile]=0)
# GPU_SESSION_PYTEST_K: a pytest -k expression for the tests step, e.g. to rerun what failed.
# GPU_SESSION_KERNEL_MODELS (space-separated), GPU_SESSION_KERNEL_OPS (comma-separated) and
# GPU_SESSION_KERNEL_K (a -k expression): a smaller kernels step, e.g. to time one change again.
PYTEST_ARGS=()
if [ "$DRY" = 1 ]; then
    KERNEL_MODELS=(smollm2-135m); KERNEL_ARGS=(--quick --check)
    E2E_MODELS=(llama-tiny)
    E2E_ARGS=(--dtype float32 --requests 4 --prompt-len 32 --gen-len 8 --repeat 1)
    STEP_PROFILE_ARGS=(--dtype float32 --requests 4 --prompt-len 32 --steps 3)
    SERVE_ARGS=(--random-model llama-micro --device cpu --streams 4,8 --gen-len 8 --repeat 1
                --through http,http-process,engine,engine-process)
    PYTEST_ARGS=(-k "${GPU_SESSION_PYTEST_K:-rms_norm_matches or (greedy_matches_transformers and torch-cpu)}")
else
    unset TRITON_INTERPRET       # compiled Triton on the GPU, never the interpreter
    # Every op but linear: no GPU backend has a linear of its own, so its cases would time
    # cuBLAS three times over in the step's few minutes.
    read -r -a KERNEL_MODELS <<< "${GPU_SESSION_KERNEL_MODELS:-llama3-8b smollm2-135m}"
    KERNEL_ARGS=(--dtype bfloat16 --check --ops "${GPU_SESSION_KERNEL_OPS:-write_kv,attention,rms_norm,rotary,silu_and_mul,sample}")
    [ -n "${GPU_SESSION_KERNEL_K:-}" ] && KERNEL_ARGS+=(-k "$GPU_SESSION_KERNEL_K")
    E2E_MODELS=(smollm2-135m llama-1b)
    E2E_ARGS=(--dtype bfloat16 --requests 32 --prompt-len 512 --gen-len 64 --repeat 2)
    STEP_PROFILE_ARGS=(--dtype bfloat16 --requests 32 --prompt-len 512 --steps 20)
    SERVE_ARGS=(--random-model smollm2-135m --device cuda --streams 64,256 --gen-len 128 --repeat 2
                --through http,http-process,engine,engine-process)
    # The CPU targets were tested where the CI runs; here only what needs the GPU.
    PYTEST_ARGS=(-k "${GPU_SESSION_PYTEST_K:-cuda and not emulated}")
fi

say() { echo "[gpu_session $(date -u +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$LOG" >&2; }

RESULTS=()
# bounded NAME LIMIT OUTPUT CMD...: run CMD under `timeout LIMIT` and record the result. The
# timeout interrupts (SIGINT) as Ctrl-C would, so pytest still writes its reports and
# pytest-benchmark its JSON of the cases done by then; a KILL follows 15 s later. OUTPUT -:
# everything to the console and the log; tee:FILE: the same, and to FILE; FILE: stdout to FILE
# only (a table), stderr to the console and the log.
bounded() {
    local name=$1 limit=$2 output=$3 rc t0=$SECONDS
    shift 3
    if [ "$limit" -lt 10 ]; then
        say "$name: skipped, no time left"
        RESULTS+=("| $name | skipped: no time left | 0 | $limit |")
        write_summary
        return 1
    fi
    say "$name: start, limit ${limit}s: $*"
    case $output in
        -) timeout -s INT -k 15 "$limit" "$@" 2>&1 | tee -a "$LOG"; rc=${PIPESTATUS[0]} ;;
        tee:*) : > "${output#tee:}"
               timeout -s INT -k 15 "$limit" "$@" 2>&1 | tee -a "$LOG" "${output#tee:}"; rc=${PIPESTATUS[0]} ;;
        *) timeout -s INT -k 15 "$limit" "$@" 2>&1 >"$output" | tee -a "$LOG"; rc=${PIPESTATUS[0]}
           cat "$output" >> "$LOG" ;;
    esac
    local result="ok"
    [ "$rc" -ne 0 ] && result="exit $rc"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && result="timed out"
    say "$name: $result after $((SECONDS - t0))s"
    RESULTS+=("| $name | $result | $((SECONDS - t0)) | $limit |")
    write_summary
    return "$rc"
}

# limit_for STEP CAP PARTS: the seconds the next part of STEP may take: at most its share of CAP
# (what is left of the step's cap, split among its PARTS still to run), and at most its share of
# what is left of the budget once the floors of the steps after STEP are kept back. The setup
# keeps nothing back: every step needs it.
limit_for() {
    local step=$1 cap=$2 parts=$3 later=0 seen=0 s
    for s in "${STEPS[@]}"; do
        [ "$seen" = 1 ] && later=$((later + FLOOR[$s]))
        [ "$s" = "$step" ] && seen=1
    done
    local left=$(((BUDGET_S - RESERVE_S - SECONDS - later) / parts)) share=$((cap / parts))
    left=$((left < share ? left : share))
    echo $((left > 0 ? left : 0))
}

write_summary() {
    {
        echo "# GPU session, $(date -u '+%Y-%m-%d %H:%M UTC')"
        echo
        echo "Steps: ${STEPS[*]}; device $DEVICE$([ "$DRY" = 1 ] && echo ' (dry run)'); budget ${BUDGET_S}s, ${SECONDS}s used."
        echo
        echo '```'
        cat "$WORK/env.txt" 2>/dev/null
        echo '```'
        echo
        echo "| part | result | seconds | limit |"
        echo "|---|---|---:|---:|"
        printf '%s\n' "${RESULTS[@]}"
        if [ -s "$WORK/tests.txt" ]; then
            echo
            echo "## Tests"
            echo
            echo '```'
            # pytest's short summary (failures, errors and skips with their reasons) and the counts.
            if grep -q "short test summary info" "$WORK/tests.txt"; then
                sed -n '/short test summary info/,$p' "$WORK/tests.txt" | tail -n 200
            else
                tail -n 1 "$WORK/tests.txt"
            fi
            echo '```'
        fi
        for f in kernels e2e sweep; do
            [ -s "$OUT/$f.md" ] && { echo; cat "$OUT/$f.md"; }
        done
        # The step profiles and the streaming table come back in this file only (the tool returns 8
        # files at most).
        [ -s "$WORK/steps.md" ] && { echo; cat "$WORK/steps.md"; }
        [ -s "$WORK/serve.md" ] && { echo; cat "$WORK/serve.md"; }
        if [ -s "$WORK/ncu.txt" ]; then
            echo
            echo "## Nsight Compute: the main lines (the whole report is in session.log)"
            echo
            echo '```'
            profile_lines "$WORK/ncu.txt"
            echo '```'
        fi
    } > "$OUT/summary.md"
}

# merge_json OUT.json FILES...: pytest-benchmark files into one (the first's machine info, every
# file's cases, without the raw per-round times, which run to megabytes per case on a GPU);
# offline_throughput files into one object keyed by file stem.
merge_json() {
    "$PY" - "$@" <<'EOF'
import json, sys
from pathlib import Path
out, files = Path(sys.argv[1]), [Path(f) for f in sys.argv[2:] if Path(f).exists()]
data = [json.loads(f.read_text()) for f in files]
if data and "benchmarks" in data[0]:
    benchmarks = [b for d in data for b in d["benchmarks"]]
    for b in benchmarks:
        (b.get("stats") or {}).pop("data", None)
    merged = dict(data[0], benchmarks=benchmarks)
else:
    merged = {f.stem: d for f, d in zip(files, data)}
out.write_text(json.dumps(merged, indent=1))
EOF
}

# kernels_table MODEL: the table `fastgen bench kernels` printed for MODEL or, where it was
# interrupted before printing, the table of the cases its JSON holds.
kernels_table() {
    echo "## Kernels: $1"
    echo
    if [ -s "$WORK/kernels-$1.md" ]; then
        cat "$WORK/kernels-$1.md"
    elif [ -s "$WORK/kernels-$1.json" ]; then
        echo "Interrupted at its time limit: the cases done by then."
        "$PY" -c "import json, sys; from fastgen.bench.kernels import format_table
print(format_table(json.load(open(sys.argv[1]))))" "$WORK/kernels-$1.json"
    else
        echo "No results."
    fi
    echo
}

setup() {
    {
        echo "host $(uname -n), $(nproc) cores, $(date -u)"
        command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
        command -v nvcc >/dev/null && nvcc --version | tail -n 2
        # The host compiler torch's extension tools build kernels.cuda's .cpp with (the SIGSEGV
        # on argument errors does not happen with gcc 12 and the same torch and nvcc on a CPU).
        command -v c++ >/dev/null && c++ --version | head -n 1
    } > "$WORK/env.txt" 2>&1
    command -v nvidia-smi >/dev/null && nvidia-smi 2>&1 | tee -a "$LOG"

    if compgen -G ".whl/*.whl" >/dev/null; then
        if [ "$DRY" = 1 ]; then
            # The wheels are for the GPU machine's Python 3.12: check that they install there.
            bounded setup:wheels-check "$(limit_for setup 60 1)" - "$PY" -m pip install -q --no-index --no-deps --no-compile \
                --no-cache-dir --upgrade --only-binary=:all: --python-version 3.12 --target "$WORK/wheels" .whl/*.whl
        else
            bounded setup:wheels "$(limit_for setup 60 1)" - "$PY" -m pip install -q --no-index --no-deps --no-compile \
                --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
        fi
    else
        say "no .whl/ folder: using the packages this Python has (bash scripts/gpu_wheels.sh makes it)"
    fi
    # fastgen itself, built from a copy of its sources (nothing is written into the checkout):
    # setuptools maps core/ to `fastgen` and plugins/ to `fastgen.plugins`, and the dist-info
    # carries the entry points through which the plugins are found.
    mkdir -p "$WORK/src" "$SITE"
    cp -r pyproject.toml README.md core plugins "$WORK/src/"
    bounded setup:fastgen "$(limit_for setup 120 1)" - "$PY" -m pip install -q --no-index --no-deps --no-build-isolation \
        --no-compile --no-cache-dir --upgrade --target "$SITE" "$WORK/src"
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    "$PY" - "$SITE" "$DEVICE" >> "$WORK/env.txt" 2>&1 <<'EOF'
import importlib.metadata as md, sys
import torch
import fastgen
site, device = sys.argv[1], torch.device(sys.argv[2])
assert fastgen.__file__.startswith(site), f"fastgen is imported from {fastgen.__file__}, not {site}"
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda})")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, sm_{p.major}{p.minor}")
for name in ("triton", "transformers", "msgspec", "gguf", "pytest-benchmark"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} not installed")
from fastgen.plugin_manager import load_plugins
for name, info in sorted(load_plugins().registry.items["kernels"].items()):
    reason = info.cls.unavailable_reason(device)
    print(f"kernels.{name} on {device}: {'available' if reason is None else 'unavailable: ' + reason}")
EOF
    cat "$WORK/env.txt" | tee -a "$LOG"
    # The backends that run on the device, from the registry (kernels.cpu does not on a GPU).
    BACKENDS=$(sed -n "s/^kernels\.\([a-z_0-9]*\) on .*: available$/\1/p" "$WORK/env.txt" | paste -sd, -)
    say "backends on $DEVICE: ${BACKENDS:-none}"
    # Build the compiled backend ahead, under its own limit, so no step's limit pays for it.
    local compiled=$([ "$DRY" = 1 ] && echo cpu || echo cuda)
    if [[ ",$BACKENDS," == *",$compiled,"* ]]; then
        bounded "setup:build-$compiled" "$(limit_for setup 180 1)" - "$PY" -m "fastgen.plugins.kernels.$compiled.build"
        # The open crash of kernels.cuda's argument errors (issue 5): what it is, into session.log.
        [ "$DRY" = 0 ] && bounded "setup:cuda-errors" 60 - "$PY" scripts/cuda_error_diag.py
    fi
    write_summary
}

# The engine-level files first, the kernel conformance suite's many cases last: where the cap
# cuts the step (it did in the 2026-11-28 sessions, at 200 and 250 s), it cuts those.
step_tests() {
    bounded tests "$(limit_for tests "${CAP[tests]}" 1)" "tee:$WORK/tests.txt" "$PY" -m pytest -q -rfEs -p no:cacheprovider \
        --junitxml="$OUT/tests.xml" "${PYTEST_ARGS[@]}" tests/core/test_kv_memory.py \
        tests/core/test_ragged_batch.py tests/bench/test_cuda_device_timing.py \
        tests/core/test_overlap_steps.py tests/core/test_prefix_caching.py \
        tests/core/test_engine_process.py::test_on_cuda_an_engine_process_answers_as_the_offline_engine \
        tests/plugins/models/test_llama_parity.py tests/plugins/kernels
}

step_kernels() {
    local m t0=$SECONDS
    : > "$OUT/kernels.md"
    # In order of priority: a model may take all that is left of the step's cap.
    for m in "${KERNEL_MODELS[@]}"; do
        bounded "kernels:$m" "$(limit_for kernels $((CAP[kernels] - SECONDS + t0)) 1)" \
            "$WORK/kernels-$m.md" \
            "$PY" -m fastgen.cli bench kernels --backends "$BACKENDS" --models "$m" --device "$DEVICE" \
            "${KERNEL_ARGS[@]}" --json "$WORK/kernels-$m.json"
        kernels_table "$m" >> "$OUT/kernels.md"
        merge_json "$OUT/kernels.json" "$WORK"/kernels-*.json
        write_summary
    done
}

# The first model greedy over the GPU backends, eager, with graphs of every step, and with graphs
# and overlap_steps (decode-only graphs, `+decodegraphs`, were measured in the 2026-11-28 H200
# session: 2.5x fewer tokens/s than graphs of every step with kernels.triton);
# the next ones sampled (a chat setting: the samplers' top-k / top-p search is in every step) over
# the GPU backends with graphs, as `kernels = auto` serves them, and with overlap_steps besides
# (kernels.torch, eager, took the llama-1b part's whole time in the 2026-11-28 session).
step_e2e() {
    local m b t0=$SECONDS kernels=$BACKENDS graphs="" sampling=()
    if [ "$DRY" = 0 ]; then
        # kernels.torch's eager row (413 tokens/s on the H100, 2026-11-28) costs the most time and
        # says the least: the GPU backends' rows with graphs take its place.
        kernels=$(tr , '\n' <<< "$BACKENDS" | grep -vx torch | paste -sd, -)
        for b in triton cuda; do
            [[ ",$BACKENDS," == *",$b,"* ]] && {
                kernels+=",$b+graphs,$b+graphs+overlap"
                graphs+=",$b+graphs,$b+graphs+overlap"; }
        done
        kernels=${kernels#,}
        [ -n "$kernels" ] || kernels=$BACKENDS
    else
        kernels+=",torch+overlap,torch+block64"
    fi
    # e2e_part NAME MODEL KERNELS ARGS...: one offline_throughput run, its table appended to
    # e2e.md and its JSON merged, within what is left of the step's cap.
    e2e_part() {
        local name=$1 model=$2 rows=$3
        shift 3
        bounded "e2e:$name" "$(limit_for e2e $((CAP[e2e] - SECONDS + t0)) 1)" "$WORK/e2e-$name.md" \
            "$PY" benchmarks/offline_throughput.py --random-model "$model" --device "$DEVICE" \
            --kernels "$rows" "${E2E_ARGS[@]}" "$@" --attn sdpa --skip-generate-batch \
            --json "$WORK/e2e-$name.json"
        { cat "$WORK/e2e-$name.md"; echo; } >> "$OUT/e2e.md"
        merge_json "$OUT/e2e.json" "$WORK"/e2e-*.json
        write_summary
    }
    : > "$OUT/e2e.md"
    for m in "${E2E_MODELS[@]}"; do
        e2e_part "$m" "$m" "$kernels" "${sampling[@]}"
        kernels=${graphs#,}
        [ -n "$kernels" ] || kernels=$BACKENDS
        # Two timed runs: the first of one row can still capture graphs of keys the warm-up
        # did not bring (kernels.triton on llama-1b: 2061 tokens/s in one run, 7668 best of 3).
        sampling=(--temperature 0.7 --top-k 50 --top-p 0.9 --repeat 2)
    done
    # Concurrency: the last model with 256 requests, as the defaults serve it on a GPU (graphs,
    # overlap, a 2048-token budget; 8 GiB of KV cache hold all 256 at full length), at most 64
    # sequences a step (the default) against 256 (vLLM's):
    # whether a GPU's default max_num_seqs should be larger, and what capturing decode graphs of up
    # to 256 sequences costs at start (session.log: "cuda_graphs: captured decode steps ...").
    # (The 2048-token budget was chosen from this place's rows in the 2026-11-28 fourth session.)
    local overlapped seqs
    overlapped=$(tr , '\n' <<< "${graphs#,}" | grep '^triton+graphs+overlap$' | paste -sd, -)
    if [ "$DRY" = 0 ] && [ -n "$overlapped" ]; then
        m=${E2E_MODELS[-1]}
        for seqs in 64 256; do
            e2e_part "$m-256req-seqs$seqs" "$m" "$overlapped" "${sampling[@]}" --requests 256 \
                --token-budget 2048 --max-num-seqs "$seqs" --kv-cache-gb 8 --repeat 1
        done
        # 64-token KV cache blocks, read by a gather (+block64) and as TMA copies (+tma,
        # attention_tma): whether the attention sweep's cache_block rows carry to a whole model,
        # at the GPU's default budget (2048 tokens a step: prompt tiles in most steps).
        e2e_part "$m-cache-blocks" "$m" "$overlapped,$overlapped+block64,$overlapped+tma" \
            "${sampling[@]}" --token-budget 2048
    fi
}

step_steps() {
    local m t0=$SECONDS
    : > "$WORK/steps.md"
    for m in "${E2E_MODELS[@]}"; do
        bounded "steps:$m" "$(limit_for steps $((CAP[steps] - SECONDS + t0)) 1)" "$WORK/steps-$m.md" \
            "$PY" benchmarks/step_profile.py --random-model "$m" --device "$DEVICE" "${STEP_PROFILE_ARGS[@]}"
        { cat "$WORK/steps-$m.md"; echo; } >> "$WORK/steps.md"
        write_summary
    done
}

step_serve() {
    bounded serve "$(limit_for serve "${CAP[serve]}" 1)" "$WORK/serve.md" \
        "$PY" benchmarks/stream_overhead.py "${SERVE_ARGS[@]}"
    write_summary
}

step_sweep() {
    local args=(--device "$DEVICE" --markdown "$OUT/sweep.md")
    [ "$DRY" = 1 ] && args+=(--quick)
    # The dry run sweeps under Triton's interpreter, which the script sets on a CPU.
    if [ "$DRY" = 0 ] && [[ ",$BACKENDS," != *",triton,"* ]]; then
        say "sweep: skipped, kernels.triton does not run on $DEVICE"
        return 0
    fi
    # GPU_SESSION_SWEEP_SHAPES (comma-separated): some shapes only, e.g. to time one change again.
    [ -n "${GPU_SESSION_SWEEP_SHAPES:-}" ] && args+=(--shapes "$GPU_SESSION_SWEEP_SHAPES")
    bounded sweep "$(limit_for sweep "${CAP[sweep]}" 1)" - "$PY" benchmarks/attention_sweep.py "${args[@]}"
}

# profile_lines FILE: of ncu's report, each kernel's heading and the lines that say where its time
# goes, and which call (stderr of profile_attention.py) it belongs to.
profile_lines() {
    grep -E '^profiling |^  [^ ].*Context [0-9]+, Stream|^==PROF==|^==ERROR==|Duration|Throughput|Registers Per Thread|Occupancy|Warp Cycles Per Issued|Issue Slots Busy|Executed Ipc|Shared Memory Configuration Size|stall|pipeline|bound|Block Limit' "$1" | head -n 400
}

step_profile() {
    local limit
    limit=$(limit_for profile "${CAP[profile]}" 1)
    if [ "$DRY" = 1 ]; then
        # Without a GPU: the same calls under the interpreter, no profiler.
        bounded profile "$limit" "tee:$WORK/ncu.txt" "$PY" benchmarks/profile_attention.py --quick
        return
    fi
    if ! command -v ncu >/dev/null; then
        say "profile: skipped, ncu is not on the PATH"
        return 0
    fi
    # Leave the clocks alone (METHOD.md); kernel replay per section pass, only inside the script's
    # profiler range.
    bounded profile "$limit" "tee:$WORK/ncu.txt" ncu --clock-control none --profile-from-start off \
        --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
        --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
        "$PY" benchmarks/profile_attention.py
}

say "steps ${STEPS[*]} on $DEVICE with $PY; results in $OUT"
setup
for s in "${STEPS[@]}"; do "step_$s"; done
write_summary
say "done in ${SECONDS}s; $OUT holds: $(cd "$OUT" && ls | paste -sd' ' -)"
