"""The Prefect flow: the stages of dvc.yaml as a DAG of tasks; DVC decides which are stale.

Each stage is a task over the same function `imgclf stage NAME` and `dvc repro` run. The
order and the edges are dvc.yaml's; before a stage runs its task asks DVC whether it is
stale (its command, deps, params or outs against dvc.lock), runs it only then, and records
it in dvc.lock as `dvc repro` would. Stages that do not depend on each other run side by
side. Shard work inside a stage (decoding in validate and cache) fans out from within the
stage's task on the pool named by `orchestration.task_runner`: the local process pool,
threads, or Dask futures; shards are not task runs, and the stage logs its own progress.
Every run ends with artifacts (a report, the rejected files, the confusion matrix, the
metrics), then `dvc push` and an optional git commit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

# Our stages log to "imgclf"; this makes those lines part of the Prefect run logs.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "imgclf")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402
from prefect.states import Completed  # noqa: E402

from flows.dvc_project import DvcProject, ProjectError, one_run_at_a_time  # noqa: E402
from flows.report import publish_artifacts  # noqa: E402
from flows.versioning import version_outputs  # noqa: E402
from tasks.download import SourceGone, source_change  # noqa: E402
from tasks.errors import Interrupted, StageError, stop_requested  # noqa: E402
from tasks.files import (  # noqa: E402
    ShardMap,
    in_order,
    on_one_thread,
    process_pool_map,
    remove_stale_temporaries,
    thread_pool_map,
)
from tasks.params import (  # noqa: E402
    OrchestrationParams, Params, ParamsError, apply_overrides, load_params, read_params_text)
from tasks.redact import plain_secrets, redact, redact_texts, reveal  # noqa: E402
from tasks.report import REPORT_HTML, gate_line  # noqa: E402
from tasks.stages import STAGES, Layout, exclusion_edited, run_stage  # noqa: E402


log = logging.getLogger("imgclf")


class DaskError(StageError, ConnectionError):
    """The Dask scheduler at `orchestration.dask_address` cannot be reached; the message says which and why."""


class DaskShards:
    """A ShardMap on Dask: each shard a Dask future (a few per worker in flight), results in shard order.

    The cluster is the scheduler at `address`, or a local one (one single-threaded worker process
    per core) started at the first call of the run; `close` ends what was started. One shard (a
    small set) runs here: starting workers would cost more than it saves.
    """

    def __init__(self, address: str | None):
        self.address = address
        self._stack = contextlib.ExitStack()
        self._client = None
        self._lock = threading.Lock()  # independent stages run side by side: one cluster for them all

    def __call__(self, fn: Callable[[Any], Any], shards: Sequence[Any]) -> Iterator[Any]:
        if len(shards) <= 1:
            yield from map(fn, shards)
            return
        from dask.utils import funcname

        client = self._connect()
        name = funcname(fn).strip("_")  # judge_shard-<uuid>, decode_shard-<uuid> in Dask's dashboard

        def submit(shard_fn: Callable[[Any], Any], shard: Any) -> Any:
            return client.submit(on_one_thread, shard_fn, shard, key=f"{name}-{uuid.uuid4().hex}")

        yield from in_order(submit, fn, shards, window=2 * sum(client.nthreads().values()))

    def _connect(self) -> Any:
        with self._lock:
            if self._client is None:
                from distributed import Client

                if not self.address:
                    cluster = self._stack.enter_context(local_cluster(os.cpu_count() or 1))
                    self._client = self._stack.enter_context(Client(cluster, set_as_default=False))
                else:
                    try:
                        _handshake(self.address)
                        self._client = self._stack.enter_context(Client(self.address, set_as_default=False))
                    except OSError as error:
                        raise DaskError(f"orchestration.dask_address: {redact(str(error))}") from None
                log.info("dask: shards go to %s (%d workers)", redact(self._client.scheduler.address),
                         len(self._client.nthreads()))  # fmt: skip
            return self._client

    def close(self) -> None:
        self._stack.close()


def _handshake(address: str) -> None:
    """Raises OSError unless a Dask scheduler answers at `address` within Dask's connect timeout.

    Dask's connect waits for the other end's handshake without a deadline: at the port of some
    other server (a web server that waits for a request line) the run waited forever, deaf to Ctrl-C;
    one that speaks first (SSH) sent it allocating exabytes for the frame its greeting seemed to announce.
    """
    import asyncio

    import dask
    from distributed.comm import connect
    from distributed.security import Security

    seconds = dask.utils.parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"))

    async def shake() -> None:  # with the TLS settings Client takes from Dask's config
        comm = await connect(address, timeout=seconds, **Security().get_connection_args("client"))
        await comm.close()

    try:  # a scheduler answers at once once connected; connect's own timeout covers a refused or silent host
        asyncio.run(asyncio.wait_for(shake(), seconds + 5))
    except TimeoutError:
        raise OSError(f"{address}: connected, but no Dask scheduler answered within {seconds + 5:g} s "
                      "(the port of some other server?)") from None  # fmt: skip
    except OSError:
        raise
    except Exception as error:  # what the other end sent is no Dask handshake
        raise OSError(f"{address}: no Dask scheduler there: its reply is no Dask handshake "
                      f"({type(error).__name__})") from None  # fmt: skip


# Dask's housekeeping, as the flow's own cluster runs it: the defaults (a stack sample every
# 10 ms, an event-loop tick every 20 ms, system and memory checks several times a second, work
# stealing) cost a 2-core machine ~6% of a core while idle, and more while busy.
LEAN_DASK = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "500ms",
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.worker.memory.monitor-interval": "1s",
    "distributed.scheduler.work-stealing": False,  # tasks queue at the scheduler: the first free worker takes one
    # What Dask puts in this process's environment to start each worker: only what keeps the
    # workers' INFO lines off the terminal; not its defaults (OMP_NUM_THREADS=1, ...), which
    # the training in this process would inherit.
    "distributed.nanny.pre-spawn-environ": {"DASK_LOGGING__DISTRIBUTED": "warning"},
    # A terminal's Ctrl-C reaches the workers too (one process group): they ignore it, and the run stops them.
    "distributed.worker.preload": ["tasks.files"],
}


@contextlib.contextmanager
def local_cluster(workers: int) -> Iterator[Any]:
    """Yields a Dask cluster on this machine: `workers` single-threaded worker processes (each
    exits when this process does), no dashboard, lean housekeeping, and its chatter off the terminal."""
    import dask
    from distributed import LocalCluster

    chatter, environ = logging.getLogger("distributed"), dict(os.environ)
    level = chatter.level
    chatter.setLevel(logging.WARNING)
    try:
        with dask.config.set(LEAN_DASK), LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                      host="127.0.0.1", dashboard_address=None) as cluster:  # fmt: skip
            yield cluster
    finally:
        chatter.setLevel(level)
        for key in set(os.environ) - set(environ):
            os.environ.pop(key, None)
        os.environ.update(environ)


@contextlib.contextmanager
def shard_map(orchestration: OrchestrationParams) -> Iterator[ShardMap]:
    """Yields the ShardMap of `orchestration.task_runner` for one flow run; a Dask cluster it started ends with it."""
    if orchestration.task_runner == "dask":
        with contextlib.closing(DaskShards(orchestration.dask_address)) as shards:
            yield shards
    else:
        yield thread_pool_map if orchestration.task_runner == "threads" else process_pool_map


@task(cache_policy=NO_CACHE, persist_result=False)
def stage_task(name: str, params: Params, layout: Layout, project: DvcProject, map_shards: ShardMap) -> Any:
    """Runs the stage if DVC finds it stale and records it in dvc.lock; else ends in a `Skipped` state."""
    logger = get_run_logger()
    if stop_requested.is_set():
        raise Interrupted(f"{name}: not started: the run was interrupted")
    reason = project.stale(name)
    if reason is None and name == "download" and not params.data.sha256:
        # dvc.lock cannot see new data behind the same URL: the source itself is asked (a
        # pinned data.sha256 already says which content the archive must be).
        try:
            reason = source_change(params.data, layout.raw_dir, layout.source_json, params.s3)
        except SourceGone as exc:  # offline, the host down, the file moved: what dvc.lock holds still stands
            logger.warning("download: cannot ask the source whether it changed (%s); the archive downloaded "
                           "before is used", redact(str(exc)))  # fmt: skip
    if reason is None and name == "train":
        reason = exclusion_edited(params, layout)
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
    overrides = flow_run.parameters.get("overrides") or {}
    targets = flow_run.parameters.get("stages") or []
    shown = redact(",".join([*targets, *(f"{key}={'' if value is None else value}" for key, value in sorted(overrides.items()))]))
    return f"imgclf-{shown}" if shown else "imgclf"


@flow(name="imgclf-pipeline", flow_run_name=_flow_run_name)
def pipeline(overrides: dict[str, Any] | None = None, params_path: str = "params.yaml", root: str = ".",
             stages: list[str] | None = None) -> dict[str, str]:  # fmt: skip
    """Runs the stages of dvc.yaml that DVC finds stale, each after those it depends on; returns {stage: "ran" | "skipped"}.

    `overrides` maps dotted params keys to values (`{"train.epochs": 5}`), checked by the same
    typed params as `params.yaml`; they apply to this run alone: params.yaml is not written,
    and dvc.lock records the values the run used. `stages`: only these and the stages they
    depend on, as `dvc repro STAGE` (empty: all).
    """
    layout = Layout(Path(root))
    if exposed := plain_secrets(overrides or {}):
        get_run_logger().warning(
            "this run's overrides hold a password or token in the clear (%s): Prefect stores a deployment run's "
            "parameters as they were sent; give credentials through ~/.netrc (HTTP) or boto3's chain (S3) instead",
            ", ".join(map(redact, exposed)))  # fmt: skip
    overrides = reveal(overrides or {})
    params_file = layout.root / params_path
    # `imgclf run` checked its --set already: what fails here came as the flow's parameter (a deployment run).
    text = read_params_text(params_file)  # read once: its stages and dvc.lock see the same values
    params = load_params(params_file, overrides, given_as="overrides", text=text)
    DvcProject(layout.root)  # outside a project: one line saying how to make one, before anything is written
    # Named as Prefect names the run: `imgclf run` took the lock already, under its own name.
    holder = f"flow run {flow_run.name!r}"
    with one_run_at_a_time(layout.root, holder), params_for_dvc(layout, params_file, text, overrides) as run_params:
        remove_stale_temporaries(layout.output_folders())
        project = DvcProject(layout.root, run_params)
        with project.held(), shard_map(params.orchestration) as map_shards:
            plan = project.pipeline(stages or [])
            if foreign := [name for name in plan if name not in STAGES]:  # dvc repro runs them; the flow cannot
                raise ProjectError(f"{layout.root / 'dvc.yaml'}: stage {', '.join(map(repr, foreign))} is none of "
                                   f"imgclf's ({', '.join(STAGES)}): `imgclf run` runs only those; run this pipeline "
                                   "with `dvc repro`")  # fmt: skip
            if missing := project.missing_params(plan):
                # DVC would stop on them only when it records a stage: after that stage's work (a publish, say).
                raise ParamsError(f"{params_file}: missing {', '.join(missing)}: dvc.yaml's stages read them "
                                  "(imgclf's own params.yaml has every key)")  # fmt: skip
            outcome = _run_dag(project, plan, params, layout, map_shards)
        get_run_logger().info("stages: %s", ", ".join(f"{name} {what}" for name, what in outcome.items()))
        if outcome.get("publish") == "ran":
            get_run_logger().info("%s", gate_line(layout))
        publish_artifacts(layout, outcome)
        if (layout.root / REPORT_HTML).exists() and "report" in outcome:  # else an earlier run's page
            get_run_logger().info("report: %s", (layout.root / REPORT_HTML).resolve())
        version_outputs(layout, params.orchestration, run_params)
    return outcome


def _run_dag(project: DvcProject, plan: dict[str, list[str]], params: Params, layout: Layout,
             map_shards: ShardMap) -> dict[str, str]:  # fmt: skip
    """Submits every stage of the plan ({stage: the stages it depends on}, as DvcProject.pipeline
    returns it), each waiting for the stages it depends on; returns {stage: ran | skipped}."""
    futures = {}
    stop_requested.clear()  # a second Ctrl-C during the wait below leaves it set, and the process may go on
    for name, upstream in plan.items():
        stage = stage_task.with_options(name=name, task_run_name=task_run_name(name, params))
        futures[name] = stage.submit(name, params, layout, project, map_shards, wait_for=[futures[up] for up in upstream])
    try:
        for future in futures.values():
            future.wait()
    except BaseException:  # Ctrl-C, or Prefect cancelling the run: the stages in flight stop at their next safe point
        stop_requested.set()
        for future in futures.values():
            future.wait()
        stop_requested.clear()  # every stage has ended; the process may go on (`imgclf serve`, tests)
        raise
    for future in futures.values():
        if future.state.is_failed():
            future.result()  # raises the first failed stage's own error (dvc.yaml order)
    return {name: "skipped" if future.state.name == "Skipped" else "ran" for name, future in futures.items()}


@contextlib.contextmanager
def params_for_dvc(layout: Layout, params_file: Path, text: str, overrides: dict[str, Any]) -> Iterator[Path]:
    """Yields the file of params this run uses, for DVC to compare and record: `text`, params.yaml (or
    `--params`) as the run read it, overrides applied. A copy, also without overrides: params.yaml edited
    during the run must not reach dvc.lock beside outputs made with the values read at its start.

    It lives only while the run does; URLs given as overrides are redacted, so dvc.lock never holds them.
    """
    # One name: one run at a time holds the project, and a killed run's copy is overwritten by the next.
    path = layout.own_dir / "run-params.yaml"
    if overrides:
        from dvc.utils.serialize import dumps_yaml, parse_yaml_for_update

        # Read and written as DVC reads YAML (1.2, where `yes` is a string, not PyYAML's True): a key
        # no override names reaches dvc.lock as it does from params.yaml itself.
        tree = apply_overrides(parse_yaml_for_update(text, str(params_file)), redact_texts(overrides))
        path.write_text(dumps_yaml(tree), encoding="utf-8")
    else:  # the very text
        path.write_text(text, encoding="utf-8")
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def serve(params_path: str = "params.yaml", name: str = "weekly-retrain") -> None:
    """Serves the flow from this machine on `orchestration.schedule` until interrupted; needs a Prefect server."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.settings import get_current_settings

    params = load_params(params_path)
    api = get_current_settings().api.url
    if not api:
        # Prefect's ephemeral API has no scheduler: the schedule would never fire.
        raise ProjectError("imgclf serve: no Prefect server to schedule runs on; start one (`prefect server start`) and "
                           "set PREFECT_API_URL (e.g. `prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`)")
    import httpx

    try:
        pipeline.serve(
            name=name,
            cron=params.orchestration.schedule,
            parameters={"params_path": params_path, "root": str(Path.cwd())},
            description="imgclf: download -> extract -> validate -> cache -> split -> train -> evaluate",
            # One run at a time, as prefect.yaml's deployments: a run due meanwhile waits its turn (queued).
            global_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        )
    except httpx.ConnectError as exc:
        raise ProjectError(f"imgclf serve: cannot reach the Prefect server at {redact(api)} ({exc}); start it "
                           "(`prefect server start`) or fix PREFECT_API_URL") from None
