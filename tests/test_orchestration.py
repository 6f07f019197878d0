"""The Prefect flow over dvc.yaml: DVC decides what is stale, overrides stay with their run, one run at a time."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tasks.download import DownloadError
from tasks.model import ModelError
from tests.conftest import REPO, VENV_BIN, dvc_project, in_venv, sh, tcp_server

prefect_testing = pytest.importorskip("prefect.testing.utilities")

from flows.dvc_project import DvcProject, ProjectError, one_run_at_a_time  # noqa: E402
from flows.pipeline import params_for_dvc, pipeline  # noqa: E402
from flows.versioning import VersioningError, version_outputs  # noqa: E402
from tasks.params import OrchestrationParams, ParamsError  # noqa: E402
from tasks.stages import STAGES, Layout  # noqa: E402

ALL = list(STAGES)
FROM_TRAIN = ALL[ALL.index("train"):]  # what a change to train's params re-runs
# Small and quick: the demo at 24x24, one epoch.
SETTINGS = {"data": {"sha256": None}, "prepare": {"image_size": 24}, "train": {"epochs": 1, "batch_size": 16}}


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    with prefect_testing.prefect_test_harness():
        yield


@pytest.fixture
def env(cli_env, monkeypatch) -> dict:
    """cli_env, also for the git and dvc commands the flow itself runs."""
    for key in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL"):
        monkeypatch.setenv(key, cli_env[key])
    return cli_env


def ran(outcome: dict[str, str]) -> list[str]:
    return [name for name, what in outcome.items() if what == "ran"]


def repro_ran(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def project(root: Path, env: dict, url: Path | str, **sections) -> Path:
    """A git + DVC project at `root` whose params.yaml reads the archive at `url`, small and quick."""
    updates = {section: dict(values) for section, values in SETTINGS.items()}
    updates["data"]["url"] = str(url)
    for section, values in sections.items():
        updates.setdefault(section, {}).update(values)
    return dvc_project(root, env, updates)


def flow(root: Path, **overrides) -> dict[str, str]:
    return pipeline(overrides=overrides, root=str(root))


def artifacts_of(flow_run_id) -> list:
    import asyncio

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read() -> list:
        async with get_client() as client:
            return await client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    return asyncio.run(read())


def dvc(root: Path, env: dict, *args: str) -> str:
    return sh(["dvc", *args], root, env)


def test_outside_a_dvc_project_the_flow_refuses_saying_how_to_make_one(tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    with pytest.raises(ProjectError, match="imgclf init"):
        flow(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_a_damaged_dvc_lock_is_named_as_dvc_names_it(tmp_path, demo_zip, env):
    root = project(tmp_path / "p", env, demo_zip)
    (root / "dvc.lock").write_text('schema: "2.0"\nstages:\n  download: [\n')
    with pytest.raises(ProjectError) as caught:
        DvcProject(root).stale("download")  # what the flow asks first
    assert str(caught.value).startswith(f"{root}: DVC: unable to read: ") and "dvc.lock" in str(caught.value)


def test_unchanged_run_skips_every_stage_and_changes_rerun_only_their_dependents(tmp_path, demo_zip, env, caplog):
    archive = Path(shutil.copy(demo_zip, tmp_path / "cells.zip"))
    root = project(tmp_path / "p", env, archive)
    assert ran(flow(root)) == ALL
    assert ran(flow(root)) == []
    # The same bytes at the source with a new mtime: fetched again; only the page showing the source follows.
    os.utime(archive, ns=(archive.stat().st_mtime_ns, archive.stat().st_mtime_ns + 10**9))
    assert ran(flow(root)) == ["download", "report"]
    # The source gone (offline, the host down, the file moved): what dvc.lock holds still stands.
    archive.rename(tmp_path / "elsewhere.zip")
    with caplog.at_level("WARNING"):
        assert ran(flow(root)) == []
    assert "cannot ask the source whether it changed" in caplog.text and "no such file" in caplog.text
    # Up to evaluate only: the run shows no gate nor page of the model before it.
    state = pipeline(overrides={"train.epochs": 2}, root=str(root), stages=["evaluate"], return_state=True)
    assert ran(state.result()) == ["train", "evaluate"]
    shown = {artifact.key: artifact for artifact in artifacts_of(state.state_details.flow_run_id)}
    assert "imgclf-gate" not in shown and "imgclf-html-report" not in shown and "## Gate" not in shown["imgclf-report"].data
    assert ran(flow(root, **{"train.epochs": 2})) == [name for name in FROM_TRAIN if name not in ("train", "evaluate")]
    # A change runs its stage, then only the stages whose inputs came out different: at distance 3
    # near_duplicates finds the same clusters, so split and all after it stay; the report shows its metrics.
    assert ran(flow(root, **{"train.epochs": 2, "validate.near_duplicate_distance": 3})) == ["near_duplicates", "report"]
    # A deleted output re-runs its stage; the same bytes come back, so nothing after it re-runs.
    (root / "data" / "split.csv").unlink()
    assert ran(flow(root, **{"train.epochs": 2, "validate.near_duplicate_distance": 3})) == ["split"]


def test_a_run_of_target_stages_runs_them_and_what_they_depend_on_only(tmp_path, demo_zip, env):
    root = project(tmp_path / "p", env, demo_zip)
    with pytest.raises(ProjectError, match="no stage 'trian'"):
        pipeline(root=str(root), stages=["trian"])
    assert not (root / "data").exists()
    data_stages = ALL[: ALL.index("split") + 1]
    outcome = pipeline(root=str(root), stages=["split"])
    assert list(outcome) == data_stages and ran(outcome) == data_stages
    assert not (root / "models").exists()
    assert ran(pipeline(root=str(root), stages=["split", "near_duplicates"])) == []
    assert "train" in dvc(root, env, "status")  # what the run left out is still to do


def test_the_pipeline_of_targets_keeps_them_and_the_stages_they_depend_on_in_order(tmp_path, env):
    project_dvc = DvcProject(project(tmp_path / "p", env, tmp_path / "none.zip"))
    assert list(project_dvc.pipeline()) == ALL
    assert list(project_dvc.pipeline(["split"])) == ALL[: ALL.index("split") + 1]
    assert list(project_dvc.pipeline(["evaluate", "near_duplicates"])) == [
        "download", "extract", "validate", "cache", "near_duplicates", "split", "train", "evaluate"]  # fmt: skip
    assert project_dvc.pipeline(["evaluate"])["evaluate"] == project_dvc.pipeline()["evaluate"]


def test_dvc_repro_then_the_flow_skips_every_stage_the_reverse_runs_nothing_and_both_give_the_same_bytes(
    tmp_path, demo_zip, env
):
    import keras
    import numpy as np

    by_repro = project(tmp_path / "repro-first", env, demo_zip)
    assert repro_ran(dvc(by_repro, env, "repro")) == ALL
    assert ran(flow(by_repro)) == []
    by_flow = project(tmp_path / "flow-first", env, demo_zip)
    assert ran(flow(by_flow)) == ALL
    assert repro_ran(dvc(by_flow, env, "repro")) == []
    assert "up to date" in dvc(by_flow, env, "status")
    # The same data, metrics and weights from either entry point.
    for output in ("data/manifest.csv", "data/split.csv", "data/cache/images.npy", "data/cache/index.csv",
                   "metrics/eval.json", "models/model.json"):
        assert (by_flow / output).read_bytes() == (by_repro / output).read_bytes(), output
    weights = [keras.models.load_model(root / "models" / "model.keras").get_weights() for root in (by_flow, by_repro)]
    assert all(np.array_equal(a, b) for a, b in zip(*weights))


def test_overrides_apply_to_their_run_alone_even_when_a_stage_fails(tmp_path, demo_zip, env):
    root = project(tmp_path / "p", env, demo_zip)
    before = (root / "params.yaml").read_bytes()
    assert ran(flow(root, **{"train.epochs": 2})) == ALL
    assert (root / "params.yaml").read_bytes() == before
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert lock["stages"]["train"]["params"]["params.yaml"]["train"]["epochs"] == 2  # what the run produced
    status = json.loads(dvc(root, env, "status", "--json"))  # dvc.lock is truthful: params.yaml says 1 epoch
    train_changed = [{"changed deps": {"params.yaml": {"train": "modified"}}}]
    assert status == {"train": train_changed, "audit": train_changed, "report": train_changed}  # the stages that read train
    # Another params file (`imgclf --params other.yaml run`): DVC compares and records its values too.
    other = yaml.safe_load(before)
    other["train"]["epochs"] = 3
    (root / "other.yaml").write_text(yaml.safe_dump(other))
    assert ran(pipeline(params_path="other.yaml", root=str(root), stages=["train"])) == ["train"]
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert lock["stages"]["train"]["params"]["params.yaml"]["train"]["epochs"] == 3
    with pytest.raises(ModelError):
        flow(root, **{"train.model": "mobilenet_v3_small", "train.weights": str(tmp_path / "missing.weights.h5"),
                      "prepare.image_size": 32})  # fmt: skip
    assert (root / "params.yaml").read_bytes() == before
    assert not (root / ".imgclf" / "run-params.yaml").exists()


def test_params_yaml_edited_during_a_run_reaches_neither_its_stages_nor_dvc_lock(tmp_path, demo_zip, env, monkeypatch):
    root = project(tmp_path / "p", env, demo_zip)
    edited = (root / "params.yaml").read_text().replace("seed: 42", "seed: 7")
    assert edited.count("seed: 7") > 1  # split.seed among them

    validate = STAGES["validate"]

    def validate_while_the_user_edits(*args):
        (root / "params.yaml").write_text(edited)
        return validate(*args)

    monkeypatch.setitem(STAGES, "validate", validate_while_the_user_edits)
    assert ran(pipeline(root=str(root), stages=["split"]))[-1] == "split"
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert lock["stages"]["split"]["params"]["params.yaml"]["split"]["seed"] == 42  # what the split was made with
    assert json.loads(dvc(root, env, "status", "--json", "split"))["split"] == [
        {"changed deps": {"params.yaml": {"split": "modified"}}}]  # fmt: skip


def test_without_overrides_dvc_gets_the_very_text_the_run_read(tmp_path):
    # Not a PyYAML dump of it: DVC reads YAML 1.2, where `yes` is a string, so dvc.lock would disagree with
    # params.yaml and `dvc status` call the stage changed after every run.
    from dvc.utils.serialize import parse_yaml

    text = "evaluate:\n  calibrate: yes\n"
    (tmp_path / ".imgclf").mkdir()
    with params_for_dvc(Layout(tmp_path), tmp_path / "params.yaml", text, {}) as path:
        assert path.read_text() == text
    assert not path.exists()
    # With overrides too, a key none of them names reaches DVC as DVC reads params.yaml.
    with params_for_dvc(Layout(tmp_path), tmp_path / "params.yaml", text, {"gate.force": True}) as path:
        assert parse_yaml(path.read_text(), str(path)) == {"evaluate": {"calibrate": "yes"}, "gate": {"force": True}}


def test_a_key_a_stage_reads_that_params_yaml_lacks_stops_the_run_before_any_stage(tmp_path, env):
    root = project(tmp_path / "p", env, tmp_path / "none.zip")
    tree = yaml.safe_load((root / "params.yaml").read_text())
    del tree["gate"], tree["data"]["max_extract_bytes"]
    (root / "params.yaml").write_text(yaml.safe_dump(tree))
    with pytest.raises(ParamsError, match=r"params.yaml: missing data.max_extract_bytes \(extract\), gate \(publish\): "):
        flow(root)  # DVC would have stopped only on recording publish, after its upload
    assert not (root / "data").exists()
    split_and_before = DvcProject(root).pipeline(["split"])
    assert DvcProject(root).missing_params(split_and_before) == ["data.max_extract_bytes (extract)"]


def test_a_bad_flow_parameter_is_named_as_the_overrides_it_came_in(tmp_path, env):
    root = project(tmp_path / "p", env, tmp_path / "none.zip")
    with pytest.raises(ParamsError, match=r"^overrides train.epochs: train.epochs: Input should be greater than 0$"):
        flow(root, **{"train.epochs": 0})


def test_a_password_sent_in_the_clear_as_a_flow_parameter_is_warned_of_redacted(tmp_path, env, caplog):
    # What a deployment run gets from `prefect deployment run -p overrides=...`: Prefect stored it as sent.
    root = project(tmp_path / "p", env, tmp_path / "none.zip")
    url = "http://reader:Hunter2Secret@127.0.0.1:9/cells.zip"
    with caplog.at_level("WARNING"), pytest.raises(DownloadError):
        flow(root, **{"data.url": url, "data.retries": 0})
    assert "overrides hold a password or token in the clear (http://***@127.0.0.1:9/cells.zip)" in caplog.text
    assert "Hunter2Secret" not in caplog.text


def test_failed_train_leaves_earlier_stages_locked_and_dvc_repro_starts_at_train(tmp_path, demo_zip, env):
    missing = tmp_path / "missing.weights.h5"
    root = project(tmp_path / "p", env, demo_zip, prepare={"image_size": 32},
                   train={"model": "mobilenet_v3_small", "weights": str(missing)})  # fmt: skip
    with pytest.raises(ModelError, match="train.weights: cannot load"):
        flow(root)
    assert not (root / "models" / "model.keras").exists()
    assert set(yaml.safe_load((root / "dvc.lock").read_text())["stages"]) == {"download", "extract", "validate", "cache", "near_duplicates", "split"}
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["model"] = "cnn"
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    # Up to train, as far as the failed run went: the stages before it are up to date.
    assert repro_ran(dvc(root, env, "repro", "train")) == ["train"]


def test_the_cloud_deployments_pull_steps_give_a_clone_that_is_up_to_date_and_the_flow_skips_every_stage(
        tmp_path, demo_zip, env, monkeypatch):  # fmt: skip
    import asyncio

    from prefect.deployments.steps.core import run_steps

    root = project(tmp_path / "p", env, demo_zip)
    dvc(root, env, "remote", "add", "-d", "storage", str(tmp_path / "remote"))
    assert ran(flow(root)) == ALL  # ends with dvc push
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "a run"], root, env)
    sh(["git", "branch", "-M", "main"], root, env)
    # prefect.yaml's cloud-weekly pull steps as a worker runs them: git clone IMGCLF_REPO, cd into it, dvc pull.
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    steps = next(deployment["pull"] for deployment in deployments if deployment["name"] == "cloud-weekly")
    (tmp_path / "worker").mkdir()
    monkeypatch.chdir(tmp_path / "worker")
    monkeypatch.setenv("IMGCLF_REPO", str(root))
    monkeypatch.setenv("PATH", f"{VENV_BIN}{os.pathsep}{env['PATH']}")  # dvc, as installed in the worker's image
    asyncio.run(run_steps(steps))
    clone = Path.cwd()
    assert clone.parent == tmp_path / "worker" and (clone / "data" / "cache").is_dir()
    assert "up to date" in dvc(clone, env, "status")
    assert ran(flow(clone)) == []


def test_a_second_run_in_the_same_project_is_refused_naming_the_first(tmp_path, demo_zip, env):
    root = project(tmp_path / "p", env, demo_zip)
    with one_run_at_a_time(root, "imgclf run"):
        with pytest.raises(ProjectError, match=rf"imgclf run \(pid {os.getpid()}, started .*\) is running in this project"):
            flow(root)
        # From the command line: that one line alone, before a Prefect server or flow run is started.
        result = subprocess.run(in_venv(["imgclf", "run"]), cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == ""
    assert re.fullmatch(rf"imgclf: error: {re.escape(str(root.resolve()))}: imgclf run \(pid {os.getpid()}, started .*\) "
                        "is running in this project; wait for it to end", result.stderr.strip())  # fmt: skip
    assert not (root / "data").exists()


def test_a_stage_run_by_hand_beside_a_run_is_refused_naming_the_run(tmp_path, demo_zip, env):
    root = project(tmp_path / "p", env, demo_zip)
    with one_run_at_a_time(root, "imgclf run"):
        result = subprocess.run(in_venv(["imgclf", "stage", "download"]), cwd=root, env=env, capture_output=True,
                                text=True)  # fmt: skip
    assert result.returncode == 1
    assert re.fullmatch(rf"imgclf: error: {re.escape(str(root.resolve()))}: imgclf run \(pid {os.getpid()}, started .*\) "
                        "is running in this project; wait for it to end", result.stderr.strip().splitlines()[-1])  # fmt: skip
    assert not (root / "data").exists()
    # Stages share the lock (multi-worker training runs one per worker); a run is refused beside them,
    # naming no run, though a run killed with SIGKILL left its name in the lock file.
    (root / ".imgclf" / "run.lock").write_text("imgclf run (pid 1, started 2026-01-01 00:00:00)\n")
    with one_run_at_a_time(root, "imgclf stage train", shared=True):
        sh(["imgclf", "stage", "download"], root, env)
        with pytest.raises(ProjectError, match="an imgclf stage is running in this project"):
            flow(root)


def test_dvc_repro_started_during_a_run_refuses_instead_of_writing_the_same_outputs(tmp_path, demo_zip, env, monkeypatch):
    root = project(tmp_path / "p", env, demo_zip)
    seen = {}

    def split_beside_a_dvc_repro(params, layout, map_shards):
        seen["holder"] = (root / ".imgclf" / "run.lock").read_text()
        seen["repro"] = subprocess.run(in_venv(["dvc", "repro"]), cwd=root, env=env, capture_output=True, text=True)
        return STAGES_BEFORE["split"](params, layout, map_shards)

    STAGES_BEFORE = dict(STAGES)
    monkeypatch.setitem(STAGES, "split", split_beside_a_dvc_repro)
    assert ran(pipeline(root=str(root), stages=["split"])) == ALL[: ALL.index("split") + 1]
    repro = seen["repro"]
    assert seen["holder"].startswith(f"flow run 'imgclf-split' (pid {os.getpid()}, started ")  # as a deployment's run
    assert repro.returncode != 0 and "Unable to acquire lock" in repro.stderr + repro.stdout
    assert repro_ran(repro.stdout) == []
    assert "up to date" in dvc(root, env, "status", "split")  # the run recorded each stage it ran; nothing interleaved


def test_dvc_s_lock_taken_before_the_flow_keeps_dvc_repro_out_and_is_let_go_of_for_the_push(tmp_path, demo_zip, env):
    from dvc.repo import Repo

    root = project(tmp_path / "p", env, demo_zip)
    dvc(root, env, "remote", "add", "-d", "storage", str(tmp_path / "store"))
    with DvcProject(root).held():  # as `imgclf run` takes it while Prefect's server boots
        repro = subprocess.run(in_venv(["dvc", "repro"]), cwd=root, env=env, capture_output=True, text=True)
        assert repro.returncode != 0 and "Unable to acquire lock" in repro.stderr + repro.stdout
        # The flow's stages run under it; its `dvc push`, after them, takes it in turn.
        assert ran(pipeline(root=str(root), stages=["download"])) == ["download"]
    assert any(path.is_file() for path in (tmp_path / "store").rglob("*"))  # pushed
    with Repo(str(root)) as repo, repo.lock:  # and free once the block ended
        pass


def test_a_run_started_during_dvc_repro_is_refused_in_one_line(tmp_path, demo_zip, env):
    from dvc.repo import Repo

    root = project(tmp_path / "p", env, demo_zip)
    with Repo(str(root)) as repo, repo.lock:  # what `dvc repro` holds while it runs
        with pytest.raises(ProjectError, match="a DVC command \\(dvc repro\\?\\) holds this project's lock"):
            flow(root)
    assert not (root / "data").exists()


def test_a_run_started_while_dvc_repro_runs_a_stage_command_is_refused_naming_it(tmp_path, demo_zip, env, monkeypatch,
                                                                                   capsys):  # fmt: skip
    from flows.cli import main

    # While a stage's command runs, `dvc repro` lets go of its project lock (the outputs removed already);
    # its rwlock file names it.
    root = project(tmp_path / "p", env, demo_zip)
    repro = subprocess.Popen(["sleep", "60"])
    (root / ".dvc" / "tmp").mkdir(exist_ok=True)
    (root / ".dvc" / "tmp" / "rwlock").write_text(json.dumps(
        {"read": {}, "write": {str(root / "data" / "split.csv"): {"pid": repro.pid, "cmd": "dvc repro"}}}))  # fmt: skip
    try:
        with pytest.raises(ProjectError, match=rf": dvc repro \(pid {repro.pid}\) is running a stage in this project"):
            flow(root)
        # Also once the stage's command holds the run lock, shared, as an `imgclf stage` does.
        (root / ".imgclf").mkdir(exist_ok=True)
        with open(root / ".imgclf" / "run.lock", "a+") as stage:
            fcntl.flock(stage, fcntl.LOCK_SH)
            with pytest.raises(ProjectError, match=rf": dvc repro \(pid {repro.pid}\) is running a stage in this project"):
                flow(root)
        # So is a stage typed by hand (a second trainer on the same models/), though the stage that
        # `dvc repro` runs, its descendant, goes ahead: dvc repro in tests/test_dvc.py.
        monkeypatch.chdir(root)
        assert main(["stage", "train"]) == 1
        assert f": dvc repro (pid {repro.pid}) is running a stage in this project" in capsys.readouterr().err
    finally:
        repro.kill()
        repro.wait()
    with one_run_at_a_time(root, "imgclf run"):  # the entry of a process that is gone holds nothing
        pass
    assert not (root / "data").exists()


def test_permanent_download_failure_fails_the_flow_with_the_url(tmp_path, env):
    missing = tmp_path / "nowhere" / "cells.zip"
    root = project(tmp_path / "p", env, missing)
    with pytest.raises(DownloadError, match=f"{missing}: no such file"):
        flow(root)


def test_outside_a_dvc_project_versioning_is_skipped_with_a_reason(tmp_path):
    said = version_outputs(Layout(tmp_path), OrchestrationParams())
    assert said == [f"{tmp_path.resolve()} is not a DVC project: skipped versioning"]


def test_failed_dvc_push_says_dvc_s_error_not_its_support_footer(tmp_path, env):
    root = dvc_project(tmp_path / "project", env, {})
    (root / "notes.txt").write_text("something to push\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("a remote cannot live below a file\n")
    dvc(root, env, "add", "notes.txt")
    dvc(root, env, "remote", "add", "-d", "storage", str(blocker / "store"))
    with pytest.raises(VersioningError) as failed:
        version_outputs(Layout(root), OrchestrationParams())
    message = str(failed.value)
    assert re.match(r"dvc push: exit \d+: ERROR: ", message) and "support" not in message, message
    assert message.endswith("only the push failed: mend the remote and run `dvc push`, or set orchestration.dvc_push=false")


def test_git_commit_after_a_run_records_dvc_lock(tmp_path, demo_zip, env):
    root = project(tmp_path / "p", env, demo_zip, orchestration={"git_commit": True})
    assert ran(flow(root)) == ALL
    log = subprocess.run(["git", "log", "--format=%s", "-1", "--name-only"], cwd=root, capture_output=True, text=True).stdout
    assert "imgclf: record pipeline run in dvc.lock" in log and "dvc.lock" in log
    # With it, what dvc.yaml leaves to git (cache: false), or a clone of the commit would re-train.
    assert {"metrics/train.json", "metrics/eval.json", "plots/roc.csv"} <= set(log.split())
    assert sh(["git", "status", "--porcelain", "--", "metrics", "plots", "dvc.lock"], root, env) == ""


def test_git_commit_leaves_out_what_git_ignores_and_a_gitignore_holding_the_users_edits(tmp_path, env):
    root = dvc_project(tmp_path / "project", env, {})
    (root / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    (root / "metrics").mkdir()
    for name in ("train.json", "eval.json"):
        (root / "metrics" / name).write_text("{}\n")
    (root / ".gitignore").write_text((root / ".gitignore").read_text() + "metrics/\nmy-notes/\n")  # the user's, uncommitted
    (root / "params.yaml").write_text((root / "params.yaml").read_text().replace("epochs: 40", "epochs: 41"))  # the run's
    (root / "tasks" / "train.py").write_text((root / "tasks" / "train.py").read_text() + "# tried something\n")
    said = version_outputs(Layout(root), OrchestrationParams(git_commit=True, dvc_push=False))
    assert said == ["dvc.lock and the outputs git carries committed (not: metrics/eval.json, metrics/train.json ignored "
                    "by git; .gitignore holding edits of yours; tasks/train.py, uncommitted edits dvc.lock records: a "
                    "clone re-runs their stages)"]  # fmt: skip
    assert sh(["git", "show", "--name-only", "--format=", "HEAD"], root, env).split() == ["dvc.lock", "params.yaml"]
    # Once tracked, outputs a .gitignore names still get their updates committed.
    sh(["git", "add", "--force", "metrics"], root, env)
    sh(["git", "commit", "-qm", "metrics"], root, env)
    (root / "metrics" / "train.json").write_text('{"epochs": 41}\n')
    (root / "dvc.lock").write_text("schema: '2.0'\nstages: {train: {cmd: imgclf stage train}}\n")
    version_outputs(Layout(root), OrchestrationParams(git_commit=True, dvc_push=False))
    assert sh(["git", "show", "--name-only", "--format=", "HEAD"], root, env).split() == ["dvc.lock", "metrics/train.json"]
    # A run with its own params: dvc.lock holds values params.yaml does not, and the summary says so.
    (root / "dvc.lock").write_text("schema: '2.0'\nstages: {train: {cmd: imgclf stage train --now}}\n")
    said = version_outputs(Layout(root), OrchestrationParams(git_commit=True, dvc_push=False), root / "other.yaml")
    assert said[0].endswith("the params this run used (overrides, --params, or params.yaml edited during the run): "
                            "dvc.lock records them, params.yaml does not hold them, and a clone re-runs the stages "
                            "they changed)")  # fmt: skip


def test_a_remote_that_is_not_the_default_is_said_not_pushed_to(tmp_path, env):
    root = dvc_project(tmp_path / "project", env, {})
    dvc(root, env, "remote", "add", "storage", str(tmp_path / "store"))
    said = version_outputs(Layout(root), OrchestrationParams())
    assert said == ["no default DVC remote among storage (dvc remote default NAME): nothing pushed"]


def test_transient_download_failures_are_retried_and_the_flow_succeeds(tmp_path, demo_zip, env):
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
        root = project(tmp_path / "p", env, f"http://127.0.0.1:{server.server_port}/cells.zip", data={"retry_backoff": 0.01})
        outcome = flow(root)
    finally:
        server.shutdown()
    assert ran(outcome) == ALL
    assert len(requests) == 3
    assert (root / "data" / "raw" / "cells.zip").read_bytes() == payload


def task_runs(state) -> list[str]:
    """Returns the names of the task runs of the flow run that ended in `state`."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    this_run = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        return sorted(run.name for run in client.read_task_runs(flow_run_filter=this_run))


