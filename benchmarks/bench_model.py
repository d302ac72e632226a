#!/usr/bin/env python
"""Time forward + backward of the masked autoencoder per sample, for every backend and device.

Each (device, backend) pair runs in its own subprocess so that the CPU peak
memory (``VmHWM``) belongs to that configuration alone; on CUDA the peak is
``torch.cuda.max_memory_allocated``.

``--compare-scan`` instead compares, in one process and alternating, the
PyTorch code of the Mamba block on CPU (``REGIONMAE_CPU_KERNELS=0``) with the
fused C++ kernels (selective scan and causal convolution): the scan alone at
the ``tiny`` and ``neurostorm`` first-stage shapes, a ``tiny`` training step
(batch 2) and a ``neurostorm`` forward + backward (batch 1, about 8 GiB),
with the largest differences of outputs and gradients between the two.

Examples
--------
    python benchmarks/bench_model.py --quick                # tiny variant, CPU, a few seconds
    python benchmarks/bench_model.py                        # neurostorm, all devices/backends here
    python benchmarks/bench_model.py --variant neurostorm --device cuda --batch 4 --json out.json
    python benchmarks/bench_model.py --compare-scan --threads 1 --json scan.json   # about 3 minutes
    python benchmarks/bench_model.py --compare-scan --quick                         # without neurostorm
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """CPU count, torch version and device names."""
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
    from bids_regionmae.models import mamba_ssm_available
    from bids_regionmae.models.cpu_kernels import kernel_status

    info["mamba_ssm"] = mamba_ssm_available()
    info["cpu_scan"] = kernel_status()
    return info


def configurations(device_arg: str, backend_arg: str) -> list[tuple[str, str]]:
    """(device, backend) pairs that can run on this machine."""
    import torch

    from bids_regionmae.models import mamba_ssm_available

    devices = ["cpu", "cuda"] if device_arg == "all" else [device_arg]
    backends = ["torch", "mamba-ssm"] if backend_arg == "all" else [backend_arg]
    out = []
    for dev in devices:
        if dev == "cuda" and not torch.cuda.is_available():
            continue
        for be in backends:
            if be == "mamba-ssm" and (dev != "cuda" or not mamba_ssm_available()):
                continue
            out.append((dev, be))
    return out


def _peak_rss_gb() -> tuple[float, str]:
    """Peak resident memory of this process in GiB, and where it comes from.

    ``VmHWM`` (Linux) belongs to this program alone; ``ru_maxrss`` survives
    ``exec`` and so includes the parent's memory at ``fork`` time.
    """
    try:
        with open("/proc/self/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20, "VmHWM"  # kB -> GiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "ru_maxrss"


def run_single(args: argparse.Namespace, device_name: str, backend: str) -> dict:
    """Measure one configuration in this process."""
    import torch

    from bids_regionmae.models import count_parameters, create_mae, get_spec

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(device_name)
    torch.manual_seed(0)
    spec = get_spec(args.variant)
    mae = create_mae(spec, backend=backend).to(device)
    if args.grad_checkpointing:
        mae.set_grad_checkpointing(True)
    mae.train()
    x = torch.randn((args.batch, spec.in_chans) + spec.img_size, device=device)
    mask = torch.rand((args.batch,) + spec.token_grid, device=device) < args.mask_ratio
    opt = torch.optim.AdamW(mae.parameters(), lr=5e-5, weight_decay=0.01)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    fwd, bwd = [], []
    for step in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        with amp:
            recon = mae(x, mask)
            loss = (recon.float() - x).square().mean()
        sync()
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        t2 = time.perf_counter()
        if step >= args.warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    if device.type == "cuda":
        peak_gb = torch.cuda.max_memory_allocated() / 2**30
        peak_kind = "cuda max_memory_allocated"
    else:
        peak_gb, peak_kind = _peak_rss_gb()
    f, b = min(fwd), min(bwd)
    return {
        "variant": spec.name, "device": device_name, "backend": backend, "batch": args.batch,
        "params": count_parameters(mae), "fwd_s_per_sample": f / args.batch,
        "bwd_s_per_sample": b / args.batch, "step_s_per_sample": (f + b) / args.batch,
        "step_s": f + b, "peak_gb": peak_gb, "peak_kind": peak_kind, "threads": torch.get_num_threads(),
        "bf16": args.bf16,
    }


SCAN_MODES = {"torch": "0", "fused": "1"}  # REGIONMAE_CPU_KERNELS for each compared path


def _timed(fn) -> tuple[float, float]:
    """(wall, CPU) seconds of ``fn()``."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def _alternate(run, passes: int, warmup: int = 1) -> dict:
    """Run ``run(mode)`` for both paths in turn; best wall and CPU seconds of each over ``passes``."""
    times: dict[str, list[tuple[float, float]]] = {mode: [] for mode in SCAN_MODES}
    for i in range(warmup + passes):
        for mode, flag in (SCAN_MODES.items() if i % 2 == 0 else reversed(SCAN_MODES.items())):
            os.environ["REGIONMAE_CPU_KERNELS"] = flag
            t = _timed(lambda mode=mode: run(mode))
            if i >= warmup:
                times[mode].append(t)
    out = {}
    for mode, ts in times.items():
        out[f"{mode}_wall_s"] = min(t[0] for t in ts)
        out[f"{mode}_cpu_s"] = min(t[1] for t in ts)
    out["speedup_wall"] = out["torch_wall_s"] / out["fused_wall_s"]
    out["speedup_cpu"] = out["torch_cpu_s"] / out["fused_cpu_s"]
    return out


