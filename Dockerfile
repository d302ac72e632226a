# bids_regionmae BIDS-App image.
#
# Default (GPU) build -- torch 2.13.0 from PyPI is built against CUDA 13.0
# (it depends on cuda-toolkit==13.0.3, cuDNN 9 for cu13), so both base images
# are CUDA 13.0 on Ubuntu 24.04 (python3.12); the mamba-ssm / causal-conv1d
# kernels are compiled in a -devel stage against that exact torch:
#
#   docker build -t regionmae:0.1.0 .
#   docker run --rm --gpus all -v /data/fmriprep:/data:ro -v /scratch/out:/out \
#       regionmae:0.1.0 /data /out participant
#
# CPU build (no CUDA, no nvcc, no internet except PyPI), as in
# scripts/container-smoke.sh:
#
#   BASE=python:3.11-slim-bookworm   # or any Debian/Ubuntu image with python3 >= 3.11
#   docker build -t regionmae:cpu \
#       --build-arg BASE_IMAGE=$BASE --build-arg BUILDER_IMAGE=$BASE \
#       --build-arg WITH_MAMBA=0 --build-arg TORCH_SPEC=torch==2.13.0 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
#       --build-arg TEMPLATES_FROM=context .
#
# Build arguments:
#   BASE_IMAGE       runtime base (CUDA *runtime* image matching torch's CUDA)
#   BUILDER_IMAGE    image with nvcc for the kernels (CUDA *devel* image);
#                    with WITH_MAMBA=0 pass BASE_IMAGE here, so nothing is pulled
#   WITH_MAMBA       1: build mamba-ssm + causal-conv1d wheels; 0: skip (CPU images)
#   TORCH_SPEC       the torch requirement (the same one in builder and runtime)
#   TORCH_INDEX_URL  optional extra index for torch (e.g. the PyTorch CPU index)
#   TEMPLATES_FROM   network: fetch TemplateFlow templates + nilearn's AAL3 during
#                    the build; context: copy them from .docker-templates/ in the
#                    build context (templateflow/ and nilearn_data/ folders);
#                    none: ship none (the run needs TEMPLATEFLOW_HOME mounted)
#   TORCH_CUDA_ARCH_LIST, MAX_JOBS   kernel build targets and parallelism
#
# The image works with `--read-only --tmpfs /tmp` and `-u $(id -u):$(id -g)`:
# HOME and every cache point at /tmp; templates and atlas are read-only in
# /opt; nothing is downloaded at run time.
#
# Works with both the classic builder and BuildKit (no BuildKit-only syntax).

ARG BASE_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
ARG BUILDER_IMAGE=nvidia/cuda:13.0.2-cudnn-devel-ubuntu24.04

# --------------------------------------------------------------------------
# (a) kernels: mamba-ssm and causal-conv1d wheels built against the exact torch
# --------------------------------------------------------------------------
FROM ${BUILDER_IMAGE} AS kernels
ARG WITH_MAMBA=1
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=
ARG MAMBA_SSM_VERSION=2.3.2.post1
ARG CAUSAL_CONV1D_VERSION=1.7.0
# CUDA 13 dropped sm < 7.5; +PTX keeps newer GPUs working through the JIT.
ARG TORCH_CUDA_ARCH_LIST="7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"
ARG MAX_JOBS=4
ARG DEBIAN_FRONTEND=noninteractive
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    MAX_JOBS=${MAX_JOBS} \
    MAMBA_FORCE_BUILD=TRUE \
    CAUSAL_CONV1D_FORCE_BUILD=TRUE
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN mkdir -p /wheels \
 && if [ "${WITH_MAMBA}" != "1" ]; then echo "WITH_MAMBA=${WITH_MAMBA}: no CUDA kernels built"; exit 0; fi \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential git \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/build-venv \
 && /opt/build-venv/bin/pip install --upgrade pip setuptools wheel packaging ninja \
 && /opt/build-venv/bin/pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "${TORCH_SPEC}" \
 && /opt/build-venv/bin/python -c "import torch; assert torch.version.cuda, 'TORCH_SPEC gave a CPU torch'; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" \
 && /opt/build-venv/bin/pip wheel --no-build-isolation --no-deps -w /wheels \
        "causal-conv1d==${CAUSAL_CONV1D_VERSION}" "mamba-ssm==${MAMBA_SSM_VERSION}" \
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
# (b) templates: TemplateFlow MNI templates and nilearn's AAL3, pre-fetched
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
 for t in ('MNI152NLin6Asym', 'MNI152NLin2009cAsym') for s, d in (('T1w', None), ('mask', 'brain'))]" \
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
 && find /opt/templateflow /opt/nilearn_data -type f | sort

# --------------------------------------------------------------------------
# (c) runtime: the app in a venv
# --------------------------------------------------------------------------
FROM python-base AS runtime
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# torch first (the largest layer, changes least), then the app's dependencies
# read from pyproject.toml, then the CUDA kernels, then the app itself.
# torch is pinned through the TORCH_SPEC build argument, which hadolint cannot see:
# hadolint ignore=DL3013
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "${TORCH_SPEC}" \
 && python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
COPY pyproject.toml /tmp/app/pyproject.toml
RUN python -c "import tomllib; \
print('\n'.join(tomllib.load(open('/tmp/app/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/app/requirements.txt \
 && pip install -r /tmp/app/requirements.txt
# The kernels' own dependencies (einops, transformers, triton...) come with them;
# naming TORCH_SPEC again keeps the resolver from moving torch off the version
# the kernels were compiled against.
COPY --from=kernels /wheels /tmp/wheels
# hadolint ignore=DL3013
RUN if ls /tmp/wheels/*.whl >/dev/null 2>&1; then \
        pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} /tmp/wheels/*.whl "${TORCH_SPEC}" \
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
ENV REGIONMAE_CONTAINER=docker \
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
