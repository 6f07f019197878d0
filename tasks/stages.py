"""The stage registry: each stage's name, in pipeline order, bound to the project's file layout.

`imgclf stage NAME` (what dvc.yaml runs) and the Prefect flow both call these; each hands
the stage function its own params section and the standard paths below. Stages talk only
through these files, as DVC sees them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class StageSpec:
    """A stage and what it touches, as dvc.yaml declares it (tests/test_pipeline_sync.py checks)."""

    run: Stage
    inputs: tuple[str, ...]  # project files and folders it reads
    code: tuple[str, ...]  # its own module first, then every tasks/ module that shapes its outputs
    params: tuple[str, ...]  # params.yaml keys or sections it reads
    outs: tuple[str, ...]  # project files and folders it writes, metrics and plots included


def _publish(p: Params, at: Layout, map_shards: ShardMap) -> Path:
    from tasks.publish import publish  # boto3 loads only when publishing

    return publish(p.publish, p.s3, at, at.metrics_dir / "publish.json")


PLOTS = ("plots/confusion_matrix.png", "plots/misclassified.png", "plots/training_curves.png", "plots/confusion.csv",
         "plots/roc.csv", "plots/roc.png")  # fmt: skip

# Pipeline order: dvc.yaml and the flow follow it.
STAGES: dict[str, StageSpec] = {
    "download": StageSpec(
        _download, (), ("tasks/download.py", "tasks/archives.py", "tasks/redact.py", "tasks/s3.py"), ("data.url", "data.sha256"), ("data/raw",)
    ),
    "extract": StageSpec(
        _extract, ("data/raw",), ("tasks/extract.py", "tasks/archives.py"), ("data.url", "data.max_extract_bytes"),
        ("data/extracted", "data/extract_skipped.csv"),
    ),
    "validate": StageSpec(
        _validate, ("data/extracted",), ("tasks/validate.py", "tasks/images.py", "tasks/png.py", "tasks/manifest.py"),
        ("validate",), ("data/manifest.csv",),
    ),
    "cache": StageSpec(
        _cache, ("data/manifest.csv", "data/extracted"),
        ("tasks/cache.py", "tasks/images.py", "tasks/png.py", "tasks/manifest.py"), ("prepare",), ("data/cache",),
    ),
    "split": StageSpec(
        _split, ("data/manifest.csv",), ("tasks/split.py", "tasks/manifest.py"), ("split",), ("data/split.csv",)
    ),
    "train": StageSpec(
        _train, ("data/cache", "data/split.csv"),
        ("tasks/train.py", "tasks/model.py", "tasks/dataset.py", "tasks/multi_worker.py"), ("train", "augment"),
        ("models/model.keras", "models/labels.json", "models/summary.txt", "metrics/train.json",
         "metrics/live/plots/metrics"),
    ),
    "evaluate": StageSpec(
        _evaluate,
        ("models/model.keras", "models/labels.json", "data/cache", "data/split.csv", "metrics/train.json"),
        ("tasks/evaluate.py", "tasks/dataset.py", "tasks/model.py"), (),
        ("metrics/eval.json", *PLOTS),
    ),
    "publish": StageSpec(
        _publish,
        ("models/model.keras", "models/labels.json", "models/summary.txt", "metrics/train.json", "metrics/eval.json",
         *PLOTS, "data/manifest.csv", "data/split.csv", "data/extract_skipped.csv"),
        ("tasks/publish.py", "tasks/report.py", "tasks/s3.py"), ("publish",), ("metrics/publish.json",),
    ),
}  # fmt: skip


def run_stage(name: str, params: Params, layout: Layout, map_shards: ShardMap = process_pool_map) -> object:
    """Runs one stage by name and returns its output path."""
    return STAGES[name].run(params, layout, map_shards)