def _max_diff(a: list, b: list) -> tuple[float, float]:
    """Largest |a - b| over paired tensors, and the largest |b| (for scale)."""
    return (max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True)),
            max(float(y.abs().max()) for y in b))


def _scan_alone(shape: tuple[int, int, int, int], passes: int) -> dict:
    """Fused vs pure-PyTorch scan (with D and the z gate) forward + backward on random float32 inputs."""
    import torch
    import torch.nn.functional as F

    from bids_regionmae.models import selective_scan

    L, Bw, E, N = shape
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(L, Bw, E, generator=g), F.softplus(torch.randn(L, Bw, E, generator=g) - 4),
            -torch.arange(1, N + 1, dtype=torch.float32).repeat(E, 1), torch.randn(L, Bw, N, generator=g),
            torch.randn(L, Bw, N, generator=g), torch.ones(E), torch.randn(L, Bw, E, generator=g)]
    args = [a.requires_grad_() for a in args]
    gout = torch.randn(L, Bw, E, generator=g)
    results = {}

    def run(mode: str) -> None:
        out = selective_scan(*args)
        results[mode] = [out.detach(), *torch.autograd.grad(out, args, gout)]

    res = _alternate(run, passes)
    res["max_abs_diff_out"], res["max_abs_out"] = _max_diff(results["fused"][:1], results["torch"][:1])
    res["max_abs_diff_grad"], res["max_abs_grad"] = _max_diff(results["fused"][1:], results["torch"][1:])
    return {"what": f"scan alone, L={L} Bw={Bw} E={E} N={N}, fwd+bwd", **res}


def _model_pass(variant: str, batch: int, passes: int, train_step: bool) -> dict:
    """Fused kernels vs PyTorch code in a whole masked-autoencoder forward + backward (+ AdamW step)."""
    import copy

    import torch

    from bids_regionmae.models import create_mae, get_spec

    torch.manual_seed(0)
    spec = get_spec(variant)
    base = create_mae(spec, backend="torch").train()
    x = torch.randn((batch, spec.in_chans) + spec.img_size)
    mask = torch.rand((batch,) + spec.token_grid) < 0.5
    # one copy of the model per path, so that both train from the same weights
    models = {mode: copy.deepcopy(base) for mode in SCAN_MODES} if train_step else dict.fromkeys(SCAN_MODES, base)
    opts = {mode: torch.optim.AdamW(m.parameters(), lr=5e-5, weight_decay=0.01) for mode, m in models.items()}
    first = {}

    def run(mode: str) -> None:
        model = models[mode]
        model.zero_grad(set_to_none=True)
        recon = model(x, mask)
        (recon - x).square().mean().backward()
        if mode not in first:  # outputs and gradients before any optimizer step: same weights for both
            first[mode] = [recon.detach(), *(p.grad.clone() for p in model.parameters() if p.grad is not None)]
        if train_step:
            opts[mode].step()

    res = _alternate(run, passes)
    res["max_abs_diff_out"], res["max_abs_out"] = _max_diff(first["fused"][:1], first["torch"][:1])
    res["max_abs_diff_grad"], res["max_abs_grad"] = _max_diff(first["fused"][1:], first["torch"][1:])
    what = "training step (fwd+bwd+AdamW)" if train_step else "fwd+bwd"
    return {"what": f"{variant}, batch {batch}, {what}", **res}


