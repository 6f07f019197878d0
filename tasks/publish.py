"""Stage publish: the run -> `<store>/runs/<run-id>/`, then, if the gate promotes it, `<store>/latest.json`.

The store is `publish.s3_uri`, or with it empty the local folder `publish.local_dir` (default
models/champion), laid out alike (tasks/champion.py). First the gate (tasks/gate.py) scores
this run's model against the champion `latest.json` points at. Then every file of the run is
uploaded, promoted or not (a run that is not promoted stays there for inspection); a
promoted run adds its reference set (its test images as raw files, and `labels.csv`) for the
next challengers. `latest.json` (run id, metrics, object keys, the gate's decision) is written
last, so a reader never sees a `latest` that points at a half-uploaded run, and only if it is
still the one the gate compared against: a publish that lost that race says so and leaves it.
The decision goes to `metrics/publish.json` and the run's report.
"""

from __future__ import annotations

import json
import logging
import secrets
import tempfile
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from tasks.calibration import CALIBRATION_JSON
from tasks.champion import LATEST, Store, StoreError, open_store
from tasks.errors import Interrupted, StageError, stop_requested
from tasks.files import atomic_file, made_for_another_model, model_json, read_json, sha256_file, write_csv, write_json
from tasks.gate import Champion, Decision, LabelledFiles, judge, reference_set, run_test_set, trained_on
from tasks.layout import Layout
from tasks.params import GateParams, PublishParams, S3Params, ValidateParams
from tasks.report import report_markdown

log = logging.getLogger("imgclf")

TRANSFERS = 16  # reference images moved at once: each is a small request, so waiting dominates
MODEL_FILES = ("model.keras", "model.json", "labels.json", CALIBRATION_JSON)  # what the gate loads of a champion


class PublishError(StageError):
    """The run cannot be published as it stands; the message names what is missing."""


def run_files(layout: Layout) -> list[Path]:
    """Returns the files a run publishes: model, its description, calibration, summary and exports (when
    the run made them), metrics and plots."""
    model_dir = layout.model_dir
    fixed = [model_dir / "model.keras", model_json(model_dir), model_dir / "summary.txt", model_dir / CALIBRATION_JSON]
    fixed += [layout.metrics_dir / name for name in ("train.json", "eval.json")]
    made = [model_dir / "model.tflite", layout.metrics_dir / "export.json"]
    exports = sorted(p for p in (model_dir / "serving").rglob("*") if p.is_file())
    plots = sorted(p for p in layout.plots_dir.glob("*") if p.suffix in (".png", ".csv"))
    return [*fixed, *(p for p in made if p.is_file()), *exports, *plots]


def publish(params: PublishParams, gate: GateParams, s3: S3Params, layout: Layout, record: Path,
            max_pixels: int = ValidateParams().max_pixels) -> Path:  # fmt: skip
    """Returns `record`, which says where the run went and what the gate decided; the gate prepares images
    up to `max_pixels` (validate's limit)."""
    files = run_files(layout)
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        raise PublishError(f"publish: missing run files (run train and evaluate first): {', '.join(missing)}")
    model_hash = sha256_file(layout.model_dir / "model.keras")
    # `imgclf stage publish` after a train alone: evaluate's and export's files would be the last model's.
    stale = [str(path) for path in files if path.suffix == ".json" and made_for_another_model(path, model_hash)]
    if stale:
        raise PublishError(f"publish: {', '.join(stale)} made for another model than {layout.model_dir / 'model.keras'} "
                           "(trained since): run evaluate and export first, or the whole pipeline")  # fmt: skip
    store = open_store(params, s3, layout.root)
    # The random part keeps two publishes of one model in the same second apart.
    run = f"runs/{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{model_hash[:8]}-{secrets.token_hex(2)}"
    run_id = run.removeprefix("runs/")
    test = run_test_set(layout.extracted_dir, layout.split_csv)
    seen = frozenset(trained_on(layout.manifest_csv, layout.split_csv))
    # The champion fetched from S3 and the report: the system's temporary folder, not the project's.
    with tempfile.TemporaryDirectory(prefix="imgclf-publish-") as scratch:
        pointer = store.read(LATEST)
        decision = _gate(gate, store, pointer, layout.model_dir / "model.keras", test, seen, max_pixels, Path(scratch))
        if gate.force:
            decision = decision.forced_through()
        _stop_if_asked(store, "before uploading this run")
        report = Path(scratch) / "report.md"
        _write_report(report, layout, decision.as_json(gate))
        objects: dict[str, str] = {}
        # Smallest first: the model, by far the largest file of the run, goes last of them.
        for path in sorted([*files, report], key=lambda path: path.stat().st_size):
            relative = path.name if path == report else path.relative_to(layout.root).as_posix()
            objects[relative] = store.put(path, f"{run}/{relative}")
        evaluation = read_json(layout.metrics_dir / "eval.json")
        latest = {
            "run_id": run_id,
            "published_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": objects["models/model.keras"],
            "model_sha256": model_hash,
            "metrics": {key: evaluation[key] for key in ("accuracy", "macro_f1", "roc_auc", "n_test") if key in evaluation},
            "objects": objects,
            "gate": decision.as_json(gate),
        }
        if decision.promoted:
            latest["reference"] = _put_reference(store, run, test, Path(scratch))
            _stop_if_asked(store, f"before the promotion ({store.where(run)} holds this run's files, "
                                  "champion of nothing)")  # fmt: skip
            # Last, once every object of the run is in place; only over the champion the gate compared against.
            if not store.replace_if(LATEST, json.dumps(latest, indent=2).encode(), pointer[1] if pointer else None):
                decision = _lost_race(store, decision)
                latest["gate"] = decision.as_json(gate)
                _write_report(report, layout, latest["gate"])
                store.put(report, f"{run}/report.md")  # this run is not the champion: nobody reads it as one
    write_json(record, {"published": True, "promoted": decision.promoted, "uri": store.where(run),
                        "latest": store.where(LATEST), **latest})  # fmt: skip
    log.info("publish: %d objects to %s; %s", len(objects), store.where(run), decision.reason)
    if decision.unreadable:
        # Recorded as done, the stage would not run again until a param changed: the next run must gate again.
        raise PublishError(f"publish: {decision.reason}; mend the store and run again (the stage re-runs), or "
                           "promote this run with gate.force=true")  # fmt: skip
    return record


