"""Mamba (selective state-space) mixer with two interchangeable backends.

The module keeps the parameter names of ``mamba_ssm.Mamba`` (``in_proj``,
``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``, ``D``, ``out_proj``) so that a
state dict moves unchanged between

- ``"mamba-ssm"``: the CUDA kernels of the ``mamba-ssm`` package
  (``selective_scan_fn``, plus ``causal_conv1d_fn`` when ``causal-conv1d`` is
  installed), imported lazily and only used for CUDA tensors;
- ``"torch"``: runs anywhere. On CPU tensors the selective scan and the
  causal convolution are the fused C++ kernels of :mod:`.cpu_kernels` (built
  on first use; nothing of size (L, Bw, N, E) is stored). Without a compiler,
  with ``REGIONMAE_CPU_KERNELS=0`` and on other devices they are pure
  PyTorch: the scan is one sequential loop over time (one fused multiply-add
  per step, which on CPUs beats parallel/associative scans), everything else
  vectorised, with a hand-written backward of one reverse loop over time, so
  its cost is linear in the sequence length (no quadratic formulation, unlike
  ``mamba_ssm``'s ``selective_scan_ref``).

``"auto"`` picks the kernels for CUDA tensors when ``mamba_ssm`` imports and
its kernels run on that GPU (:func:`kernel_error`), and falls back to
``"torch"`` (with a logged warning) otherwise. Use
:func:`resolve_backend` to learn which one a run actually uses.

The recurrence, per channel ``e`` and state ``n`` (``A = -exp(A_log)``)::

    delta_t = softplus(dt_proj(x_proj(x_t)[:R]))
    h_t     = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t     = <C_t, h_t> + D * u_t
    out_t   = out_proj(y_t * silu(z_t))
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bids_regionmae.errors import BackendError, UsageError
from bids_regionmae.models.cpu_kernels import MAX_STATE, FusedCausalConv, FusedSelectiveScan, fused_ops

logger = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("auto", "mamba-ssm", "torch")

INSTALL_HINT = (
    "Install the CUDA extra on a machine with a CUDA build of torch: "
    "MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE "
    "pip install --no-build-isolation 'bids_regionmae[cuda]'"
)


# --------------------------------------------------------------------------- backends


@functools.lru_cache(maxsize=1)
def _mamba_ssm_kernels() -> tuple[Any, Any, str | None]:
    """Import the CUDA kernels once.

    Returns
    -------
    (selective_scan_fn or None, causal_conv1d_fn or None, error message or None)
    """
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as exc:  # ImportError, or OSError/RuntimeError from a broken CUDA extension
        return None, None, f"{type(exc).__name__}: {exc}"
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:
        causal_conv1d_fn = None
    return selective_scan_fn, causal_conv1d_fn, None


def mamba_ssm_available() -> bool:
    """Whether ``mamba_ssm``'s selective-scan kernel can be imported."""
    return _mamba_ssm_kernels()[0] is not None


#: device -> None (the kernels ran there) or why they did not; filled once per device by :func:`kernel_error`
_KERNEL_ERRORS: dict[str, str | None] = {}


def _probe_inputs(device: torch.device) -> dict[str, torch.Tensor]:
    """Tiny valid inputs (8 channels, 4 states, 16 steps) for one selective scan and one causal convolution."""
    g = torch.Generator().manual_seed(0)
    E, N, L = 8, 4, 16

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=g).to(device)

    return {"u": rand(1, E, L), "delta": rand(1, E, L), "A": -rand(E, N), "B": rand(1, N, L), "C": rand(1, N, L),
            "D": rand(E), "z": rand(1, E, L), "delta_bias": rand(E), "weight": rand(E, 4), "bias": rand(E)}


def kernel_error(device: torch.device | str) -> str | None:
    """Why the mamba-ssm kernels cannot run on ``device``, or None when they can.

    ``import mamba_ssm`` succeeds whatever GPU the extension was compiled
    for; a GPU architecture missing from the build only fails at the first
    kernel launch ("no kernel image is available for execution on the
    device"). This runs both kernels once on tiny inputs on ``device`` and
    remembers the outcome per device.

    Parameters
    ----------
    device : torch.device or str
        A CUDA device.

    Returns
    -------
    str or None
        The error (type and message), or None when both kernels ran.
    """
    device = torch.device(device)
    key = str(device)
    if key not in _KERNEL_ERRORS:
        scan, conv, error = _mamba_ssm_kernels()
        if scan is not None:
            try:
                with torch.no_grad(), torch.autocast(device.type, enabled=False):
                    t = _probe_inputs(device)
                    scan(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], z=t["z"], delta_bias=t["delta_bias"],
                         delta_softplus=True)
                    if conv is not None:
                        conv(t["u"], t["weight"], t["bias"], activation="silu")
                    if device.type == "cuda" and torch.cuda.is_available():
                        torch.cuda.synchronize(device)
            except Exception as exc:  # no kernel image for this GPU, driver/toolkit mismatch...
                lines = str(exc).strip().splitlines()
                error = f"{type(exc).__name__}: {lines[0] if lines else ''}"
        _KERNEL_ERRORS[key] = error
    return _KERNEL_ERRORS[key]


