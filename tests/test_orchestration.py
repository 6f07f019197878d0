"""The Prefect flow as a DAG: cached like DVC, failing cleanly, resuming at the failed stage, versioned by DVC."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.download import DownloadError
from tasks.model import ModelError
from tests.conftest import REPO

prefect_testing = pytest.importorskip("prefect.testing.utilities")

from flows.pipeline import pipeline  # noqa: E402
from flows.versioning import version_outputs  # noqa: E402
from tasks.params import OrchestrationParams  # noqa: E402
from tasks.stages import STAGES, Layout  # noqa: E402

ALL = list(STAGES)
# Small and quick: the demo at 24x24, one epoch.
QUICK = {"data.sha256": None, "prepare.image_size": 24, "train.epochs": 1, "train.batch_size": 16}


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    with prefect_testing.prefect_test_harness():
        yield


def ran(outcome: dict[str, str]) -> list[str]:
    return [name for name, what in outcome.items() if what == "ran"]


def run(root: Path, demo_zip: Path, **overrides) -> dict[str, str]:
    return pipeline(overrides=QUICK | {"data.url": str(demo_zip)} | overrides, root=str(root))


def test_unchanged_run_skips_every_stage_and_changes_rerun_only_their_dependents(tmp_path, demo_zip):
    assert ran(run(tmp_path, demo_zip)) == ALL
    assert ran(run(tmp_path, demo_zip)) == []
    assert ran(run(tmp_path, demo_zip, **{"train.epochs": 2})) == ["train", "evaluate", "publish"]
    assert ran(run(tmp_path, demo_zip, **{"train.epochs": 2, "prepare.image_size": 32})) == ["cache", "train", "evaluate",
                                                                                             "publish"]  # fmt: skip
    # A deleted output re-runs its stage; the same bytes come back, so nothing after it re-runs.
    (tmp_path / "data" / "split.csv").unlink()
    assert ran(run(tmp_path, demo_zip, **{"train.epochs": 2, "prepare.image_size": 32})) == ["split"]


def test_failed_stage_fails_the_flow_keeps_earlier_outputs_and_the_next_run_starts_there(tmp_path, demo_zip):
    bad = {"train.model": "mobilenet_v3_small", "train.weights": str(tmp_path / "missing.weights.h5"),
           "prepare.image_size": 32}  # fmt: skip
    with pytest.raises(ModelError, match="train.weights: cannot load"):
        run(tmp_path, demo_zip, **bad)
    assert (tmp_path / "data" / "cache" / "images.npy").exists() and (tmp_path / "data" / "split.csv").exists()
    assert not (tmp_path / "models" / "model.keras").exists()
    assert ran(run(tmp_path, demo_zip, **{"prepare.image_size": 32})) == ["train", "evaluate", "publish"]


def test_permanent_download_failure_fails_the_flow_with_the_url(tmp_path):
    missing = tmp_path / "nowhere" / "cells.zip"
    with pytest.raises(DownloadError, match=f"{missing}: no such file"):
        pipeline(overrides=QUICK | {"data.url": str(missing)}, root=str(tmp_path))


def test_outside_a_dvc_project_versioning_is_skipped_with_a_reason(tmp_path):
    said = version_outputs(Layout(tmp_path), OrchestrationParams())
    assert said == [f"{tmp_path.resolve()} is not a DVC project: skipped versioning"]


def git_dvc_project(root: Path, env: dict) -> Path:
    root.mkdir()
    shutil.copytree(REPO / "tasks", root / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(REPO / name, root)
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(command, cwd=root, env=env, check=True, capture_output=True)
    return root


def dvc(root: Path, env: dict, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def test_flow_run_in_a_git_dvc_repo_leaves_dvc_status_clean(tmp_path, demo_zip, cli_env, monkeypatch):
    for key in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL"):
        monkeypatch.setenv(key, cli_env[key])
    root = git_dvc_project(tmp_path / "project", cli_env)
    outcome = run(root, demo_zip, **{"orchestration.git_commit": True})
    assert ran(outcome) == ALL
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert params["train"]["epochs"] == 1 and params["data"]["url"] == str(demo_zip)
    assert "# imgclf: every knob" in (root / "params.yaml").read_text()  # comments kept
    assert "up to date" in dvc(root, cli_env, "status")
    assert "Running stage" not in dvc(root, cli_env, "repro")
    log = subprocess.run(["git", "log", "--format=%s", "-1", "--name-only"], cwd=root, capture_output=True, text=True).stdout
    assert "imgclf: record pipeline run in dvc.lock" in log and "dvc.lock" in log


def test_transient_download_failures_are_retried_and_the_flow_succeeds(tmp_path, demo_zip):
    import http.server
    import threading

    payload, requests = demo_zip.read_bytes(), []

    class Flaky(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            if len(requests) <= 2:
                self.send_error(503, "busy")
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/cells.zip"
        outcome = pipeline(overrides=QUICK | {"data.url": url, "data.retry_backoff": 0.01}, root=str(tmp_path))
    finally:
        server.shutdown()
    assert ran(outcome) == ALL
    assert len(requests) == 3
    assert (tmp_path / "data" / "raw" / "cells.zip").read_bytes() == payload


@pytest.mark.parametrize("runner", ["processes", "threads"])
def test_shards_fan_out_on_the_task_runner_with_the_same_bytes(tmp_path, runner):
    from tasks.demo_data import make_demo_archive

    # 524 files and 520 images: several validate and cache shards, so the runner really fans out.
    archive = make_demo_archive(tmp_path / "big.zip", per_class=260)
    overrides = QUICK | {"data.url": str(archive), "orchestration.task_runner": runner}
    assert ran(pipeline(overrides=overrides, root=str(tmp_path / "flow"))) == ALL
    for name in ("download", "extract", "validate", "cache", "split"):
        run_stage_directly = STAGES[name].run
        from tasks.files import process_pool_map
        from tasks.params import load_params

        run_stage_directly(load_params(tmp_path / "none.yaml", overrides), Layout(tmp_path / "direct"), process_pool_map)
    for output in ("data/manifest.csv", "data/cache/images.npy", "data/cache/index.csv", "data/split.csv"):
        assert (tmp_path / "flow" / output).read_bytes() == (tmp_path / "direct" / output).read_bytes(), output


@pytest.fixture
def dask_cluster():
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                       dashboard_address=None, silence_logs=40)  # fmt: skip
    try:
        yield cluster
    finally:
        cluster.close()


def test_dask_cluster_gives_the_same_cache_and_split_as_the_local_run(tmp_path, dask_cluster):
    from tasks.demo_data import make_demo_archive

    archive = make_demo_archive(tmp_path / "big.zip", per_class=260)
    base = QUICK | {"data.url": str(archive)}
    on_dask = base | {"orchestration.task_runner": "dask", "orchestration.dask_address": dask_cluster.scheduler_address}
    assert ran(pipeline(overrides=on_dask, root=str(tmp_path / "dask"))) == ALL
    assert ran(pipeline(overrides=base, root=str(tmp_path / "local"))) == ALL
    for output in ("data/manifest.csv", "data/cache/images.npy", "data/cache/index.csv", "data/split.csv"):
        assert (tmp_path / "dask" / output).read_bytes() == (tmp_path / "local" / output).read_bytes(), output


def test_a_dask_worker_killed_mid_stage_costs_only_its_shard(tmp_path, dask_cluster):
    import os
    import signal
    import threading
    import time

    from distributed import Client

    from tasks.demo_data import make_demo_archive

    archive = make_demo_archive(tmp_path / "big.zip", per_class=260)
    with Client(dask_cluster) as client:
        pids = client.run(os.getpid)
    killed: list[str] = []

    def kill_a_busy_worker() -> None:
        deadline = time.monotonic() + 120
        while not killed and time.monotonic() < deadline:
            for task in list(dask_cluster.scheduler.tasks.values()):
                worker = task.processing_on
                if worker is not None and worker.address in pids:
                    os.kill(pids[worker.address], signal.SIGKILL)
                    killed.append(worker.address)
                    return
            time.sleep(0.005)

    watcher = threading.Thread(target=kill_a_busy_worker, daemon=True)
    watcher.start()
    overrides = QUICK | {"data.url": str(archive), "orchestration.task_runner": "dask",
                         "orchestration.dask_address": dask_cluster.scheduler_address}  # fmt: skip
    outcome = pipeline(overrides=overrides, root=str(tmp_path / "dask"))
    watcher.join(timeout=5)
    assert killed, "no shard was seen running on a worker"
    assert ran(outcome) == ALL
    assert ran(pipeline(overrides=QUICK | {"data.url": str(archive)}, root=str(tmp_path / "local"))) == ALL
    for output in ("data/manifest.csv", "data/cache/images.npy"):
        assert (tmp_path / "dask" / output).read_bytes() == (tmp_path / "local" / output).read_bytes(), output
