"""`imgclf init DIR`: a ready git + DVC project whose pipeline code is the installed imgclf."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from flows.init import ProjectExistsError, ToolMissingError, init_project
from tasks.params import ParamsError
from tests.conftest import REPO, in_venv, sh

IGNORED_FOLDERS = ("data", "models", ".imgclf")  # DVC caches them; metrics/ and plots/ json and csv go to git


@pytest.fixture(autouse=True)
def _no_dvc_analytics(monkeypatch):
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")  # for init_project called in this process


def imgclf(args: list[str], cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(in_venv(["imgclf", *args]), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def without_code_deps(pipeline: dict) -> dict:
    """Returns dvc.yaml's tree without `tasks/...` deps (and without a deps list left empty)."""
    for stage in pipeline["stages"].values():
        stage["deps"] = [dep for dep in stage.get("deps", []) if not (isinstance(dep, str) and dep.startswith("tasks/"))]
        if not stage["deps"]:
            del stage["deps"]
    return pipeline


def test_init_on_an_empty_folder_makes_a_clean_git_and_dvc_project_with_this_repos_pipeline(tmp_path, cli_env):
    out = sh(["imgclf", "init", "proj"], tmp_path, cli_env)
    project = tmp_path / "proj"

    assert out.strip().splitlines()[-2:] == ["  cd proj", "  imgclf run"], out
    assert sh(["git", "status", "--porcelain", "--untracked-files=all"], project, cli_env) == ""
    assert sh(["git", "log", "--format=%s"], project, cli_env).strip() == "imgclf init"
    assert {"params.yaml", "dvc.yaml", "prefect.yaml", ".gitignore", ".dvc/config"} <= set(
        sh(["git", "ls-files"], project, cli_env).split()
    )
    sh(["dvc", "status"], project, cli_env)
    pipeline = yaml.safe_load((project / "dvc.yaml").read_text())
    deps = [dep for stage in pipeline["stages"].values() for dep in stage.get("deps", [])]
    assert not [dep for dep in deps if str(dep).startswith("tasks/")]
    assert pipeline == without_code_deps(yaml.safe_load((REPO / "dvc.yaml").read_text()))
    assert (project / "params.yaml").read_text() == (REPO / "params.yaml").read_text()
    ignored = sh(["git", "check-ignore", *(f"{folder}/x" for folder in IGNORED_FOLDERS)], project, cli_env)
    assert len(ignored.split()) == len(IGNORED_FOLDERS)
    repo_ignores = (REPO / ".gitignore").read_text().splitlines()
    assert set((project / ".gitignore").read_text().splitlines()) <= set(repo_ignores)


def test_init_with_a_url_sets_data_url_empties_the_checksum_and_keeps_the_comments(tmp_path):
    init_project(tmp_path / "proj", "https://example.com/cells.zip")
    written = (tmp_path / "proj" / "params.yaml").read_text()

    data = yaml.safe_load(written)["data"]
    assert data["url"] == "https://example.com/cells.zip" and data["sha256"] is None
    template = (REPO / "params.yaml").read_text()
    assert [line for line in written.splitlines() if line.lstrip().startswith("#")] == [
        line for line in template.splitlines() if line.lstrip().startswith("#")
    ]


def test_init_refuses_a_folder_with_a_params_yaml_naming_it_and_touches_nothing(tmp_path, cli_env):
    project = tmp_path / "mine"
    project.mkdir()
    (project / "params.yaml").write_text("train: {epochs: 3}  # my own\n")

    result = imgclf(["init", "mine"], tmp_path, cli_env)
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 1, lines
    assert lines[-1].startswith("imgclf: error:") and "mine/params.yaml" in lines[-1], lines
    assert sorted(path.name for path in project.iterdir()) == ["params.yaml"]
    assert (project / "params.yaml").read_text() == "train: {epochs: 3}  # my own\n"