def _rebuild_hint(device: torch.device) -> str:
    """Names the GPU and says how to get kernels for it (for messages)."""
    try:
        major, minor = torch.cuda.get_device_capability(device)
        gpu, arch = f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})", f"{major}.{minor}"
    except Exception:  # noqa: BLE001 - only for the message
        gpu, arch = str(device), "its compute capability"
    return (f"{gpu}. Rebuild mamba-ssm and causal-conv1d with code for {arch} (README, 'Containers': "
            f"TORCH_CUDA_ARCH_LIST and scripts/nvcc-arch-filter.sh)")


def _kernels_usable(device: torch.device) -> bool:
    """``auto`` on a CUDA device: do the kernels import and run there? Warns once per device when not."""
    if not mamba_ssm_available():
        return False
    first = str(device) not in _KERNEL_ERRORS
    error = kernel_error(device)
    if error is not None and first:
        logger.warning(
            "backend 'auto': the mamba-ssm kernels are installed but fail on this GPU (%s); using the "
            "pure-PyTorch selective scan instead (same results, much slower). GPU: %s, or pass "
            "--backend torch to silence this warning.", error, _rebuild_hint(device),
        )
    return error is None


def _check_requested(requested: str) -> str:
    if requested not in BACKENDS:
        raise UsageError(f"backend: expected one of {', '.join(BACKENDS)}; got {requested!r}")
    return requested


def resolve_backend(requested: str, device: torch.device | str) -> str:
    """Return the backend a model with ``backend=requested`` uses on ``device``.

    Parameters
    ----------
    requested : {"auto", "mamba-ssm", "torch"}
        The backend asked for (command line or configuration).
    device : torch.device or str
        Device the model runs on.

    Returns
    -------
    str
        ``"mamba-ssm"`` or ``"torch"``, for the run configuration.

    Raises
    ------
    UsageError
        ``requested`` is not a known backend.
    BackendError
        ``"mamba-ssm"`` was requested but cannot be imported, ``device`` is
        not a CUDA device, or the kernels fail there (:func:`kernel_error`).
    """
    _check_requested(requested)
    device = torch.device(device)
    if requested == "torch":
        return "torch"
    available = mamba_ssm_available()
    if requested == "mamba-ssm":
        if not available:
            raise BackendError(
                f"backend 'mamba-ssm' requested but mamba_ssm cannot be imported "
                f"({_mamba_ssm_kernels()[2]}). {INSTALL_HINT}. Or use --backend torch."
            )
        if device.type != "cuda":
            raise BackendError(
                f"backend 'mamba-ssm' needs a CUDA device; got {device}. "
                "Use backend 'torch' (or 'auto') on CPU."
            )
        error = kernel_error(device)
        if error is not None:
            raise BackendError(
                f"backend 'mamba-ssm' requested but its kernels fail on this GPU ({error}). GPU: "
                f"{_rebuild_hint(device)}; or use --backend torch (or auto)."
            )
        return "mamba-ssm"
    # auto
    if device.type == "cuda" and available:
        return "mamba-ssm" if _kernels_usable(device) else "torch"
    if device.type == "cuda":
        logger.warning(
            "backend 'auto': mamba_ssm is not importable (%s); using the pure-PyTorch selective scan "
            "on %s, which is much slower than the CUDA kernels. %s.",
            _mamba_ssm_kernels()[2], device, INSTALL_HINT,
        )
    else:
        logger.warning(
            "backend 'auto': using the pure-PyTorch selective scan on %s "
            "(the mamba-ssm kernels need a CUDA device).", device,
        )
    return "torch"


def check_backend_available(requested: str) -> None:
    """Fail early when ``requested`` can never work on this machine.

    Raises
    ------
    UsageError
        Unknown backend name.
    BackendError
        ``"mamba-ssm"`` requested but ``mamba_ssm`` does not import.
    """
    _check_requested(requested)
    if requested == "mamba-ssm" and not mamba_ssm_available():
        raise BackendError(
            f"backend 'mamba-ssm' requested but mamba_ssm cannot be imported "
            f"({_mamba_ssm_kernels()[2]}). {INSTALL_HINT}. Or use --backend torch."
        )


