"""Each stage of dvc.yaml bound to its function and the project's file layout.

`imgclf stage NAME` (what dvc.yaml runs) and the Prefect flow both call these; each hands
the stage function its own params section and the standard paths. dvc.yaml alone says the
order, what each stage reads and writes, and which params it depends on; stages talk only
through those files, as DVC sees them.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path

from tasks.cache import cache
from tasks.champion import check_store_folder
from tasks.download import archive_path, download
from tasks.extract import extract
from tasks.files import MODEL_JSON, ShardMap, process_pool_map, sha256_file
from tasks.layout import Layout, output_holding
from tasks.near_duplicates import near_duplicates
from tasks.params import Params, ParamsError
from tasks.rows import Staging, staging_dir
from tasks.split import split
from tasks.validate import validate


Stage = Callable[[Params, Layout, ShardMap], object]


def _download(p: Params, at: Layout, map_shards: ShardMap) -> Path:
    return download(p.data, at.raw_dir, at.source_json, p.s3)


def _extract(p: Params, at: Layout, map_shards: ShardMap) -> Path:
    return extract(p.data, archive_path(p.data, at.raw_dir), at.extracted_dir, at.extract_skipped_csv)


def _validate(p: Params, at: Layout, map_shards: ShardMap) -> Path:
    # `prepare` is a hint here, not a dependency: validate stages the rows the cache stage will want.
    staging = Staging(p.prepare, staging_dir(at.cache_dir), at.cache_dir)
    return validate(p.validate, at.extracted_dir, at.manifest_csv, map_shards, staging)


def _cache(p: Params, at: Layout, map_shards: ShardMap) -> Path:
    return cache(p.prepare, at.manifest_csv, at.extracted_dir, at.cache_dir, map_shards, staging_dir(at.cache_dir)).path


def _near_duplicates(p: Params, at: Layout, map_shards: ShardMap) -> Path:
    return near_duplicates(p.validate, at.cache_dir, at.near_duplicates_csv, at.metrics_dir / "near_duplicates.json")


def _split(p: Params, at: Layout, map_shards: ShardMap) -> Path:
    return split(p.split, at.manifest_csv, at.split_csv, at.near_duplicates_csv)


def _audit(p: Params, at: Layout, map_shards: ShardMap) -> Path:
    from tasks.audit import audit  # TensorFlow loads only when the audit runs

    return audit(p.audit, p.train, p.augment, at.cache_dir, at.split_csv, at.oof_csv, at.label_issues_csv,
                 at.metrics_dir / "audit.json")  # fmt: skip


def _train(p: Params, at: Layout, map_shards: ShardMap) -> Path:
    from tasks.train import train  # TensorFlow loads only for the stages that need it

    return train(p.train, p.augment, at.cache_dir, at.split_csv, at.model_dir, at.metrics_dir)


def _evaluate(p: Params, at: Layout, map_shards: ShardMap) -> Path:
    from tasks.evaluate import evaluate
    from tasks.train import read_exclusion

    return evaluate(at.model_dir / "model.keras", at.cache_dir, at.split_csv, at.metrics_dir / "train.json",
                    at.metrics_dir, at.plots_dir, p.evaluate, read_exclusion(p.train.exclude))  # fmt: skip


def _export(p: Params, at: Layout, map_shards: ShardMap) -> Path:
    from tasks.export import export

    return export(at.model_dir / "model.keras", at.model_dir / "calibration.json", at.cache_dir, at.split_csv,
                  at.model_dir / "serving", at.model_dir / "model.tflite", at.metrics_dir / "export.json")  # fmt: skip


def _publish(p: Params, at: Layout, map_shards: ShardMap) -> Path:
    from tasks.publish import publish  # boto3 loads only when publishing

    return publish(p.publish, p.gate, p.s3, at, at.metrics_dir / "publish.json", p.validate.max_pixels)


def _report(p: Params, at: Layout, map_shards: ShardMap) -> Path:
    from tasks.report import REPORT_HTML, report

    # The whole params: the page shows what the run was asked to do.
    return report(p, at, archive_path(p.data, at.raw_dir), at.root / REPORT_HTML)


# What each stage of dvc.yaml runs. Order, inputs, params and outputs are dvc.yaml's to say.
STAGES: dict[str, Stage] = {
    "download": _download,
    "extract": _extract,
    "validate": _validate,
    "cache": _cache,
    "near_duplicates": _near_duplicates,
    "split": _split,
    "train": _train,
    "audit": _audit,
    "evaluate": _evaluate,
    "export": _export,
    "publish": _publish,
    "report": _report,
}


def run_stage(name: str, params: Params, layout: Layout, map_shards: ShardMap = process_pool_map) -> object:
    """Runs one stage by name and returns its output path."""
    check_store_folder(params.publish, layout.root)  # before any stage's work, not after training
    if params.train.exclude and (holder := output_holding(layout.root, Path(params.train.exclude))):
        # audit rewrites data/label_issues.csv after train read it: the model would not be the list's
        raise ParamsError(f"train.exclude: {params.train.exclude} lies in {holder[1]}, an output of dvc.yaml's stage "
                          f"{holder[0]}, which the pipeline rewrites: copy the rows you agree with to a file of "
                          "your own (e.g. label_review/exclude.csv)")  # fmt: skip
    return STAGES[name](params, layout, map_shards)


def exclusion_edited(params: Params, layout: Layout) -> str | None:
    """Returns why train must run though dvc.lock finds it up to date: train.exclude names the list the model
    was trained without, edited in place since (DVC sees the name, not the content); else None."""
    recorded = {}
    with contextlib.suppress(OSError, ValueError):
        recorded = json.loads((layout.model_dir / MODEL_JSON).read_text()).get("exclude") or {}
    if not params.train.exclude or not isinstance(recorded, dict) or recorded.get("file") != params.train.exclude:
        return None
    try:
        edited = sha256_file(layout.root / params.train.exclude) != recorded.get("sha256")
    except OSError:
        return None  # gone: train says so in one line when it runs
    return f"train.exclude {params.train.exclude} edited since the model was trained without it" if edited else None
