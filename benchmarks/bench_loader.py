"""Is the clip loader the bottleneck of pretraining?

Measures, on this machine:

* loader throughput: clips/s that :class:`bids_regionmae.train.data.ClipDataset`
  delivers through a ``DataLoader`` with 0, 1 and 2 worker processes (memory
  mapped float16 reads of the 96^3 store, average pooling to the model grid,
  brain mask); the first batch (worker start-up) is timed separately;
* model consumption: clips/s of one training step (forward + backward +
  AdamW) of the ``tiny`` variant, and of ``neurostorm`` (skipped with
  ``--quick``; on a CPU one NeuroSTORM step takes minutes);

and says, per worker count, whether the loader keeps up with each model.
The store is a synthetic one written in the participant-level format
(:func:`bids_regionmae.testing.store.write_synthetic_store`) unless
``--store OUTPUT_DIR`` points at real participant-level outputs. The page
cache is warm (the store was just written or read); a cold cache on a
network file system is slower.

Usage::

    .venv/bin/python benchmarks/bench_loader.py --quick
    .venv/bin/python benchmarks/bench_loader.py --workers 0 1 2 4 --variants tiny neurostorm
    .venv/bin/python benchmarks/bench_loader.py --variants neurostorm --loader-only
    .venv/bin/python benchmarks/bench_loader.py --store /out --variants neurostorm --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path


def machine() -> dict[str, object]:
    import torch

    info: dict[str, object] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


def bench_loader(runs: list, img_size: tuple[int, ...], workers: int, batch_size: int, n_batches: int) -> dict:
    """Clips/s through a DataLoader (after the first batch) and the first batch's latency."""
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from bids_regionmae.train.data import ClipDataset

    dataset = ClipDataset(runs, img_size)
    sampler = RandomSampler(dataset, replacement=True, num_samples=batch_size * (n_batches + 1),
                            generator=torch.Generator().manual_seed(0))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        prefetch_factor=2 if workers else None)
    t0 = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    n = 0
    for batch in iterator:
        n += batch["clip"].shape[0]
    dt = time.perf_counter() - t1
    return {"workers": workers, "first_batch_s": round(first, 3), "clips": n, "seconds": round(dt, 3),
            "clips_per_s": round(n / dt, 2) if dt > 0 else float("inf")}


def bench_model(variant: str, batch_size: int, steps: int, device: str, backend: str) -> dict:
    """Clips/s of full training steps (forward, masked loss, backward, AdamW) on random data."""
    import torch

    from bids_regionmae.masking import masked_mse
    from bids_regionmae.models.registry import create_mae, get_spec

    spec = get_spec(variant)
    torch.manual_seed(0)
    model = create_mae(spec, backend=backend).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch_size, 1, *spec.img_size, device=device)
    mask = torch.zeros(batch_size, *spec.token_grid, dtype=torch.bool, device=device)
    mask[:, : spec.token_grid[0] // 2] = True
    use_bf16 = device == "cuda"
    times = []
    for _ in range(steps + 1):  # the first step warms up (allocations, kernels)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=use_bf16):
            recon = model(x, mask)
        loss = masked_mse(recon, x, mask, spec.patch_size)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    steady = times[1:] or times
    per_step = sorted(steady)[len(steady) // 2]
    return {"variant": variant, "img_size": list(spec.img_size), "batch_size": batch_size, "steps": len(steady),
            "s_per_step": round(per_step, 3), "clips_per_s": round(batch_size / per_step, 3),
            "precision": "bf16" if use_bf16 else "fp32"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small store, few batches, tiny model only")
    parser.add_argument("--store", type=Path, default=None, help="existing participant-level output_dir")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=None, help="default: tiny neurostorm (tiny with --quick)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--batches", type=int, default=None, help="batches timed per worker count")
    parser.add_argument("--model-steps", type=int, default=None)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--subjects", type=int, default=None)
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--loader-only", action="store_true",
                        help="skip the model steps (e.g. neurostorm on a CPU: minutes per step)")
    args = parser.parse_args(argv)

    variants = args.variants or (["tiny"] if args.quick else ["tiny", "neurostorm"])
    n_batches = args.batches or (6 if args.quick else 20)
    model_steps = args.model_steps or (2 if args.quick else 3)
    subjects = args.subjects or (2 if args.quick else 4)
    frames = args.frames or (40 if args.quick else 80)

    from bids_regionmae.models.registry import get_spec
    from bids_regionmae.preprocess.store import find_model_ready_runs
    from bids_regionmae.testing.store import write_synthetic_store

    config = {"variants": variants, "workers": args.workers, "batch_size": args.batch_size,
              "timed_batches": n_batches, "model_steps": model_steps, "device": args.device,
              "backend": args.backend, "store": str(args.store) if args.store else
              f"synthetic: {subjects} participants x {frames} frames (96^3 float16)"}
    print("config :", json.dumps(config))
    print("machine:", json.dumps(machine()))

    tmp = None
    try:
        if args.store is None:
            tmp = Path(tempfile.mkdtemp(prefix="bench_loader_"))
            t0 = time.perf_counter()
            write_synthetic_store(tmp, n_subjects=subjects, n_frames=frames, clip_length=20)
            print(f"wrote the synthetic store in {time.perf_counter() - t0:.1f} s")
            store = tmp
        else:
            store = args.store
        runs = find_model_ready_runs(store)
        if not runs:
            print(f"no model-ready runs in {store}", file=sys.stderr)
            return 66

        results: dict[str, list] = {"loader": [], "model": []}
        print(f"\n{'variant':<11} {'workers':>7} {'first batch s':>13} {'loader clips/s':>15}")
        for variant in variants:
            img_size = get_spec(variant).img_size
            for workers in args.workers:
                row = {"variant": variant, **bench_loader(runs, img_size, workers, args.batch_size, n_batches)}
                results["loader"].append(row)
                print(f"{variant:<11} {workers:>7} {row['first_batch_s']:>13.3f} {row['clips_per_s']:>15.2f}")

        print(f"\n{'variant':<11} {'img_size':<20} {'s/step':>8} {'model clips/s':>14}  (batch {args.batch_size}, "
              f"{args.device})")
        for variant in [] if args.loader_only else variants:
            row = bench_model(variant, args.batch_size, model_steps, args.device, args.backend)
            results["model"].append(row)
            print(f"{variant:<11} {str(tuple(row['img_size'])):<20} {row['s_per_step']:>8.3f} "
                  f"{row['clips_per_s']:>14.3f}")

        print("\nverdict (the loader must deliver at least what the model consumes):")
        for model_row in results["model"]:
            need = model_row["clips_per_s"]
            for row in (r for r in results["loader"] if r["variant"] == model_row["variant"]):
                ratio = row["clips_per_s"] / need if need else float("inf")
                verdict = "loader keeps up" if ratio >= 1.0 else "LOADER IS THE BOTTLENECK"
                print(f"  {model_row['variant']:<11} workers={row['workers']}: loader {row['clips_per_s']:.2f} vs "
                      f"model {need:.3f} clips/s -> {ratio:.1f}x, {verdict}")
        if args.json:
            args.json.write_text(json.dumps({"config": config, "machine": machine(), **results}, indent=2))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


if __name__ == "__main__":
    sys.exit(main())