def pick_backend(requested: str, tensor: torch.Tensor) -> str:
    """Backend for one forward call (silent version of :func:`resolve_backend`)."""
    if requested == "torch":
        return "torch"
    if requested == "mamba-ssm":
        # raises with the explanation (not importable / not a CUDA tensor / no kernels for this GPU)
        return resolve_backend(requested, tensor.device)
    if tensor.is_cuda and _kernels_usable(tensor.device):
        return "mamba-ssm"
    return "torch"


# --------------------------------------------------------------------------- selective scan


_WORKSPACE = threading.local()


def _workspace(slot: int, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A reusable scratch tensor of ``shape`` (contents undefined), one per thread and slot.

    On CPU, large temporaries of the scan reuse these buffers instead of
    fresh allocations, whose page faults otherwise cost about as much as the
    arithmetic. Free them with :func:`release_workspace`. Other devices get
    a fresh tensor.
    """
    if like.device.type != "cpu":  # CUDA's caching allocator already makes fresh tensors cheap
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    cache = getattr(_WORKSPACE, "buffers", None)
    if cache is None:
        cache = _WORKSPACE.buffers = {}
    # tensors made under inference_mode cannot be written outside it (and vice versa): keep them apart
    key = (slot, like.device, like.dtype, torch.is_inference_mode_enabled())
    numel = math.prod(shape)
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        buf = cache[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buf[:numel].view(shape)


def release_workspace() -> None:
    """Free the scratch buffers of the pure-PyTorch scan held by the calling thread."""
    _WORKSPACE.buffers = {}


class _SelectiveScan(torch.autograd.Function):
    """Selective scan without ``D``/``z`` on time-major tensors.

    Forward: ``h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t``, ``y_t = <C_t, h_t>``.
    Backward: one reverse loop for ``dL/dh_t``; all other gradients are
    vectorised. States are stored as (L, Bw, N, E), channels innermost, so
    every broadcast runs over long contiguous rows and every contraction is
    a batched matrix product over the L*Bw tokens. Memory: the states are
    saved; ``exp(delta A)`` is recomputed; other (L, Bw, N, E) temporaries
    live in per-thread scratch buffers (two of them).
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C):  # noqa: D102  (shapes in selective_scan)
        L, Bw, E = u.shape
        N = A.shape[1]
        LB = L * Bw
        At = A.t().contiguous()  # (N, E)
        dA = torch.mul(delta.unsqueeze(2), At, out=_workspace(0, (L, Bw, N, E), u)).exp_()
        h = torch.mul((delta * u).unsqueeze(2), B.unsqueeze(3))  # (L, Bw, N, E): the states
        hs, dAs = h.unbind(0), dA.unbind(0)  # views, made once: one dispatcher call per step
        for t in range(1, L):
            hs[t].addcmul_(dAs[t], hs[t - 1])
        y = torch.bmm(C.reshape(LB, 1, N), h.view(LB, N, E)).view(L, Bw, E)
        ctx.save_for_backward(u, delta, At, B, C, h)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):  # noqa: D102
        u, delta, At, B, C, h = ctx.saved_tensors
        L, Bw, E = u.shape
        N = At.shape[0]
        LB = L * Bw
        gy = gy.contiguous()
        dA = torch.mul(delta.unsqueeze(2), At, out=_workspace(0, (L, Bw, N, E), u)).exp_()
        # dL/dh_t: direct contribution C_t gy_t, plus exp(delta_{t+1} A) dL/dh_{t+1}
        gh = torch.mul(gy.unsqueeze(2), C.unsqueeze(3), out=_workspace(1, (L, Bw, N, E), u))
        ghs, dAs = gh.unbind(0), dA.unbind(0)
        for t in range(L - 2, -1, -1):
            ghs[t].addcmul_(dAs[t + 1], ghs[t + 1])
        ghv = gh.view(LB, N, E)
        g_C = torch.bmm(h.view(LB, N, E), gy.view(LB, E, 1)).view(L, Bw, N)
        g_B = torch.bmm(ghv, (delta * u).view(LB, E, 1)).view(L, Bw, N)
        ghB = torch.bmm(B.reshape(LB, 1, N), ghv).view(L, Bw, E)
        # G_t = dL/d(delta_t A) = gh_t * h_{t-1} * exp(delta_t A), zero at t = 0 (h_{-1} = 0)
        G = dA
        G[0].zero_()
        G[1:].mul_(gh[1:]).mul_(h[:-1])
        g_A = torch.mul(G, delta.unsqueeze(2), out=gh).view(LB, N * E).sum(0).view(N, E).t()
        g_delta = G.mul_(At).sum(2)
        g_delta.addcmul_(ghB, u)
        g_u = ghB.mul_(delta)
        return g_u, g_delta, g_A, g_B, g_C


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
) -> torch.Tensor:
    """Selective scan over the first (time) axis (fused C++ kernel on CPU, else pure PyTorch).

    Parameters
    ----------
    u : Tensor, shape (L, Bw, E)
        Input sequence (time-major: L steps, Bw sequences, E channels).
    delta : Tensor, shape (L, Bw, E)
        Positive step sizes (already passed through softplus).
    A : Tensor, shape (E, N)
        State matrix (diagonal per channel), usually ``-exp(A_log)``.
    B, C : Tensor, shape (L, Bw, N)
        Input and output projections of the state.
    D : Tensor, shape (E,), optional
        Skip connection ``y += D * u``.
    z : Tensor, shape (L, Bw, E), optional
        Gate: ``y *= silu(z)``.

    Returns
    -------
    Tensor, shape (L, Bw, E)
        In the dtype of ``u``; computed in float32 (or float64 for float64 input).

    Notes
    -----
    CPU tensors go through :class:`.cpu_kernels.FusedSelectiveScan` when the
    extension is available (see :func:`.cpu_kernels.kernel_status`); the two
    implementations agree to float32 rounding.
    """
    dtype = u.dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    if u.device.type == "cpu" and A.shape[1] <= MAX_STATE and fused_ops() is not None:
        args = [None if t is None else t.to(work) for t in (u, delta, A, B, C, D, z)]
        with torch.autocast("cpu", enabled=False):
            return FusedSelectiveScan.apply(*args).to(dtype)
    uu, dd, AA, BB, CC = (t.to(work).contiguous() for t in (u, delta, A, B, C))
    with torch.autocast(u.device.type, enabled=False):
        y = _SelectiveScan.apply(uu, dd, AA, BB, CC)
    if D is not None:
        y = y + uu * D.to(work)
    if z is not None:
        y = y * F.silu(z.to(work))
    return y.to(dtype)


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          silu: bool = False) -> torch.Tensor:
    """Causal depthwise 1-D convolution along the first (time) axis, then SiLU when ``silu``.

    Equivalent to ``nn.Conv1d(E, E, K, groups=E, padding=K-1)`` trimmed to the
    first L outputs. On CPU, the fused kernel of :mod:`.cpu_kernels` when it
    is available; otherwise K shifted multiply-adds.

    Parameters
    ----------
    x : Tensor, shape (L, Bw, E)
    weight : Tensor, shape (E, 1, K)
    bias : Tensor, shape (E,), optional
    silu : bool
        Apply SiLU to the result.

    Returns
    -------
    Tensor, shape (L, Bw, E)
        In the dtype ``x``, ``weight`` and ``bias`` promote to.
    """
    L = x.shape[0]
    K = weight.shape[-1]
    w = weight.reshape(weight.shape[0], K)
    if x.device.type == "cpu" and fused_ops() is not None:
        dtype = torch.promote_types(x.dtype, weight.dtype)
        dtype = dtype if bias is None else torch.promote_types(dtype, bias.dtype)
        work = torch.float64 if dtype == torch.float64 else torch.float32
        with torch.autocast("cpu", enabled=False):
            out = FusedCausalConv.apply(x.to(work), w.to(work), None if bias is None else bias.to(work), silu)
        return out.to(dtype)
    xp = F.pad(x, (0, 0, 0, 0, K - 1, 0))
    out = xp[K - 1:] * w[:, K - 1]
    for k in range(K - 1):
        out = out + xp[k:k + L] * w[:, k]
    if bias is not None:
        out = out + bias
    return F.silu(out) if silu else out


