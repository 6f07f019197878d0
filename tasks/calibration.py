"""Calibration: temperature scaling and the operating threshold, fitted on val by evaluate.

`models/calibration.json` (an evaluate output, beside the model) says how to turn the model's
probabilities into calibrated ones and those into a class: evaluate reports on test with it,
`imgclf predict` labels files with it, and the export builds the same arithmetic into the
serving graph. Everything works from the model's own output probabilities, (N, n_classes),
a sigmoid unit's p read as [1 - p, p] (`tasks.model.Head.probabilities`).

Temperature scaling divides the log-probabilities by one number T (fitted to minimise the
negative log-likelihood on val) and takes the softmax again: for a sigmoid unit that is
sigmoid(logit / T). It never changes which class is likelier, only how sure the model says it is.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tasks.errors import StageError
from tasks.files import write_json

CALIBRATION_JSON = "calibration.json"  # beside model.keras, written by evaluate

# The model's float32 outputs say nothing past these, so log-probabilities are clipped there:
# a sigmoid unit's p rounds to 1.0 beyond a logit of ~17, so both classes of a two-class model
# stop at 2**-24 alike (symmetric, and 1 - 2**-24 is exact in float32); a softmax keeps its
# small probabilities down to float32's smallest normal number. Both bounds are exact in
# float32 and float64, so the export's float32 graph clips exactly where NumPy does.
BINARY_FLOOR = 2.0**-24
SOFTMAX_FLOOR = float(np.finfo(np.float32).tiny)
TEMPERATURE_BOUNDS = (0.05, 20.0)


class CalibrationError(StageError, ValueError):
    """The calibration file or settings cannot be used; the message names the file or key."""


@dataclass(frozen=True)
class Calibration:
    """How the model's probabilities become calibrated ones (temperature) and a class (threshold).

    `threshold`, for two classes with a positive class: the positive class wins when its
    calibrated probability is at least this; otherwise (None) the likelier class wins.
    """

    temperature: float
    classes: list[str]
    positive_class: str | None = None
    threshold: float | None = None

    @property
    def positive_index(self) -> int | None:
        return None if self.positive_class is None else self.classes.index(self.positive_class)

    @property
    def floor(self) -> float:
        """The smallest probability the log is taken of (see BINARY_FLOOR)."""
        return BINARY_FLOOR if len(self.classes) == 2 else SOFTMAX_FLOOR


def uncalibrated(classes: list[str]) -> Calibration:
    """Returns the calibration that changes nothing: temperature 1, the likelier class wins."""
    return Calibration(temperature=1.0, classes=list(classes))


def save_calibration(calibration: Calibration, path: Path, model_sha256: str | None = None) -> Path:
    """Writes the calibration as JSON (atomically), with the sha256 of the model it was fitted for; returns the path."""
    write_json(path, asdict(calibration) | ({"model_sha256": model_sha256} if model_sha256 else {}))
    return path


def load_calibration(path: Path) -> Calibration:
    """Returns the calibration saved at `path`; a CalibrationError naming the file if it cannot be used."""
    try:
        found = json.loads(Path(path).read_text())
        calibration = Calibration(
            temperature=float(found["temperature"]),
            classes=[str(name) for name in found["classes"]],
            positive_class=None if found.get("positive_class") is None else str(found["positive_class"]),
            threshold=None if found.get("threshold") is None else float(found["threshold"]),
        )
    except OSError as exc:
        raise CalibrationError(f"{path}: cannot read the calibration ({exc.strerror or exc})") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CalibrationError(f"{path}: not a calibration file ({type(exc).__name__}: {exc})") from None
    if not (math.isfinite(calibration.temperature) and calibration.temperature > 0):
        raise CalibrationError(f"{path}: temperature must be a positive number, not {calibration.temperature}")
    if calibration.positive_class is not None and calibration.positive_class not in calibration.classes:
        raise CalibrationError(f"{path}: positive_class {calibration.positive_class!r} is not one of its classes")
    if calibration.threshold is not None and (calibration.positive_class is None or len(calibration.classes) != 2
                                              or not 0 <= calibration.threshold <= 1):  # fmt: skip
        raise CalibrationError(f"{path}: a threshold needs two classes, a positive_class, and a value in [0, 1]")
    return calibration


def log_probabilities(probabilities: np.ndarray, floor: float) -> np.ndarray:
    """Returns log(probabilities) as float64, clipped below at `floor` (a saturated output stays finite)."""
    return np.log(np.clip(np.asarray(probabilities, dtype=np.float64), floor, 1.0))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Returns the row-wise softmax of (N, K) logits, as float64."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def calibrated_probabilities(probabilities: np.ndarray, calibration: Calibration) -> np.ndarray:
    """Returns (N, n_classes) calibrated probabilities from the model's (N, n_classes) output probabilities."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or probabilities.shape[1] != len(calibration.classes):
        raise CalibrationError(f"calibration: expected (N, {len(calibration.classes)}) probabilities, "
                               f"got shape {probabilities.shape}")  # fmt: skip
    if calibration.temperature == 1.0:  # changes nothing: the model's own numbers, not their round trip through log
        return probabilities
    return softmax(log_probabilities(probabilities, calibration.floor) / calibration.temperature)


