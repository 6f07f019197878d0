"""Prediction: a saved model and raw image files -> rows of (path, label, probability, error).

The model's `model.json` says how its images were prepared (size, resize mode, channels);
each file is judged and prepared exactly as the validate and cache stages do, and its
`calibration.json` (evaluate's) turns the probabilities into calibrated ones and a label as
evaluate and the export do, so predictions match evaluation. A file that cannot be read is a
row with an error, not a crash.
"""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import keras
import numpy as np

from tasks.calibration import CALIBRATION_JSON, Calibration, calibrated_probabilities, load_calibration, predicted_indices, uncalibrated
from tasks.errors import StageError
from tasks.files import chunked, made_for_another_model, model_json, named_output, sha256_file, shown_name
from tasks.images import decode, read_image_file, resize
from tasks.model import class_probabilities
from tasks.params import ValidateParams

log = logging.getLogger("imgclf")

COLUMNS = ["path", "label", "probability", "error"]
BATCH = 64
OVERLAY_SUFFIX = ".gradcam.png"  # predict --explain's overlay of <name>: <name>.gradcam.png


class PredictError(StageError, ValueError):
    """The model or its description cannot be used; the message names the file."""


def expand(paths: Iterable[Path], out: Path | None = None, explain: Path | None = None) -> list[Path]:
    """Returns the paths named, with each folder replaced by everything below it but folders, sorted: broken
    links, FIFOs and links to folders (not followed) too, so each gets a row saying why it has no label.
    Below a folder, what an earlier predict wrote there is left out, or a second run would read it as images:
    the CSV at `out` (when predict wrote it) and the overlays in the `explain` folder."""
    ours = Path(os.path.realpath(out)) if _ours(out) else None
    overlays = Path(os.path.realpath(explain)) if explain is not None else None

    def written_by_predict(path: Path) -> bool:
        if not (ours and path.name == ours.name or overlays and path.name.endswith(OVERLAY_SUFFIX)):
            return False  # the name alone rules most files out, before the folder is resolved
        where = Path(os.path.realpath(path.parent)) / path.name  # the entry itself not followed: a link is its own
        return where == ours or (overlays is not None and where.name.endswith(OVERLAY_SUFFIX)
                                 and where.is_relative_to(overlays))  # fmt: skip

    found: list[Path] = []
    for path in paths:
        below = (p for p in path.rglob("*") if (p.is_symlink() or not p.is_dir()) and not written_by_predict(p))
        found.extend(sorted(below) if path.is_dir() else [path])
    return found


def check_outputs(model_path: Path, files: Iterable[Path], out: Path | None, explain: Path | None) -> None:
    """Raises PredictError, before any work, when writing would replace a file: `out` one that predict reads
    (an input, the model, its description or calibration), `explain` a file where a folder goes."""
    if explain is not None and explain.exists() and not explain.is_dir():
        raise PredictError(f"--explain {explain}: a file; name a folder to write the overlays into")
    if out is None or not out.is_file() or _ours(out):  # its own CSV of an earlier run, in a folder it reads
        return
    read = [model_path, model_json(model_path.parent), model_path.parent / CALIBRATION_JSON, *files]
    if any(path.exists() and path.samefile(out) for path in read):
        raise PredictError(f"--out {out}: predict reads this file (an input, or the model's); name another to write")


def _ours(path: Path | None) -> bool:
    """Whether the file is a CSV predict wrote."""
    if path is None or not path.is_file():
        return False
    header = ",".join(COLUMNS).encode()
    with open(path, "rb") as handle:
        return handle.read(len(header) + 2).rstrip(b"\r\n") == header


def prepare_file(path: Path, described: dict, max_pixels: int) -> np.ndarray:
    if not path.is_file():  # a FIFO or a device would block or never end
        raise ValueError("not a regular file" if path.exists() else _why_missing(path))
    size = tuple(described["image_size"])
    pixels = decode(read_image_file(path), described["channels"], draft_size=max(size), max_pixels=max_pixels)
    return resize(pixels, size, described["resize"])


def _why_missing(path: Path) -> str:
    try:
        path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a loop of symbolic links"
    return "no such file"


