#!/usr/bin/env bash
# The TensorRT backend's check on a machine with an NVIDIA GPU, in one command:
#
#     bash benchmarks/gpu_check.sh            # from the repository root; OUT=out/gpu-check by default
#
# 1. creates .venv-gpu and installs latentrt with the test and export extras and the TensorRT extra
#    that fits this GPU: NVIDIA TensorRT ("tensorrt") on Hopper/Turing or when TARGET=tensorrt,
#    TensorRT-RTX ("tensorrt-rtx") on Ampere/Ada/Blackwell RTX (override with TARGET=tensorrt|tensorrt-rtx);
# 2. exports tiny-sd3 and the demo model, builds their engines for this GPU (`latentrt build`, target auto);
# 3. runs the GPU tests (`pytest -m gpu`: engines vs ONNX Runtime for every family, fp16, the device loop
#    and its CUDA graph, chunking, two pipelines, close(), the stand-in device tests);
# 4. runs `latentrt bench` on bench-sd3 with torch, onnxruntime and tensorrt and prints its table.
#
# Needs: Python >= 3.10, an NVIDIA driver (nvidia-smi), internet access to PyPI (and PyTorch's CPU
# wheel index for the exporter). Takes about 10-20 minutes, most of it installing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
OUT=${OUT:-out/gpu-check}
VENV=${VENV:-.venv-gpu}
RUNS=${RUNS:-5}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
exec > >(tee "$LOG") 2>&1

echo "== machine"
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader
CC=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' ')
case "${TARGET:-auto}" in
  tensorrt|tensorrt-rtx) EXTRA=$TARGET ;;
  auto) case "$CC" in 8.0|8.6|8.9|12.*) EXTRA=tensorrt-rtx ;; *) EXTRA=tensorrt ;; esac ;;
  *) echo "TARGET must be auto, tensorrt or tensorrt-rtx" >&2; exit 2 ;;
esac
echo "compute capability $CC: installing the '$EXTRA' extra"

echo "== install"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu  # the exporter runs on the CPU
"$VENV/bin/pip" install -q -e ".[test,export,$EXTRA]"
BIN="$VENV/bin"
"$BIN/python" - <<'PY'
import importlib
for name in ("tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings", "cuda.bindings", "onnxruntime"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '')}")
    except ImportError:
        pass
from latentrt.engines.library import visible_compute_capability
print("GPU visible to cuda-python:", visible_compute_capability())
PY

echo "== bundles and engines"
"$BIN/latentrt" export tiny-sd3 -o "$OUT/tiny-sd3" --overwrite
"$BIN/latentrt" build "$OUT/tiny-sd3" --batch 1:1:2
"$BIN/latentrt" export models/demo/pipeline -o "$OUT/demo-bundle" --max-sequence-length 0 --overwrite
"$BIN/latentrt" build "$OUT/demo-bundle"
"$BIN/latentrt" inspect "$OUT/demo-bundle" | tail -12
"$BIN/latentrt" generate "$OUT/demo-bundle" --backend tensorrt --steps 16 --guidance 3.0 --seed 0 \
    -p "a large red circle on the left" -o "$OUT/demo-tensorrt.png"

echo "== GPU tests"
set +e
"$BIN/python" -m pytest -q -m gpu -p no:cacheprovider tests -rs 2>&1 | tee "$OUT/pytest-gpu.txt" | tail -40
PYTEST=${PIPESTATUS[0]}
set -e

echo "== benchmark (bench-sd3, 256x256, 8 steps)"
"$BIN/python" -c "from latentrt.models.presets import save_preset; save_preset('bench-sd3', '$OUT/bench-src')"
"$BIN/latentrt" export "$OUT/bench-src" -o "$OUT/bench-bundle" --overwrite
"$BIN/latentrt" build "$OUT/bench-bundle" --static 256x256 --batch 1:1:1
"$BIN/latentrt" bench "$OUT/bench-src" --bundle "$OUT/bench-bundle" --backends torch,onnxruntime,tensorrt \
    --runs "$RUNS" --json "$OUT/bench-sd3.json"

echo "== summary"
tail -1 "$OUT/pytest-gpu.txt"
echo "log: $LOG; benchmark: $OUT/bench-sd3.json; image: $OUT/demo-tensorrt.png"
exit "$PYTEST"
