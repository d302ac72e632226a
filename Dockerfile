# bids_regionmae BIDS-App image.
#
# Default (GPU) build: CUDA 12.6, for NVIDIA drivers >= 525 (any CUDA 12 driver, through CUDA's
# minor-version compatibility). torch 2.13.0+cu126 comes from the PyTorch index (PyPI's torch is built
# for CUDA 13); mamba-ssm and causal-conv1d are compiled against that exact torch in a -devel stage, for
# compute capabilities 7.5 8.0 8.6 8.9 9.0 (T4, A100, A10/A40/RTX 30xx, L4/L40/RTX 40xx, H100/H200).
# Blackwell GPUs (10.x, 12.x) need the CUDA 13 variant.
#
#   docker build -t regionmae:0.1.0 .
#   docker run --rm --gpus all -v /data/fmriprep:/data:ro -v /scratch/out:/out \
#       regionmae:0.1.0 /data /out participant
#
# CUDA 13 variant (drivers >= 580; adds 10.0 and 12.0+PTX): the CUDA version, and the driver
# requirement that goes with it (the build stops when the two disagree):
#
#   docker build -t regionmae:0.1.0-cuda13 \
#       --build-arg CUDA_VERSION=13.0.2 --build-arg NVIDIA_REQUIRE_CUDA="cuda>=13.0" .
#
# CPU build (no CUDA, no nvcc, no internet except PyPI), as in scripts/container-smoke.sh:
#
#   BASE=python:3.11-slim-bookworm   # or any Debian/Ubuntu image with python3 >= 3.11
#   docker build -t regionmae:cpu \
#       --build-arg BASE_IMAGE=$BASE --build-arg BUILDER_IMAGE=$BASE \
#       --build-arg WITH_MAMBA=0 --build-arg TORCH_SPEC=torch==2.13.0 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
#       --build-arg TEMPLATES_FROM=context .
#
# Build arguments:
#   CUDA_VERSION     CUDA of the base images and of the torch build (12.6.3; 13.0.2)
#   NVIDIA_REQUIRE_CUDA  driver check of the NVIDIA container toolkit ("cuda>=12.0": any driver
#                    >= 525; the CUDA base images ask for more than minor-version compatibility needs)
#   BASE_IMAGE       runtime base [nvidia/cuda:${CUDA_VERSION}-base-ubuntu24.04]: torch brings its
#                    own CUDA libraries (cuBLAS, cuDNN, NCCL...), so the small "base" flavour is enough
#   BUILDER_IMAGE    image with nvcc for the kernels [nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04];
#                    with WITH_MAMBA=0 pass BASE_IMAGE here, so nothing is pulled
#   WITH_MAMBA       1: build mamba-ssm + causal-conv1d wheels; 0: skip (CPU images)
#   TORCH_VERSION    2.13.0; with TORCH_SPEC empty, torch==${TORCH_VERSION}+cuXY from
#                    https://download.pytorch.org/whl/cuXY, XY from CUDA_VERSION
#   TORCH_SPEC       a torch requirement instead (CPU images); TORCH_INDEX_URL its extra index
#   TORCH_CUDA_ARCH_LIST  compute capabilities of the kernels [CUDA 12: 7.5;8.0;8.6;8.9;9.0,
#                    CUDA 13: 7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX]. mamba-ssm and causal-conv1d write
#                    their own -gencode flags, so scripts/nvcc-arch-filter.sh enforces this list
#   MAX_JOBS         kernel compile jobs (4; each nvcc can take several GB of memory)
#   EXTRAS           optional dependency groups of pyproject.toml to install too (comma list, e.g.
#                    tensorboard); cuda is the kernels stage's job
#   TEMPLATES_FROM   network: fetch TemplateFlow templates (and the MNI152NLin2009cAsym ->
#                    MNI152NLin6Asym transform) + nilearn's AAL3 during the build; context: copy
#                    them from .docker-templates/ in the build context (templateflow/ and
#                    nilearn_data/ folders); none: ship none (the run needs TEMPLATEFLOW_HOME mounted)
#
# With --gpus all on a GPU that the kernels were not built for, the app warns once and uses the
# pure-PyTorch selective scan (same results, slower); `--backend mamba-ssm` stops with an error instead.
#
# The image works with `--read-only --tmpfs /tmp` and `-u $(id -u):$(id -g)`:
# HOME and every cache point at /tmp; templates and atlas are read-only in
# /opt; nothing is downloaded at run time.
#
# Works with both the classic builder and BuildKit (no BuildKit-only syntax).

ARG CUDA_VERSION=12.6.3
ARG NVIDIA_REQUIRE_CUDA="cuda>=12.0"
ARG BASE_IMAGE=nvidia/cuda:${CUDA_VERSION}-base-ubuntu24.04
ARG BUILDER_IMAGE=nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04

