"""The Prefect flow: the stage registry as a DAG of tasks, cached the way DVC decides.

Each stage is a task over the same function `imgclf stage NAME` and `dvc repro` run. A
task's cache key is what DVC keys on: the content of the stage's inputs, its params
section, and its code. A stage re-runs when that key is new or when the outputs it wrote
last time are missing or changed; otherwise it is skipped ("Cached"). Shard work inside a
stage (decoding in validate and cache) fans out with `.map`-style submits on the task
runner named by `orchestration.task_runner`. Every run ends with artifacts (a report, the
rejected files, the confusion matrix, the metrics) and, in a DVC project, `dvc.lock`
recording what it produced.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

# Our stages log to "imgclf"; this makes those lines part of the Prefect run logs.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "imgclf")

from prefect import flow, get_client, get_run_logger, task  # noqa: E402
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner  # noqa: E402

from flows.fingerprints import Fingerprints  # noqa: E402
from flows.report import publish_artifacts  # noqa: E402
from flows.versioning import is_dvc_project, version_outputs, write_overrides  # noqa: E402
from tasks.files import ShardMap, atomic_file, sha256_file  # noqa: E402
from tasks.params import OrchestrationParams, Params, load_params  # noqa: E402
from tasks.stages import STAGES, Layout, StageSpec, run_stage  # noqa: E402

CODE_ROOT = Path(__file__).resolve().parents[1]


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
    return ProcessPoolTaskRunner(max_workers=workers)


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


@task(persist_result=True)
def stage_task(name: str, params: Params, layout: Layout, map_shards: ShardMap) -> str:
    return str(run_stage(name, params, layout, map_shards))


def _section(params: Params, dotted: str) -> Any:
    node: Any = params.model_dump(mode="json")
    for part in dotted.split("."):
        node = node[part]
    return node


def cache_key(name: str, spec: StageSpec, params: Params, layout: Layout, prints: Fingerprints) -> str:
    """Returns the stage's key: its project, inputs' content, params section and code."""
    described = {
        "project": str(layout.root.resolve()),
        "stage": name,
        "inputs": {path: prints.of(path) for path in spec.inputs},
        "params": {key: _section(params, key) for key in spec.params},
        "code": {path: sha256_file(CODE_ROOT / path) for path in spec.code},
    }
    return f"imgclf-{name}-" + hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def _outputs_record(layout: Layout, name: str) -> Path:
    return layout.root / ".imgclf" / "stages" / f"{name}.json"


def _outputs_now(key: str, spec: StageSpec, prints: Fingerprints) -> dict:
    return {"key": key, "outs": {path: prints.of(path) for path in spec.outs}}


def outputs_intact(name: str, key: str, spec: StageSpec, layout: Layout, prints: Fingerprints) -> bool:
    """True when the stage's outputs are still what its last run, under this same key, wrote."""
    try:
        recorded = json.loads(_outputs_record(layout, name).read_text())
    except (OSError, ValueError):
        return False
    return recorded == _outputs_now(key, spec, prints)


def _record_outputs(name: str, key: str, spec: StageSpec, layout: Layout, prints: Fingerprints) -> None:
    with atomic_file(_outputs_record(layout, name)) as handle:
        json.dump(_outputs_now(key, spec, prints), handle, indent=2)


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
    shown = ",".join(f"{key}={value}" for key, value in sorted(overrides.items()))
    return f"imgclf-{shown}" if shown else "imgclf"


@flow(name="imgclf-pipeline", flow_run_name=_flow_run_name)
def pipeline(overrides: dict[str, Any] | None = None, params_path: str = "params.yaml", root: str = ".") -> dict[str, str]:
    """Runs every stage in order, skipping those whose inputs, params and code are unchanged.

    `overrides` maps dotted params keys to values (`{"train.epochs": 5}`), checked by the same
    typed params as `params.yaml`. Returns {stage: "ran" | "skipped"}.
    """
    logger = get_run_logger()
    layout = Layout(Path(root))
    params = load_params(layout.root / params_path, overrides)
    if overrides and params.orchestration.dvc_commit and is_dvc_project(layout):
        # dvc.lock will record params.yaml: it must hold the values this run uses.
        write_overrides(layout.root / params_path, overrides)
        logger.info("wrote %s into %s (as `dvc exp run -S` does)", ", ".join(overrides), params_path)
    prints = Fingerprints(layout.root)
    with contextlib.closing(PrefectShards(params.orchestration)) as map_shards:
        outcome = _run_stages(params, layout, prints, map_shards)
    logger.info("stages: %s", ", ".join(f"{name} {what}" for name, what in outcome.items()))
    publish_artifacts(layout, outcome)
    version_outputs(layout, params.orchestration)
    return outcome


def _run_stages(params: Params, layout: Layout, prints: Fingerprints, map_shards: ShardMap) -> dict[str, str]:
    outcome: dict[str, str] = {}
    for name, spec in STAGES.items():
        key = cache_key(name, spec, params, layout, prints)
        stage = stage_task.with_options(
            name=name,
            task_run_name=task_run_name(name, params),
            cache_key_fn=lambda *_, key=key: key,
            refresh_cache=not outputs_intact(name, key, spec, layout, prints),
        )
        state = stage(name, params, layout, map_shards, return_state=True)
        state.result()  # a failed stage raises its own error here and fails the flow
        if state.name == "Cached":
            outcome[name] = "skipped"
        else:
            outcome[name] = "ran"
            _record_outputs(name, key, spec, layout, prints)
        prints.save()
    return outcome


def serve(params_path: str = "params.yaml", name: str = "weekly-retrain") -> None:
    """Serves the flow from this machine on `orchestration.schedule` until interrupted."""
    params = load_params(params_path)
    pipeline.serve(
        name=name,
        cron=params.orchestration.schedule,
        parameters={"params_path": params_path, "root": str(Path.cwd())},
        description="imgclf: download -> extract -> validate -> cache -> split -> train -> evaluate",
    )