def test_init_refuses_a_folder_with_a_dvc_yaml(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    with pytest.raises(ProjectExistsError, match="dvc.yaml"):
        init_project(tmp_path)


@pytest.mark.parametrize("url", ["https://bob:hunter2secret@data.example.org/x.zip",
                                 "https://data.example.org/x.zip?X-Amz-Signature=hunter2secret"])
def test_init_refuses_a_url_with_credentials_before_writing_anything(tmp_path, url):
    # params.yaml is committed by init and recorded by dvc.lock: the password would land in git.
    with pytest.raises(ParamsError, match="^--url: .*holds credentials.*netrc") as caught:
        init_project(tmp_path / "proj", url)
    assert "hunter2secret" not in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "proj").exists()


def test_init_refuses_a_url_of_another_scheme_in_the_words_of_its_own_option(tmp_path):
    with pytest.raises(ParamsError) as caught:
        init_project(tmp_path / "proj", "ftp://data.example.org/x.zip")
    assert str(caught.value).startswith("--url: unsupported scheme ftp://")  # not a --set the user never typed
    assert not (tmp_path / "proj").exists()


def test_init_without_git_is_one_line_error_before_creating_anything(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))
    with pytest.raises(ToolMissingError, match="^git: not found on PATH") as caught:
        init_project(tmp_path / "proj")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "proj").exists()


def test_init_without_a_git_identity_leaves_the_files_staged_and_says_so(tmp_path, cli_env):
    env = {key: value for key, value in cli_env.items() if not key.startswith("GIT_") and key != "EMAIL"}
    env |= {"HOME": str(tmp_path / "home"), "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null"}

    out = sh(["imgclf", "init", "proj"], tmp_path, env)
    assert "Staged, not committed" in out
    staged = sh(["git", "status", "--porcelain"], tmp_path / "proj", env).splitlines()
    assert {"A  params.yaml", "A  dvc.yaml", "A  prefect.yaml", "A  .gitignore"} <= set(staged)
    assert subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=tmp_path / "proj", env=env).returncode != 0


def test_init_keeps_an_existing_gitignore_and_adds_the_output_lines(tmp_path):
    (tmp_path / ".gitignore").write_text("*.log")
    init_project(tmp_path)
    lines = (tmp_path / ".gitignore").read_text().splitlines()
    assert lines[0] == "*.log" and {"/data/", "/.imgclf/", "/dvc_plots/"} <= set(lines)
    assert not [line for line in lines if "benchmarks" in line]


def test_prefect_yaml_entrypoints_load_the_installed_flow_and_the_rest_is_this_repos(tmp_path):
    from prefect.flows import load_flow_from_entrypoint

    from flows.pipeline import pipeline

    init_project(tmp_path)
    written = yaml.safe_load((tmp_path / "prefect.yaml").read_text())
    template = yaml.safe_load((REPO / "prefect.yaml").read_text())
    for deployment in written["deployments"]:
        assert load_flow_from_entrypoint(deployment["entrypoint"]).name == pipeline.name
    for deployment in template["deployments"] + written["deployments"]:
        del deployment["entrypoint"]
    assert written == template


def test_a_project_from_init_runs_the_pipeline_on_a_local_archive(tmp_path, cli_env, demo_zip):
    sh(["imgclf", "init", "proj"], tmp_path, cli_env)
    project = tmp_path / "proj"

    overrides = [f"data.url={demo_zip}", "data.sha256=", "prepare.image_size=24", "train.epochs=1"]
    result = imgclf(["run", *(arg for item in overrides for arg in ("--set", item))], project, cli_env)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    assert result.stdout.strip().splitlines()[-1].startswith("test accuracy"), result.stdout[-2000:]
    status = sh(["git", "status", "--porcelain", "--untracked-files=all"], project, cli_env).splitlines()
    assert not [line for line in status if line[3:].split("/")[0] in IGNORED_FOLDERS], status
    # An extracted image cut short in place (root ignores read-only modes) leaves DVC's cached copy whole.
    image = next((project / "data" / "extracted").rglob("*.png"))
    digest = hashlib.md5(image.read_bytes()).hexdigest()
    os.truncate(image, 100)
    cached = project / ".dvc" / "cache" / "files" / "md5" / digest[:2] / digest[2:]
    assert hashlib.md5(cached.read_bytes()).hexdigest() == digest