# --------------------------------------------------------------------------
# torch-spec: which torch build (one requirement file for both stages below)
# --------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS torch-spec
ARG CUDA_VERSION
ARG NVIDIA_REQUIRE_CUDA
ARG TORCH_VERSION=2.13.0
ARG TORCH_SPEC=
ARG TORCH_INDEX_URL=
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN tag="cu$(echo "${CUDA_VERSION}" | cut -d. -f1,2 | tr -d .)" \
 && spec="${TORCH_SPEC}" index="${TORCH_INDEX_URL}" \
 && if [ -z "$spec" ]; then \
        major="${CUDA_VERSION%%.*}"; \
        if [ "${NVIDIA_REQUIRE_CUDA}" != "cuda>=${major}.0" ]; then \
            echo "CUDA_VERSION=${CUDA_VERSION} needs --build-arg NVIDIA_REQUIRE_CUDA=\"cuda>=${major}.0\" (got '${NVIDIA_REQUIRE_CUDA}')" >&2; \
            exit 1; \
        fi; \
        spec="torch==${TORCH_VERSION}+${tag}"; index="${index:-https://download.pytorch.org/whl/${tag}}"; \
    fi \
 && { if [ -n "$index" ]; then echo "--extra-index-url $index"; fi; echo "$spec"; } > /torch-requirement.txt \
 && cat /torch-requirement.txt

