"""Stage publish: the run's model, metrics, plots and report -> `<publish.s3_uri>/runs/<run-id>/`.

Every file of the run is uploaded first; `<publish.s3_uri>/latest.json` (run id, metrics,
object keys) is written last, so a reader never sees a `latest` that points at a
half-uploaded run: an interrupted publish leaves it on the previous complete run. With an
empty `publish.s3_uri` the stage publishes nothing and says so in `metrics/publish.json`.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path

from tasks.files import atomic_file, model_json, retrying, sha256_file
from tasks.layout import Layout
from tasks.params import PublishParams, S3Params
from tasks.report import read_json, report_markdown
from tasks.s3 import S3Error, S3Transient, S3Uri, client, explain_error, parse_uri

log = logging.getLogger("imgclf")

ATTEMPTS = 4


def run_files(layout: Layout) -> list[Path]:
    """Returns the files a run publishes: model, its description and summary, metrics and plots."""
    model_dir = layout.model_dir
    fixed = [model_dir / "model.keras", model_json(model_dir), model_dir / "summary.txt"]
    fixed += [layout.metrics_dir / name for name in ("train.json", "eval.json")]
    plots = sorted(p for p in layout.plots_dir.glob("*") if p.suffix in (".png", ".csv"))
    return [*fixed, *plots]


def _retrying(uri: S3Uri, call) -> None:
    def explained_call() -> None:
        try:
            call()
        except Exception as exc:
            raise explain_error(uri, exc) from None

    try:
        retrying(explained_call, ATTEMPTS, 0.5, S3Transient, f"publish: {uri}")
    except S3Transient as exc:
        raise S3Error(f"{exc} (gave up after {ATTEMPTS} attempts)") from None


def publish(params: PublishParams, s3: S3Params, layout: Layout, record: Path) -> Path:
    """Returns `record`, which says what was published where (or that nothing was)."""
    if not params.s3_uri:
        with atomic_file(record) as handle:
            json.dump({"published": False, "reason": "publish.s3_uri is empty"}, handle, indent=2)
        log.info("publish: skipped (publish.s3_uri is empty)")
        return record
    files = run_files(layout)
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        raise S3Error(f"publish: missing run files (run train and evaluate first): {', '.join(missing)}")
    base = parse_uri(params.s3_uri)
    model_hash = sha256_file(layout.model_dir / "model.keras")
    run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{model_hash[:8]}"
    s3_client = client(s3)
    objects: dict[str, str] = {}
    report = layout.root / ".imgclf" / "report.md"
    with atomic_file(report) as handle:
        handle.write(report_markdown(layout))
    # Smallest first: the model, by far the largest, goes last before latest.json.
    for path in sorted([*files, report], key=lambda path: path.stat().st_size):
        relative = path.name if path == report else path.relative_to(layout.root).as_posix()
        target = base.child("runs", run_id, relative)
        _retrying(target, lambda path=path, target=target: s3_client.upload_file(str(path), target.bucket, target.key))
        objects[relative] = target.key
    evaluation = read_json(layout.metrics_dir / "eval.json")
    latest = {
        "run_id": run_id,
        "published_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": objects["models/model.keras"],
        "model_sha256": model_hash,
        "metrics": {key: evaluation[key] for key in ("accuracy", "macro_f1", "roc_auc", "n_test") if key in evaluation},
        "objects": objects,
    }
    pointer = base.child("latest.json")
    body = json.dumps(latest, indent=2).encode()
    # Last, once every object of the run is in place.
    _retrying(pointer, lambda: s3_client.put_object(Bucket=pointer.bucket, Key=pointer.key, Body=body,
                                                     ContentType="application/json"))  # fmt: skip
    with atomic_file(record) as handle:
        json.dump({"published": True, "uri": str(base.child("runs", run_id)), "latest": str(pointer), **latest},
                  handle, indent=2)  # fmt: skip
    log.info("publish: %d objects to %s, then %s", len(objects), base.child("runs", run_id), pointer)
    return record
