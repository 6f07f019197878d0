"""What a flow run shows in Prefect: a markdown report, the rejected files, the confusion matrix, the metrics."""

from __future__ import annotations

import base64
import csv
import json
from collections import Counter
from pathlib import Path

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.stages import Layout


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def report_markdown(layout: Layout, outcome: dict[str, str]) -> str:
    """Returns the run report: stages, data counts, rejections by reason, split sizes, metrics, model."""
    manifest, split = _rows(layout.manifest_csv), _rows(layout.split_csv)
    skipped = _rows(layout.extract_skipped_csv)
    evaluation, training = _json(layout.metrics_dir / "eval.json"), _json(layout.metrics_dir / "train.json")
    lines = ["# imgclf run", "", "| stage | this run |", "| --- | --- |"]
    lines += [f"| {name} | {what} |" for name, what in outcome.items()]
    statuses = Counter(row["status"] for row in manifest)
    lines += ["", "## Data", "", f"{len(manifest)} files judged: " + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))]
    lines.append(f"{len(skipped)} archive entries skipped at extraction (OS junk, unsafe paths).")
    reasons = Counter(row["reason"] for row in manifest if row["reason"])
    if reasons:
        lines += ["", "| reason | files |", "| --- | --- |"] + [f"| {r} | {n} |" for r, n in sorted(reasons.items())]
    cells = Counter((row["label"], row["split"]) for row in split)
    labels = sorted({label for label, _ in cells})
    lines += ["", "## Split", "", "| label | train | val | test |", "| --- | --- | --- | --- |"]
    lines += [f"| {label} | {cells[label, 'train']} | {cells[label, 'val']} | {cells[label, 'test']} |" for label in labels]
    if evaluation:
        auc = f", ROC AUC {evaluation['roc_auc']:.4f}" if "roc_auc" in evaluation else ""
        lines += ["", "## Model", "",
                  f"Test accuracy **{evaluation['accuracy']:.4f}** on {evaluation['n_test']} images, "
                  f"macro F1 {evaluation['macro_f1']:.4f}{auc}.",
                  f"Trained: {training.get('model')} on {training.get('device')}, {training.get('epochs_run')} epochs, "
                  f"{training.get('images_per_second')} images/s.",
                  f"Saved to `{(layout.model_dir / 'model.keras').resolve()}`."]  # fmt: skip
    return "\n".join(lines) + "\n"


def publish_artifacts(layout: Layout, outcome: dict[str, str]) -> None:
    """Creates the run's artifacts: report, rejected files, confusion matrix image, metrics table."""
    create_markdown_artifact(key="imgclf-report", markdown=report_markdown(layout, outcome), description="imgclf run report")
    rejected = [{key: row[key] for key in ("path", "label", "status", "reason", "detail")}
                for row in _rows(layout.manifest_csv) if row["status"] != "valid"]  # fmt: skip
    create_table_artifact(key="imgclf-rejected", table=rejected or [{"path": "", "reason": "none rejected"}],
                          description="Files validate did not accept, with the reason")  # fmt: skip
    confusion = layout.plots_dir / "confusion_matrix.png"
    if confusion.exists():
        encoded = base64.b64encode(confusion.read_bytes()).decode()
        create_markdown_artifact(key="imgclf-confusion", markdown=f"![confusion matrix](data:image/png;base64,{encoded})",
                                 description="Confusion matrix on the test split")  # fmt: skip
    evaluation = _json(layout.metrics_dir / "eval.json")
    if evaluation:
        table = [{"class": name, **scores} for name, scores in evaluation["per_class"].items()]
        table.append({"class": "(all)", "accuracy": evaluation["accuracy"], "macro_f1": evaluation["macro_f1"],
                      "roc_auc": evaluation.get("roc_auc", ""), "support": evaluation["n_test"]})  # fmt: skip
        create_table_artifact(key="imgclf-metrics", table=table, description="Test-split metrics")
