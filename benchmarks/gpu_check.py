#!/usr/bin/env python3
"""The GPU path, measured in one call: kernels, parity, throughput, memory, torchrun, prediction.

Commands
--------
``prepare`` (on a machine with PyPI access, e.g. the development machine)
    Fill ``.gpu-check/`` with what a bare GPU machine lacks: wheels of the
    app's dependencies that are not in the device image (resolved by pip for
    CPython 3.12 / manylinux x86-64), the mamba-ssm and causal-conv1d sdists
    (versions from the Dockerfile's build arguments) and ``manifest.json``.
``run`` (on the GPU machine; ``benchmarks/gpu_check.sh`` calls it)
    Install the missing wheels, build the kernels for the local GPU only, then
    run every step below, each in its own process with its own time limit,
    continuing past failures, within one overall budget. Writes
    ``OUT/gpu_check.json`` (rewritten after every step, so a killed run still
    leaves valid JSON), ``OUT/gpu_check.log`` and ``OUT/build.log``.
``step NAME`` (internal)
    One step; ``run`` starts these with their options in the environment.

Steps of ``run`` (in order; ``build`` runs in the background while the
CPU-heavy ``store`` and the ``torch``-backend steps run):

=================  ==========================================================
machine            GPU, driver, torch, CUDA, nvcc, CPU, memory, package versions
install            carried wheels that the machine lacks -> a site folder; checks
                   every requirement of pyproject.toml is then met
build              causal-conv1d + mamba-ssm from their sdists, for the local
                   compute capability only (skipped when they already import)
store              synthetic fMRIPrep data -> participant level (model-ready store)
torchrun_pretrain  ``torchrun --nproc_per_node 1`` pretraining, killed (-9) after
                   its checkpoint at step 2, rerun: must resume, 4 steps in all
nccl_ddp           NCCL process group (world size 1), all_reduce, one DDP step
finetune           cross-validated linear probe from the pretrained model
kernels            the kernels import and run on this GPU; the archs they hold
parity             ``pytest -m gpu``: mamba-ssm vs pure-PyTorch, same weights,
                   forward and backward, fp32 and bf16, stated tolerances
throughput         pretraining steps of ``neurostorm`` at batch 1, 8 and the
                   largest that fits: fp32+TF32 (NeuroSTORM's setup) vs bf16
                   autocast (ours), data already on the GPU; clips/s, peak memory
loader             the same steps fed by the real DataLoader from the store
predict            participant level with --model: seconds per participant with
                   and without attribution
=================  ==========================================================

``run --skip-gpu`` runs only what needs no GPU (machine, install, build's
decision); CI runs it in ``tests/test_gpu_check.py``. ``run --device cpu
--variant tiny`` runs every step that can run on a CPU, with the tiny model.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

SCHEMA = "regionmae-gpu-check/1"
REPO = Path(__file__).resolve().parents[1]
NVCC_FILTER = REPO / "scripts" / "nvcc-arch-filter.sh"
DEFAULT_CARRY = REPO / ".gpu-check"
DEFAULT_STATE = Path(tempfile.gettempdir()) / "regionmae-gpu-check"
REPORT_NAME, LOG_NAME, BUILD_LOG_NAME = "gpu_check.json", "gpu_check.log", "build.log"
#: Kernel packages: distribution name -> (Dockerfile build argument with its version, extension module)
KERNEL_PACKAGES = {
    "causal-conv1d": ("CAUSAL_CONV1D_VERSION", "causal_conv1d_cuda"),
    "mamba-ssm": ("MAMBA_SSM_VERSION", "selective_scan_cuda"),
}
#: The device machine (``nvidia-h200`` kind): CPython 3.12 on x86-64 Linux.
DEVICE_PYTHON = "3.12"
DEVICE_PLATFORMS = ("manylinux_2_39_x86_64", "manylinux_2_35_x86_64", "manylinux_2_34_x86_64",
                    "manylinux_2_31_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
                    "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                    "manylinux_2_5_x86_64", "manylinux1_x86_64")
#: Packages of the app's dependency tree that the device image already holds (its package list as read
#: on 2026-11-17), so ``prepare`` does not carry them; ``install`` checks presence again on the machine.
DEVICE_IMAGE_PACKAGES = frozenset({
    "certifi", "charset-normalizer", "click", "cloudpickle", "contourpy", "cycler", "einops", "fonttools",
    "formulaic", "fsspec", "idna", "interface-meta", "jinja2", "joblib", "kiwisolver", "markupsafe", "matplotlib",
    "narwhals", "ninja", "numpy", "packaging", "pandas", "pillow", "pyparsing", "pytest", "python-dateutil",
    "pyyaml", "requests", "safetensors", "scikit-learn", "scipy", "setuptools", "six", "threadpoolctl", "torch",
    "tqdm", "transformers", "triton", "typing-extensions", "urllib3", "wheel", "wrapt",
})
#: What the steps import (``install`` checks they import with the carried wheels).
APP_MODULES = ("bids_regionmae.cli", "bids_regionmae.synthetic", "bids_regionmae.workflows.participant",
               "bids_regionmae.workflows.pretrain", "bids_regionmae.workflows.finetune",
               "bids_regionmae.workflows.predict")
CARRY_LIMIT_MIB = 56  # the device tool takes 64 MiB of working tree per call, the repository included


# =========================================================================== small helpers


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON so that ``path`` always holds a complete document."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def dockerfile_args(path: Path = REPO / "Dockerfile") -> dict[str, str]:
    """``ARG NAME=value`` defaults of the Dockerfile (the kernel versions live there)."""
    args = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\s*ARG\s+([A-Za-z_][A-Za-z0-9_]*)=(\S*)\s*$", line)
        if match:
            args.setdefault(match.group(1), match.group(2).strip("\"'"))
    return args


def kernel_versions() -> dict[str, str]:
    """Distribution -> version pinned by the Dockerfile."""
    args = dockerfile_args()
    return {dist: args[arg] for dist, (arg, _) in KERNEL_PACKAGES.items()}


def app_requirements(exclude: Iterable[str] = ()) -> list[str]:
    """``project.dependencies`` of pyproject.toml, minus the ``exclude`` distributions."""
    import tomllib

    drop = {canonical(n) for n in exclude}
    deps = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    return [d for d in deps if canonical(re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0]) not in drop]


def tail(text: str, n: int = 3000) -> str:
    return text if len(text) <= n else "..." + text[-n:]


# =========================================================================== prepare


def plan_downloads(report: dict[str, Any], assume_present: Iterable[str]) -> list[tuple[str, str]]:
    """(name, version) of every distribution of a ``pip install --report`` that is not assumed present."""
    present = {canonical(n) for n in assume_present}
    out = []
    for item in report.get("install", []):
        meta = item["metadata"]
        if canonical(meta["name"]) not in present:
            out.append((meta["name"], meta["version"]))
    return sorted(out, key=lambda nv: canonical(nv[0]))


def _pip(*args: str, env: dict[str, str] | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def prepare(dest: Path, *, python_version: str = DEVICE_PYTHON, platforms: Sequence[str] = DEVICE_PLATFORMS,
            assume_present: Iterable[str] = DEVICE_IMAGE_PACKAGES, limit_mib: float = CARRY_LIMIT_MIB) -> dict:
    """Download what the device machine lacks into ``dest``; returns the manifest."""
    target = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for plat in platforms:
        target += ["--platform", plat]
    with tempfile.TemporaryDirectory() as tmp:
        reqs = Path(tmp) / "requirements.txt"
        reqs.write_text("\n".join(app_requirements(exclude=["torch"])) + "\n", encoding="utf-8")
        report_path = Path(tmp) / "report.json"
        _pip("install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report_path),
             "--target", str(Path(tmp) / "never"), *target, "-r", str(reqs))
        report = json.loads(report_path.read_text(encoding="utf-8"))
    plan = plan_downloads(report, assume_present)
    for sub in ("wheels", "sdists"):
        shutil.rmtree(dest / sub, ignore_errors=True)
        (dest / sub).mkdir(parents=True)
    _pip("download", "--no-deps", "--quiet", *target, "-d", str(dest / "wheels"), *(f"{n}=={v}" for n, v in plan))
    # the sdists' setup.py imports torch even for metadata; SKIP_CUDA_BUILD keeps it from looking for nvcc
    env = dict(os.environ, MAMBA_SKIP_CUDA_BUILD="TRUE", CAUSAL_CONV1D_SKIP_CUDA_BUILD="TRUE")
    _pip("download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation", "--quiet", "-d", str(dest / "sdists"),
         *(f"{d}=={v}" for d, v in kernel_versions().items()), env=env)
    files = sorted(p for p in dest.rglob("*") if p.is_file() and p.name != "manifest.json")
    total = sum(p.stat().st_size for p in files)
    manifest = {"created": now_iso(), "python": python_version, "platforms": list(platforms),
                "kernels": kernel_versions(), "wheels": [f"{n}=={v}" for n, v in plan],
                "assumed_present": sorted(canonical(n) for n in assume_present),
                "files": {str(p.relative_to(dest)): p.stat().st_size for p in files}, "total_bytes": total}
    write_json_atomic(dest / "manifest.json", manifest)
    print(f"{len(files)} files, {total / 2**20:.1f} MiB in {dest}")
    if total > limit_mib * 2**20:
        raise SystemExit(f"{dest} holds {total / 2**20:.1f} MiB, more than the {limit_mib} MiB a device call can "
                         "carry next to the repository: trim the wheel list (assume more packages present).")
    return manifest


# =========================================================================== the step runner


@dataclass(frozen=True)
class Step:
    """One unit of work of ``run``: a command with a time limit.

    Attributes
    ----------
    name : str
    argv : tuple of str
        Command; its stdout and stderr go to the log.
    limit_s : float
        Seconds it may run (also bounded by what is left of the overall budget).
    what : str
        One line for the report.
    needs_gpu : bool
        Skipped under ``--skip-gpu``.
    after : tuple of str
        Steps that must have finished first (any outcome).
    requires : tuple of str
        Steps that must have passed, else this one is skipped.
    background : bool
        Start it and go on; the first step that lists it in ``after`` or
        ``requires`` waits for it.
    min_s : float
        Not started with less time left than this.
    log_name : str or None
        Its own log file under OUT (else the main log).
    """

    name: str
    argv: tuple[str, ...]
    limit_s: float
    what: str = ""
    needs_gpu: bool = True
    after: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    background: bool = False
    min_s: float = 10.0
    log_name: str | None = None


@dataclass
class _Running:
    step: Step
    proc: subprocess.Popen
    started: float
    limit: float
    log_path: Path
    offset: int
    result_path: Path
    ended: float | None = None

    def watch(self) -> None:
        """Note when the process ends (a background step is joined later)."""
        self.proc.wait()
        self.ended = time.monotonic()


@dataclass
class Runner:
    """Runs steps with time limits, past failures, writing the report after every step.

    Parameters
    ----------
    out : Path
        Folder of the report and the logs.
    budget_s : float
        Overall seconds; steps get what is left when they start.
    env : dict
        Environment of every step (the runner adds ``GPU_CHECK_RESULT``).
    work : Path
        Scratch folder for the steps' result files.
    skip_gpu : bool
    reserve_s : float
        Kept back from every step's limit, to finish the report.
    """

    out: Path
    budget_s: float
    env: dict[str, str]
    work: Path
    skip_gpu: bool = False
    reserve_s: float = 5.0
    meta: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    running: dict[str, _Running] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        self.deadline = self.t0 + self.budget_s
        self.planned: set[str] = set()
        self.started = now_iso()
        self.log_path = self.out / LOG_NAME
        self.log_path.write_text(f"gpu_check {self.started} budget {self.budget_s:.0f} s\n", encoding="utf-8")

    # ------------------------------------------------------------------ logging and report

    def log(self, text: str) -> None:
        with self.log_path.open("a", encoding="utf-8") as fh:
            fh.write(text if text.endswith("\n") else text + "\n")
        print(text.rstrip("\n"), flush=True)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def report(self, complete: bool = False) -> dict[str, Any]:
        data = {"schema": SCHEMA, "complete": complete, "started": self.started, "updated": now_iso(),
                "wall_s": round(time.monotonic() - self.t0, 1), "budget_s": self.budget_s, **self.meta,
                "steps": self.records, "summary": summarize(self.records)}
        write_json_atomic(self.out / REPORT_NAME, data)
        return data

    def _record(self, step: Step, status: str, **fields: Any) -> dict[str, Any]:
        rec = {"name": step.name, "what": step.what, "status": status, **fields}
        self.records.append(rec)
        self.log(f"--- {step.name}: {status}" + (f" ({fields['reason']})" if fields.get("reason") else "")
                 + (f" in {fields['seconds']:.1f} s" if "seconds" in fields else ""))
        self.report()
        return rec

    def status_of(self, name: str) -> str | None:
        for rec in self.records:
            if rec["name"] == name:
                return rec["status"]
        return None

    # ------------------------------------------------------------------ running

    def run(self, steps: Sequence[Step]) -> dict[str, Any]:
        """Run ``steps`` in order; returns the final report.

        A step in ``requires`` that is not among ``steps`` (left out with
        ``--only``/``--skip``) counts as done: its outputs may be there from
        an earlier call on the same machine.
        """
        self.planned = {step.name for step in steps}

        def stop(signum: int, _frame: Any) -> None:
            raise SystemExit(f"stopped by signal {signum}")

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
        self.report()  # valid JSON from the start
        try:
            for step in steps:
                self._run_one(step)
            for name in list(self.running):
                self._finish(name)
        except BaseException:
            self.report()  # what is done so far, marked incomplete
            raise
        finally:
            for name in list(self.running):  # interrupted: stop what still runs
                self._stop(self.running.pop(name).proc)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.report(complete=True)

    def _skip_reason(self, step: Step) -> str | None:
        if self.skip_gpu and step.needs_gpu:
            return "--skip-gpu: needs a GPU"
        for name in step.requires:
            if name not in self.planned:
                continue
            status = self.status_of(name)
            if status != "passed":
                return f"needs {name}, which {'did not run' if status is None else status}"
        if self.left() - self.reserve_s < step.min_s:
            return f"out of time: {max(self.left(), 0):.0f} s of the {self.budget_s:.0f} s budget left"
        return None

    def _run_one(self, step: Step) -> None:
        for name in (*step.after, *step.requires):
            if name in self.running:
                self._finish(name)
        reason = self._skip_reason(step)
        if reason:
            self._record(step, "skipped", reason=reason)
            return
        limit = min(step.limit_s, self.left() - self.reserve_s)
        log_path = self.out / step.log_name if step.log_name else self.log_path
        result_path = self.work / f"{step.name}.result.json"
        result_path.unlink(missing_ok=True)
        header = f"\n=== {now_iso()} {step.name} (limit {limit:.0f} s): {' '.join(step.argv)}\n"
        if step.log_name:
            log_path.write_text(header, encoding="utf-8")
            self.log(f"=== {step.name} started{' in the background' if step.background else ''}, "
                     f"output in {step.log_name}")
        else:
            self.log(header)
        offset = log_path.stat().st_size
        env = dict(self.env, GPU_CHECK_RESULT=str(result_path))
        with log_path.open("ab") as fh:  # own process group (to stop its children too), same session
            proc = subprocess.Popen(list(step.argv), stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                    process_group=0)
        run = self.running[step.name] = _Running(step, proc, time.monotonic(), limit, log_path, offset, result_path)
        threading.Thread(target=run.watch, daemon=True).start()
        if not step.background:
            self._finish(step.name)

    @staticmethod
    def _stop(proc: subprocess.Popen) -> None:
        """Terminate the step's whole process group (its children too), then kill it."""
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def _finish(self, name: str) -> None:
        run = self.running[name]  # stays listed until stopped: an interrupt in between still stops it
        timed_out = False
        try:
            run.proc.wait(timeout=max(run.started + run.limit - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            timed_out = True
        self._stop(run.proc)  # also ends children a finished step left behind
        del self.running[name]
        seconds = round((run.ended if run.ended and not timed_out else time.monotonic()) - run.started, 1)
        with run.log_path.open("rb") as fh:
            fh.seek(run.offset)
            output = fh.read().decode("utf-8", "replace")
        if run.step.log_name:
            self.log(f"... last lines of {run.step.log_name}:\n" + "\n".join(output.splitlines()[-40:]))
        fields: dict[str, Any] = {"seconds": seconds, "limit_s": round(run.limit, 1)}
        result: dict[str, Any] = {}
        if run.result_path.is_file():
            try:
                result = json.loads(run.result_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                fields["error"] = f"unreadable result file: {exc}"
        if timed_out:
            status = "timeout"
            fields["reason"] = f"stopped after {run.limit:.0f} s (its time limit)"
            fields["error"] = tail(output, 2000)
        elif run.proc.returncode != 0:
            status = "failed"
            fields["returncode"] = run.proc.returncode
            fields["error"] = tail(output, 3000)
        else:
            status = str(result.pop("status", "passed"))
            if "reason" in result:
                fields["reason"] = result.pop("reason")
            if status == "failed":
                fields["error"] = tail(output, 3000)
        if result:
            fields["result"] = result
        self._record(run.step, status, **fields)


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counts per status, and the headline numbers of the steps that produced them."""
    summary: dict[str, Any] = {}
    for rec in records:
        summary.setdefault(rec["status"], []).append(rec["name"])
    by_name = {rec["name"]: rec.get("result") or {} for rec in records}
    headline = {}
    for step, keys in (("kernels", ("backend_auto", "archs")), ("parity", ("passed", "failed", "max_errors")),
                       ("throughput", ("backend", "bf16_speedup_batch8", "bf16_speedup_largest", "largest_batch")),
                       ("loader", ("verdict",)), ("predict", ("seconds_per_participant",)),
                       ("torchrun_pretrain", ("resumed_from_step",)), ("nccl_ddp", ("nccl_version",))):
        for key in keys:
            if key in by_name.get(step, {}):
                headline[f"{step}.{key}"] = by_name[step][key]
    summary["headline"] = headline
    return summary


# =========================================================================== the plan


def plan(opts: dict[str, Any]) -> list[Step]:
    """The steps of ``run``, in order, with their time limits (seconds)."""
    me = (sys.executable, str(Path(__file__).resolve()), "step")
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1")
    return [
        Step("machine", (*me, "machine"), 60, "GPU, driver, torch, CUDA, nvcc, package versions", needs_gpu=False),
        Step("install", (*me, "install"), 120, "carried wheels the machine lacks -> site folder", needs_gpu=False),
        Step("build", (*me, "build"), 270, "causal-conv1d + mamba-ssm for the local GPU only", needs_gpu=False,
             after=("install",), background=True, min_s=60, log_name=BUILD_LOG_NAME),
        Step("store", (*me, "store"), 150, "synthetic fMRIPrep data -> participant level", after=("install",)),
        Step("torchrun_pretrain", (*me, "torchrun_pretrain"), 150,
             "torchrun pretraining: checkpoint, kill -9, resume", requires=("store",)),
        Step("nccl_ddp", (*torchrun, str(Path(__file__).resolve()), "step", "nccl_ddp"), 60,
             "NCCL process group, all_reduce, one DDP step", after=("install",)),
        Step("finetune", (*me, "finetune"), 120, "cross-validated linear probe (for predict)",
             requires=("store",), after=("torchrun_pretrain",)),
        Step("kernels", (*me, "kernels"), 60, "the kernels import and run here; their archs", after=("build",)),
        Step("parity", (*me, "parity"), 150, "pytest -m gpu: mamba-ssm vs pure PyTorch", after=("build",)),
        Step("throughput", (*me, "throughput"), 150, "clips/s and peak memory, fp32+TF32 vs bf16, data on GPU",
             after=("build",), min_s=30),
        Step("loader", (*me, "loader"), 100, "the same steps fed by the real DataLoader", requires=("store",),
             after=("build",), min_s=30),
        Step("predict", (*me, "predict"), 150, "seconds per participant with and without attribution",
             requires=("finetune",), after=("build",), min_s=30),
    ]


def step_environment(opts: dict[str, Any]) -> dict[str, str]:
    """Environment of every step: the repository and the site folder first on the path, offline."""
    site = Path(opts["state"]) / "site"
    path = [str(REPO), str(site)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), PYTHONUNBUFFERED="1", REGIONMAE_OFFLINE="1",
               MPLBACKEND="Agg", GPU_CHECK_OPTIONS=json.dumps(opts), HF_HUB_OFFLINE="1",
               TRITON_CACHE_DIR=str(Path(opts["state"]) / "triton-cache"))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def run(opts: dict[str, Any], steps: Sequence[Step] | None = None) -> dict[str, Any]:
    """Run the plan (or ``steps``) and write the report; returns it."""
    out, state = Path(opts["out"]), Path(opts["state"])
    steps = list(plan(opts) if steps is None else steps)
    scale = float(opts.get("limit_scale") or 1.0)
    steps = [replace(s, limit_s=s.limit_s * scale) for s in steps]
    if opts.get("only"):
        steps = [s for s in steps if s.name in opts["only"]]
    if opts.get("skip"):
        steps = [s for s in steps if s.name not in opts["skip"]]
    runner = Runner(out, float(opts["budget"]), step_environment(opts), state / "results",
                    skip_gpu=bool(opts.get("skip_gpu")))
    runner.meta = {"command": sys.argv, "options": opts, "repo_commit": _git_commit()}
    report = runner.run(steps)
    runner.log("\n" + format_summary(report))
    for path in sorted(out.glob("*.log")):
        cap_file(path)
    return report


def cap_file(path: Path, limit: int = 15 * 2**20) -> None:
    """Keep the first and last ``limit/2`` bytes of a file larger than ``limit`` (files come back up to 16 MiB)."""
    size = path.stat().st_size
    if size <= limit:
        return
    with path.open("rb") as fh:
        head = fh.read(limit // 2)
        fh.seek(size - limit // 2)
        end = fh.read()
    path.write_bytes(head + f"\n[... {size - len(head) - len(end)} bytes cut ...]\n".encode() + end)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def format_summary(report: dict[str, Any]) -> str:
    lines = [f"gpu_check: {report['wall_s']:.0f} s of {report['budget_s']:.0f} s"]
    for rec in report["steps"]:
        lines.append(f"  {rec['name']:<18} {rec['status']:<8} {rec.get('seconds', 0):>6.1f} s  {rec.get('reason', '')}")
    for key, value in report["summary"].get("headline", {}).items():
        lines.append(f"  {key}: {json.dumps(value, default=str)[:300]}")
    return "\n".join(lines)


# =========================================================================== steps (run in their own process)


def _opts() -> dict[str, Any]:
    return json.loads(os.environ.get("GPU_CHECK_OPTIONS", "{}"))


def _paths(opts: dict[str, Any]) -> dict[str, Path]:
    state = Path(opts["state"])
    return {"state": state, "site": state / "site", "built": state / "built-wheels", "data": state / "data",
            "work": state / "work", "carry": Path(opts["carry"])}


def _run(cmd: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], **kwargs)


def _cuda_home() -> str | None:
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:  # noqa: BLE001 - torch without cpp_extension support
        return None
    return CUDA_HOME


def _tool_version(cmd: Sequence[str]) -> str | None:
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or out.stderr.strip() or None


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def step_machine(opts: dict[str, Any]) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable,
                            "platform": platform.platform(), "cpu_count": os.cpu_count(),
                            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                            "cuda_available": torch.cuda.is_available()}
    with contextlib.suppress(OSError):
        meminfo = Path("/proc/meminfo").read_text()
        info["memory_gib"] = round(int(re.search(r"MemTotal:\s+(\d+)", meminfo).group(1)) / 2**20, 1)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                    compute_capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                    bf16_supported=torch.cuda.is_bf16_supported())
        smi = _tool_version(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        info["driver"] = smi.splitlines()[0] if smi else None
    cuda_home = _cuda_home()
    info["cuda_home"] = cuda_home
    nvcc = Path(cuda_home) / "bin" / "nvcc" if cuda_home else None
    version = _tool_version([str(nvcc), "--version"]) if nvcc and nvcc.exists() else None
    info["nvcc"] = version.splitlines()[-1] if version else None
    info["packages"] = {name: _dist_version(name) for name in (
        "numpy", "einops", "triton", "transformers", "pytest", "ninja", "mamba-ssm", "causal-conv1d", "nibabel",
        "pybids", "nilearn", "templateflow", "pydantic")}
    return info


def _base_paths(site: Path) -> list[str]:
    """``sys.path`` without the repository and the site folder: what the machine itself has."""
    drop = {str(site.resolve()), str(REPO)}
    return [p for p in sys.path if p and str(Path(p).resolve()) not in drop]


def installed_versions(paths: Sequence[str]) -> dict[str, str]:
    """Canonical distribution name -> version of every distribution found on ``paths``."""
    from importlib import metadata

    found: dict[str, str] = {}
    for dist in metadata.distributions(path=list(paths)):
        name = dist.metadata.get("Name")
        if name:
            found.setdefault(canonical(name), dist.version)
    return found


def unmet_requirements(requirements: Iterable[str], versions: dict[str, str]) -> list[str]:
    """Requirements (PEP 508 strings) that ``versions`` does not satisfy, with what is there."""
    from packaging.requirements import Requirement

    unmet = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        have = versions.get(canonical(req.name))
        if have is None or (req.specifier and not req.specifier.contains(have, prereleases=True)):
            unmet.append(f"{text} (found: {have or 'nothing'})")
    return unmet


def step_install(opts: dict[str, Any]) -> dict[str, Any]:
    from packaging.utils import parse_wheel_filename

    p = _paths(opts)
    p["site"].mkdir(parents=True, exist_ok=True)
    base = installed_versions(_base_paths(p["site"]))
    in_site = installed_versions([str(p["site"])])
    wheels = sorted((p["carry"] / "wheels").glob("*.whl"))
    todo, present = [], {}
    for wheel in wheels:
        name, version, _, _ = parse_wheel_filename(wheel.name)
        name = canonical(name)
        if name in base:
            present[name] = base[name]
        elif in_site.get(name) != str(version):
            todo.append(wheel)
    if todo:
        proc = _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                     "--no-cache-dir", "--disable-pip-version-check", "--upgrade", "--target", p["site"], *todo])
        if proc.returncode != 0:
            raise SystemExit(f"pip install into {p['site']} failed ({proc.returncode})")
    versions = {**base, **installed_versions([str(p["site"])])}
    unmet = unmet_requirements(app_requirements(), versions)
    result: dict[str, Any] = {"site": str(p["site"]), "carried_wheels": len(wheels),
                              "installed": sorted(w.name for w in todo), "already_there": present, "unmet": unmet}
    if not wheels:
        result["note"] = f"no carried wheels in {p['carry'] / 'wheels'} (run `gpu_check.py prepare` first)"
    # the modules the steps use, imported with the site folder on the path (catches a missing transitive need)
    check = subprocess.run([sys.executable, "-c", "import " + ", ".join(APP_MODULES)], capture_output=True, text=True)
    result["import_error"] = check.stderr.strip().splitlines()[-1] if check.returncode else None
    problems = ([f"{len(unmet)} requirement(s) of pyproject.toml unmet: " + "; ".join(unmet)] if unmet else []) + (
        [f"the app does not import: {result['import_error']}"] if check.returncode else [])
    if problems:
        result.update(status="failed", reason=" ".join(problems))
    return result


def kernels_importable() -> dict[str, str | None]:
    """Extension module -> None if it imports, else the error."""
    import importlib

    import torch  # noqa: F401  (the extensions need torch's libraries loaded first)

    errors: dict[str, str | None] = {}
    for _, module in KERNEL_PACKAGES.values():
        try:
            importlib.import_module(module)
            errors[module] = None
        except Exception as exc:  # noqa: BLE001 - ImportError, OSError from a broken extension
            errors[module] = f"{type(exc).__name__}: {exc}"
    return errors


def build_decision(import_errors: dict[str, str | None], cuda_available: bool, nvcc: str | None,
                   sdists: dict[str, Path | None]) -> tuple[str, str, list[str]]:
    """What ``build`` does: ``("skip"|"build"|"fail", reason, distributions to build)``.

    Parameters
    ----------
    import_errors : dict
        Extension module -> None (imports) or the import error.
    cuda_available : bool
    nvcc : str or None
        Path of nvcc, if found.
    sdists : dict
        Distribution -> its carried sdist (None: not carried).
    """
    missing = [dist for dist, (_, module) in KERNEL_PACKAGES.items() if import_errors.get(module) is not None]
    if not missing:
        return "skip", "already importable", []
    if not cuda_available:
        return "skip", "no CUDA device", []
    if nvcc is None:
        return "fail", "nvcc not found (set CUDA_HOME)", missing
    absent = [dist for dist in missing if sdists.get(dist) is None]
    if absent:
        return "fail", f"no sdist of {', '.join(absent)} in the carried sdists (run `gpu_check.py prepare`)", missing
    return "build", f"{', '.join(missing)} not importable", missing


def _find_sdist(folder: Path, dist: str, version: str) -> Path | None:
    stem = f"{dist.replace('-', '_')}-{version}"
    for path in sorted(folder.glob("*.tar.gz")):
        if canonical(path.name[: -len(".tar.gz")]) == canonical(stem):
            return path
    return None


def elf_archs(library: Path, cuda_home: str | None) -> list[str]:
    """GPU architectures with machine code (``sm_XX``) in ``library``, read by cuobjdump."""
    cuobjdump = Path(cuda_home or "/usr/local/cuda") / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        found = shutil.which("cuobjdump")
        if not found:
            return []
        cuobjdump = Path(found)
    out = subprocess.run([str(cuobjdump), "--list-elf", str(library)], capture_output=True, text=True, timeout=120)
    return sorted(set(re.findall(r"\.(sm_\d+[a-z]?)\.", out.stdout)))


def kernel_libraries() -> dict[str, Path]:
    """Extension module -> its shared library, for the importable ones."""
    import importlib.util

    found = {}
    for _, module in KERNEL_PACKAGES.values():
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.origin:
            found[module] = Path(spec.origin)
    return found


def step_build(opts: dict[str, Any]) -> dict[str, Any]:
    import torch

    p = _paths(opts)
    errors = kernels_importable()
    cuda = torch.cuda.is_available()
    cuda_home = _cuda_home()
    nvcc = str(Path(cuda_home) / "bin" / "nvcc") if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists() else None
    versions = kernel_versions()
    sdists = {d: _find_sdist(p["carry"] / "sdists", d, v) for d, v in versions.items()}
    action, reason, todo = build_decision(errors, cuda, nvcc, sdists)
    result: dict[str, Any] = {"action": action, "import_errors": errors, "nvcc": nvcc, "versions": versions}
    print(f"build: {action} ({reason})", flush=True)
    if action == "skip":
        if reason == "already importable":
            result["archs"] = {m: elf_archs(lib, cuda_home) for m, lib in kernel_libraries().items()}
        return {**result, "status": "passed" if reason == "already importable" else "skipped", "reason": reason}
    if action == "fail":
        return {**result, "status": "failed", "reason": reason}
    major, minor = torch.cuda.get_device_capability(0)
    arch = opts.get("arch") or f"{major}.{minor}"
    jobs = int(opts.get("max_jobs") or os.cpu_count() or 4)
    shutil.rmtree(p["built"], ignore_errors=True)
    p["built"].mkdir(parents=True)
    # PYTORCH_NVCC goes verbatim into ninja's command lines: "bash SCRIPT" works whatever the file's mode
    env = dict(os.environ, MAMBA_FORCE_BUILD="TRUE", CAUSAL_CONV1D_FORCE_BUILD="TRUE", TORCH_CUDA_ARCH_LIST=arch,
               NVCC_ARCHS=arch, PYTORCH_NVCC=f"bash {shlex.quote(str(NVCC_FILTER))}", NVCC_REAL=nvcc,
               CUDA_HOME=str(cuda_home),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    result["ninja"] = shutil.which("ninja", path=env["PATH"])
    if result["ninja"] is None:  # torch would compile without ninja, but then ignore PYTORCH_NVCC: every arch
        return {**result, "status": "failed", "reason": "ninja not found (torch runs PYTORCH_NVCC in ninja builds "
                "only; without it the kernels compile for every architecture their setup.py lists)"}
    result.update(arch=arch, max_jobs=jobs)
    save_partial(result)
    procs = {}
    t0 = time.perf_counter()
    for dist in todo:  # in parallel: the build is bound by its slowest translation units
        share = jobs if dist == "mamba-ssm" else max(jobs // 2, 1)
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index",
               "--disable-pip-version-check", "--wheel-dir", str(p["built"]), str(sdists[dist])]
        print("+", f"MAX_JOBS={share}", " ".join(cmd), flush=True)
        procs[dist] = subprocess.Popen(cmd, env=dict(env, MAX_JOBS=str(share)))
    codes = {dist: proc.wait() for dist, proc in procs.items()}
    result.update(build_seconds=round(time.perf_counter() - t0, 1), returncodes=codes)
    if any(codes.values()):
        return {**result, "status": "failed", "reason": f"pip wheel failed: {codes}"}
    wheels = sorted(p["built"].glob("*.whl"))
    proc = _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                 "--disable-pip-version-check", "--upgrade", "--target", p["site"], *wheels])
    if proc.returncode != 0:
        return {**result, "status": "failed", "reason": "installing the built wheels failed"}
    check = subprocess.run([sys.executable, "-c", "import json, sys; sys.path.insert(0, sys.argv[1]); "
                            "from gpu_check import kernels_importable; print(json.dumps(kernels_importable()))",
                            str(Path(__file__).parent)], capture_output=True, text=True)
    result["import_errors"] = (json.loads(check.stdout.strip().splitlines()[-1]) if check.returncode == 0
                               else check.stderr)
    result["wheels"] = {w.name: w.stat().st_size for w in wheels}
    result["archs"] = {lib.name: elf_archs(lib, cuda_home) for lib in sorted(p["site"].glob("*_cuda*.so"))}
    want = "sm_" + arch.replace(".", "").replace("+PTX", "")
    if not isinstance(result["import_errors"], dict) or any(result["import_errors"].values()):
        return {**result, "status": "failed", "reason": "built, but the extensions do not import"}
    if result["archs"] and any(want not in found for found in result["archs"].values()):
        return {**result, "status": "failed", "reason": f"built without {want} machine code: {result['archs']}"}
    if any(found and found != [want] for found in result["archs"].values()):
        result["note"] = f"more than {want} compiled: the nvcc filter was bypassed"
    return result


# ---------------------------------------------------------------------------------------- data


def _cli(args: Sequence[str], *, env: dict[str, str] | None = None, timeout: float | None = None,
         check: bool = True) -> tuple[float, subprocess.CompletedProcess]:
    """Run ``python -m bids_regionmae.cli ARGS``; (seconds, process)."""
    t0 = time.perf_counter()
    proc = _run([sys.executable, "-m", "bids_regionmae.cli", *args], env=env, timeout=timeout)
    seconds = round(time.perf_counter() - t0, 1)
    if check and proc.returncode != 0:
        raise SystemExit(f"regionmae {' '.join(args)} exited with {proc.returncode}")
    return seconds, proc


def _dirs(opts: dict[str, Any]) -> tuple[Path, Path]:
    data = _paths(opts)["data"]
    return data / "fmriprep", data / "derivatives"


def step_store(opts: dict[str, Any]) -> dict[str, Any]:
    from bids_regionmae.preprocess.store import find_model_ready_runs
    from bids_regionmae.synthetic import generate_dataset

    fmriprep, out = _dirs(opts)
    n, frames = int(opts["subjects"]), int(opts["frames"])
    if len(find_model_ready_runs(out)) == n:
        return {"reused": str(out), "runs": n, "frames": frames}
    shutil.rmtree(fmriprep.parent, ignore_errors=True)
    t0 = time.perf_counter()
    generate_dataset(fmriprep, n_subjects=n, n_frames=frames, seed=0)
    generate_s = round(time.perf_counter() - t0, 1)
    nprocs = max(min(n, (os.cpu_count() or 2) // 2), 1)
    seconds, _ = _cli([fmriprep, out, "participant", "--nprocs", str(nprocs), "--omp-nthreads", "1"])
    runs = find_model_ready_runs(out)
    size = sum(f.stat().st_size for f in out.rglob("*_desc-modelready_bold.npy"))
    return {"subjects": n, "frames": frames, "runs": len(runs), "generate_s": generate_s, "participant_s": seconds,
            "participant_nprocs": nprocs, "store_gib": round(size / 2**30, 2)}


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _model_dirs(out: Path, prefix: str) -> list[Path]:
    return sorted(d for d in (out / "models").glob(f"{prefix}*") if d.is_dir())


def step_torchrun_pretrain(opts: dict[str, Any]) -> dict[str, Any]:
    """torchrun pretraining; kill -9 once the checkpoint of step 2 exists; rerun; it must resume."""
    from bids_regionmae.train.resume_state import RECORD_NAME  # the engine's checkpoint record

    fmriprep, out = _dirs(opts)
    for d in _model_dirs(out, "pretrain_"):
        shutil.rmtree(d)
    steps = 4
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
            "-m", "bids_regionmae.cli", fmriprep, out, "group", "--stage", "pretrain", "--variant", opts["variant"],
            "--backend", opts["early_backend"], "--device", opts["device"], "--batch-size", "2",
            "--max-steps", str(steps), "--checkpoint-every", "1", "--num-workers", "2", "--seed", "0", "-v"]
    t0 = time.perf_counter()
    first = subprocess.Popen([str(a) for a in args], process_group=0)  # its group: kill -9 agent and worker
    killed_at = None
    try:
        while first.poll() is None:
            dirs = _model_dirs(out, "pretrain_")
            if dirs and (dirs[0] / "checkpoints" / RECORD_NAME).is_file() and (dirs[0] / "train_log.csv").is_file():
                rows = _read_csv(dirs[0] / "train_log.csv")
                if len(rows) >= 2:
                    killed_at = len(rows)
                    break
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    first_s = round(time.perf_counter() - t0, 1)
    if killed_at is None:
        return {"status": "failed", "first_run_s": first_s, "returncode": first.returncode,
                "reason": "the first run ended before it could be killed after step 2 (resume not exercised)"}
    t1 = time.perf_counter()
    second = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    sys.stdout.write(second.stdout[-6000:] + second.stderr[-6000:])
    second_s = round(time.perf_counter() - t1, 1)
    model_dir = _model_dirs(out, "pretrain_")[0]
    rows = _read_csv(model_dir / "train_log.csv")
    resumed = re.search(r"resuming from \S+ at step (\d+)/(\d+)", second.stderr + second.stdout)
    config = (model_dir / "regionmae_config.toml").read_text(encoding="utf-8")
    result = {"model_dir": str(model_dir), "killed_after_rows": killed_at, "first_run_s": first_s,
              "second_run_s": second_s, "returncode": second.returncode, "steps_logged": [r.get("step") for r in rows],
              "resumed_from_step": int(resumed.group(1)) if resumed else None,
              "world_size": re.findall(r"world_size = (\d+)", config),
              "clips_per_s": [r.get("clips_per_s") for r in rows], "backend": opts["early_backend"]}
    problems = []
    if second.returncode != 0:
        problems.append(f"the rerun exited with {second.returncode}")
    if not resumed:
        problems.append("the rerun did not log 'resuming from ... at step N'")
    if len(rows) != steps or len({r.get("step") for r in rows}) != steps:
        problems.append(f"train_log.csv has steps {result['steps_logged']}, expected {steps} distinct ones")
    if problems:
        result.update(status="failed", reason="; ".join(problems))
    return result


def step_nccl_ddp(opts: dict[str, Any]) -> dict[str, Any] | None:
    """Under torchrun: an NCCL group, all_reduce, and one DDP training step of the tiny model."""
    import torch
    import torch.distributed as dist

    from bids_regionmae.models import create_mae

    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if opts["device"] == "cuda" else torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, device_id=device)
    else:
        dist.init_process_group(backend=backend)
    init_s = round(time.perf_counter() - t0, 2)
    value = torch.ones(4, device=device) * (dist.get_rank() + 1)
    dist.all_reduce(value)
    torch.manual_seed(0)
    model = create_mae("tiny", backend=opts["early_backend"]).to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local] if device.type == "cuda" else None)
    x = torch.randn((2, 1) + model.spec.img_size, device=device)
    mask = torch.rand((2,) + model.spec.token_grid, device=device) < 0.5
    loss = (ddp(x, mask) - x).square().mean()
    loss.backward()
    grads_finite = all(torch.isfinite(p.grad).all().item() for p in model.parameters() if p.grad is not None)
    dist.barrier()
    result = {"backend": backend, "world_size": dist.get_world_size(), "init_s": init_s,
              "all_reduce": value.tolist(), "loss": float(loss), "grads_finite": grads_finite,
              "nccl_version": ".".join(map(str, torch.cuda.nccl.version())) if backend == "nccl" else None}
    dist.destroy_process_group()
    if not grads_finite or value[0].item() != sum(range(1, result["world_size"] + 1)):
        result.update(status="failed", reason="all_reduce or DDP gradients wrong")
    return result if int(os.environ.get("RANK", "0")) == 0 else None


def step_finetune(opts: dict[str, Any]) -> dict[str, Any]:
    fmriprep, out = _dirs(opts)
    pretrained = next(iter(_model_dirs(out, "pretrain_")), None)
    if pretrained is None:
        raise SystemExit(f"no pretrained model in {out / 'models'} (see torchrun_pretrain)")
    for d in _model_dirs(out, "finetune_"):
        shutil.rmtree(d)
    seconds, _ = _cli([fmriprep, out, "group", "--stage", "finetune", "--target", "diagnosis", "--model", pretrained,
                       "--folds", "2", "--epochs", "1", "--batch-size", "4", "--val-fraction", "0",
                       "--backend", opts["early_backend"], "--device", opts["device"], "--seed", "0", "-v"])
    return {"seconds": seconds, "model_dir": str(_model_dirs(out, "finetune_")[0]), "backend": opts["early_backend"]}


# ---------------------------------------------------------------------------------------- GPU steps


def step_kernels(opts: dict[str, Any]) -> dict[str, Any]:
    import torch

    from bids_regionmae.models.mamba import Mamba, kernel_error, resolve_backend

    if not torch.cuda.is_available():
        return NO_CUDA
    device = torch.device("cuda")
    result: dict[str, Any] = {"versions": {d: _dist_version(d) for d in KERNEL_PACKAGES},
                              "import_errors": kernels_importable(),
                              "archs": {m: elf_archs(lib, _cuda_home()) for m, lib in kernel_libraries().items()}}
    result["kernel_error"] = kernel_error(device)
    result["backend_auto"] = resolve_backend("auto", device)
    if result["kernel_error"] is not None:
        return {**result, "status": "failed", "reason": f"kernels do not run here: {result['kernel_error']}"}
    torch.manual_seed(0)
    layer = Mamba(36, backend="torch").to(device)
    x = torch.randn(64, 256, 36, device=device)
    with torch.no_grad():
        ref = layer(x)
        layer.backend = "mamba-ssm"
        got = layer(x)
    result["one_layer_rel_err"] = float((got - ref).norm() / ref.norm())
    if not result["one_layer_rel_err"] <= 1e-4:  # fp32, TF32 off: rounding-level (tests/test_models.py)
        return {**result, "status": "failed", "reason": f"one Mamba layer differs: {result['one_layer_rel_err']:.2e}"}
    return result


def _junit(path: Path) -> dict[str, Any]:
    import xml.etree.ElementTree as ET

    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "failed", "skipped": "skipped"}[tag]
                message = (node.get("message") or "")[:500]
                break
        else:
            message = ""
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "message": message,
                      **({"values": props} if props else {})})
    return {"cases": cases}


def step_parity(opts: dict[str, Any]) -> dict[str, Any]:
    work = _paths(opts)["work"]
    work.mkdir(parents=True, exist_ok=True)
    junit = work / "parity-junit.xml"
    junit.unlink(missing_ok=True)
    proc = _run([sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q", "-rA", "-s",
                 "--junitxml", junit, "tests/test_models.py", "tests/test_masking.py"], cwd=REPO)
    if not junit.is_file():
        return {"status": "failed", "reason": f"pytest exited with {proc.returncode} and wrote no report"}
    result = _junit(junit)
    counts = {k: sum(c["outcome"] == k for c in result["cases"]) for k in ("passed", "failed", "skipped")}
    result.update(counts, returncode=proc.returncode)
    result["max_errors"] = {c["test"].rsplit("::", 1)[-1]: c["values"] for c in result["cases"] if c.get("values")}
    if counts["failed"] or proc.returncode not in (0, 5):
        result.update(status="failed", reason=f"{counts['failed']} gpu test(s) failed")
    elif not counts["passed"]:
        result.update(status="skipped", reason="every gpu test skipped (no CUDA or no mamba_ssm)")
    return result


@dataclass(frozen=True)
class Setup:
    """A training precision setup of the throughput comparison."""

    name: str
    tf32: bool
    bf16: bool


#: NeuroSTORM's reference: fp32 with TF32 matmuls (``set_float32_matmul_precision("high")``);
#: ours: bf16 autocast with torch's defaults (the engine's ``precision="bf16"``).
SETUPS = (Setup("fp32+tf32", tf32=True, bf16=False), Setup("bf16", tf32=False, bf16=True))


class _Bench:
    """Pretraining steps as the engine takes them (step function, autocast, backward, AdamW)."""

    def __init__(self, variant: str, backend: str, device: Any, setup: Setup) -> None:
        import torch

        from bids_regionmae.masking import build_masker
        from bids_regionmae.models import create_mae
        from bids_regionmae.testing.store import synthetic_labels
        from bids_regionmae.train.engine import default_param_groups
        from bids_regionmae.train.pretrain import MaskingSetup, make_step_fn

        self.torch, self.device, self.setup, self.backend = torch, device, setup, backend
        torch.backends.cuda.matmul.allow_tf32 = setup.tf32  # = set_float32_matmul_precision("high"|"highest")
        torch.manual_seed(0)
        self.model = create_mae(variant, backend=backend).to(device).train()
        spec = self.model.spec
        self.spec = spec
        labels = torch.as_tensor(synthetic_labels(spec.img_size[:3])).long()
        masker = build_masker("random", labels, spec.patch_size, ratio=0.5, T=spec.img_size[3], device=device)
        self.step_fn = make_step_fn(MaskingSetup(masker=masker, patch_size=spec.patch_size))
        self.opt = torch.optim.AdamW(default_param_groups(self.model, 0.01), lr=5e-5)
        self.steps_done = 0

    def batch(self, size: int) -> dict[str, Any]:
        torch = self.torch
        return {"clip": torch.randn((size, 1) + self.spec.img_size, device=self.device),
                "brain_mask": torch.ones((size,) + self.spec.img_size[:3], dtype=torch.bool, device=self.device)}

    def step(self, batch: dict[str, Any]) -> float:
        from bids_regionmae.train.engine import StepContext, make_generator

        torch = self.torch
        size = batch["clip"].shape[0]
        ctx = StepContext(step=self.steps_done, micro=0, epoch=0, rank=0, world_size=1, device=self.device,
                          generator=make_generator(0, 1, self.steps_done, 0, device=self.device), local_batch=size)
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.setup.bf16):
            out = self.step_fn(self.model, batch, ctx)
        if not torch.isfinite(out.loss.detach()):
            raise FloatingPointError(f"non-finite loss at step {self.steps_done}")
        out.loss.float().backward()
        self.opt.step()
        self.steps_done += 1
        return float(out.loss.detach())

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def timed(self, batches: Callable[[], dict[str, Any]], warmup: int, steps: int) -> dict[str, Any]:
        """Median seconds per step (after ``warmup``), clips/s, peak memory."""
        torch = self.torch
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        times = []
        size = 0
        for i in range(warmup + steps):
            batch = batches()
            size = batch["clip"].shape[0]
            self.sync()
            t0 = time.perf_counter()
            self.step(batch)
            self.sync()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        step_s = statistics.median(times)
        row = {"setup": self.setup.name, "batch": size, "step_s": round(step_s, 4),
               "clips_per_s": round(size / step_s, 2), "steps_timed": steps}
        if self.device.type == "cuda":
            row["peak_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
            row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(self.device) / 2**30, 2)
        return row

    def close(self) -> None:
        import gc

        del self.model, self.opt
        gc.collect()
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()


def _is_oom(exc: BaseException) -> bool:
    return "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"


def largest_batch(peak1: float, peak8: float, capacity: float) -> int:
    """Largest batch whose peak memory fits ``capacity`` (all GiB), extrapolated from batches 1 and 8."""
    per_sample = max((peak8 - peak1) / 7.0, 1e-6)
    fixed = peak1 - per_sample
    return max(int((capacity - fixed) / per_sample), 8)


NO_CUDA = {"status": "skipped", "reason": "no CUDA device"}


def _device_and_backend(opts: dict[str, Any]) -> tuple[Any, str] | None:
    """The step's device and the backend ``auto`` resolves to there; None when CUDA is asked for but absent."""
    import torch

    from bids_regionmae.models.mamba import resolve_backend

    device = torch.device(opts["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        return None
    return device, resolve_backend("auto", device)


def save_partial(result: dict[str, Any]) -> None:
    """Write what a step has so far: a step stopped at its time limit still reports it."""
    if os.environ.get("GPU_CHECK_RESULT"):
        write_json_atomic(Path(os.environ["GPU_CHECK_RESULT"]), result)


def step_throughput(opts: dict[str, Any]) -> dict[str, Any]:
    import gc

    import torch

    if (found := _device_and_backend(opts)) is None:
        return NO_CUDA
    device, backend = found
    capacity = torch.cuda.get_device_properties(device).total_memory / 2**30 * 0.9 if device.type == "cuda" else 0.0
    result: dict[str, Any] = {"variant": opts["variant"], "backend": backend, "capacity_gib": round(capacity, 1),
                              "goal": "bf16 >= 1.5x fp32+tf32 clips/s at batch 8", "rows": [], "largest_batch": {}}
    rows = result["rows"]

    def measure(bench: _Bench, size: int, warmup: int, steps: int, **extra: Any) -> dict[str, Any]:
        try:
            batch = bench.batch(size)
            row = {**bench.timed(lambda: batch, warmup, steps), "backend": bench.backend, "data": "on device"}
        except Exception as exc:  # out of memory, or a kernel's launch limits: recorded, the other rows go on
            row = {"setup": bench.setup.name, "backend": bench.backend, "batch": size, "oom": _is_oom(exc),
                   "error": f"{type(exc).__name__}: {str(exc).strip()[:300]}"}
        batch = None
        if "error" in row and device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
        rows.append({**row, **extra})
        print(rows[-1], flush=True)
        save_partial(result)
        return rows[-1]

    for setup in SETUPS:
        bench = _Bench(opts["variant"], backend, device, setup)
        try:
            one, eight = measure(bench, 1, 2, 5), measure(bench, 8, 2, 4)
            if device.type == "cuda" and "peak_gib" in one and "peak_gib" in eight:
                size = largest_batch(one["peak_gib"], eight["peak_gib"], capacity)
                for _ in range(4):
                    row = measure(bench, size, 1, 2, largest=True)
                    if "error" not in row:
                        result["largest_batch"][setup.name] = size
                    if "error" not in row or not row["oom"]:
                        break
                    size = int(size * 0.8)
        finally:
            bench.close()
    if backend == "mamba-ssm":  # what the kernels are worth: the pure-PyTorch scan, ours, batch 8
        bench = _Bench(opts["variant"], "torch", device, SETUPS[1])
        try:
            measure(bench, 8, 1, 2)
        finally:
            bench.close()

    def rate(setup: str, largest: bool) -> float | None:
        for r in rows:
            if (r["setup"] == setup and r["backend"] == backend and "error" not in r
                    and (r.get("largest", False) if largest else r["batch"] == 8)):
                return r["clips_per_s"]
        return None

    for key, largest in (("bf16_speedup_batch8", False), ("bf16_speedup_largest", True)):
        fp32, bf16 = rate("fp32+tf32", largest), rate("bf16", largest)
        result[key] = round(bf16 / fp32, 2) if fp32 and bf16 else None
    result["goal_met"] = bool(result["bf16_speedup_batch8"] and result["bf16_speedup_batch8"] >= 1.5)
    return result


def step_loader(opts: dict[str, Any]) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from bids_regionmae.preprocess.store import find_model_ready_runs
    from bids_regionmae.train.data import ClipDataset

    if (found := _device_and_backend(opts)) is None:
        return NO_CUDA
    device, backend = found
    _, out = _dirs(opts)
    runs = find_model_ready_runs(out)
    setup = SETUPS[1] if device.type == "cuda" else SETUPS[0]
    bench = _Bench(opts["variant"], backend, device, setup)
    dataset = ClipDataset(runs, bench.spec.img_size)
    size, steps = int(opts["loader_batch"]), int(opts["loader_steps"])
    workers_list = [int(opts["workers"]), 0] if int(opts["workers"]) else [0]  # the engine's default is 0
    result: dict[str, Any] = {"variant": opts["variant"], "backend": backend, "precision": setup.name, "batch": size,
                              "clips": len(dataset), "runs": len(runs), "rows": []}
    rows = result["rows"]
    try:
        fixed = next(iter(DataLoader(dataset, batch_size=size, shuffle=False)))
        fixed = {k: v.to(device) for k, v in fixed.items() if isinstance(v, torch.Tensor)}
        reference = bench.timed(lambda: fixed, 2, steps)
        rows.append({**reference, "workers": None, "data": "on device (real clips)"})
        print(rows[-1], flush=True)
        save_partial(result)
        for workers in workers_list:
            sampler = RandomSampler(dataset, replacement=True, num_samples=size * (steps + 3),
                                    generator=torch.Generator().manual_seed(0))
            loader = DataLoader(dataset, batch_size=size, sampler=sampler, num_workers=workers,
                                pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                prefetch_factor=2 if workers else None)
            it = iter(loader)
            t0 = time.perf_counter()
            next(it)
            first_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            clips = sum(b["clip"].shape[0] for b in (next(it) for _ in range(steps)))
            only = clips / (time.perf_counter() - t0)
            del it

            def fed(it=iter(loader)) -> dict[str, Any]:
                return {k: v.to(device, non_blocking=True) for k, v in next(it).items() if isinstance(v, torch.Tensor)}

            row = bench.timed(fed, 1, steps)
            rows.append({**row, "workers": workers, "first_batch_s": round(first_s, 2),
                         "loader_only_clips_per_s": round(only, 2), "data": "DataLoader"})
            print(rows[-1], flush=True)
            save_partial(result)
    finally:
        bench.close()
    ref = rows[0]["clips_per_s"]
    result["verdict"] = {f"workers={row['workers']}": f"{row['clips_per_s'] / ref:.2f} of the on-GPU rate: "
                         + ("loader keeps up" if row["clips_per_s"] >= 0.9 * ref else "LOADER IS THE BOTTLENECK")
                         for row in rows[1:]}
    return result


def _predict_seconds(out: Path) -> dict[str, float]:
    """Participant -> seconds of its runs, from the newest predict status logs."""
    seconds = {}
    for path in (out / "logs").rglob("sub-*_predict-*.json"):
        data = json.loads(path.read_text(encoding="utf-8"))
        subject = path.name.split("_", 1)[0]
        seconds[subject] = round(sum(float(r.get("seconds") or 0) for r in (data.get("runs") or {}).values()), 2)
    return seconds


def step_predict(opts: dict[str, Any]) -> dict[str, Any]:
    if (found := _device_and_backend(opts)) is None:
        return NO_CUDA
    backend = found[1]
    fmriprep, out = _dirs(opts)
    model = _model_dirs(out, "finetune_")[0]
    labels = list(opts["predict_labels"])
    result: dict[str, Any] = {"model_dir": str(model), "participants": labels, "backend": backend, "runs": {}}
    per_participant = {}
    for name, extra in (("with_attribution", []), ("without_attribution", ["--no-attribution"])):
        for status in (out / "logs").rglob("sub-*_predict-*.json"):
            status.unlink()
        seconds, _ = _cli([fmriprep, out, "participant", "--model", model, "--participant-label", *labels,
                           "--device", opts["device"], "--batch-size", "4", "--seed", "0", *extra])
        runs = _predict_seconds(out)
        result["runs"][name] = {"wall_s": seconds, "seconds": runs}
        per_participant[name] = round(statistics.mean(runs.values()), 2) if runs else None
        result["seconds_per_participant"] = per_participant
        save_partial(result)
    return result


STEPS: dict[str, Callable[[dict[str, Any]], dict[str, Any] | None]] = {
    "machine": step_machine, "install": step_install, "build": step_build, "store": step_store,
    "torchrun_pretrain": step_torchrun_pretrain, "nccl_ddp": step_nccl_ddp, "finetune": step_finetune,
    "kernels": step_kernels, "parity": step_parity, "throughput": step_throughput, "loader": step_loader,
    "predict": step_predict,
}


def run_step(name: str) -> int:
    """Run one step in this process; its result goes to ``$GPU_CHECK_RESULT``."""

    def stop(signum: int, _frame: Any) -> None:  # the runner's time limit: let ``finally`` blocks clean up
        raise SystemExit(f"step {name} stopped by signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    result = STEPS[name](_opts())
    if result is not None and os.environ.get("GPU_CHECK_RESULT"):
        write_json_atomic(Path(os.environ["GPU_CHECK_RESULT"]), result)
    print(json.dumps(result, default=str)[:4000] if result is not None else "", flush=True)
    return 0


# =========================================================================== command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    prep = sub.add_parser("prepare", help="download what the device machine lacks into .gpu-check/")
    prep.add_argument("--dest", type=Path, default=DEFAULT_CARRY)
    prep.add_argument("--python-version", default=DEVICE_PYTHON)
    prep.add_argument("--limit-mib", type=float, default=CARRY_LIMIT_MIB)

    r = sub.add_parser("run", help="run every step (on the GPU machine)")
    r.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or DEFAULT_STATE / "out"),
                   help="report and logs [$OUT, else %(default)s]")
    r.add_argument("--carry", type=Path, default=DEFAULT_CARRY, help="what `prepare` wrote [%(default)s]")
    r.add_argument("--state", type=Path, default=DEFAULT_STATE,
                   help="site folder, built kernels, data; kept between calls on a warm machine [%(default)s]")
    r.add_argument("--budget", type=float, default=330.0,
                   help="seconds for everything; later steps are skipped when it runs out [%(default)s]")
    r.add_argument("--skip-gpu", action="store_true", help="run only what needs no GPU (CI)")
    r.add_argument("--limit-scale", type=float, default=1.0,
                   help="multiply every step's time limit (e.g. 5 for --device cpu) [%(default)s]")
    r.add_argument("--only", nargs="+", metavar="STEP", choices=list(STEPS), help="run only these steps")
    r.add_argument("--skip", nargs="+", metavar="STEP", choices=list(STEPS), default=[], help="leave these out")
    r.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    r.add_argument("--variant", default="neurostorm", help="model variant [%(default)s]")
    r.add_argument("--early-backend", choices=["torch", "auto"], default="torch",
                   help="backend of the steps that run while the kernels build [%(default)s]")
    r.add_argument("--subjects", type=int, default=4)
    r.add_argument("--frames", type=int, default=60)
    r.add_argument("--workers", type=int, default=min(8, max((os.cpu_count() or 2) // 2, 1)),
                   help="DataLoader workers compared with 0 in `loader` [%(default)s]")
    r.add_argument("--loader-batch", type=int, default=8)
    r.add_argument("--loader-steps", type=int, default=6)
    r.add_argument("--predict-labels", nargs="+", default=["01", "02"], help="participants `predict` times")
    r.add_argument("--arch", default=None, help="compute capability to build for [the GPU's]")
    r.add_argument("--max-jobs", type=int, default=os.cpu_count() or 4)

    st = sub.add_parser("step", help="(internal) run one step")
    st.add_argument("name", choices=list(STEPS))
    return parser.parse_args(argv)


def options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``run`` options as JSON-able values (passed to the steps)."""
    opts = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "command"}
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "prepare":
        prepare(args.dest, python_version=args.python_version, limit_mib=args.limit_mib)
        return 0
    if args.command == "step":
        return run_step(args.name)
    report = run(options(args))
    failed = [r["name"] for r in report["steps"] if r["status"] in ("failed", "timeout")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