def test_in_order_yields_shard_results_in_order_with_a_few_shards_in_flight():
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from tasks.files import in_order

    lock, running, most = threading.Lock(), [0], [0]

    def slow_first(shard: int) -> int:  # the first shards take longest: later ones finish first
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.002 * (20 - shard % 100))
        with lock:
            running[0] -= 1
        return shard * shard

    submitted = []

    with ThreadPoolExecutor(max_workers=8) as pool:
        def submit(fn, shard):
            submitted.append(shard)
            return pool.submit(fn, shard)

        assert list(in_order(submit, slow_first, range(20), window=3)) == [shard * shard for shard in range(20)]
        assert most[0] <= 3
        results = in_order(submit, slow_first, range(100, 120), window=3)
        assert next(results) == 100 * 100
        results.close()  # left early: nothing more is submitted
    assert submitted[20:] == [100, 101, 102, 103]


def test_an_interrupted_process_pool_stops_its_workers_without_waiting_for_their_shards():
    import time

    import psutil

    from tasks.files import process_pool_map

    before = set(psutil.Process().children(recursive=True))  # the module's Prefect server
    results = process_pool_map(time.sleep, [0, 120, 120, 120])
    assert next(results) is None
    workers = [child for child in psutil.Process().children(recursive=True)
               if child not in before and "resource_tracker" not in " ".join(child.cmdline())]  # fmt: skip
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        results.throw(KeyboardInterrupt)  # Ctrl-C while the parent waits for the next shard
    assert time.monotonic() - started < 10
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert workers and not alive


