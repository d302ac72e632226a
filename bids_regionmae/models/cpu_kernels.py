"""Fused CPU kernels of the Mamba block: a small C++ extension, built on first use, with the PyTorch code as fallback.

- :class:`FusedSelectiveScan`: the selective scan with ``D`` and the
  ``silu(z)`` gate. The pure-PyTorch scan
  (:class:`bids_regionmae.models.mamba._SelectiveScan`) materialises
  (L, Bw, N, E) tensors: ``exp(delta A)``, ``delta B u`` and all states,
  forward and backward. The kernel keeps the N states of each (sequence, block
  of channels) in vector registers instead; the forward keeps the state at the
  start of every :data:`CHUNK` steps, and the backward recomputes the states of
  one chunk at a time from those, then runs the reverse recurrence.
- :class:`FusedCausalConv`: the causal depthwise convolution (+ bias, + SiLU)
  in one pass over the data instead of K shifted multiply-adds.

Work is spread with ``at::parallel_for`` (sequences x channel blocks, or rows),
so it follows ``torch.set_num_threads``. The extension carries one copy of the
kernels per instruction set (AVX-512, AVX2+FMA, baseline) and runs the best
the CPU has. Inputs are float32 or float64 (callers cast bfloat16/float16 to
float32); results agree with the PyTorch code to float32 rounding (float64:
to 1e-14).

Build: :func:`torch.utils.cpp_extension.load` compiles ``csrc/`` (the ATen
glue and one file of kernels per instruction set, in parallel) the first time
a process needs it (about 15 s of CPU, 25 s on 2 busy cores; needs a C++
compiler; ``ninja`` is a dependency) into a folder named after a hash of the
sources, the torch version and the flags, under ``$TORCH_EXTENSIONS_DIR`` or
torch's per-user cache (``~/.cache/torch_extensions``). Later processes load
the built library directly (milliseconds). Concurrent first uses wait on one
build (an OS file lock, released even if a builder is killed).

Fallback: when the build or the load fails (no compiler, read-only cache,
another platform), the PyTorch code runs, with one logged warning per
process. ``REGIONMAE_CPU_KERNELS=0`` forces the fallback without trying.
To build ahead (a container image, a cluster's login node):
``python -c "from bids_regionmae.models.cpu_kernels import build; print(build())"``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: Environment variable: ``0`` (or ``false``/``no``/``off``) forces the PyTorch code.
ENV_VAR = "REGIONMAE_CPU_KERNELS"
#: Time steps between the state checkpoints the forward keeps for the backward.
CHUNK = 16
#: Largest state size N the kernels handle (mamba uses 16).
MAX_STATE = 64

_CSRC = Path(__file__).resolve().with_name("csrc")
_SOURCES = ("mamba_cpu.cpp", "kernels_generic.cpp", "kernels_avx2.cpp", "kernels_avx512.cpp")  # compiled
_HEADERS = ("kernels.h", "scan_kernel.h", "conv_kernel.h")
_DONE = "built.ok"  # written after a build loaded once; its presence lets later processes skip the build


def _flags() -> tuple[list[str], list[str]]:
    cflags = ["-O3", "-Wno-psabi"]
    ldflags: list[str] = []
    if sys.platform.startswith("linux"):
        # at::parallel_for runs on torch's OpenMP pool only when the extension is built with OpenMP
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    return cflags, ldflags


def extension_name() -> str:
    """Name of the extension: a hash of its sources, the torch/Python versions and the flags."""
    digest = hashlib.sha256()
    for name in _SOURCES + _HEADERS:
        digest.update((_CSRC / name).read_bytes())
    digest.update(f"{torch.__version__}|{sys.version_info[:2]}|{sysconfig.get_platform()}|{_flags()}".encode())
    return f"regionmae_mamba_{digest.hexdigest()[:12]}"


def build_directory() -> Path:
    """Folder the extension is built in: ``$TORCH_EXTENSIONS_DIR`` or torch's per-user cache, then the name."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:  # what torch.utils.cpp_extension.get_default_build_root gives, without importing setuptools
        import torch._appdirs

        root = torch._appdirs.user_cache_dir(appname="torch_extensions")
    return Path(root) / extension_name()


