"""Benchmark of fMRIPrep input discovery against plain pybids.

Generates an fMRIPrep-style tree (default 1,000 participants x 2 runs, two
MNI spaces, anat/figures/surfaces/transforms/AROMA/CIFTI/report clutter;
identical files are hard-linked so generation is fast), then times, each in
a fresh Python process so imports count the way they do for a real run:

* cold discovery: ``discover_runs`` with an empty work directory;
* warm discovery: the same call again (cache hit);
* optionally the pybids-backed index (``backend="pybids"``, ignore list,
  ``database_path``), cold and warm;
* plain ``BIDSLayout(fmriprep_dir, validate=False, derivatives=False,
  config=["bids", "derivatives"])``.

The page cache is warm in every case (the tree was just written); dropping it
needs root.

Usage::

    .venv/bin/python benchmarks/bench_discovery.py            # 1,000 x 2
    .venv/bin/python benchmarks/bench_discovery.py --quick    # 100 x 2
    .venv/bin/python benchmarks/bench_discovery.py --participants 300 --keep /tmp/tree
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_COLD_S = 5.0
TARGET_WARM_S = 0.5

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
mode, root, work = sys.argv[1], sys.argv[2], sys.argv[3]
out = {}
if mode in ("fast", "pybids"):
    from bids_regionmae.bids import discover_runs
    from bids_regionmae.config import InputConfig
    out["import_s"] = time.perf_counter() - t0
    t1, c1 = time.perf_counter(), time.process_time()
    res = discover_runs(root, InputConfig(), work_dir=work, backend=mode)
    out["call_s"], out["cpu_s"] = time.perf_counter() - t1, time.process_time() - c1
    out["runs"] = len(res.runs)
    out["skipped"] = len(res.skipped)
    out["cache"] = res.report.cache
elif mode == "layout":
    from bids.layout import BIDSLayout
    out["import_s"] = time.perf_counter() - t0
    t1, c1 = time.perf_counter(), time.process_time()
    layout = BIDSLayout(root, validate=False, derivatives=False, config=["bids", "derivatives"])
    out["call_s"], out["cpu_s"] = time.perf_counter() - t1, time.process_time() - c1
    t2 = time.perf_counter()
    n = len(layout.get(suffix="bold", desc="preproc", extension=".nii.gz", return_type="filename"))
    out["query_s"] = time.perf_counter() - t2
    out["runs"] = n
out["total_s"] = time.perf_counter() - t0
print(json.dumps(out))
"""


def generate(root: Path, participants: int, runs: int) -> float:
    """Write the cluttered tree; return seconds."""
    from bids_regionmae.testing.fmriprep import make_fmriprep_tree

    t0 = time.perf_counter()
    make_fmriprep_tree(root, subjects=[f"{i:04d}" for i in range(1, participants + 1)],
                       runs=[str(r) for r in range(1, runs + 1)],
                       spaces=("MNI152NLin6Asym:res-2", "MNI152NLin2009cAsym"), clutter=True, link=True)
    return time.perf_counter() - t0


def child(mode: str, root: Path, work: Path, timeout: float) -> dict:
    """Run one measurement in a fresh interpreter."""
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD, mode, str(root), str(work)],
                              capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {timeout:.0f} s (--timeout)"}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def count_files(root: Path) -> int:
    """Number of files in the tree."""
    return sum(len(files) for _, _, files in os.walk(root))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--participants", type=int, default=None, help="participants (default 1000)")
    parser.add_argument("--runs", type=int, default=2, help="runs per participant (default 2)")
    parser.add_argument("--quick", action="store_true", help="100 participants")
    parser.add_argument("--skip-pybids", action="store_true", help="skip both pybids measurements")
    parser.add_argument("--skip-pybids-backend", action="store_true",
                        help="skip the pybids-backed discovery (keep plain BIDSLayout)")
    parser.add_argument("--skip-layout", action="store_true", help="skip the plain BIDSLayout measurement")
    parser.add_argument("--keep", type=Path, default=None, help="build the tree here and keep it")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per measurement")
    args = parser.parse_args(argv)
    n = args.participants or (100 if args.quick else 1000)

    import bids

    base = args.keep or Path(tempfile.mkdtemp(prefix="bench_discovery_"))
    root = base / "fmriprep"
    print("== bench_discovery ==")
    print(f"config : {n} participants x {args.runs} runs, spaces MNI152NLin6Asym:res-2 + "
          "MNI152NLin2009cAsym, clutter (anat, figures, surfaces, xfm .h5, AROMA, CIFTI, reports)")
    print(f"machine: nproc={os.cpu_count()} python={platform.python_version()} "
          f"pybids={bids.__version__} platform={platform.platform()}")
    try:
        if not root.exists():
            gen_s = generate(root, n, args.runs)
            print(f"generate: {gen_s:.1f} s, {count_files(root)} files", flush=True)
        else:
            print(f"reusing tree {root} ({count_files(root)} files)", flush=True)
        results: dict[str, dict] = {}
        work = base / "work-fast"
        shutil.rmtree(work, ignore_errors=True)
        plan = [("cold (fast index)", "fast", work), ("warm (fast index)", "fast", work)]
        if not args.skip_pybids and not args.skip_pybids_backend:
            work_p = base / "work-pybids"
            shutil.rmtree(work_p, ignore_errors=True)
            plan += [("cold (pybids index)", "pybids", work_p), ("warm (pybids index)", "pybids", work_p)]
        if not args.skip_pybids and not args.skip_layout:
            plan.append(("plain BIDSLayout", "layout", base / "unused"))
        for name, mode, workdir in plan:
            results[name] = child(mode, root, workdir, args.timeout)
            print(f"  done: {name}: {json.dumps(results[name])}", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nload average (1 min) after the runs: {load:.2f} on {os.cpu_count()} cores")
    print(f"{'measurement':<22} {'call s':>8} {'cpu s':>7} {'import s':>9} {'process s':>10}  runs  result")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<22} ERROR {r['error']}")
            continue
        verdict = ""
        if name.startswith("cold (fast"):
            verdict = f"target <= {TARGET_COLD_S} s: {'PASS' if r['call_s'] <= TARGET_COLD_S else 'FAIL'}"
        elif name.startswith("warm (fast"):
            verdict = f"target <= {TARGET_WARM_S} s: {'PASS' if r['call_s'] <= TARGET_WARM_S else 'FAIL'}"
        elif name == "plain BIDSLayout":
            verdict = f"(+ {r['query_s']:.2f} s for one get())"
        if "cache" in r:
            verdict = f"cache {r['cache']}; " + verdict
        print(f"{name:<22} {r['call_s']:>8.2f} {r['cpu_s']:>7.2f} {r['import_s']:>9.2f} {r['total_s']:>10.2f}  "
              f"{r['runs']:>4}  {verdict}")
    print("\ncall s = wall time inside discover_runs / BIDSLayout() (the targets apply to it); "
          "cpu s = CPU time of that call;\nprocess s = wall time of the whole process, imports included.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