@pytest.mark.parametrize("runner", ["processes", "threads"])
def test_shards_fan_out_on_the_configured_pool_with_the_same_bytes_and_no_task_run_each(tmp_path, runner, env):
    from tasks.demo_data import make_demo_archive
    from tasks.files import process_pool_map
    from tasks.params import load_params

    # 524 files and 520 images: several validate and cache shards, so the runner really fans out.
    archive = make_demo_archive(tmp_path / "big.zip", per_class=260)
    root = project(tmp_path / "flow", env, archive, orchestration={"task_runner": runner})
    state = pipeline(root=str(root), return_state=True)
    assert ran(state.result()) == ALL
    assert len(task_runs(state)) == len(ALL)  # one task run a stage; shards are not task runs
    for name in ("download", "extract", "validate", "cache", "near_duplicates", "split"):
        STAGES[name](load_params(root / "params.yaml"), Layout(tmp_path / "direct"), process_pool_map)
    for output in ("data/manifest.csv", "data/cache/images.npy", "data/cache/index.csv", "data/split.csv"):
        assert (root / output).read_bytes() == (tmp_path / "direct" / output).read_bytes(), output


@pytest.fixture
def dask_cluster():
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                       dashboard_address=None, silence_logs=40)  # fmt: skip
    try:
        yield cluster
    finally:
        cluster.close()


