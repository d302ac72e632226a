"""The fused CPU kernels (bids_regionmae.models.cpu_kernels) against naive references and the PyTorch code."""

from __future__ import annotations

import logging
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from test_models import _naive_scan

from bids_regionmae.models import cpu_kernels, selective_scan
from bids_regionmae.models.cpu_kernels import ENV_VAR, FusedCausalConv, FusedSelectiveScan, kernel_status
from bids_regionmae.models.mamba import Mamba, _SelectiveScan, causal_depthwise_conv

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HAVE_COMPILER = sys.platform.startswith("linux") and any(shutil.which(c) for c in ("c++", "g++"))


def _args(L, Bw, E, N, dtype=torch.float64, seed=0, D=True, z=True):
    g = torch.Generator().manual_seed(seed)
    args = [torch.randn(L, Bw, E, generator=g), torch.rand(L, Bw, E, generator=g) * 0.5 + 0.01,
            -torch.rand(E, N, generator=g) * 2 - 0.1, torch.randn(L, Bw, N, generator=g),
            torch.randn(L, Bw, N, generator=g), torch.randn(E, generator=g) if D else None,
            torch.randn(L, Bw, E, generator=g) if z else None]
    return [None if a is None else a.to(dtype).requires_grad_() for a in args]


def _grads(out, args, gout):
    inputs = [a for a in args if a is not None]
    return torch.autograd.grad(out, inputs, gout)


@pytest.fixture(scope="module")
def ops():
    """The loaded extension (skips where it cannot be built)."""
    ops = cpu_kernels.fused_ops()
    if ops is None:
        pytest.skip(f"fused scan unavailable here: {kernel_status()}")
    return ops


def _supported_isas(ops) -> list[str]:
    before = ops.isa()
    names = []
    for code in range(3):
        try:
            names.append(ops.isa(code))
        except RuntimeError:  # not supported by this CPU
            pass
    ops.isa(["generic", "avx2", "avx512"].index(before))
    return names


@pytest.fixture(params=["generic", "avx2", "avx512"])
def isa(request, ops):
    """Run the test with each instruction set the CPU supports (the extension carries all of them)."""
    names = ["generic", "avx2", "avx512"]
    if request.param not in _supported_isas(ops):
        pytest.skip(f"{request.param} not supported by this CPU")
    before = ops.isa()
    ops.isa(names.index(request.param))
    yield request.param
    ops.isa(names.index(before))


def test_fused_scan_is_built_where_a_compiler_exists():
    if not HAVE_COMPILER:
        pytest.skip("no C++ compiler: the fallback is what runs here")
    assert cpu_kernels.kernels_enabled()
    assert kernel_status().startswith("fused ("), kernel_status()


# shapes with every edge: E not a multiple of the lanes (4/8/16), odd N, L not a multiple of the chunk,
# L = 1, one sequence
SHAPES = [(37, 3, 6, 4), (40, 2, 13, 5), (33, 1, 17, 9), (1, 2, 3, 2), (2 * cpu_kernels.CHUNK, 2, 24, 16)]


@pytest.mark.parametrize("shape", SHAPES)
def test_fused_scan_matches_naive_reference(isa, shape):
    for D, z in ((True, True), (False, False), (True, False)):
        args = _args(*shape, D=D, z=z)
        out, ref = FusedSelectiveScan.apply(*args), _naive_scan(*args)
        assert torch.allclose(out, ref, atol=1e-12, rtol=1e-10), (isa, shape, D, z)
        gout = torch.randn_like(out)
        for a, b in zip(_grads(out, args, gout), _grads(ref, args, gout), strict=True):
            assert torch.allclose(a, b, atol=1e-11, rtol=1e-9), (isa, shape, D, z)


def test_fused_scan_gradcheck(isa):
    for seed, shape in enumerate([(6, 2, 3, 2), (cpu_kernels.CHUNK + 3, 1, 5, 3)]):
        args = _args(*shape, seed=seed)
        assert torch.autograd.gradcheck(FusedSelectiveScan.apply, args)  # also checks that backward is repeatable
    args = _args(5, 2, 3, 2, seed=7, D=False, z=False)
    assert torch.autograd.gradcheck(FusedSelectiveScan.apply, args)


def test_fused_scan_takes_slices_as_the_mamba_block_passes_them(ops):
    """z and u are halves of in_proj's output, B and C slices of x_proj's: no copies, same results."""
    L, Bw, E, N, R = 20, 3, 10, 4, 2
    g = torch.Generator().manual_seed(0)
    xz = torch.randn(L, Bw, 2 * E, generator=g, dtype=torch.float64, requires_grad=True)
    dbl = torch.randn(L, Bw, R + 2 * N, generator=g, dtype=torch.float64, requires_grad=True)
    u, z = xz.chunk(2, -1)
    B, C = dbl[..., R:R + N], dbl[..., R + N:]
    delta = torch.rand(L, Bw, E, generator=g, dtype=torch.float64) * 0.5 + 0.01
    A = -torch.rand(E, N, generator=g, dtype=torch.float64) - 0.1
    D = torch.randn(E, generator=g, dtype=torch.float64)
    out, ref = FusedSelectiveScan.apply(u, delta, A, B, C, D, z), _naive_scan(u, delta, A, B, C, D, z)
    assert torch.allclose(out, ref, atol=1e-12)
    gout = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (xz, dbl), gout), torch.autograd.grad(ref, (xz, dbl), gout),
                    strict=True):
        assert torch.allclose(a, b, atol=1e-11)