def predict(model_path: Path, files: Iterable[Path], max_pixels: int = ValidateParams().max_pixels) -> list[dict]:
    """Returns one row per file (as `expand` lists them): the predicted label and its probability, or the error."""
    described, model = load_described_model(model_path)
    calibration = load_model_calibration(model_path, described["classes"])
    rows: list[dict] = []
    for batch in chunked(files, BATCH):
        images, ready = [], []
        for path in batch:
            row = {"path": shown_name(str(path)), "label": "", "probability": "", "error": ""}
            rows.append(row)
            try:
                images.append(prepare_file(path, described, max_pixels))
                ready.append(row)
            except (OSError, ValueError) as exc:
                row["error"] = str(exc) or type(exc).__name__
        if images:
            probabilities = calibrated_probabilities(class_probabilities(model, np.stack(images)), calibration)
            for row, p, index in zip(ready, probabilities, predicted_indices(probabilities, calibration)):
                row["label"] = described["classes"][int(index)]
                row["probability"] = f"{p[index]:.6f}"
    return rows


def load_inference_model(model_path: Path) -> keras.Model:
    """Returns the saved model, computing in float32 whatever precision it was trained in.

    Mixed precision is a training speed-up: the weights are float32 either way. Predicting in
    float32 everywhere (evaluate, predict, the export) keeps their probabilities the same to
    float32 rounding, and TFLite has no bfloat16 kernels.
    """
    model = keras.models.load_model(model_path, compile=False)
    config = model.get_config()
    float32 = _float32_policies(config)
    if float32 == config:
        return model
    rebuilt = model.__class__.from_config(float32)
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def _float32_policies(config):
    if isinstance(config, dict):
        if str(config.get("class_name", "")).endswith("DTypePolicy") and str(config["config"].get("name")).startswith("mixed_"):
            return {**config, "config": {**config["config"], "name": "float32"}}
        return {key: _float32_policies(value) for key, value in config.items()}
    if isinstance(config, list):
        return [_float32_policies(value) for value in config]
    return config


def load_model_calibration(model_path: Path, classes: list[str]) -> Calibration:
    """Returns the calibration evaluate saved beside the model; none (temperature 1, the likelier
    class wins) for a model evaluate has not seen."""
    path = model_path.parent / CALIBRATION_JSON
    if not path.exists() or made_for_another_model(path, sha256_file(model_path)):
        why = "no calibration beside the model" if not path.exists() else "fitted for another model (trained since?)"
        log.warning("%s: %s; evaluate writes it: its own probabilities, the likelier class wins, no operating "
                    "threshold", path, why)  # fmt: skip
        return uncalibrated(classes)
    calibration = load_calibration(path)
    if calibration.classes != list(classes):
        raise PredictError(f"{path}: calibrated for classes {calibration.classes}, but the model has {list(classes)} "
                           "(re-run evaluate)")  # fmt: skip
    return calibration


def load_described_model(model_path: Path) -> tuple[dict, keras.Model]:
    """Returns the model's description (model.json beside it) and the model, checked against each other."""
    if model_path.is_dir():  # models/serving, say: TensorFlow Serving's, not ours
        raise PredictError(f"{model_path}: a folder, not a Keras model file (predict takes models/model.keras)")
    if not model_path.is_file():
        raise PredictError(f"{model_path}: no such model file")
    described_by = model_json(model_path.parent)
    try:
        described = json.loads(described_by.read_text())
        size, channels, classes = tuple(described["image_size"]), int(described["channels"]), list(described["classes"])
        if described["resize"] not in ("stretch", "pad", "crop"):
            raise ValueError(f"unknown resize mode {described['resize']!r}")
    except OSError as exc:
        raise PredictError(f"{described_by}: cannot read the model description ({exc.strerror or exc})") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise PredictError(f"{described_by}: not a model description ({type(exc).__name__}: {exc})") from None
    try:
        model = load_inference_model(model_path)
    except Exception as exc:  # Keras raises ValueError, OSError, zipfile errors... on a damaged file
        raise PredictError(f"{model_path}: not a readable Keras model ({type(exc).__name__})") from None
    expected = (*size, channels)
    if tuple(model.input_shape[1:]) != expected or model.output_shape[-1] not in (len(classes), 1):
        raise PredictError(
            f"{described_by}: describes {'x'.join(map(str, expected))} images and {len(classes)} classes, but "
            f"{model_path} takes {'x'.join(map(str, model.input_shape[1:]))} and gives {model.output_shape[-1]} outputs"
        )
    return described, model


def write_rows(rows: list[dict], out: Path | None) -> None:
    """Writes the rows as CSV to `out` (as `named_output` writes) or to stdout."""
    if out is None:
        _write(sys.stdout, rows)
        return
    with named_output(out, newline="", encoding="utf-8") as handle:
        _write(handle, rows)


def _write(handle, rows: list[dict]) -> None:
    writer = csv.DictWriter(handle, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