def test_dask_cluster_gives_the_same_cache_and_split_as_the_local_run(tmp_path, dask_cluster, env, monkeypatch, caplog):
    from tasks.demo_data import make_demo_archive
    from tasks.files import Progress

    monkeypatch.setattr(Progress, "LOG_EVERY_S", 0.0)  # every 10% step logged, however quick
    archive = make_demo_archive(tmp_path / "big.zip", per_class=260)
    on_dask = {"task_runner": "dask", "dask_address": dask_cluster.scheduler_address}
    with caplog.at_level("INFO", logger="imgclf"):
        state = pipeline(root=str(project(tmp_path / "dask", env, archive, orchestration=on_dask)), return_state=True)
    assert ran(state.result()) == ALL
    # The shards were Dask tasks, not task runs; the stages logged their progress as they came back.
    # (validate decodes each image once and stages its row; cache then has nothing to decode)
    assert "judge_shard" in dask_cluster.scheduler.task_prefixes
    assert len(task_runs(state)) == len(ALL)
    assert "validate: 100% (524/524 files)" in caplog.text and "cache: 100% (520/520 images)" in caplog.text
    assert ran(flow(project(tmp_path / "local", env, archive))) == ALL
    for output in ("data/manifest.csv", "data/cache/images.npy", "data/cache/index.csv", "data/split.csv"):
        assert (tmp_path / "dask" / output).read_bytes() == (tmp_path / "local" / output).read_bytes(), output