# --------------------------------------------------------------------------
# (a) kernels: mamba-ssm and causal-conv1d wheels built against the exact torch
# --------------------------------------------------------------------------
FROM ${BUILDER_IMAGE} AS kernels
ARG CUDA_VERSION
ARG WITH_MAMBA=1
ARG MAMBA_SSM_VERSION=2.3.2.post1
ARG CAUSAL_CONV1D_VERSION=1.7.0
ARG TORCH_CUDA_ARCH_LIST=
ARG MAX_JOBS=4
ARG DEBIAN_FRONTEND=noninteractive
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MAX_JOBS=${MAX_JOBS} \
    MAMBA_FORCE_BUILD=TRUE \
    CAUSAL_CONV1D_FORCE_BUILD=TRUE \
    PYTORCH_NVCC=/opt/nvcc-arch-filter.sh
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY --from=torch-spec /torch-requirement.txt /tmp/torch-requirement.txt
COPY scripts/nvcc-arch-filter.sh /opt/nvcc-arch-filter.sh
# hadolint ignore=DL3008
RUN mkdir -p /wheels \
 && if [ "${WITH_MAMBA}" != "1" ]; then echo "WITH_MAMBA=${WITH_MAMBA}: no CUDA kernels built"; exit 0; fi \
 && archs="${TORCH_CUDA_ARCH_LIST}" \
 && if [ -z "$archs" ]; then \
        case "${CUDA_VERSION%%.*}" in \
            12) archs="7.5;8.0;8.6;8.9;9.0" ;; \
            *) archs="7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX" ;; \
        esac; \
    fi \
 && export TORCH_CUDA_ARCH_LIST="$archs" NVCC_ARCHS="$archs" NVCC_REAL=/usr/local/cuda/bin/nvcc \
 && chmod 755 /opt/nvcc-arch-filter.sh \
 && echo "kernels for compute capabilities: $archs" \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/build-venv \
 && /opt/build-venv/bin/pip install --upgrade pip setuptools wheel packaging ninja \
 && /opt/build-venv/bin/pip install -r /tmp/torch-requirement.txt \
 && /opt/build-venv/bin/python -c "import torch; assert torch.version.cuda, 'the torch requirement gave a CPU torch'; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" \
 && /opt/build-venv/bin/pip wheel --no-build-isolation --no-deps -w /wheels \
        "causal-conv1d==${CAUSAL_CONV1D_VERSION}" "mamba-ssm==${MAMBA_SSM_VERSION}" \
 && mkdir -p /tmp/unpacked \
 && for whl in /wheels/*.whl; do /opt/build-venv/bin/python -m zipfile -e "$whl" /tmp/unpacked; done \
 && want=$(echo "${archs//[;,]/ }" | tr ' ' '\n' | sed -E 's/\+PTX$//; s/^([0-9]+)\.([0-9][a-z]?)$/sm_\1\2/' | sort -u) \
 && for so in /tmp/unpacked/*_cuda*.so; do \
        have=$(/usr/local/cuda/bin/cuobjdump --list-elf "$so" | grep -oE 'sm_[0-9]+[a-z]?' | sort -u); \
        echo "$(basename "$so"): ${have//$'\n'/ }"; \
        if [ "$have" != "$want" ]; then echo "expected machine code for: ${want//$'\n'/ }" >&2; exit 1; fi; \
    done \
 && rm -rf /tmp/unpacked \
 && ls -l /wheels

# --------------------------------------------------------------------------
# python-base: python3 + an empty venv on the runtime base image
# --------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS python-base
ARG DEBIAN_FRONTEND=noninteractive
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Python comes from the base image's distribution (Ubuntu 24.04: 3.12; Debian 12: 3.11);
# apt runs only when the base image lacks python3 + venv. Versions are the distribution's.
# hadolint ignore=DL3008
RUN if ! python3 -c "import venv, ensurepip" >/dev/null 2>&1; then \
        apt-get update \
     && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
     && rm -rf /var/lib/apt/lists/*; \
    fi \
 && python3 -m venv /opt/venv \
 && python --version

# --------------------------------------------------------------------------
# (b) templates: TemplateFlow MNI templates, the MNI152NLin2009cAsym ->
#     MNI152NLin6Asym transform (ANTs/ITK .h5) and nilearn's AAL3, pre-fetched
# --------------------------------------------------------------------------
FROM python-base AS templates
ARG TEMPLATES_FROM=network
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV TEMPLATEFLOW_HOME=/opt/templateflow \
    NILEARN_DATA=/opt/nilearn_data \
    TEMPLATEFLOW_AUTOUPDATE=0
# pyproject.toml only makes the glob match something when .docker-templates/ is absent.
COPY pyproject.toml .docker-template[s] /tmp/context/
RUN mkdir -p /opt/templateflow /opt/nilearn_data \
 && case "${TEMPLATES_FROM}" in \
    network) \
        python3 -m venv /tmp/fetch \
     && /tmp/fetch/bin/pip install "templateflow>=24.0" "nilearn>=0.11" \
     && /tmp/fetch/bin/python -c "from templateflow import api; \
[api.get(t, resolution=2, suffix=s, desc=d, extension='.nii.gz') \
 for t in ('MNI152NLin6Asym', 'MNI152NLin2009cAsym') for s, d in (('T1w', None), ('mask', 'brain'))]; \
print(api.get('MNI152NLin6Asym', suffix='xfm', mode='image', extension='.h5', **{'from': 'MNI152NLin2009cAsym'}))" \
     && /tmp/fetch/bin/python -c "from nilearn.datasets import fetch_atlas_aal; \
print(fetch_atlas_aal(version='3v2', data_dir='/opt/nilearn_data').maps)" \
     && rm -rf /tmp/fetch ;; \
    context) \
        if [ -d /tmp/context/templateflow ]; then cp -r /tmp/context/templateflow/. /opt/templateflow/; fi \
     && if [ -d /tmp/context/nilearn_data ]; then cp -r /tmp/context/nilearn_data/. /opt/nilearn_data/; fi ;; \
    none) ;; \
    *) echo "TEMPLATES_FROM must be network, context or none, got '${TEMPLATES_FROM}'" >&2; exit 1 ;; \
    esac \
 && rm -rf /tmp/context \
 && find /opt/templateflow /opt/nilearn_data -type f | sort \
 && xfm=/opt/templateflow/tpl-MNI152NLin6Asym/tpl-MNI152NLin6Asym_from-MNI152NLin2009cAsym_mode-image_xfm.h5 \
 && if [ -s "$xfm" ]; then echo "baked: $xfm"; \
    else echo "not baked: $xfm (the template-to-template warp of MNI152NLin2009cAsym inputs needs it;" \
              "for TEMPLATES_FROM=context put it in .docker-templates/templateflow/tpl-MNI152NLin6Asym/)"; fi

# --------------------------------------------------------------------------
# (c) runtime: the app in a venv
# --------------------------------------------------------------------------
FROM python-base AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# torch first (the largest layer, changes least), then the app's dependencies
# read from pyproject.toml (plus EXTRAS), then the CUDA kernels, then the app itself.
COPY --from=torch-spec /torch-requirement.txt /tmp/app/torch-requirement.txt
RUN pip install -r /tmp/app/torch-requirement.txt \
 && python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
COPY pyproject.toml /tmp/app/pyproject.toml
# (declared here, not at the top of the stage: a build argument is part of the cache key of every RUN after it)
ARG EXTRAS=
RUN python -c "import sys, tomllib; \
project = tomllib.load(open('/tmp/app/pyproject.toml', 'rb'))['project']; \
groups = project.get('optional-dependencies', {}); \
extras = sys.argv[1].replace(',', ' ').split(); \
bad = [e for e in extras if e not in groups or e == 'cuda']; \
bad and sys.exit('EXTRAS: %s not installable here; optional groups: %s (cuda: the kernels stage builds it)' \
                 % (', '.join(bad), ', '.join(sorted(groups)))); \
print('\n'.join(project['dependencies'] + [r for e in extras for r in groups[e]]))" "${EXTRAS}" \
        > /tmp/app/requirements.txt \
 && pip install -r /tmp/app/requirements.txt
# Of the kernels' declared dependencies only what `import mamba_ssm` needs: einops (above),
# triton (comes with torch) and transformers; tilelang, quack-kernels and apache-tvm-ffi serve
# Mamba-3 paths this app does not use (mamba_ssm imports them only if present). The torch
# requirement again keeps the resolver from moving torch off the build the kernels were compiled for.
COPY --from=kernels /wheels /tmp/wheels
# hadolint ignore=DL3013
RUN if ls /tmp/wheels/*.whl >/dev/null 2>&1; then \
        pip install --no-deps /tmp/wheels/*.whl \
     && pip install transformers -r /tmp/app/torch-requirement.txt \
     && python -c "from importlib.metadata import version as v; print('mamba-ssm', v('mamba-ssm'), 'causal-conv1d', v('causal-conv1d'))"; \
    fi \
 && rm -rf /tmp/wheels
COPY --from=templates /opt/templateflow /opt/templateflow
COPY --from=templates /opt/nilearn_data /opt/nilearn_data
COPY README.md /tmp/app/README.md
COPY bids_regionmae /tmp/app/bids_regionmae
RUN pip install --no-deps /tmp/app \
 && rm -rf /tmp/app

# Run-time environment. Everything writable lives under /tmp (a tmpfs with
# --read-only) or under the work/output directories given on the command line.
# Thread counts are left to torch (all CPUs the container sees); the
# participant level splits them between its --nprocs workers itself. Set
# OMP_NUM_THREADS when the container is limited with --cpus or a SLURM
# allocation smaller than the node.
# (Version/name/date ARGs are declared this late so that they do not
# invalidate the cached dependency layers above.)
ARG VERSION=0.1.0
ARG IMAGE_NAME=ghcr.io/bids-regionmae/regionmae
ARG NVIDIA_REQUIRE_CUDA
# NVIDIA_REQUIRE_CUDA replaces the CUDA base image's own check, which asks for the image's exact
# CUDA minor version except on a few datacenter driver branches: "cuda>=12.0" admits every
# driver >= 525, as CUDA 12's minor-version compatibility allows.
ENV NVIDIA_REQUIRE_CUDA=${NVIDIA_REQUIRE_CUDA} \
    REGIONMAE_CONTAINER=docker \
    REGIONMAE_IMAGE=${IMAGE_NAME}:${VERSION} \
    TEMPLATEFLOW_HOME=/opt/templateflow \
    TEMPLATEFLOW_AUTOUPDATE=0 \
    REGIONMAE_OFFLINE=1 \
    NILEARN_DATA=/opt/nilearn_data \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCH_HOME=/tmp/.cache/torch \
    TRITON_CACHE_DIR=/tmp/.cache/triton \
    MPLBACKEND=Agg \
    PYTHONDONTWRITEBYTECODE=1

# Complete TemplateFlow's skeleton now (offline, from the wheel) so that it
# never writes into the read-only /opt/templateflow at run time; then smoke-test.
RUN python -c "from templateflow import conf; conf.update(local=True, overwrite=False, silent=True)" \
 && chmod -R a+rX /opt/templateflow /opt/nilearn_data \
 && regionmae --version \
 && python -c "import bids_regionmae.models, bids_regionmae.atlas" \
 && if [ -n "$(find /opt/templateflow -name '*_T1w.nii.gz' -size +1k)" ]; then \
        python -c "from bids_regionmae.atlas import get_template; \
print(get_template('MNI152NLin6Asym', 'T1w', 2)); print(get_template('MNI152NLin6Asym', 'mask', 2))"; \
    fi \
 && rm -rf /tmp/* /tmp/.cache

ARG BUILD_DATE=unknown
ARG VCS_REF=unknown
LABEL org.opencontainers.image.title="bids_regionmae" \
      org.opencontainers.image.description="BIDS-App: region-aware masked pretraining of a NeuroSTORM-style 4D fMRI foundation model on fMRIPrep derivatives" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.source="https://github.com/bids-regionmae/bids_regionmae" \
      org.opencontainers.image.url="https://github.com/bids-regionmae/bids_regionmae" \
      org.opencontainers.image.documentation="https://github.com/bids-regionmae/bids_regionmae#readme" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="bids_regionmae developers" \
      org.opencontainers.image.ref.name="${IMAGE_NAME}:${VERSION}"

WORKDIR /tmp
ENTRYPOINT ["regionmae"]
CMD ["--help"]