def kernels_enabled() -> bool:
    """Whether ``REGIONMAE_CPU_KERNELS`` allows the fused kernels (it does unless set to 0/false/no/off)."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in {"0", "false", "no", "off"}


@contextlib.contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive OS lock on ``folder`` (released by the OS if this process dies)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on torch's own lock file
        yield
        return
    with open(folder / "regionmae.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            # torch's lock file can only be left over from a killed build: nobody else builds now
            (folder / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """Put the ``ninja`` of the ``ninja`` package on PATH (the venv's bin folder may not be there) for a build."""
    path = os.environ.get("PATH", "")
    if shutil.which("ninja") is None:
        with contextlib.suppress(ImportError):
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
    try:
        yield
    finally:
        os.environ["PATH"] = path


def build(verbose: bool = False) -> Path:
    """Build the extension if needed and load it into this process.

    Returns
    -------
    Path
        The shared library.

    Raises
    ------
    Exception
        Whatever the compiler, ninja or the loader raised (the caller decides
        whether to fall back).
    """
    folder = build_directory()
    library = folder / f"{folder.name}.so"

    def built() -> bool:
        return (folder / _DONE).is_file() and library.is_file()

    if not built():
        compiler = os.environ.get("CXX", "c++")
        if shutil.which(compiler) is None:
            raise RuntimeError(f"no C++ compiler: {compiler!r} is not on PATH (set CXX or install g++)")
        from torch.utils import cpp_extension

        folder.mkdir(parents=True, exist_ok=True)
        cflags, ldflags = _flags()
        with _build_lock(folder):
            if not built():  # another process may have built it while we waited
                with _ninja_on_path():
                    cpp_extension.load(
                        name=folder.name, sources=[str(_CSRC / name) for name in _SOURCES], extra_cflags=cflags,
                        extra_ldflags=ldflags, build_directory=str(folder), is_python_module=False, verbose=verbose,
                    )
                (folder / _DONE).write_text(f"{torch.__version__}\n", encoding="utf-8")
                return library
    torch.ops.load_library(str(library))
    return library


def _first_cause(message: str) -> str:
    """The line of a build log that says what went wrong (compiler missing, first error), shortened."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in lines:
        if ("error" in line.lower() or "not found" in line) and not line.startswith("Error building extension"):
            return line[:300]
    return lines[-1][:300] if lines else "unknown error"


@functools.lru_cache(maxsize=1)
def _load() -> tuple[Any, str | None]:
    """The ``torch.ops.regionmae_mamba`` namespace, or None and why not (warns once)."""
    try:
        build()
        ops = torch.ops.regionmae_mamba
        ops.scan_forward  # noqa: B018  (raises when the library registered nothing)
    except Exception as exc:  # compiler missing, build error, read-only cache, foreign platform...
        reason = f"{type(exc).__name__}: {_first_cause(str(exc))}"
        logger.warning(
            "The fused CPU kernels of the Mamba block could not be built or loaded (%s); using the PyTorch "
            "code, which is slower and needs more memory. They need a C++ compiler (e.g. Debian's g++) and a "
            "writable $TORCH_EXTENSIONS_DIR or ~/.cache; set %s=0 to skip trying.", reason, ENV_VAR,
        )
        return None, reason
    return ops, None


def fused_ops() -> Any:
    """The fused operators, or None when disabled or unavailable (then the caller falls back)."""
    if not kernels_enabled():
        return None
    return _load()[0]


def kernel_status() -> str:
    """Which CPU kernels run here: ``"fused (avx512)"`` (instruction set), ``"torch (REGIONMAE_CPU_KERNELS=0)"``
    or ``"torch (<why the extension is unavailable>)"``."""
    if not kernels_enabled():
        return f"torch ({ENV_VAR}={os.environ.get(ENV_VAR)})"
    ops, reason = _load()
    return f"fused ({ops.isa()})" if ops is not None else f"torch ({reason})"


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` (L, Bw, X) itself when its rows are evenly spaced with contiguous values (a slice along X), else a copy."""
    L, Bw, X = t.shape
    ok = (X <= 1 or t.stride(2) == 1) and (L <= 1 or Bw <= 1 or t.stride(0) == Bw * t.stride(1))
    return t if ok else t.contiguous()


class FusedSelectiveScan(torch.autograd.Function):
    """Selective scan through the C++ kernels: ``out = (scan(u, delta, A, B, C) + D u) * silu(z)``.

    Same contract as :func:`bids_regionmae.models.mamba.selective_scan` with
    float32/float64 CPU tensors of one dtype (``D`` and ``z`` may be None).
    ``u``, ``delta``, ``B``, ``C``, ``z`` may be slices along their last axis
    (e.g. the halves of ``in_proj``'s output); other layouts are copied.
    Saved for the backward: the inputs and the states at every
    :data:`CHUNK`-th step, (ceil(L / CHUNK), Bw, N, E); the states are not
    kept when no input needs a gradient.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z):  # noqa: D102  (shapes in mamba.selective_scan)
        u, delta, B, C = (_rows(t) for t in (u, delta, B, C))
        z = None if z is None else _rows(z)
        D = None if D is None else D.contiguous()
        save = any(ctx.needs_input_grad)
        out, ckpt = _load()[0].scan_forward(u, delta, A, B, C, D, z, CHUNK, save)
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, ckpt)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout):  # noqa: D102
        u, delta, A, B, C, D, z, ckpt = ctx.saved_tensors
        gu, gdelta, gA, gB, gC, gD, gz = _load()[0].scan_backward(u, delta, A, B, C, D, z, ckpt, gout.contiguous(),
                                                             CHUNK)
        return gu, gdelta, gA, gB, gC, None if D is None else gD, None if z is None else gz


class FusedCausalConv(torch.autograd.Function):
    """Causal depthwise convolution along time, + bias, + SiLU when ``silu``, through the C++ kernels.

    Same result as :func:`bids_regionmae.models.mamba.causal_depthwise_conv`
    (then ``F.silu``) for float32/float64 CPU tensors of one dtype: ``x``
    (L, Bw, E), a slice along E is fine; ``weight`` (E, K); ``bias`` (E,) or
    None. Saved for the backward: the inputs only (the pre-activation is
    recomputed).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, silu):  # noqa: D102
        x, weight = _rows(x), weight.contiguous()
        bias = None if bias is None else bias.contiguous()
        out = _load()[0].conv_forward(x, weight, bias, silu)
        ctx.silu = silu
        ctx.save_for_backward(x, weight, bias)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout):  # noqa: D102
        x, weight, bias = ctx.saved_tensors
        gx, gw, gb = _load()[0].conv_backward(x, weight, bias, ctx.silu, gout.contiguous())
        return gx, gw, None if bias is None else gb, None

