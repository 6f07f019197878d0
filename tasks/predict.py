"""Prediction: a saved model and raw image files -> rows of (path, label, probability, error).

The model's `labels.json` says how its images were prepared (size, resize mode, channels);
each file is judged and prepared exactly as the validate and cache stages do, so predictions
match evaluation. A file that cannot be read is a row with an error, not a crash.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable
from pathlib import Path

import keras
import numpy as np

from tasks.files import atomic_file, chunked
from tasks.images import decode, judge, resize
from tasks.model import class_probabilities
from tasks.params import ValidateParams

COLUMNS = ["path", "label", "probability", "error"]
BATCH = 64


def expand(paths: Iterable[Path]) -> list[Path]:
    """Returns the files named, with each folder replaced by the files below it, sorted."""
    found: list[Path] = []
    for path in paths:
        found.extend(sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])
    return found


def _prepare(path: Path, described: dict, max_pixels: int) -> np.ndarray:
    data = path.read_bytes()
    verdict = judge(data, max_pixels)
    if verdict.reason:
        raise ValueError(verdict.reason + (f": {verdict.detail}" if verdict.detail else ""))
    size = tuple(described["image_size"])
    return resize(decode(data, described["channels"], draft_size=max(size)), size, described["resize"])


def predict(model_path: Path, paths: Iterable[Path], max_pixels: int = ValidateParams().max_pixels) -> list[dict]:
    """Returns one row per file: the predicted label and its probability, or the error."""
    described = json.loads((model_path.parent / "labels.json").read_text())
    model = keras.models.load_model(model_path)
    rows: list[dict] = []
    for batch in chunked(expand(paths), BATCH):
        images, ready = [], []
        for path in batch:
            row = {"path": str(path), "label": "", "probability": "", "error": ""}
            rows.append(row)
            try:
                images.append(_prepare(path, described, max_pixels))
                ready.append(row)
            except (OSError, ValueError) as exc:
                row["error"] = str(exc) or type(exc).__name__
        if images:
            probabilities = class_probabilities(model, np.stack(images))
            for row, p in zip(ready, probabilities):
                row["label"] = described["classes"][int(p.argmax())]
                row["probability"] = f"{p.max():.6f}"
    return rows


def write_rows(rows: list[dict], out: Path | None) -> None:
    """Writes the rows as CSV to `out` (atomically) or to stdout."""
    if out is None:
        _write(sys.stdout, rows)
        return
    with atomic_file(out, newline="", encoding="utf-8") as handle:
        _write(handle, rows)


def _write(handle, rows: list[dict]) -> None:
    writer = csv.DictWriter(handle, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
