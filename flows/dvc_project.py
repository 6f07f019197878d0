"""The pipeline as dvc.yaml describes it, asked through DVC's own API: the order, what is stale, what ran.

DVC decides for both entry points: a stage is stale exactly when `dvc status` says so (its
command, deps, params or outs differ from dvc.lock), and a stage that ran is recorded in
dvc.lock as `dvc repro` records it (deps and outs hashed, outs committed to the DVC cache),
at once, so a run that fails later keeps what it finished. A run hands DVC the params it uses
(its own copy of params.yaml as read at its start, overrides applied): dvc.lock records what
the run produced, and params.yaml is never written.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

from tasks.errors import StageError
from tasks.files import alive_elsewhere
from tasks.layout import OWN_FOLDER


class ProjectError(StageError):
    """Not a DVC project, or its dvc.yaml cannot be read; the message says what to do."""


def is_dvc_project(root: Path) -> bool:
    return (root / "dvc.yaml").is_file() and (root / ".dvc").is_dir()


# Projects whose run lock this process took for the flow it then runs (`imgclf run`): the flow holds it by then.
_HANDED_TO_THE_FLOW: set[Path] = set()
# DVC's project lock of each project this process holds it for, by resolved root, until a flow takes it over.
_DVC_LOCKS: dict[Path, object] = {}


@contextlib.contextmanager
def one_run_at_a_time(root: Path, what: str, shared: bool = False, for_the_flow: bool = False) -> Iterator[None]:
    """Holds the project's run lock for `what`: an `imgclf run` alone (exclusive), or `shared` by the
    `imgclf stage` processes, which may run side by side (multi-worker training starts one per worker) but
    never beside a run. Refused at once, naming the run that holds it, or the `dvc repro` running a stage.
    `for_the_flow`: taken by the command line before it starts the flow, which then runs under it."""
    if not shared and root.resolve() in _HANDED_TO_THE_FLOW:
        yield
        return
    lock_path = root / OWN_FOLDER / "run.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()  # only a run writes its name
            if not holder:  # an `imgclf stage`: the `dvc repro` running it, when one is
                _refuse_beside_a_dvc_stage(root, _ancestors() if shared else frozenset())
                holder = "an imgclf stage"
            raise ProjectError(f"{root.resolve()}: {holder} is running in this project; wait for it to end") from None
        if shared:
            # Holding it shared, no run holds it: a name there is a killed run's (SIGKILL skips the truncate).
            handle.truncate(0)
            # Nor beside a stage a `dvc repro` runs, unless that `dvc repro` runs this one.
            _refuse_beside_a_dvc_stage(root, _ancestors())
            yield
            return
        _refuse_beside_a_dvc_stage(root)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{what} (pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        handle.flush()
        if for_the_flow:
            _HANDED_TO_THE_FLOW.add(root.resolve())
        try:
            yield  # the kernel releases the lock when the file closes, or the process dies
        finally:
            _HANDED_TO_THE_FLOW.discard(root.resolve())
            handle.truncate(0)  # a stage refusing a later run must not name this one


def _ancestors() -> set[int]:
    """Returns the pids of this process's parent, its parent, and so on (Linux's /proc; else the parent alone)."""
    found, pid = set(), os.getppid()
    while pid > 1 and pid not in found:
        found.add(pid)
        try:  # /proc/PID/stat: "PID (name) STATE PPID ...", the name may hold spaces and parentheses
            pid = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return found


def _refuse_beside_a_dvc_stage(root: Path, running_me: set[int] = frozenset()) -> None:
    # `dvc repro` lets go of its project lock while a stage's command runs, after it removed the
    # stage's outputs; the command takes the run lock only once it has started. DVC's rwlock file
    # names that `dvc repro` throughout.
    try:
        locks = json.loads((root / ".dvc" / "tmp" / "rwlock").read_text())
        infos = [*locks.get("write", {}).values(), *(info for infos in locks.get("read", {}).values() for info in infos)]
        holders = {(int(info["pid"]), str(info["cmd"])) for info in infos}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return
    for pid, cmd in sorted(holders):
        if pid not in running_me and alive_elsewhere(pid):
            raise ProjectError(f"{root.resolve()}: {cmd} (pid {pid}) is running a stage in this project; "
                               "wait for it to end")  # fmt: skip


class DvcProject:
    """One run's view of a DVC project. Thread-safe: stages that run side by side ask it in turn."""

    def __init__(self, root: Path, params_file: Path | None = None):
        """`params_file`: the run's copy of the params it uses (else DVC reads params.yaml as it is now)."""
        if not is_dvc_project(root):
            raise ProjectError(
                f"{root.resolve()}: not an imgclf project (no dvc.yaml and .dvc/ here); "
                "create one with `imgclf init DIR --url URL`, or run from the project's folder"
            )
        self.root, self.params_file = root, params_file
        self._lock = threading.Lock()
        self._held = None  # DVC's own project lock, while held() holds it for the run

    # A process-pool task runner pickles the stage task's parameters with each shard: the
    # lock stays behind, the where travels.
    def __getstate__(self) -> dict:
        return {"root": self.root, "params_file": self.params_file}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["root"], state["params_file"])

    @contextlib.contextmanager
    def _repo(self) -> Iterator:
        from dvc.exceptions import DvcException
        from dvc.repo import Repo

        # DVC says "Updating lock file 'dvc.lock'" (on stdout too) for every stage recorded: the
        # run's own log lines say more. (Set here: importing DVC sets its logger's level.)
        logging.getLogger("dvc").setLevel(logging.WARNING)
        with self._lock:
            try:
                with Repo(str(self.root)) as repo:
                    if self._held is None:
                        with repo.lock:
                            yield repo
                    else:
                        repo.lock = self._held  # taken already: DVC's stage methods check that it is held
                        yield repo
            except DvcException as exc:  # a damaged dvc.yaml or dvc.lock, a lock held by `dvc repro`
                # DVC names the file itself, and says who holds a busy output on the lines after the first.
                said = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
                raise ProjectError(f"{self.root.resolve()}: DVC: {said}") from None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Holds DVC's project lock while the stages run, as `dvc repro` holds it for its own: a `dvc repro`
        started meanwhile refuses ("Unable to acquire lock") instead of writing the same outputs.
        `imgclf run` takes it before the flow starts, and hands it on: the flow's stages run under it, and
        the flow lets go of it when they end (its `dvc push` takes it in turn)."""
        from dvc.exceptions import DvcException
        from dvc.repo import Repo

        key = self.root.resolve()
        if (handed := _DVC_LOCKS.pop(key, None)) is not None:
            self._held = handed
            try:
                yield
            finally:
                self._held = None
                handed.unlock()
            return
        with Repo(str(self.root)) as repo:
            try:
                repo.lock.lock()
            except DvcException:
                raise ProjectError(f"{self.root.resolve()}: a DVC command (dvc repro?) holds this project's lock; "
                                   "wait for it to end") from None  # fmt: skip
            self._held = _DVC_LOCKS[key] = repo.lock
            try:
                yield
            finally:
                self._held = None
                if _DVC_LOCKS.pop(key, None) is not None:  # not handed on, and let go of, already
                    repo.lock.unlock()

    def pipeline(self, targets: Sequence[str] = ()) -> dict[str, list[str]]:
        """Returns {stage: the stages it depends on}, in an order where each comes after those: every
        stage, or the targets and the stages they depend on, as `dvc repro TARGET...` runs them."""
        import networkx as nx

        with self._repo() as repo:
            graph = repo.index.graph  # an edge runs from a stage to a stage it depends on
            named = {stage.name: stage for stage in graph}
            unknown = [name for name in targets if name not in named]
            if unknown:
                raise ProjectError(f"{self.root / 'dvc.yaml'}: no stage {', '.join(map(repr, unknown))} "
                                   f"(its stages: {', '.join(named)})")  # fmt: skip
            if targets:
                graph = graph.subgraph({named[name] for name in targets}.union(*(nx.descendants(graph, named[name])
                                                                                  for name in targets)))  # fmt: skip
            written = {stage: position for position, stage in enumerate(repo.index.stages)}
            # Dependencies first; among stages free to go, dvc.yaml's order.
            order = nx.lexicographical_topological_sort(graph.reverse(), key=written.get)
            return {stage.name: sorted(up.name for up in graph.successors(stage)) for stage in order}

    def missing_params(self, stages: Collection[str]) -> list[str]:
        """Returns each params key that these stages read from params.yaml and this run's params lack
        (read as DVC reads them), with the first stage that reads it."""
        from dvc.dependency.param import ParamsDependency

        path = str((self.params_file or self.root / "params.yaml").resolve())
        missing: dict[str, str] = {}
        with self._repo() as repo:
            for stage in repo.index.stages:
                for dep in stage.deps if stage.name in stages else ():
                    if isinstance(dep, ParamsDependency) and dep.def_path == "params.yaml" and dep.params:
                        found = _read_params(dep, path)
                        for key in dep.params:
                            if key not in found:
                                missing.setdefault(key, stage.name)
        return [f"{key} ({stage})" for key, stage in missing.items()]

    def stale(self, name: str) -> str | None:
        """Returns why the stage must run, as `dvc status` sees it with this run's params; None when up to date."""
        with self._repo() as repo:
            stage = self._stage(repo, name)
            if not any(entry.hash_info for entry in (*stage.deps, *stage.outs)):
                return "not in dvc.lock yet"
            status = next(iter(stage.status().values()), [])
        return "; ".join(_reasons(status)) or None

    def record(self, name: str) -> None:
        """Records the stage in dvc.lock and its outputs in the DVC cache, as `dvc repro` does when it finishes one."""
        with self._repo() as repo:
            stage = self._stage(repo, name)
            stage.save(run_cache=False)  # the run cache resolves paths against the cwd; dvc.lock is what counts
            stage.commit()
            stage.dump(update_pipeline=False)

    def _stage(self, repo, name: str):
        from dvc.dependency.param import ParamsDependency

        stage = repo.stage.collect(f"{Path(repo.root_dir) / 'dvc.yaml'}:{name}")[0]
        if self.params_file is not None:
            for dep in stage.deps:
                if isinstance(dep, ParamsDependency):
                    dep.read_params = functools.partial(_read_params, dep, str(self.params_file.resolve()))
        return stage


def _read_params(dep, path: str, flatten: bool = True, **kwargs) -> dict:
    # ParamsDependency.read_params, from the run's own params file: DVC compares and records
    # these values, and dvc.lock still names params.yaml.
    from dvc.dependency.param import read_param_file

    return read_param_file(dep.repo.fs, path, list(dep.params) if dep.params else None, flatten=flatten)


def _reasons(status: list) -> Iterator[str]:
    for entry in status:
        if entry == "always changed":
            yield "always runs"
        elif entry == "changed checksum":
            yield "its definition in dvc.yaml changed"
        elif isinstance(entry, dict):
            for kind, changes in entry.items():
                for path, what in changes.items():
                    if isinstance(what, dict):  # a params file: {key: modified | new | deleted}
                        yield "params changed: " + ", ".join(sorted(what))
                    else:
                        yield f"{'output' if kind == 'changed outs' else 'input'} {path} {what}"
