"""A real Prefect server on 127.0.0.1, the flow served from it, a run started through the API with overrides."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tasks.params import load_params
from tests.conftest import dvc_project, free_port, in_venv

prefect_settings = pytest.importorskip("prefect.settings")


def wait_for(check, what: str, seconds: float = 120):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            found = check()
            if found:
                return found
        except Exception:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture
def prefect_server(tmp_path, cli_env):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = cli_env | {"PREFECT_HOME": str(tmp_path / "server-home"), "PREFECT_API_URL": api,
                     "PREFECT_SERVER_UI_ENABLED": "false"}  # fmt: skip
    server = subprocess.Popen(in_venv(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"]),
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for(lambda: urllib.request.urlopen(f"{api}/health", timeout=2).status == 200, "the Prefect server")
        yield api, env
    finally:
        stop(server)


def test_served_flow_runs_through_the_api_with_overrides_and_artifacts(tmp_path, demo_zip, prefect_server):
    api, env = prefect_server
    project = dvc_project(tmp_path / "project", env, {"data": {"url": str(demo_zip), "sha256": None},
                                                      "prepare": {"image_size": 24}, "train": {"epochs": 1}})  # fmt: skip
    serve = subprocess.Popen(in_venv(["imgclf", "serve", "--name", "test"]), cwd=project, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        with prefect_settings.temporary_settings(updates={prefect_settings.PREFECT_API_URL: api}):
            from prefect import get_client
            from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
            from prefect.deployments import run_deployment

            async def deployment():
                async with get_client() as client:
                    return await client.read_deployment_by_name("imgclf-pipeline/test")

            import asyncio

            found = wait_for(lambda: asyncio.run(deployment()), "the served deployment")
            assert found.schedules and found.schedules[0].schedule.cron == load_params(project / "params.yaml").orchestration.schedule
            flow_run = run_deployment("imgclf-pipeline/test", parameters={"overrides": {"train.epochs": 2}}, timeout=600)
            assert flow_run.state.is_completed(), flow_run.state

            async def artifacts():
                async with get_client() as client:
                    return await client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))

            keys = {artifact.key for artifact in asyncio.run(artifacts())}
    finally:
        stop(serve)
    assert {"imgclf-report", "imgclf-rejected", "imgclf-confusion", "imgclf-metrics"} <= keys
    assert flow_run.name == "imgclf-train.epochs=2"
    assert json.loads((project / "metrics" / "train.json").read_text())["epochs_run"] == 2  # the override took
    assert json.loads((project / "metrics" / "eval.json").read_text())["n_test"] > 0


def test_prefect_yaml_deploys_the_weekly_retrain_and_a_run_reports_to_the_server_a_profile_names(
        tmp_path, demo_zip, prefect_server):  # fmt: skip
    api, env = prefect_server
    repo = Path(__file__).resolve().parents[1]
    env = env | {"IMGCLF_HOME": str(repo)}
    created = subprocess.run(in_venv(["prefect", "work-pool", "create", "imgclf-process", "--type", "process"]),
                             cwd=repo, env=env, capture_output=True, text=True)  # fmt: skip
    assert created.returncode == 0, created.stdout + created.stderr
    deployed = subprocess.run(in_venv(["prefect", "--no-prompt", "deploy", "--name", "weekly-retrain"]),
                              cwd=repo, env=env, capture_output=True, text=True)  # fmt: skip
    assert deployed.returncode == 0, deployed.stdout[-2000:] + deployed.stderr[-2000:]
    with prefect_settings.temporary_settings(updates={prefect_settings.PREFECT_API_URL: api}):
        import asyncio

        from prefect import get_client

        async def deployment():
            async with get_client() as client:
                return await client.read_deployment_by_name("imgclf-pipeline/weekly-retrain")

        found = asyncio.run(deployment())
    assert found.work_pool_name == "imgclf-process"
    assert found.schedules[0].schedule.cron == load_params(repo / "params.yaml").orchestration.schedule
    assert found.parameters["overrides"] == {}
    # One run at a time: a run that comes due while another runs waits for it (the gate's champion moves under neither).
    assert found.global_concurrency_limit.limit == 1
    assert found.concurrency_options.collision_strategy == "ENQUEUE"

    # The same server named by PREFECT_API_URL in the active profile (`prefect config set`), not the environment.
    profiles = tmp_path / "profiles.toml"
    profiles.write_text(f'active = "shared"\n\n[profiles.shared]\nPREFECT_API_URL = "{api}"\n')
    env = {key: value for key, value in env.items() if key != "PREFECT_API_URL"} | {"PREFECT_PROFILES_PATH": str(profiles)}
    project = dvc_project(tmp_path / "project", env, {"data": {"url": str(demo_zip), "sha256": None}})
    result = subprocess.run(in_venv(["imgclf", "run", "download"]), cwd=project, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    with prefect_settings.temporary_settings(updates={prefect_settings.PREFECT_API_URL: api}):
        async def flow_runs():
            async with get_client() as client:
                return await client.read_flow_runs()

        ran = [run for run in asyncio.run(flow_runs()) if run.state.is_completed()]  # not the deployment's scheduled ones
        assert [run.name for run in ran] == ["imgclf-download"]