def predicted_indices(probabilities: np.ndarray, calibration: Calibration) -> np.ndarray:
    """Returns (N,) class indices from calibrated probabilities: the positive class when it reaches
    the threshold (two classes with one set), otherwise the likelier class."""
    probabilities = np.asarray(probabilities)
    if calibration.threshold is None:
        return probabilities.argmax(axis=1)
    positive = calibration.positive_index
    return np.where(probabilities[:, positive] >= calibration.threshold, positive, 1 - positive)


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray, classes: list[str]) -> float:
    """Returns the temperature that minimises the mean negative log-likelihood of `labels` (bounded search)."""
    from scipy.optimize import minimize_scalar

    logits = log_probabilities(probabilities, uncalibrated(classes).floor)
    labels = np.asarray(labels)

    def nll(log_temperature: float) -> float:
        scaled = logits / math.exp(log_temperature)
        shifted = scaled - scaled.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(shifted).sum(axis=1))
        return float(np.mean(log_norm - shifted[np.arange(len(labels)), labels]))

    low, high = (math.log(bound) for bound in TEMPERATURE_BOUNDS)
    found = minimize_scalar(nll, bounds=(low, high), method="bounded", options={"xatol": 1e-6})
    return float(math.exp(found.x))


def threshold_for_recall(positive_scores: np.ndarray, target_recall: float) -> float:
    """Returns the highest threshold at which at least `target_recall` of the positive scores are at or above it."""
    scores = np.sort(np.asarray(positive_scores, dtype=np.float64))[::-1]
    needed = max(1, math.ceil(target_recall * len(scores) - 1e-9))  # 1e-9: 0.95 * 20 is 19.000000000000004
    return float(scores[needed - 1])


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Returns the ECE: over equal-width bins of confidence (the top probability), the mean gap between
    confidence and accuracy, weighted by each bin's share of the rows."""
    table = reliability_table(probabilities, labels, bins)
    total = sum(row["count"] for row in table)
    return float(sum(row["count"] * abs(row["confidence"] - row["accuracy"]) for row in table) / max(total, 1))


def reliability_table(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> list[dict]:
    """Returns one row per non-empty confidence bin: its bounds, count, mean confidence and accuracy."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    confidence, correct = probabilities.max(axis=1), probabilities.argmax(axis=1) == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)  # (low, high] bins
    table = []
    for b in range(bins):
        inside = which == b
        if inside.any():
            table.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": int(inside.sum()),
                          "confidence": float(confidence[inside].mean()), "accuracy": float(correct[inside].mean())})  # fmt: skip
    return table
