"""The Prefect flow: every stage of the registry, in order, each as a task.

Stages run the same functions as `imgclf stage NAME` and `dvc repro`; shard work inside a
stage (decoding in validate and cache) fans out with `.map` on a process-pool task runner,
one worker per core.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

# Our stages log to "imgclf"; this makes those lines part of the Prefect run logs.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "imgclf")

from prefect import flow, get_client, task  # noqa: E402
from prefect.task_runners import ProcessPoolTaskRunner  # noqa: E402

from tasks.params import Params, load_params  # noqa: E402
from tasks.stages import STAGES, Layout, run_stage  # noqa: E402


@task(name="shard")
def run_shard(fn: Callable[[Any], Any], shard: Sequence[Any]) -> Any:
    return fn(shard)


def prefect_map(fn: Callable[[Any], Any], shards: Sequence[Any]) -> Iterator[Any]:
    """Yields fn(shard) per shard, in order, each shard a task on a process pool."""
    if not shards:
        return
    # Workers must report to this run's API (maybe a temporary local server): without
    # PREFECT_API_URL in their environment each would start a server of its own.
    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = str(get_client().api_url)
    try:
        with ProcessPoolTaskRunner(max_workers=min(len(shards), os.cpu_count() or 1)) as runner:
            futures = [runner.submit(run_shard, {"fn": fn, "shard": shard}) for shard in shards]
            for future in futures:
                yield future.result()
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous


@task
def stage_task(name: str, params: Params, layout: Layout) -> Any:
    return run_stage(name, params, layout, prefect_map)


@flow(name="imgclf-pipeline", log_prints=True)
def pipeline(overrides: dict[str, Any] | None = None, params_path: str = "params.yaml", root: str = ".") -> dict[str, str]:
    """Runs every stage in order; returns {stage: output path}."""
    params = load_params(Path(root) / params_path, overrides)
    layout = Layout(Path(root))
    outputs = {}
    for name in STAGES:
        outputs[name] = str(stage_task.with_options(name=name, task_run_name=name)(name, params, layout))
    return outputs
