#!/usr/bin/env bash
# nvcc wrapper: compile device code only for the GPU architectures in NVCC_ARCHS
# (default: TORCH_CUDA_ARCH_LIST).
#
# mamba-ssm and causal-conv1d write their own -gencode flags into setup.py
# (sm_75 ... sm_121, depending on nvcc's version), and torch's extension
# builder then ignores TORCH_CUDA_ARCH_LIST. It runs $PYTORCH_NVCC instead of
# nvcc for ninja builds, so this wrapper decides the architectures:
#
#   PYTORCH_NVCC=$PWD/scripts/nvcc-arch-filter.sh TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0" \
#   MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
#       pip wheel --no-build-isolation --no-deps causal-conv1d==1.7.0 mamba-ssm==2.3.2.post1
#
# Every architecture flag of the command (-gencode, --generate-code, -arch,
# --gpu-architecture, -code, --gpu-code; "-flag value" or "-flag=value") is
# dropped and one -gencode per listed architecture is added: "9.0" embeds
# sm_90 machine code, "9.0+PTX" also compute_90 PTX (for newer GPUs, through
# the driver's JIT), "9.0a" sm_90a. Entries are separated by ';', ',' or
# spaces. A command without architecture flags (nvcc -V) and every command
# when the list is empty pass through unchanged. The real compiler is
# $NVCC_REAL, else $CUDA_HOME/bin/nvcc, else the first other nvcc on PATH.
set -euo pipefail

archs=${NVCC_ARCHS:-${TORCH_CUDA_ARCH_LIST:-}}

real=${NVCC_REAL:-}
if [ -z "$real" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then real=$CUDA_HOME/bin/nvcc; fi
if [ -z "$real" ]; then
  self=$(readlink -f "$0")
  while IFS= read -r candidate; do
    if [ "$(readlink -f "$candidate")" != "$self" ]; then real=$candidate; break; fi
  done < <(type -ap nvcc)
fi
if [ -z "$real" ] && [ -x /usr/local/cuda/bin/nvcc ]; then real=/usr/local/cuda/bin/nvcc; fi
if [ -z "$real" ]; then
  echo "nvcc-arch-filter: no nvcc found (set NVCC_REAL or CUDA_HOME)" >&2
  exit 127
fi

kept=()
found=0
skip_next=0
for arg in "$@"; do
  if [ "$skip_next" = 1 ]; then skip_next=0; continue; fi
  case "$arg" in
    -gencode|--generate-code|-arch|--gpu-architecture|-code|--gpu-code)
      found=1; skip_next=1 ;;
    -gencode=*|--generate-code=*|-arch=*|--gpu-architecture=*|-code=*|--gpu-code=*)
      found=1 ;;
    *) kept+=("$arg") ;;
  esac
done

if [ "$found" = 0 ] || [ -z "${archs//[;, ]/}" ]; then
  exec "$real" "$@"
fi

flags=()
for entry in ${archs//[;,]/ }; do
  ptx=0
  case "$entry" in *+PTX|*+ptx) ptx=1; entry=${entry%+*} ;; esac
  if ! [[ $entry =~ ^([0-9]+)\.([0-9])([a-z]?)$ ]]; then
    echo "nvcc-arch-filter: '$entry' in '$archs' is not a compute capability such as 8.6, 9.0+PTX or 9.0a" >&2
    exit 2
  fi
  cc=${BASH_REMATCH[1]}${BASH_REMATCH[2]}${BASH_REMATCH[3]}
  flags+=(-gencode "arch=compute_$cc,code=sm_$cc")
  if [ "$ptx" = 1 ]; then flags+=(-gencode "arch=compute_$cc,code=compute_$cc"); fi
done

exec "$real" "${kept[@]}" "${flags[@]}"
