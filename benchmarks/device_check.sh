#!/usr/bin/env bash
# DETR-R50 512² under onnxruntime's CUDA and TensorRT execution providers (fp32, fp16, fxq int8 QDQ for the
# tensorrt target), interleaved rounds, p10/median/p90 -> benchmarks/results/device_check.{md,json}.
# Needs an NVIDIA GPU and onnxruntime-gpu; fails fast without a GPU; the whole run is bounded to 8 minutes.
# Never a test requirement. Arguments go to benchmarks/device_check.py (e.g. --rounds 5 --runs 4).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "device_check: no NVIDIA GPU here (nvidia-smi missing or failing); run it on a CUDA machine" >&2
    exit 2
fi
if ! "$PYTHON" -c "import onnxruntime as o, sys; sys.exit(0 if 'CUDAExecutionProvider' in o.get_available_providers() else 1)"; then
    echo "device_check: this onnxruntime has no CUDAExecutionProvider: $PYTHON -m pip install onnxruntime-gpu" \
         "(and tensorrt for TensorrtExecutionProvider)" >&2
    exit 2
fi
exec timeout --signal=INT --kill-after=20 480 "$PYTHON" benchmarks/device_check.py "$@"