# NeuroSTORM's Mamba sequences: 4x4x4x4 windows (256 tokens) at widths 36/72/144 (E = 72/144/288), the last
# stage's 2x2x2x4 window (32 tokens) at 288 (E = 576); N = 16. Few sequences each, to stay quick.
STAGES = [(256, 6, 72), (256, 3, 144), (256, 2, 288), (32, 5, 576)]


@pytest.mark.parametrize(("L", "Bw", "E"), STAGES)
def test_fused_scan_agrees_with_torch_scan_on_neurostorm_stage_shapes(ops, L, Bw, E):
    g = torch.Generator().manual_seed(E)
    u, z = torch.randn(L, Bw, E, generator=g), torch.randn(L, Bw, E, generator=g)
    delta = F.softplus(torch.randn(L, Bw, E, generator=g) - 4)  # typical dt_proj init range
    A = -torch.arange(1, 17, dtype=torch.float32).repeat(E, 1) * torch.exp(torch.randn(E, 16, generator=g) * 0.3)
    B, C = torch.randn(L, Bw, 16, generator=g), torch.randn(L, Bw, 16, generator=g)
    D = torch.ones(E)
    args = [t.requires_grad_() for t in (u, delta, A, B, C, D, z)]
    out = FusedSelectiveScan.apply(*args)
    ref = (_SelectiveScan.apply(*args[:5]) + u * D) * F.silu(z)
    scale = ref.abs().max()
    assert (out - ref).abs().max() <= 2e-6 * scale
    gout = torch.randn_like(out)
    for name, a, b in zip("u delta A B C D z".split(), _grads(out, args, gout), _grads(ref, args, gout),
                          strict=True):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), name


def test_selective_scan_uses_the_fused_kernel_and_casts_low_precision(ops, monkeypatch):
    calls = []
    original = FusedSelectiveScan.apply
    monkeypatch.setattr(FusedSelectiveScan, "apply", lambda *a: calls.append(a[0].dtype) or original(*a))
    args = [None if a is None else a.detach().float() for a in _args(40, 2, 12, 16)]
    full = selective_scan(*args)
    low = selective_scan(*[a.bfloat16() for a in args])
    assert calls == [torch.float32, torch.float32]
    assert low.dtype == torch.bfloat16
    assert (low.float() - full).abs().max() <= 0.05 * full.abs().max()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert selective_scan(*args).dtype == torch.float32
    with torch.inference_mode():  # no states kept for a backward
        assert torch.equal(selective_scan(*args), full)


def test_env_var_forces_the_torch_scan(ops, monkeypatch):
    args = _args(30, 2, 8, 4)
    fused = selective_scan(*args)
    monkeypatch.setenv(ENV_VAR, "0")
    assert not cpu_kernels.kernels_enabled() and kernel_status() == f"torch ({ENV_VAR}=0)"
    calls = []
    monkeypatch.setattr(FusedSelectiveScan, "apply", lambda *a: calls.append(a))
    torch_path = selective_scan(*args)
    assert calls == []
    assert torch.allclose(fused, torch_path, atol=1e-12)


def test_build_failure_falls_back_with_one_warning(monkeypatch, caplog):
    def broken_build(verbose=False):
        raise RuntimeError("Error building extension 'regionmae_mamba': c++: not found")

    monkeypatch.setattr(cpu_kernels, "build", broken_build)
    cpu_kernels._load.cache_clear()
    try:
        args = _args(12, 2, 5, 3)
        with caplog.at_level(logging.WARNING, logger="bids_regionmae.models.cpu_kernels"):
            first = selective_scan(*args)
            second = selective_scan(*args)
        warnings = [r for r in caplog.records if r.name == "bids_regionmae.models.cpu_kernels"]
        assert len(warnings) == 1
        assert "c++: not found" in warnings[0].getMessage() and ENV_VAR in warnings[0].getMessage()
        assert kernel_status() == "torch (RuntimeError: Error building extension 'regionmae_mamba': c++: not found)"
        assert torch.equal(first, second)
        assert torch.allclose(first, _naive_scan(*args), atol=1e-12)
    finally:
        cpu_kernels._load.cache_clear()


