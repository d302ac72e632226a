#!/usr/bin/env bash
# One-shot GPU check of bids_regionmae on a bare GPU machine (torch with CUDA, nvcc, triton and einops
# already there; nothing downloadable): installs the carried wheels the machine lacks, builds
# causal-conv1d and mamba-ssm for the local GPU only, then runs the parity tests, the throughput and
# memory measurements, the loader, torchrun and prediction checks, each with its own time limit,
# continuing past failures. Writes $OUT/gpu_check.json, $OUT/gpu_check.log and $OUT/build.log.
#
#   python benchmarks/gpu_check.py prepare      # first, on a machine with PyPI: fills .gpu-check/
#   benchmarks/gpu_check.sh [--budget 330] [--only STEP ...] [gpu_check.py run options]
#
# benchmarks/README.md (GPU section) has the exact device call; `gpu_check.py run --help` the options.
# Environment: OUT (default /tmp/regionmae-gpu-check/out), PYTHON (default python3).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/regionmae-gpu-check/out}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1
if [ ! -d .gpu-check/wheels ]; then
  echo "gpu_check.sh: no .gpu-check/ here: run 'python benchmarks/gpu_check.py prepare' first and carry it" >&2
fi
exec "$PYTHON" benchmarks/gpu_check.py run --out "$OUT" "$@"
