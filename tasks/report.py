"""The run report, in markdown: what the data became and how the model scored. Read from the stages' outputs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tasks.files import read_csv
from tasks.layout import Layout


def read_rows(path: Path) -> list[dict]:
    return read_csv(path) if path.exists() else []


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def score_line(evaluation: dict) -> str:
    """Returns the test scores of eval.json in one line: accuracy, count, macro F1 and ROC AUC (two classes)."""
    auc = f", ROC AUC {evaluation['roc_auc']:.4f}" if "roc_auc" in evaluation else ""
    return f"test accuracy {evaluation['accuracy']:.4f} on {evaluation['n_test']} images (macro F1 {evaluation['macro_f1']:.4f}{auc})"


def report_markdown(layout: Layout, outcome: dict[str, str] | None = None) -> str:
    """Returns the run report: stages (when known), data counts, rejections by reason, split sizes, metrics, model."""
    manifest, split = read_rows(layout.manifest_csv), read_rows(layout.split_csv)
    skipped = read_rows(layout.extract_skipped_csv)
    evaluation, training = read_json(layout.metrics_dir / "eval.json"), read_json(layout.metrics_dir / "train.json")
    lines = ["# imgclf run", ""]
    if outcome:
        lines += ["| stage | this run |", "| --- | --- |"] + [f"| {name} | {what} |" for name, what in outcome.items()]
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
        lines += ["", "## Model", "",
                  f"{score_line(evaluation).capitalize()}.",
                  f"Trained: {training.get('model')} on {training.get('device')}, {training.get('epochs_run')} epochs, "
                  f"{training.get('images_per_second')} images/s.",
                  f"Saved to `{(layout.model_dir / 'model.keras').resolve()}`."]  # fmt: skip
    return "\n".join(lines) + "\n"
