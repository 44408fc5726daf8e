#!/usr/bin/env bash
# The GPU benchmark set in one go, on one H100-class card, with no network (under 8 minutes):
# QLoRA NF4 vs bf16 LoRA training steps at sequence 512 (micro-batch 1 and 8: step time,
# tokens/s, peak GPU memory, MFU against the measured bf16 matmul peak) and generation
# (p50 / p95 latency of a 64-token answer, batched throughput), on `tinyllama-arch`: the real
# TinyLlama-1.1B shapes with random weights, built locally. No Ray is imported.
#
#   bash benchmarks/gpu.sh [OUT_DIR] [extra bench args, e.g. --quick or key=value overrides]
#
# OUT_DIR defaults to $OUT (the device tool's return folder), else ./bench-gpu. Everything lands
# there: gpu.json, gpu.md, gpu.log, env.txt, nvidia-smi.txt.
#
# Packages the GPU machine lacks (pydantic, bitsandbytes; trl / datasets / ray are not needed)
# are installed from wheels in benchmarks/wheels/ (or $TINYQA_WHEELS) with --no-index. Fetch them
# beforehand on a machine with network (docs/benchmarks.md, "GPU set"), e.g.:
#   pip download -d benchmarks/wheels --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 pydantic
#   pip download -d benchmarks/wheels --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_24_x86_64 bitsandbytes
set -euo pipefail

cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-bench-gpu}}
shift || true
WHEELS=${TINYQA_WHEELS:-benchmarks/wheels}
PY=${PYTHON:-python3}
TIME_LIMIT_S=${TINYQA_BENCH_TIME_LIMIT_S:-470}
mkdir -p "$OUT_DIR"

# module:distribution pairs the suite imports; only the missing ones are installed.
missing=$("$PY" - <<'PYEOF'
import importlib.util
need = {"pydantic": "pydantic", "bitsandbytes": "bitsandbytes", "yaml": "pyyaml",
        "peft": "peft", "transformers": "transformers", "accelerate": "accelerate",
        "tokenizers": "tokenizers", "safetensors": "safetensors", "filelock": "filelock"}
print(" ".join(dist for mod, dist in need.items() if importlib.util.find_spec(mod) is None))
PYEOF
)
if [ -n "$missing" ]; then
    if [ ! -d "$WHEELS" ]; then
        echo "gpu.sh: missing packages ($missing) and no wheel folder $WHEELS;" \
             "pip download them there first (see the header of this script)" >&2
        exit 2
    fi
    echo "gpu.sh: installing $missing from $WHEELS (no network)"
    "$PY" -m pip install --no-index --find-links "$WHEELS" $missing 2>&1 | tail -3
fi

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(hostname)"
    "$PY" -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
    "$PY" -m pip list 2>/dev/null | grep -iE '^(torch|transformers|peft|accelerate|bitsandbytes|pydantic) ' || true
    lscpu 2>/dev/null | grep -E 'Model name|^CPU\(s\)' || true
} > "$OUT_DIR/env.txt" 2>&1
nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi" > "$OUT_DIR/nvidia-smi.txt"

export TINYQA_CACHE=${TINYQA_CACHE:-/tmp/tinyqa-cache}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Overrides go right after the suite name (the CLI reads them there).
status=0
timeout "$TIME_LIMIT_S" "$PY" -m tinyqa.cli bench gpu model.name=tinyllama-arch "$@" \
    --out "$OUT_DIR" > "$OUT_DIR/gpu.log" 2>&1 || status=$?
tail -n 40 "$OUT_DIR/gpu.log"
if [ "$status" -ne 0 ]; then
    echo "gpu.sh: the GPU set failed or ran past ${TIME_LIMIT_S} s (exit $status); see $OUT_DIR/gpu.log" >&2
fi
exit "$status"
