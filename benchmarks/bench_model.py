#!/usr/bin/env python
"""Time forward + backward of the masked autoencoder per sample, for every backend and device.

Each (device, backend) pair runs in its own subprocess so that the CPU peak
memory (``ru_maxrss``) belongs to that configuration alone; on CUDA the peak
is ``torch.cuda.max_memory_allocated``.

Examples
--------
    python benchmarks/bench_model.py --quick                # tiny variant, CPU, a few seconds
    python benchmarks/bench_model.py                        # neurostorm, all devices/backends here
    python benchmarks/bench_model.py --variant neurostorm --device cuda --batch 4 --json out.json
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

    info["mamba_ssm"] = mamba_ssm_available()
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
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
        peak_kind = "ru_maxrss"
    f, b = min(fwd), min(bwd)
    return {
        "variant": spec.name, "device": device_name, "backend": backend, "batch": args.batch,
        "params": count_parameters(mae), "fwd_s_per_sample": f / args.batch,
        "bwd_s_per_sample": b / args.batch, "step_s_per_sample": (f + b) / args.batch,
        "step_s": f + b, "peak_gb": peak_gb, "peak_kind": peak_kind, "threads": torch.get_num_threads(),
        "bf16": args.bf16,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="neurostorm", help="model variant (default: neurostorm)")
    p.add_argument("--quick", action="store_true", help="tiny variant, 1 warm-up + 2 timed steps")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 1; 2 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 2)")
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
    p.add_argument("--single", nargs=2, metavar=("DEVICE", "BACKEND"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
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
          f"{info['python']} | cuda={info.get('cuda_device', 'none')} | mamba_ssm={info['mamba_ssm']}")
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
