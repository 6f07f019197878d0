"""The Prefect flow: the stages of dvc.yaml as a DAG of tasks; DVC decides which are stale.

Each stage is a task over the same function `imgclf stage NAME` and `dvc repro` run. The
order and the edges are dvc.yaml's; before a stage runs its task asks DVC whether it is
stale (its command, deps, params or outs against dvc.lock), runs it only then, and records
it in dvc.lock as `dvc repro` would. Stages that do not depend on each other run side by
side. Shard work inside a stage (decoding in validate and cache) fans out on the task runner
named by `orchestration.task_runner`. Every run ends with artifacts (a report, the rejected
files, the confusion matrix, the metrics), then `dvc push` and an optional git commit.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

# Our stages log to "imgclf"; this makes those lines part of the Prefect run logs.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "imgclf")

from prefect import flow, get_client, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.states import Completed  # noqa: E402
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner  # noqa: E402

from flows.dvc_project import DvcProject, ProjectError  # noqa: E402
from flows.report import publish_artifacts  # noqa: E402
from flows.versioning import version_outputs  # noqa: E402
from tasks.download import source_change  # noqa: E402
from tasks.files import ShardMap, die_with_parent, remove_stale_temporaries  # noqa: E402
from tasks.params import OrchestrationParams, Params, load_params, params_tree  # noqa: E402
from tasks.redact import redact, reveal  # noqa: E402
from tasks.stages import Layout, run_stage  # noqa: E402


@task(name="shard")
def run_shard(fn: Callable[[Any], Any], shard: Sequence[Any]) -> Any:
    return fn(shard)


def _task_runner(orchestration: OrchestrationParams):
    workers = os.cpu_count() or 1
    if orchestration.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=workers)
    if orchestration.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if orchestration.dask_address:
            return DaskTaskRunner(address=orchestration.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1})
    return ProcessPoolTaskRunner(max_workers=workers, initializer=die_with_parent)


@contextlib.contextmanager
def _workers_report_here() -> Iterator[None]:
    # Worker processes must report to this run's API (maybe a temporary local server):
    # without PREFECT_API_URL in their environment each would start a server of its own.
    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = str(get_client().api_url)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous


class PrefectShards:
    """A ShardMap that runs shards as tasks on the configured task runner, started once per flow run.

    One shard (a small set) runs inline: starting workers would cost more than it saves.
    """

    def __init__(self, orchestration: OrchestrationParams):
        self.orchestration = orchestration
        self._stack = contextlib.ExitStack()
        self._runner = None

    def __call__(self, fn: Callable[[Any], Any], shards: Sequence[Any]) -> Iterator[Any]:
        if len(shards) <= 1:
            yield from map(fn, shards)
            return
        if self._runner is None:
            self._stack.enter_context(_workers_report_here())
            self._runner = self._stack.enter_context(_task_runner(self.orchestration))
        futures = [self._runner.submit(run_shard, {"fn": fn, "shard": shard}) for shard in shards]
        for future in futures:
            yield future.result()

    def close(self) -> None:
        self._stack.close()

    # The stage task's parameters include this object, and a process-pool runner pickles them
    # with each shard's context: only the settings travel, never the live runner.
    def __getstate__(self) -> dict:
        return {"orchestration": self.orchestration}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["orchestration"])


@task(cache_policy=NO_CACHE, persist_result=False)
def stage_task(name: str, params: Params, layout: Layout, project: DvcProject, map_shards: ShardMap) -> Any:
    """Runs the stage if DVC finds it stale and records it in dvc.lock; else ends in a `Skipped` state."""
    logger = get_run_logger()
    reason = project.stale(name)
    if reason is None and name == "download" and not params.data.sha256:
        # dvc.lock cannot see new data behind the same URL: the source itself is asked (a
        # pinned data.sha256 already says which content the archive must be).
        reason = source_change(params.data, layout.raw_dir, params.s3)
    if reason is None:
        logger.info("%s: up to date in dvc.lock, skipped", name)
        return Completed(name="Skipped", message="up to date in dvc.lock")
    logger.info("%s: runs: %s", name, redact(reason))
    output = run_stage(name, params, layout, map_shards)
    if params.orchestration.dvc_commit:
        project.record(name)
    return Completed(message=f"ran: {redact(reason)}", data=str(output))


def task_run_name(name: str, params: Params) -> str:
    """Returns what a stage's task run is called: what ran, at a glance (cache-64x64, train-cnn-e10)."""
    height, width = params.prepare.image_size
    gray = "-gray" if params.prepare.channels == 1 else ""
    return {
        "cache": f"cache-{height}x{width}{gray}",
        "split": f"split-seed{params.split.seed}",
        "train": f"train-{params.train.model}-e{params.train.epochs}",
    }.get(name, name)


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    overrides = flow_run.parameters.get("overrides") or {}
    shown = redact(",".join(f"{key}={value}" for key, value in sorted(overrides.items())))
    return f"imgclf-{shown}" if shown else "imgclf"


