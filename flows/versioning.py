"""After a flow run: record it in dvc.lock, push to the DVC remote, commit dvc.lock; each only where it applies."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tasks.errors import StageError
from tasks.files import atomic_file
from tasks.params import OrchestrationParams, S3Params
from tasks.s3 import parse_uri
from tasks.layout import Layout

log = logging.getLogger("imgclf")

REMOTE = "storage"


class VersioningError(StageError):
    """A DVC or git command failed after the pipeline itself succeeded."""


def _run(command: list[str], layout: Layout) -> str:
    result = subprocess.run(command, cwd=layout.root, capture_output=True, text=True)
    if result.returncode:
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise VersioningError(f"{' '.join(command[:4])}: exit {result.returncode}: {last[0]}")
    return result.stdout


def _dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def is_dvc_project(layout: Layout) -> bool:
    return (layout.root / "dvc.yaml").is_file() and (layout.root / ".dvc").is_dir()


def write_overrides(params_file: Path, overrides: Mapping[str, Any]) -> None:
    """Sets dotted keys in the params file, keeping its comments and order (as `dvc exp run -S` does)."""
    from ruamel.yaml import YAML

    yaml = YAML()
    tree = yaml.load(params_file.read_text()) if params_file.exists() else None
    tree = tree if tree is not None else {}
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    with atomic_file(params_file) as handle:
        yaml.dump(tree, handle)


def configure_remote(layout: Layout, uri: str, s3: S3Params) -> list[str]:
    """Makes `uri` (s3://bucket/prefix) the project's default DVC remote, endpoint and region included.

    Only where it is goes into `.dvc/config`; credentials stay in boto3's chain (environment,
    profile, role), as `dvc push` and `dvc pull` read them.
    """
    parse_uri(uri)
    if not is_dvc_project(layout):
        raise VersioningError(f"{layout.root.resolve()}: not a DVC project (run `dvc init` first)")
    _run(_dvc("remote", "add", "--default", "--force", REMOTE, uri), layout)
    done = [f"DVC remote {REMOTE!r} -> {uri} (default)"]
    endpoint = s3.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    for option, value in (("endpointurl", endpoint), ("region", s3.region)):
        if value:
            _run(_dvc("remote", "modify", REMOTE, option, value), layout)
            done.append(f"{option} {value}")
    return _say(done)


def version_outputs(layout: Layout, orchestration: OrchestrationParams) -> list[str]:
    """Returns what was done: `dvc commit` (dvc.lock), `dvc push`, `git commit`, or why not."""
    if not orchestration.dvc_commit:
        return _say(["versioning off (orchestration.dvc_commit: false)"])
    if not is_dvc_project(layout):
        return _say([f"{layout.root.resolve()} is not a DVC project: skipped versioning"])
    # The flow ran each stage as `dvc repro` would: record the outputs, as `dvc repro` does.
    _run(_dvc("commit", "--force", "--quiet"), layout)
    done = ["dvc.lock updated"]
    if orchestration.dvc_push:
        if _run(_dvc("remote", "list"), layout).strip():
            _run(_dvc("push", "--quiet"), layout)
            done.append("pushed to the DVC remote")
        else:
            done.append("no DVC remote configured: nothing pushed")
    if orchestration.git_commit:
        if (layout.root / ".git").exists():
            _run(["git", "add", "dvc.lock"], layout)
            staged = _run(["git", "diff", "--cached", "--name-only"], layout).split()
            if "dvc.lock" in staged:
                _run(["git", "commit", "--quiet", "-m", "imgclf: record pipeline run in dvc.lock", "--", "dvc.lock"], layout)
                done.append("dvc.lock committed to git")
            else:
                done.append("dvc.lock unchanged: no git commit")
        else:
            done.append("not a git repo: no git commit")
    return _say(done)


def _say(lines: list[str]) -> list[str]:
    for line in lines:
        log.info("versioning: %s", line)
    return lines