def _stop_if_asked(store: Store, when: str) -> None:
    # Ctrl-C during the gate or the uploads: the stage stops at these safe points, before the promotion,
    # which cannot be undone.
    if stop_requested.is_set():
        raise Interrupted(f"publish: interrupted {when}: {store.where(LATEST)} is unchanged")


def _gate(gate: GateParams, store: Store, pointer: tuple[bytes, str] | None, model_path: Path, test: LabelledFiles,
          seen: frozenset[str], max_pixels: int, scratch: Path) -> Decision:  # fmt: skip
    """Returns the gate's decision on this run against the champion `pointer` (latest.json's bytes) names."""
    if pointer is None:
        return judge(gate, model_path, test, None, max_pixels=max_pixels)
    try:
        champion = _fetch_champion(store, pointer[0], scratch)
    except (StageError, ValueError, KeyError, TypeError) as exc:
        return Decision.refused(f"the champion cannot be read ({store.where(LATEST)}): {exc}", unreadable=True)
    return judge(gate, model_path, test, champion, seen, max_pixels)


def _fetch_champion(store: Store, pointer: bytes, scratch: Path) -> Champion:
    latest = json.loads(pointer)
    if not isinstance(latest, dict) or not isinstance(latest.get("run_id"), str) or not isinstance(latest.get("objects"), dict):
        raise StoreError("not a record publish writes (an object with run_id and objects)")
    run_id, objects = latest["run_id"], latest["objects"]
    run = f"runs/{run_id}"
    if "reference" not in latest:
        raise StoreError(f"its run {run_id} has no reference set (published before the gate); gate.force=true "
                         "promotes this run and makes its test split the reference set")  # fmt: skip
    wanted = {f"models/{name}" for name in MODEL_FILES}
    fetched = {relative: store.get(f"{run}/{relative}", scratch) for relative in objects if relative in wanted}
    if "models/model.keras" not in fetched:
        raise StoreError(f"its run {run_id} lists no models/model.keras")
    if latest.get("model_sha256") not in (None, sha256_file(fetched["models/model.keras"])):  # replaced since
        raise StoreError(f"its run {run_id}'s models/model.keras is not the model latest.json records (sha256 "
                         f"{str(latest['model_sha256'])[:12]}...)")  # fmt: skip
    labels_csv = store.get(f"{run}/reference/labels.csv", scratch)
    reference = reference_set(labels_csv, labels_csv.parent / "images")
    with ThreadPoolExecutor(TRANSFERS) as pool:
        list(pool.map(lambda path: store.get(f"{run}/reference/images/{path}", scratch), reference.paths))
    return Champion(run_id, fetched["models/model.keras"], reference)


def _put_reference(store: Store, run: str, test: LabelledFiles, scratch: Path) -> dict:
    """Publishes the test split as the reference set: each raw file, then labels.csv naming them."""
    with ThreadPoolExecutor(TRANSFERS) as pool:
        list(pool.map(lambda path: store.put(test.root / path, f"{run}/reference/images/{path}"), test.paths))
    labels = scratch / "labels.csv"
    write_csv(labels, ["path", "label"], zip(test.paths, test.labels))
    return {"labels": store.put(labels, f"{run}/reference/labels.csv"), "images": len(test.paths)}


def _lost_race(store: Store, decision: Decision) -> Decision:
    current = store.read(LATEST)
    holder = json.loads(current[0]).get("run_id") if current else None
    lost = Decision.refused(f"lost the race: latest.json moved to {holder} while this run was gated against "
                            f"{decision.champion or 'no champion'}; left on {holder}", decision.champion,
                            forced=decision.forced, comparisons=decision.comparisons)  # fmt: skip
    log.warning("publish: %s", lost.reason)
    return lost


def _write_report(path: Path, layout: Layout, gate: dict) -> None:
    with atomic_file(path) as handle:
        handle.write(report_markdown(layout, gate=gate))
