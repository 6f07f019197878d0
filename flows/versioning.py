"""After a flow run (each stage already recorded in dvc.lock): push to the DVC remote, commit dvc.lock; each only where it applies."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from flows.dvc_project import is_dvc_project
from tasks.errors import StageError
from tasks.params import OrchestrationParams, ParamsError, S3Params, params_tree
from tasks.redact import HOLDS_CREDENTIALS, has_secret, redact
from tasks.s3 import parse_uri
from tasks.layout import Layout

log = logging.getLogger("imgclf")

REMOTE = "storage"


class VersioningError(StageError):
    """A DVC or git command failed after the pipeline itself succeeded."""


def _run(command: list[str], layout: Layout, allowed: tuple[int, ...] = ()) -> str:
    result = subprocess.run(command, cwd=layout.root, capture_output=True, text=True)
    if result.returncode and result.returncode not in allowed:
        lines = [line.strip() for line in (result.stderr or result.stdout).splitlines()
                 if line.strip() and not line.startswith("hint:")]  # git's advice, not what went wrong
        # DVC ends with a support footer; its "ERROR: ..." line says what went wrong.
        errors = [line for line in lines if line.startswith("ERROR")]
        reason = (errors or lines or ["no output"])[-1]
        shown = " ".join(command[2:5] if command[0] == sys.executable else command[:3])
        raise VersioningError(f"{shown}: exit {result.returncode}: {reason}")
    return result.stdout


def _dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def configure_remote(layout: Layout, uri: str, s3: S3Params) -> list[str]:
    """Makes `uri` (s3://bucket/prefix) the project's default DVC remote, endpoint and region included.

    Only where it is goes into `.dvc/config`; credentials stay in boto3's chain (environment,
    profile, role), as `dvc push` and `dvc pull` read them.
    """
    parse_uri(uri)
    if not is_dvc_project(layout.root):
        raise VersioningError(f"{layout.root.resolve()}: not a DVC project (run `dvc init` first)")
    endpoint = s3.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")  # s3.endpoint_url holds none: params refuse it
    for name, value in (("the remote", uri), ("AWS_ENDPOINT_URL", endpoint)):
        if value and has_secret(value):
            raise VersioningError(f"{name}: {redact(value)} {HOLDS_CREDENTIALS}, "
                                  "which .dvc/config, tracked by git, would keep: give them through boto3's chain "
                                  "(environment, profile, role)")  # fmt: skip
    _run(_dvc("remote", "add", "--default", "--force", REMOTE, uri), layout)
    done = [f"DVC remote {REMOTE!r} -> {uri} (default)"]
    for option, value in (("endpointurl", endpoint), ("region", s3.region)):
        if value:
            _run(_dvc("remote", "modify", REMOTE, option, value), layout)
            done.append(f"{option} {value}")
    return done  # `imgclf remote` prints them


def version_outputs(layout: Layout, orchestration: OrchestrationParams, run_params: Path | None = None) -> list[str]:
    """Returns what was done after the stages (each already in dvc.lock): `dvc push`, `git commit`, or why not.
    `run_params`: the run's copy of the params DVC recorded (params.yaml's at its start, or `--params FILE`'s,
    overrides applied)."""
    if not is_dvc_project(layout.root):
        return _say([f"{layout.root.resolve()} is not a DVC project: skipped versioning"])
    done = []
    if orchestration.dvc_push:
        unpushed = _why_no_push(layout)
        if unpushed is None:
            try:
                _run(_dvc("push"), layout)
            except VersioningError as failed:
                # Not committed to git either: a clone of that commit could not pull what it records.
                raise VersioningError(f"{failed}; the stages ran and dvc.lock records them, only the push failed: "
                                      "mend the remote and run `dvc push`, or set orchestration.dvc_push=false") from None
            done.append("pushed to the DVC remote")
        else:
            done.append(unpushed)
    if orchestration.git_commit:
        done.append(_git_commit_lock(layout, run_params))
    return _say(done)


def _why_no_push(layout: Layout) -> str | None:
    """Returns why `dvc push` has nowhere to push, or None when a default remote is set."""
    from dvc.repo import Repo  # in process: `dvc remote list` would start a second Python for one line

    with Repo(str(layout.root)) as repo:
        remotes = sorted(repo.config["remote"])
        if not remotes:
            return "no DVC remote configured: nothing pushed"
        if not repo.config["core"].get("remote"):
            return (f"no default DVC remote among {', '.join(remotes)} (dvc remote default NAME): nothing pushed")
    return None


def _git_commit_lock(layout: Layout, run_params: Path | None) -> str:
    from dvc.repo import Repo

    if not (layout.root / ".git").exists():
        return "not a git repo: no git commit"
    if not (layout.root / "dvc.lock").exists():
        return "no dvc.lock (orchestration.dvc_commit: false?): no git commit"
    # The outputs dvc.yaml leaves to git (cache: false: metrics, plots' tables), and the .gitignore files
    # DVC writes beside the cached ones: a clone needs them with the lock.
    with Repo(str(layout.root)) as repo:
        in_git = {out.def_path for out in repo.index.outs if not out.use_cache}
        entries = defaultdict(set)  # .gitignore -> the lines DVC writes there, one per cached output
        for out in repo.index.outs:
            if out.use_cache:
                entries[str(Path(out.def_path).parent / ".gitignore")].add("/" + Path(out.def_path).name)
        outs = {out.def_path for out in repo.index.outs}
        deps = {dep.def_path for stage in repo.index.stages for dep in stage.deps} - outs
    # The params and pipeline dvc.lock was recorded from go with it: a clone must read what the run read.
    paths = ["dvc.lock", "dvc.yaml", "params.yaml", *(path for path in sorted(in_git) if (layout.root / path).exists())]
    ignored = set(_run(["git", "check-ignore", "--", *paths], layout, allowed=(1,)).splitlines())  # untracked ones
    # A .gitignore goes in only while every line it adds is DVC's: edits of the user's stay theirs to commit.
    theirs = sorted(path for path, lines in entries.items() if _added_lines(layout, path) - lines)
    paths = [path for path in paths if path not in ignored and (layout.root / path).exists()] + sorted(
        path for path in entries if (layout.root / path).exists() and path not in theirs)  # fmt: skip
    # Code dvc.lock records but the commit does not carry: a clone of it would run those stages again.
    rest = sorted(deps - set(paths))
    edited = [line[3:] for line in _run(["git", "status", "--porcelain", "--", *rest], layout).splitlines()] if rest else []
    _run(["git", "add", "--force", "--", *paths], layout)  # forced: a tracked file a .gitignore names still updates
    if not _run(["git", "diff", "--cached", "--name-only", "--", *paths], layout).split():
        return "dvc.lock unchanged: no git commit"
    _run(["git", "commit", "--quiet", "-m", "imgclf: record pipeline run in dvc.lock", "--", *paths], layout)
    left = [f"{', '.join(sorted(ignored))} ignored by git"] if ignored else []
    left += [f"{', '.join(theirs)} holding edits of yours"] if theirs else []
    left += [f"{', '.join(edited)}, uncommitted edits dvc.lock records: a clone re-runs their stages"] if edited else []
    # The lock names params.yaml but holds the values this run used: committed beside it, they disagree.
    left += ["the params this run used (overrides, --params, or params.yaml edited during the run): dvc.lock records "
             "them, params.yaml does not hold them, and a clone re-runs the stages they changed"
             ] if run_params and _differ(run_params, layout.root / "params.yaml") else []  # fmt: skip
    return "dvc.lock and the outputs git carries committed" + (f" (not: {'; '.join(left)})" if left else "")


def _differ(run_params: Path, params_file: Path) -> bool:
    """Whether the params a run used are not params.yaml's (now)."""
    try:
        return params_tree(run_params) != params_tree(params_file)
    except ParamsError:
        return True


def _added_lines(layout: Layout, path: str) -> set[str]:
    """Returns the lines of `path` that its committed version (if any) lacks."""
    if not (layout.root / path).exists():
        return set()
    committed = subprocess.run(["git", "show", f"HEAD:{path}"], cwd=layout.root, capture_output=True, text=True).stdout
    return {line.strip() for line in (layout.root / path).read_text().splitlines() if line.strip()} - {
        line.strip() for line in committed.splitlines()}  # fmt: skip


def _say(lines: list[str]) -> list[str]:
    for line in lines:
        log.info("versioning: %s", line)
    return lines