# --------------------------------------------------------------------------- module


class Mamba(nn.Module):
    """Mamba mixer (selective SSM) with a switchable compute backend.

    Parameters
    ----------
    d_model : int
        Channels C of the input and output tokens.
    d_state : int
        State size N per channel (16).
    d_conv : int
        Width of the causal depthwise convolution (4).
    expand : int
        Inner width ``E = expand * d_model`` (2).
    dt_rank : int or "auto"
        Rank R of the step-size projection; ``"auto"`` is ``ceil(d_model / 16)``.
    dt_min, dt_max, dt_init_floor : float
        Range of the initial step sizes (as in mamba-ssm).
    backend : {"auto", "mamba-ssm", "torch"}
        Compute backend, see the module docstring.

    Notes
    -----
    Parameter shapes (E = expand*C, R = dt_rank, N = d_state, K = d_conv):
    ``in_proj.weight`` (2E, C); ``conv1d.weight`` (E, 1, K), ``conv1d.bias`` (E);
    ``x_proj.weight`` (R + 2N, E); ``dt_proj.weight`` (E, R), ``dt_proj.bias`` (E);
    ``A_log`` (E, N); ``D`` (E); ``out_proj.weight`` (C, E).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.backend = _check_requested(backend)
        E, N, R = self.d_inner, d_state, self.dt_rank

        # registration order gives state_dict order: A_log, D, in_proj, conv1d, x_proj, dt_proj, out_proj
        A = torch.arange(1, N + 1, dtype=torch.float32).repeat(E, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(E))
        self.D._no_weight_decay = True
        self.in_proj = nn.Linear(d_model, 2 * E, bias=False)
        self.conv1d = nn.Conv1d(E, E, kernel_size=d_conv, groups=E, padding=d_conv - 1, bias=True)
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=True)
        self.out_proj = nn.Linear(E, d_model, bias=False)

        std = R ** -0.5
        with torch.no_grad():
            nn.init.uniform_(self.dt_proj.weight, -std, std)
            dt = torch.exp(torch.rand(E) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_init_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def extra_repr(self) -> str:  # noqa: D102
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, "
                f"d_conv={self.d_conv}, dt_rank={self.dt_rank}, backend={self.backend!r}")

    def uses_kernels(self, x: torch.Tensor) -> bool:
        """Whether a forward on ``x`` runs the mamba-ssm kernels."""
        return pick_backend(self.backend, x) == "mamba-ssm"

    def forward(self, x: torch.Tensor, seq_first: bool = False) -> torch.Tensor:
        """Mix tokens along the sequence axis.

        Parameters
        ----------
        x : Tensor, shape (Bw, L, C), or (L, Bw, C) when ``seq_first``
            Bw independent sequences of L tokens.
        seq_first : bool
            Layout of ``x`` and of the result. The torch backend works
            time-major internally, so ``seq_first=True`` saves two copies.

        Returns
        -------
        Tensor, same shape as ``x``
        """
        if pick_backend(self.backend, x) == "mamba-ssm":
            xb = x.transpose(0, 1) if seq_first else x
            out = self._forward_kernels(xb)
            return out.transpose(0, 1) if seq_first else out
        xt = x if seq_first else x.transpose(0, 1)
        out = self._forward_torch(xt)
        return out if seq_first else out.transpose(0, 1)

    def _ssm_inputs(self, xc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dbl = self.x_proj(xc)
        dt, B, C = torch.split(dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        return dt, B, C

    def _forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        """The ``"torch"`` backend (fused CPU kernels or PyTorch code); ``x`` is time-major (L, Bw, C)."""
        xz = self.in_proj(x)
        xi, z = xz.chunk(2, dim=-1)
        xc = causal_depthwise_conv(xi, self.conv1d.weight, self.conv1d.bias, silu=True)
        dt, B, C = self._ssm_inputs(xc)
        delta = F.softplus(self.dt_proj(dt).float())
        A = -torch.exp(self.A_log.float())
        y = selective_scan(xc, delta, A, B, C, D=self.D, z=z)
        return self.out_proj(y)

    def _forward_kernels(self, x: torch.Tensor) -> torch.Tensor:
        """mamba-ssm path; ``x`` is batch-first (Bw, L, C) on a CUDA device."""
        selective_scan_fn, causal_conv1d_fn, _ = _mamba_ssm_kernels()
        L = x.shape[1]
        xz = self.in_proj(x).transpose(1, 2)  # (Bw, 2E, L)
        xi, z = xz.chunk(2, dim=1)
        if causal_conv1d_fn is not None:
            bias = None if self.conv1d.bias is None else self.conv1d.bias.to(xi.dtype)
            xc = causal_conv1d_fn(xi.contiguous(), self.conv1d.weight.squeeze(1).to(xi.dtype), bias,
                                  activation="silu")
        else:
            xc = F.silu(self.conv1d(xi)[..., :L])
        dt, B, C = self._ssm_inputs(xc.transpose(1, 2))  # (Bw, L, *)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2).contiguous()  # (Bw, E, L); bias in kernel
        A = -torch.exp(self.A_log.float())
        y = selective_scan_fn(
            xc.contiguous(), dt, A,
            B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(),
            self.D.float(), z=z.contiguous(),
            delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
        )
        return self.out_proj(y.transpose(1, 2))
