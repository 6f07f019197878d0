"""Each stage of dvc.yaml bound to its function and the project's file layout.

`imgclf stage NAME` (what dvc.yaml runs) and the Prefect flow both call these; each hands
the stage function its own params section and the standard paths. dvc.yaml alone says the
order, what each stage reads and writes, and which params it depends on; stages talk only
through those files, as DVC sees them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tasks.cache import cache
from tasks.download import archive_path, download
from tasks.extract import extract
from tasks.files import ShardMap, process_pool_map
from tasks.layout import Layout
from tasks.params import Params
from tasks.split import split
from tasks.validate import validate


Stage = Callable[[Params, Layout, ShardMap], object]


def _download(p: Params, at: Layout, map_shards: ShardMap) -> Path:
    return download(p.data, at.raw_dir, p.s3)


def _extract(p: Params, at: Layout, map_shards: ShardMap) -> Path:
    return extract(p.data, archive_path(p.data, at.raw_dir), at.extracted_dir, at.extract_skipped_csv)


def _validate(p: Params, at: Layout, map_shards: ShardMap) -> Path:
    return validate(p.validate, at.extracted_dir, at.manifest_csv, map_shards)


def _cache(p: Params, at: Layout, map_shards: ShardMap) -> Path:
    return cache(p.prepare, at.manifest_csv, at.extracted_dir, at.cache_dir, map_shards).path


def _split(p: Params, at: Layout, map_shards: ShardMap) -> Path:
    return split(p.split, at.manifest_csv, at.split_csv)


def _train(p: Params, at: Layout, map_shards: ShardMap) -> Path:
    from tasks.train import train  # TensorFlow loads only for the stages that need it

    return train(p.train, p.augment, at.cache_dir, at.split_csv, at.model_dir, at.metrics_dir)


def _evaluate(p: Params, at: Layout, map_shards: ShardMap) -> Path:
    from tasks.evaluate import evaluate

    return evaluate(at.model_dir / "model.keras", at.cache_dir, at.split_csv, at.metrics_dir / "train.json",
                    at.metrics_dir, at.plots_dir)  # fmt: skip


def _publish(p: Params, at: Layout, map_shards: ShardMap) -> Path:
    from tasks.publish import publish  # boto3 loads only when publishing

    return publish(p.publish, p.s3, at, at.metrics_dir / "publish.json")


# What each stage of dvc.yaml runs. Order, inputs, params and outputs are dvc.yaml's to say.
STAGES: dict[str, Stage] = {
    "download": _download,
    "extract": _extract,
    "validate": _validate,
    "cache": _cache,
    "split": _split,
    "train": _train,
    "evaluate": _evaluate,
    "publish": _publish,
}


def run_stage(name: str, params: Params, layout: Layout, map_shards: ShardMap = process_pool_map) -> object:
    """Runs one stage by name and returns its output path."""
    return STAGES[name](params, layout, map_shards)
