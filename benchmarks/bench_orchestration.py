"""Orchestration overhead: the Prefect flow and `dvc repro` against calling the stage functions.

On a tiny set (the demo archive, 30 images per class, 24x24, one epoch), each in a fresh
process, measured in the same run:
  direct        every stage function called in order (`run_stage`), no Prefect
  flow (cold)   the Prefect flow, local mode, on a fresh PREFECT_HOME (it creates its database)
  flow          the flow on a fresh project, Prefect's database already there (the usual case)
  flow no-op    the flow again with nothing changed: DVC finds every stage up to date
  repro         `dvc repro` of the same pipeline in a git + DVC repo
  repro no-op   `dvc repro` again with nothing changed
Targets: flow - direct under 10 s; the no-op `dvc repro` under 3 s.

    python benchmarks/bench_orchestration.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.demo_data import make_demo_archive  # noqa: E402

TINY = {"prepare": {"image_size": 24}, "train": {"epochs": 1}}

DIRECT = """
from pathlib import Path
from tasks.params import load_params
from tasks.stages import STAGES, Layout, run_stage
params, layout = load_params("params.yaml"), Layout(Path("."))
for name in STAGES:
    run_stage(name, params, layout)
"""


def timed(command: list[str], cwd: Path, env: dict) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=cwd, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def project(base: Path, name: str, archive: Path, env: dict) -> Path:
    """Returns a git + DVC project (the flow needs one, as `dvc repro` does) reading `archive`, tiny settings."""
    root = base / name
    root.mkdir()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(url=str(archive), sha256=None)
    for section, values in TINY.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(ROOT / "tasks", root / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", root)
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(command, cwd=root, env=env, check=True, capture_output=True)
    return root


def main() -> None:
    base = Path(tempfile.mkdtemp(prefix="bench-orchestration-"))
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3", "PREFECT_HOME": str(base / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
        "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost",
    }  # fmt: skip
    try:
        archive = make_demo_archive(base / "demo.zip", per_class=30)
        direct = timed([sys.executable, "-c", DIRECT], project(base, "direct", archive, env), env)
        cold = timed(["imgclf", "run"], project(base, "cold", archive, env), env)
        flow_root = project(base, "flow", archive, env)
        flow = timed(["imgclf", "run"], flow_root, env)
        flow_noop = timed(["imgclf", "run"], flow_root, env)
        dvc_root = project(base, "dvc", archive, env)
        repro = timed(["dvc", "repro"], dvc_root, env)
        repro_noop = timed(["dvc", "repro"], dvc_root, env)
    finally:  # a failed command leaves no projects or Prefect home behind either
        shutil.rmtree(base, ignore_errors=True)
    print(f"orchestration benchmark: demo archive, 60 images, 24x24, 1 epoch, {os.cpu_count()} cores")
    print(f"{'run':<14} {'seconds':>8} {'vs direct':>10}")
    for name, seconds in (("direct", direct), ("flow (cold)", cold), ("flow", flow), ("flow no-op", flow_noop),
                          ("repro", repro), ("repro no-op", repro_noop)):  # fmt: skip
        print(f"{name:<14} {seconds:>8.1f} {seconds / direct:>9.2f}x")
    print(f"flow overhead: {flow - direct:.1f} s, {cold - direct:.1f} s cold (target < 10 s); "
          f"no-op dvc repro: {repro_noop:.1f} s (target < 3 s)")  # fmt: skip


if __name__ == "__main__":
    main()
