"""Scale-out figures for the capacity plan: validate + cache on a Dask cluster of 1 and 2 workers.

On the malaria-sized set of bench_cache.py (27,558 PNGs, built once), the validate and cache
stages run inside a Prefect flow whose shards go to a `distributed.LocalCluster` (one
single-threaded worker process each) through prefect-dask, as `orchestration.task_runner:
dask` does; then the same stages on the local process pool for comparison. Prints images/s
per run and per worker. Training images/s per worker comes from bench_train.py.

    python benchmarks/bench_scale.py [--images 27558]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=27_558)
    args = parser.parse_args()

    from bench_cache import build_set
    from distributed import LocalCluster
    from prefect import flow, get_client

    from flows.pipeline import PrefectShards
    from tasks.cache import cache
    from tasks.files import process_pool_map
    from tasks.params import OrchestrationParams, PrepareParams, ValidateParams
    from tasks.validate import validate

    cells = build_set(ROOT / "benchmarks" / ".data" / "cells", args.images)

    def stages(map_shards, work: Path) -> tuple[float, float]:
        started = time.perf_counter()
        validate(ValidateParams(), cells, work / "manifest.csv", map_shards)
        validated = time.perf_counter()
        cache(PrepareParams(), work / "manifest.csv", cells, work / "cache", map_shards)
        return validated - started, time.perf_counter() - validated

    @flow(name="bench-scale")
    def on_dask(workers: int, work: str) -> tuple[float, float]:
        # As on a real cluster, the workers know the Prefect API (here this run's local server).
        os.environ["PREFECT_API_URL"] = str(get_client().api_url)
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address=None, silence_logs=40) as cluster:  # fmt: skip
            shards = PrefectShards(OrchestrationParams(task_runner="dask", dask_address=cluster.scheduler_address))
            try:
                return stages(shards, Path(work))
            finally:
                shards.close()

    rows = []
    for workers in (1, 2):
        rows.append((f"dask, {workers} worker(s)", workers, *on_dask(workers, tempfile.mkdtemp())))
        os.environ.pop("PREFECT_API_URL", None)
    rows.append((f"process pool, {os.cpu_count()} workers", os.cpu_count(), *stages(process_pool_map, Path(tempfile.mkdtemp()))))
    print(f"scale-out benchmark: validate + cache of {args.images} PNGs (100-200 px -> 64x64), {os.cpu_count()} cores")
    print(f"{'runner':<26} {'validate/s':>10} {'cache/s':>9} {'both/s':>8} {'both/s per worker':>18}")
    for name, workers, validate_s, cache_s in rows:
        both = args.images / (validate_s + cache_s)
        print(f"{name:<26} {args.images / validate_s:>10.0f} {args.images / cache_s:>9.0f} {both:>8.0f} {both / workers:>18.0f}")


if __name__ == "__main__":
    main()