def _neurostorm_peaks(threads: int) -> dict:
    """Peak memory of one ``neurostorm`` training pass (batch 1) per path, each in its own process."""
    from bids_regionmae.models.cpu_kernels import ENV_VAR

    peaks = {}
    for mode, flag in SCAN_MODES.items():
        cmd = [sys.executable, os.path.abspath(__file__), "--single", "cpu", "torch", "--variant", "neurostorm",
               "--batch", "1", "--steps", "1", "--warmup", "0", "--threads", str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, ENV_VAR: flag})
        if proc.returncode == 0:
            peaks[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        else:
            print(f"neurostorm peak memory, {mode}: failed\n{proc.stderr[-2000:]}")
    return peaks


def compare_scan(args: argparse.Namespace) -> int:
    """The ``--compare-scan`` report; returns the exit status."""
    import torch

    from bids_regionmae.models.cpu_kernels import ENV_VAR, kernel_status

    if args.threads:
        torch.set_num_threads(args.threads)
    status = kernel_status()
    info = machine_info()
    print("# bench_model --compare-scan: PyTorch code vs fused C++ kernels of the Mamba block on CPU, alternating")
    print(f"machine: {info['cpu']} | usable cpus={info['cpus_usable']} | torch_threads={torch.get_num_threads()} "
          f"| torch {info['torch']} | kernels: {status} | load before: {os.getloadavg()[0]:.1f}")
    if not status.startswith("fused"):
        print(f"the fused kernels are not available ({status}); nothing to compare")
        return 1
    rows = [_scan_alone((256, 32, 32, 16), passes=5), _scan_alone((256, 320, 72, 16), passes=3),
            _model_pass("tiny", 2, passes=args.steps or 5, train_step=True)]
    peaks = {}
    if not args.quick:
        rows.append(_model_pass("neurostorm", 1, passes=args.steps or 2, train_step=False))
        peaks = _neurostorm_peaks(torch.get_num_threads())
    os.environ.pop(ENV_VAR, None)
    load_after = os.getloadavg()[0]
    header = (f"{'what':<52} {'torch s':>8} {'fused s':>8} {'x wall':>7} {'x CPU':>6}  "
              f"{'max|d out| / max|out|':>21}  {'max|d grad| / max|grad|':>23}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['what']:<52} {r['torch_wall_s']:>8.3f} {r['fused_wall_s']:>8.3f} {r['speedup_wall']:>6.2f}x "
              f"{r['speedup_cpu']:>5.2f}x  {r['max_abs_diff_out']:>10.2e} / {r['max_abs_out']:<8.3g}  "
              f"{r['max_abs_diff_grad']:>10.2e} / {r['max_abs_grad']:<10.3g}")
    for mode, res in peaks.items():
        print(f"neurostorm fwd+bwd+AdamW, {mode}, own process: {res['step_s']:.2f} s (one cold pass), "
              f"peak RSS {res['peak_gb']:.2f} GiB")
    print(f"(seconds: best wall time of the alternating passes; x CPU: the same ratio in CPU time) | load after: "
          f"{load_after:.1f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"machine": info, "kernels": status, "threads": torch.get_num_threads(), "rows": rows,
                       "neurostorm_peaks": peaks, "load_after": load_after, "date": time.strftime("%Y-%m-%d %H:%M")},
                      fh, indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="neurostorm", help="model variant (default: neurostorm)")
    p.add_argument("--quick", action="store_true", help="tiny variant, 1 warm-up + 2 timed steps")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 1; 2 with --quick)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps (default 2; --compare-scan: 5 tiny steps, 2 neurostorm passes)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps (default 1)")
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    p.add_argument("--backend", choices=["torch", "mamba-ssm", "all"], default="all")
    p.add_argument("--mask-ratio", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--in-process", action="store_true",
                   help="run every configuration in this process (CPU peak memory then accumulates)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--compare-scan", action="store_true",
                   help="PyTorch code vs fused CPU kernels of the Mamba block, alternating in this process")
    p.add_argument("--single", nargs=2, metavar=("DEVICE", "BACKEND"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.compare_scan:
        return compare_scan(args)
    if args.quick and args.variant == "neurostorm":
        args.variant = "tiny"
    args.batch = args.batch or (2 if args.quick else 1)
    args.steps = args.steps or 2

    if args.single:
        print(json.dumps(run_single(args, *args.single)))
        return 0

    info = machine_info()
    configs = configurations(args.device, args.backend)
    print("# bench_model")
    print(f"config : variant={args.variant} batch={args.batch} steps={args.steps} warmup={args.warmup} "
          f"mask_ratio={args.mask_ratio} grad_checkpointing={args.grad_checkpointing} bf16={args.bf16}")
    print(f"machine: {info['cpu']} | cpu_count={info['cpu_count']} usable={info['cpus_usable']} "
          f"torch_threads={args.threads or info['torch_threads']} | torch {info['torch']} | python "
          f"{info['python']} | cuda={info.get('cuda_device', 'none')} | mamba_ssm={info['mamba_ssm']} | "
          f"cpu scan={info['cpu_scan']}")
    if not configs:
        print("no runnable (device, backend) configuration on this machine")
        return 1
    results = []
    for dev, be in configs:
        if args.in_process:
            res = run_single(args, dev, be)
        else:
            cmd = [sys.executable, os.path.abspath(__file__), "--single", dev, be,
                   "--variant", args.variant, "--batch", str(args.batch), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--mask-ratio", str(args.mask_ratio),
                   "--threads", str(args.threads)]
            cmd += ["--grad-checkpointing"] if args.grad_checkpointing else []
            cmd += ["--bf16"] if args.bf16 else []
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{dev}/{be}: failed\n{proc.stderr[-2000:]}")
                continue
            res = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(res)
    header = (f"{'device':<6} {'backend':<9} {'batch':>5} {'params':>10} {'fwd s/sample':>13} "
              f"{'bwd s/sample':>13} {'step s/sample':>14} {'peak GiB':>9}  peak from")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['device']:<6} {r['backend']:<9} {r['batch']:>5} {r['params']:>10,} "
              f"{r['fwd_s_per_sample']:>13.3f} {r['bwd_s_per_sample']:>13.3f} {r['step_s_per_sample']:>14.3f} "
              f"{r['peak_gb']:>9.2f}  {r['peak_kind']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"machine": info, "args": vars(args), "results": results}, fh, indent=2)
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