@flow(name="imgclf-pipeline", flow_run_name=_flow_run_name)
def pipeline(overrides: dict[str, Any] | None = None, params_path: str = "params.yaml", root: str = ".") -> dict[str, str]:
    """Runs the stages of dvc.yaml that DVC finds stale, each after those it depends on; returns {stage: "ran" | "skipped"}.

    `overrides` maps dotted params keys to values (`{"train.epochs": 5}`), checked by the same
    typed params as `params.yaml`; they apply to this run alone: params.yaml is not written,
    and dvc.lock records the values the run used.
    """
    layout = Layout(Path(root))
    overrides = reveal(overrides or {})
    params_file = layout.root / params_path
    params = load_params(params_file, overrides)
    DvcProject(layout.root)  # outside a project: one line saying how to make one, before anything is written
    with one_run_at_a_time(layout), params_for_dvc(layout, params_file, overrides) as run_params:
        remove_stale_temporaries(layout.output_folders())
        project = DvcProject(layout.root, run_params)
        with contextlib.closing(PrefectShards(params.orchestration)) as map_shards:
            outcome = _run_dag(project, params, layout, map_shards)
        get_run_logger().info("stages: %s", ", ".join(f"{name} {what}" for name, what in outcome.items()))
        publish_artifacts(layout, outcome)
        version_outputs(layout, params.orchestration)
    return outcome


def _run_dag(project: DvcProject, params: Params, layout: Layout, map_shards: ShardMap) -> dict[str, str]:
    """Submits every stage, each waiting for the stages it depends on; returns {stage: ran | skipped}."""
    futures = {}
    for name, upstream in project.pipeline().items():
        stage = stage_task.with_options(name=name, task_run_name=task_run_name(name, params))
        futures[name] = stage.submit(name, params, layout, project, map_shards, wait_for=[futures[up] for up in upstream])
    for future in futures.values():
        future.wait()
    for future in futures.values():
        if future.state.is_failed():
            future.result()  # raises the first failed stage's own error (dvc.yaml order)
    return {name: "skipped" if future.state.name == "Skipped" else "ran" for name, future in futures.items()}


@contextlib.contextmanager
def one_run_at_a_time(layout: Layout) -> Iterator[None]:
    """Holds the project's run lock; a second run refuses at once, naming the one that holds it."""
    lock_path = layout.root / ".imgclf" / "run.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ProjectError(f"{layout.root.resolve()}: {holder} is running in this project; wait for it to end") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"imgclf run (pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        handle.flush()
        yield  # the kernel releases the lock when the file closes, or the process dies


@contextlib.contextmanager
def params_for_dvc(layout: Layout, params_file: Path, overrides: dict[str, Any]) -> Iterator[Path | None]:
    """Yields the file of params this run uses, for DVC to compare and record (None: params.yaml itself).

    It lives only while the run does; URLs in it are redacted, so dvc.lock never holds a credential.
    """
    if not overrides:
        yield None
        return
    tree = params_tree(params_file, {key: redact(value) if isinstance(value, str) else value
                                     for key, value in overrides.items()})  # fmt: skip
    # One name: one run at a time holds the project, and a killed run's copy is overwritten by the next.
    path = layout.root / ".imgclf" / "run-params.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def serve(params_path: str = "params.yaml", name: str = "weekly-retrain") -> None:
    """Serves the flow from this machine on `orchestration.schedule` until interrupted."""
    params = load_params(params_path)
    pipeline.serve(
        name=name,
        cron=params.orchestration.schedule,
        parameters={"params_path": params_path, "root": str(Path.cwd())},
        description="imgclf: download -> extract -> validate -> cache -> split -> train -> evaluate",
    )