def test_mamba_block_same_with_fused_and_torch_scan(ops, monkeypatch):
    torch.manual_seed(0)
    m = Mamba(20, backend="torch").double()
    x = torch.randn(3, 21, 20, dtype=torch.float64, requires_grad=True)
    out = {}
    for flag in ("1", "0"):
        monkeypatch.setenv(ENV_VAR, flag)
        m.zero_grad()
        y = m(x)
        (gx,) = torch.autograd.grad(y.square().sum(), x)
        out[flag] = (y, gx)
    assert torch.allclose(out["1"][0], out["0"][0], atol=1e-12)
    assert torch.allclose(out["1"][1], out["0"][1], atol=1e-10)


def _conv_reference(x, w, b, silu):
    """torch's own Conv1d (padding K-1, first L outputs), on a (L, Bw, E) tensor."""
    L, Bw, E = x.shape
    out = F.conv1d(x.permute(1, 2, 0), w.unsqueeze(1), b, padding=w.shape[1] - 1, groups=E)[..., :L]
    out = out.permute(2, 0, 1)
    return F.silu(out) if silu else out


@pytest.mark.parametrize(("L", "Bw", "E", "K"), [(11, 3, 5, 4), (3, 2, 19, 4), (40, 1, 33, 2), (7, 4, 16, 1)])
def test_fused_conv_matches_conv1d(isa, L, Bw, E, K):
    g = torch.Generator().manual_seed(L * E)
    xz = torch.randn(L, Bw, 2 * E, generator=g, dtype=torch.float64, requires_grad=True)
    x = xz[..., :E]  # the first half of in_proj's output, as the Mamba block passes it
    w = torch.randn(E, K, generator=g, dtype=torch.float64, requires_grad=True)
    for b in (torch.randn(E, generator=g, dtype=torch.float64, requires_grad=True), None):
        for silu in (True, False):
            args = [t for t in (xz, w, b) if t is not None]
            out, ref = FusedCausalConv.apply(x, w, b, silu), _conv_reference(x, w, b, silu)
            assert torch.allclose(out, ref, atol=1e-12), (isa, b is None, silu)
            gout = torch.randn_like(out)
            for a, r in zip(torch.autograd.grad(out, args, gout), torch.autograd.grad(ref, args, gout), strict=True):
                assert torch.allclose(a, r, atol=1e-11), (isa, b is None, silu)
    small = [torch.randn(5, 2, 3, generator=g, dtype=torch.float64, requires_grad=True),
             torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True),
             torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(lambda x, w, b: FusedCausalConv.apply(x, w, b, True), small)


def test_causal_conv_dtypes_follow_torch_promotion(ops):
    w, b = torch.randn(6, 1, 4), torch.randn(6)
    x = torch.randn(9, 2, 6)
    ref = causal_depthwise_conv(x, w, b, silu=True)
    assert causal_depthwise_conv(x.bfloat16(), w, b, silu=True).dtype == torch.float32  # as bf16 * f32 in torch
    low = causal_depthwise_conv(x.bfloat16(), w.bfloat16(), b.bfloat16(), silu=True)
    assert low.dtype == torch.bfloat16 and (low.float() - ref).abs().max() < 0.1
    assert torch.allclose(ref, _conv_reference(x, w.squeeze(1), b, True), atol=1e-5)


def test_thread_count_does_not_change_results(ops):
    args = [None if a is None else a.detach().float().requires_grad_() for a in _args(64, 3, 40, 16, seed=3)]
    res = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out = FusedSelectiveScan.apply(*args)
        res[threads] = (out, _grads(out, args, torch.ones_like(out)))
    torch.set_num_threads(1)
    assert torch.equal(res[1][0], res[2][0])
    for a, b in zip(res[1][1], res[2][1], strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_without_a_compiler_the_model_runs_on_the_torch_code(tmp_path):
    """A real failed build (no compiler) in a fresh process: one warning, the PyTorch code, exit status 0."""
    import os
    import subprocess

    code = ("import torch; from bids_regionmae.models import create_mae, get_spec; "
            "from bids_regionmae.models.cpu_kernels import kernel_status; "
            "spec = get_spec('tiny', depths=(1, 1)); mae = create_mae(spec, backend='torch'); "
            "x = torch.randn((1, 1) + spec.img_size); m = torch.zeros((1,) + spec.token_grid, dtype=torch.bool); "
            "mae(x, m).sum().backward(); mae(x, m); print(kernel_status())")
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"),
           "OMP_NUM_THREADS": "1"}
    env.pop(ENV_VAR, None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = f"torch (RuntimeError: no C++ compiler: '{env['CXX']}' is not on PATH (set CXX or install g++))"
    assert proc.stdout.strip() == expected
    assert proc.stderr.count("could not be built or loaded") == 1, proc.stderr[-2000:]
    assert "!! WARNING" not in proc.stderr  # no compiler check of torch's own either


def test_build_directory_follows_torch_extensions_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = cpu_kernels.build_directory()
    assert folder.parent == tmp_path and folder.name == cpu_kernels.extension_name()
    assert folder.name.startswith("regionmae_mamba_") and folder.name.isidentifier()