@pytest.mark.parametrize("scheduler", ["refused", "silent", "greeting"])
def test_an_unreachable_dask_scheduler_fails_the_stage_in_one_line_naming_the_key(tmp_path, env, scheduler):
    import dask
    import distributed  # noqa: F401  its config defaults, loaded before dask.config.set below: its exit keeps them

    from flows.pipeline import DaskError
    from tasks.demo_data import make_demo_archive

    archive = make_demo_archive(tmp_path / "big.zip", per_class=260)  # more than one shard: Dask is asked
    # The discard port refuses. The ports of other servers: one that never answers (Dask waited forever),
    # one that greets first as SSH does (Dask read its first bytes as a frame length of exabytes).
    held = []  # the greeted connections stay open, as a server keeps them

    def greet(connection) -> None:
        connection.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
        held.append(connection)

    with tcp_server(greet if scheduler == "greeting" else None) as listening:
        port = 9 if scheduler == "refused" else listening
        on_dask = {"task_runner": "dask", "dask_address": f"tcp://127.0.0.1:{port}"}
        root = project(tmp_path / "dask", env, archive, orchestration=on_dask)
        with dask.config.set({"distributed.comm.timeouts.connect": "1s"}), pytest.raises(DaskError) as failed:
            flow(root)
    assert re.fullmatch(rf"orchestration\.dask_address: .*tcp://127\.0\.0\.1:{port}\b.*", str(failed.value))


