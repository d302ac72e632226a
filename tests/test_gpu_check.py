"""The CPU-testable parts of the one-shot GPU check (``benchmarks/gpu_check.py``, ``benchmarks/gpu_check.sh``).

What needs a GPU runs on a lent GPU machine (``benchmarks/README.md``, GPU
section); here: the step runner (time limits, failures, skips, background
steps, the JSON report), ``run --skip-gpu`` end to end, the install and
build decisions, the download plan, the nvcc architecture filter, and the
device call written in the README.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "benchmarks" / "gpu_check.py"
NVCC_FILTER = REPO / "scripts" / "nvcc-arch-filter.sh"


def _load_driver():
    spec = importlib.util.spec_from_file_location("gpu_check", DRIVER)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


gpu_check = _load_driver()


def _py(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


RESULT = "import json, os; json.dump({res}, open(os.environ['GPU_CHECK_RESULT'], 'w'))"


# --------------------------------------------------------------------------- the runner


def test_runner_time_limits_failures_skips_and_background_steps(tmp_path):
    pidfile = tmp_path / "child.pid"
    steps = [
        gpu_check.Step("ok", _py(RESULT.format(res="{'value': 42}")), 30, needs_gpu=False),
        gpu_check.Step("bg", _py("import time; time.sleep(1.5); " + RESULT.format(res="{'done': True}")), 30,
                needs_gpu=False, background=True, min_s=1),
        gpu_check.Step("boom", _py("raise RuntimeError('kernel exploded')"), 30, needs_gpu=False),
        # the child of a step that overruns its limit is stopped with it
        gpu_check.Step("slow", _py(f"import subprocess, time; p = subprocess.Popen(['sleep', '60']); "
                            f"open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(60)"), 2, needs_gpu=False,
                min_s=1),
        gpu_check.Step("self_skip", _py(RESULT.format(res="{'status': 'skipped', 'reason': 'no CUDA device'}")), 30,
                needs_gpu=False),
        gpu_check.Step("after_bg", _py(RESULT.format(res="{}")), 30, needs_gpu=False, after=("bg",)),
        gpu_check.Step("needs_boom", _py("print('never')"), 30, needs_gpu=False, requires=("boom",)),
        gpu_check.Step("gpu_only", _py("print('never')"), 30, needs_gpu=True),
        gpu_check.Step("too_late", _py("print('never')"), 30, needs_gpu=False, min_s=1000),
    ]
    runner = gpu_check.Runner(tmp_path / "out", budget_s=120, env=dict(os.environ), work=tmp_path / "work",
                              skip_gpu=True)
    t0 = time.monotonic()
    report = runner.run(steps)
    assert time.monotonic() - t0 < 60
    by_name = {r["name"]: r for r in report["steps"]}
    assert [r["name"] for r in report["steps"]] == ["ok", "boom", "slow", "self_skip", "bg", "after_bg",
                                                    "needs_boom", "gpu_only", "too_late"]
    assert by_name["ok"]["status"] == "passed" and by_name["ok"]["result"] == {"value": 42}
    assert by_name["bg"]["status"] == "passed" and by_name["bg"]["result"] == {"done": True}
    assert 1.0 <= by_name["bg"]["seconds"] < 10  # its own run time, not the time until it was joined
    assert by_name["boom"]["status"] == "failed" and by_name["boom"]["returncode"] == 1
    assert "kernel exploded" in by_name["boom"]["error"]
    assert by_name["slow"]["status"] == "timeout" and by_name["slow"]["limit_s"] == 2
    assert by_name["slow"]["seconds"] < 20
    child = int(pidfile.read_text())
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
    assert by_name["self_skip"]["status"] == "skipped" and by_name["self_skip"]["reason"] == "no CUDA device"
    assert by_name["needs_boom"] == {"name": "needs_boom", "what": "", "status": "skipped",
                                     "reason": "needs boom, which failed"}
    assert by_name["gpu_only"]["reason"] == "--skip-gpu: needs a GPU"
    assert by_name["too_late"]["reason"].startswith("out of time")
    on_disk = json.loads((tmp_path / "out" / gpu_check.REPORT_NAME).read_text())
    assert on_disk["schema"] == gpu_check.SCHEMA and on_disk["complete"] is True and on_disk["steps"] == report["steps"]
    assert on_disk["summary"]["failed"] == ["boom"] and on_disk["summary"]["timeout"] == ["slow"]
    log = (tmp_path / "out" / gpu_check.LOG_NAME).read_text()
    assert "=== " in log and "kernel exploded" in log and "--- slow: timeout" in log


def test_report_is_valid_json_after_every_step(tmp_path):
    check = _py("import json, os; json.load(open(os.path.join(os.environ['OUT_DIR'], 'gpu_check.json'))); "
                "print('ok')")
    env = dict(os.environ, OUT_DIR=str(tmp_path / "out"))
    runner = gpu_check.Runner(tmp_path / "out", budget_s=60, env=env, work=tmp_path / "work")
    report = runner.run([gpu_check.Step(f"s{i}", check, 20, needs_gpu=False) for i in range(2)])
    seen = [r["status"] for r in report["steps"]]
    assert seen == ["passed", "passed"]  # each step read the report its predecessors left


# --------------------------------------------------------------------------- run --skip-gpu, end to end


def _wheel(folder: Path, name: str = "gpu_check_probe", version: str = "0.1") -> Path:
    """A minimal valid pure-Python wheel."""
    dist = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": b"VALUE = 1\n",
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
              f"{len(data)}" for path, data in files.items()] + [f"{dist}/RECORD,,"]
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for arc, data in files.items():
            zf.writestr(arc, data)
    return path


def test_run_skip_gpu_writes_one_json(tmp_path):
    carry = tmp_path / "carry"
    (carry / "wheels").mkdir(parents=True)
    wheel = _wheel(carry / "wheels")
    out, state = tmp_path / "out", tmp_path / "state"
    proc = subprocess.run([sys.executable, str(DRIVER), "run", "--skip-gpu", "--out", str(out), "--state", str(state),
                           "--carry", str(carry), "--budget", "200"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    report = json.loads((out / "gpu_check.json").read_text())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report["schema"] == gpu_check.SCHEMA and report["complete"] is True
    assert report["options"]["skip_gpu"] is True and report["options"]["budget"] == 200
    steps = {r["name"]: r for r in report["steps"]}
    assert sorted(steps) == sorted(s.name for s in gpu_check.plan(report["options"]))  # in the order they ended
    assert steps["machine"]["status"] == "passed"
    import torch

    assert steps["machine"]["result"]["torch"] == torch.__version__
    install = steps["install"]
    assert install["status"] == "passed", install
    assert install["result"]["installed"] == [wheel.name] and install["result"]["unmet"] == []
    assert (state / "site" / "gpu_check_probe" / "__init__.py").is_file()
    build = steps["build"]
    if not torch.cuda.is_available():
        assert build["status"] == "skipped" and build["reason"] == "no CUDA device"
        assert build["result"]["action"] == "skip" and build["result"]["versions"] == gpu_check.kernel_versions()
    gpu_steps = [s.name for s in gpu_check.plan(report["options"]) if s.needs_gpu]
    assert {steps[n]["status"] for n in gpu_steps} == {"skipped"}
    assert {steps[n]["reason"] for n in gpu_steps} == {"--skip-gpu: needs a GPU"}
    assert (out / "gpu_check.log").is_file() and (out / "build.log").is_file()
    # at most 8 files come back from a device call, none deeper than 2 folders
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.relative_to(out).parts) <= 3 for p in files)
    # a second run finds the wheel installed and installs nothing
    subprocess.run([sys.executable, str(DRIVER), "run", "--skip-gpu", "--only", "install", "--out", str(out),
                    "--state", str(state), "--carry", str(carry)], capture_output=True, text=True, timeout=120,
                   check=True)
    again = json.loads((out / "gpu_check.json").read_text())["steps"][0]
    assert again["name"] == "install" and again["result"]["installed"] == []


# --------------------------------------------------------------------------- decisions


def test_build_decision():
    both = {"causal_conv1d_cuda": None, "selective_scan_cuda": None}
    missing = {"causal_conv1d_cuda": None, "selective_scan_cuda": "ImportError: no module"}
    sdists = {"causal-conv1d": Path("c.tar.gz"), "mamba-ssm": Path("m.tar.gz")}
    assert gpu_check.build_decision(both, False, None, {}) == ("skip", "already importable", [])
    assert gpu_check.build_decision(missing, False, "/cuda/bin/nvcc", sdists) == ("skip", "no CUDA device", [])
    assert gpu_check.build_decision(missing, True, None, sdists)[0:2] == ("fail", "nvcc not found (set CUDA_HOME)")
    action, reason, todo = gpu_check.build_decision(missing, True, "/cuda/bin/nvcc", {"mamba-ssm": None})
    assert action == "fail" and "mamba-ssm" in reason and todo == ["mamba-ssm"]
    assert gpu_check.build_decision(missing, True, "/cuda/bin/nvcc", sdists) == ("build", "mamba-ssm not importable",
                                                                          ["mamba-ssm"])


def test_sdists_are_found_by_the_dockerfile_versions(tmp_path):
    versions = gpu_check.kernel_versions()
    assert set(versions) == {"causal-conv1d", "mamba-ssm"}
    assert all(re.fullmatch(r"\d+\.\d+\.\d+(\.post\d+)?", v) for v in versions.values()), versions
    for dist, version in versions.items():
        (tmp_path / f"{dist.replace('-', '_')}-{version}.tar.gz").write_bytes(b"")
    (tmp_path / "mamba_ssm-0.0.1.tar.gz").write_bytes(b"")
    for dist, version in versions.items():
        assert gpu_check._find_sdist(tmp_path, dist, version).name.endswith(f"-{version}.tar.gz")
    assert gpu_check._find_sdist(tmp_path, "mamba-ssm", "9.9") is None


def test_plan_downloads_skips_what_the_device_has():
    report = {"install": [{"metadata": {"name": "NumPy", "version": "2.5"}},
                          {"metadata": {"name": "pybids", "version": "0.18.1"}},
                          {"metadata": {"name": "pydantic_core", "version": "2.50"}}]}
    assert gpu_check.plan_downloads(report, {"numpy", "pydantic-core"}) == [("pybids", "0.18.1")]
    assert [n for n, _ in gpu_check.plan_downloads(report, set())] == ["NumPy", "pybids", "pydantic_core"]
    assert "torch" not in " ".join(gpu_check.app_requirements(exclude=["torch"]))
    assert any(r.startswith("torch") for r in gpu_check.app_requirements())


def test_unmet_requirements():
    versions = {"numpy": "1.20.0", "pybids": "0.18.1", "pydantic": "2.6"}
    unmet = gpu_check.unmet_requirements(["numpy>=1.24", "pybids>=0.16", "pydantic>=2.5", "nilearn>=0.11",
                                   "never-there; python_version < '3'"], versions)
    assert unmet == ["numpy>=1.24 (found: 1.20.0)", "nilearn>=0.11 (found: nothing)"]


def test_largest_batch_extrapolates_peak_memory():
    # 2 GiB fixed + 5 GiB per sample: 7 GiB at batch 1, 42 at batch 8; 127 GiB usable -> 25
    assert gpu_check.largest_batch(7.0, 42.0, 127.0) == 25
    assert gpu_check.largest_batch(7.0, 42.0, 10.0) == 8  # never below the batch that already ran


# --------------------------------------------------------------------------- nvcc architecture filter


def _fake_nvcc(tmp_path: Path) -> Path:
    fake = tmp_path / "nvcc"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)
    return fake


@pytest.mark.parametrize("archs,expected", [
    ("8.0;9.0+PTX", ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
                     "-gencode", "arch=compute_90,code=compute_90"]),
    ("8.6 9.0a", ["-gencode", "arch=compute_86,code=sm_86", "-gencode", "arch=compute_90a,code=sm_90a"]),
])
def test_nvcc_filter_replaces_architecture_flags(tmp_path, archs, expected):
    # the flags mamba-ssm's setup.py passes (separate values), and torch's own (-gencode=...)
    args = ["-c", "a.cu", "-o", "a.o", "-O3", "-gencode", "arch=compute_75,code=sm_75", "-gencode",
            "arch=compute_121,code=sm_121", "-gencode=arch=compute_90,code=sm_90", "-arch=sm_80", "--threads", "4"]
    env = dict(os.environ, NVCC_REAL=str(_fake_nvcc(tmp_path)), TORCH_CUDA_ARCH_LIST=archs)
    env.pop("NVCC_ARCHS", None)
    out = subprocess.run(["bash", str(NVCC_FILTER), *args], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split("\n")[:-1] == ["-c", "a.cu", "-o", "a.o", "-O3", "--threads", "4", *expected]


def test_nvcc_filter_passes_other_commands_through_and_rejects_names(tmp_path):
    env = dict(os.environ, NVCC_REAL=str(_fake_nvcc(tmp_path)), NVCC_ARCHS="9.0")
    out = subprocess.run(["bash", str(NVCC_FILTER), "-V"], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["-V"]
    env.update(NVCC_ARCHS="", TORCH_CUDA_ARCH_LIST="")
    out = subprocess.run(["bash", str(NVCC_FILTER), "-arch=sm_80", "x.cu"], capture_output=True, text=True, env=env,
                         check=True)
    assert out.stdout.split() == ["-arch=sm_80", "x.cu"]
    env.update(NVCC_ARCHS="Ampere")
    bad = subprocess.run(["bash", str(NVCC_FILTER), "-arch=sm_80", "x.cu"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "'Ampere'" in bad.stderr and "compute capability" in bad.stderr


# --------------------------------------------------------------------------- the device call in the README


def device_call() -> dict:
    """The JSON block after 'Device call' in benchmarks/README.md."""
    text = (REPO / "benchmarks" / "README.md").read_text(encoding="utf-8")
    match = re.search(r"Device call.*?```json\n(.*?)\n```", text, re.S)
    assert match, "benchmarks/README.md has no 'Device call' JSON block"
    return json.loads(match.group(1))


def test_device_call_fits_the_device_tool():
    call = device_call()
    assert set(call) == {"command", "timeout_s", "carry"}
    assert len(call["command"]) < 2000 and "benchmarks/gpu_check.sh" in call["command"]
    assert call["carry"] == [".gpu-check"] and ".gpu-check" in (REPO / ".gitignore").read_text().split("/")
    assert 60 < call["timeout_s"] <= 600
    budget = re.search(r"--budget (\d+)", call["command"])
    budget = float(budget.group(1)) if budget else gpu_check.parse_args(["run"]).budget
    # the script ends inside the call's limit, leaving time for interpreter start-up and the last report
    assert budget + 45 <= call["timeout_s"]
    # two cold calls (about 90 s to start a machine, 30 s of interpreter start-up and transfers) fit the
    # 15 minutes of device time of a task
    assert 2 * (budget + 30 + 90) <= 15 * 60
    wrapper = (REPO / "benchmarks" / "gpu_check.sh").read_text()
    assert "gpu_check.py" in wrapper and os.access(REPO / "benchmarks" / "gpu_check.sh", os.X_OK)


def test_an_interrupted_run_stops_its_steps_and_leaves_a_report(tmp_path):
    import signal
    import threading

    pidfile = tmp_path / "step.pid"
    step = gpu_check.Step("long", _py(f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); "
                               "time.sleep(120)"), 100, needs_gpu=False)
    runner = gpu_check.Runner(tmp_path / "out", budget_s=200, env=dict(os.environ), work=tmp_path / "work")
    timer = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGTERM))  # the device tool's time limit
    timer.start()
    with pytest.raises(SystemExit, match="signal"):
        runner.run([step])
    timer.cancel()
    pid = int(pidfile.read_text())
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    report = json.loads((tmp_path / "out" / gpu_check.REPORT_NAME).read_text())
    assert report["complete"] is False
    assert signal.getsignal(signal.SIGTERM) is not None  # the runner put the previous handler back


def test_cap_file_keeps_head_and_tail(tmp_path):
    path = tmp_path / "big.log"
    path.write_bytes(b"a" * 600 + b"b" * 600)
    gpu_check.cap_file(path, limit=1000)
    data = path.read_bytes()
    assert data.startswith(b"a" * 500) and data.endswith(b"b" * 500) and b"200 bytes cut" in data
    small = tmp_path / "small.log"
    small.write_bytes(b"x" * 10)
    gpu_check.cap_file(small, limit=1000)
    assert small.read_bytes() == b"x" * 10