def test_a_tls_scheduler_is_asked_with_the_tls_settings_in_dask_s_config(tmp_path):
    # As Client connects; the probe before it once went without them, and failed with a TypeError.
    import asyncio

    import dask
    from distributed import Scheduler
    from distributed.security import Security

    from flows.pipeline import _handshake

    cert, key = _self_signed_certificate(tmp_path)
    tls = {f"distributed.comm.tls.{name}": str(path) for name, path in [
        ("ca-file", cert), ("client.cert", cert), ("client.key", key), ("scheduler.cert", cert), ("scheduler.key", key)]}  # fmt: skip

    async def ask() -> None:
        async with Scheduler(host="tls://127.0.0.1", port=0, dashboard_address=None, security=Security()) as scheduler:
            await asyncio.get_running_loop().run_in_executor(None, _handshake, scheduler.address)

    with dask.config.set(tls):
        asyncio.run(ask())


def _self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """Returns (certificate, key) PEM files for 127.0.0.1, its own CA."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key()).serial_number(1)
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    (cert_path := folder / "cert.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (key_path := folder / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))  # fmt: skip
    return cert_path, key_path


def test_a_dask_worker_killed_mid_stage_costs_only_its_shard(tmp_path, dask_cluster, env):
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
    on_dask = {"task_runner": "dask", "dask_address": dask_cluster.scheduler_address}
    outcome = flow(project(tmp_path / "dask", env, archive, orchestration=on_dask))
    watcher.join(timeout=5)
    assert killed, "no shard was seen running on a worker"
    assert ran(outcome) == ALL
    assert ran(flow(project(tmp_path / "local", env, archive))) == ALL
    for output in ("data/manifest.csv", "data/cache/images.npy"):
        assert (tmp_path / "dask" / output).read_bytes() == (tmp_path / "local" / output).read_bytes(), output


def shuffle_labels(archive: Path, seed: int = 1) -> None:
    """Rewrites the zip in place with every file under a class folder moved to a random class (names kept apart)."""
    import random
    import zipfile

    with zipfile.ZipFile(archive) as source:
        entries = [(info.filename, source.read(info)) for info in source.infolist() if not info.is_dir()]
    labels = sorted({name.split("/")[1] for name, _ in entries if name.count("/") == 2})
    pick = random.Random(seed)
    with zipfile.ZipFile(archive, "w") as target:
        for name, data in entries:
            top, label, file = name.split("/") if name.count("/") == 2 else (None, None, None)
            target.writestr(f"{top}/{pick.choice(labels)}/{label}-{file}" if top else name, data)


def test_a_retrain_on_shuffled_labels_at_the_same_url_is_caught_by_the_reference_set(tmp_path, env):
    from tasks.demo_data import make_demo_archive

    archive = make_demo_archive(tmp_path / "cells.zip", per_class=60)
    root = project(tmp_path / "p", env, archive, prepare={"image_size": 32}, train={"epochs": 10})
    assert ran(flow(root)) == ALL
    first = json.loads((root / "metrics" / "publish.json").read_text())
    assert first["promoted"], first["gate"]["reason"]
    latest = root / "models" / "champion" / "latest.json"
    before = latest.read_bytes()

    shuffle_labels(archive)  # the same URL, now serving a mislabeled archive: every stage re-runs
    assert ran(flow(root)) == ALL
    second = json.loads((root / "metrics" / "publish.json").read_text())
    reference = second["gate"]["sets"]["reference"]
    assert not second["promoted"], second["gate"]
    assert reference["champion"] - reference["challenger"] > 0.2, reference  # the frozen set shows the damage
    assert latest.read_bytes() == before
