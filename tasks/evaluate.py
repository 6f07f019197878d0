"""Stage evaluate: the saved model on the held-out test split -> `metrics/eval.json`, `plots/`,
and the calibration it is served with, `models/calibration.json`.

Calibration first, on the val split only: a temperature that makes the probabilities honest
(`evaluate.calibrate`), and for two classes the threshold on `evaluate.positive_class` that
reaches `evaluate.target_recall` there. Then test, at that operating point: accuracy (with a
95% bootstrap interval), n_test, per-class precision/recall/F1/support, macro F1, ROC AUC (two
classes), the confusion matrix, the expected calibration error before and after, and with a
threshold the sensitivity, specificity and precision, each with its interval. Plots: the
confusion matrix (as rows DVC draws and as a PNG), the ROC curve, the reliability diagram,
the training curves, and a grid of the test images the model got wrong most confidently.
The model is reloaded from its file as `imgclf predict` loads it (in float32).
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import matplotlib
import numpy as np
from sklearn import metrics as skm

from tasks.calibration import (
    CALIBRATION_JSON,
    Calibration,
    calibrated_probabilities,
    expected_calibration_error,
    fit_temperature,
    predicted_indices,
    reliability_table,
    save_calibration,
    threshold_for_recall,
    uncalibrated,
)
from tasks.dataset import CachedSet, DatasetError, load_cached_set, make_dataset, without
from tasks.errors import StageError
from tasks.files import atomic_file, atomic_path, read_json, sha256_file, write_csv, write_json
from tasks.model import class_probabilities
from tasks.params import EvaluateParams
from tasks.predict import load_described_model
from tasks.train import Exclusion

matplotlib.use("Agg")  # files only, no display
# Class names and paths are drawn as they are: two $ in one (tier_$1_to_$5) would be read as TeX.
matplotlib.rcParams["text.parse_math"] = False
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger("imgclf")

EVAL_BATCH = 64


class EvaluateError(StageError, ValueError):
    """The evaluate settings do not fit the data; the message names the key."""


def evaluate(model_path: Path, cache_dir: Path, split_csv: Path, train_json: Path, metrics_dir: Path, plots_dir: Path,
             params: EvaluateParams = EvaluateParams(), exclusion: Exclusion = Exclusion()) -> Path:  # fmt: skip
    """Returns the path of `eval.json`, written with the test-split metrics; plots go to `plots_dir`,
    the calibration fitted on val (less the images of `exclusion`, train.exclude's, as training had it) to
    `calibration.json` beside the model."""
    described, model = load_described_model(model_path)
    # DVC sees train.exclude's name, not its content: a list edited under the same name since training
    # would calibrate on other val images than the model was early-stopped on.
    trained_without = (described.get("exclude") or {}).get("sha256", "")
    if trained_without != exclusion.sha256:
        raise EvaluateError(f"train.exclude: {exclusion.file or 'unset'} is not the list {model_path} was trained "
                            f"without (sha256 {trained_without[:12] or 'none'}, now {exclusion.sha256[:12] or 'none'}); "
                            "re-run train (an edited list needs a new name for DVC to see it)")  # fmt: skip
    data = without(load_cached_set(cache_dir, split_csv), exclusion.paths, ("val",))
    _check_positive_class(params, data.classes)
    rows = data.rows["test"]
    if not len(rows):
        raise DatasetError(f"evaluate: {split_csv} has no test rows (split.test is 0?)")
    calibration, fitted, val_recall = _calibrate(params, model, data, split_csv)
    raw = class_probabilities(model, make_dataset(data, "test", EVAL_BATCH).map(lambda x, y: x))
    probabilities = calibrated_probabilities(raw, calibration)
    truth, predicted = data.labels[rows], predicted_indices(probabilities, calibration)
    labels = list(range(len(data.classes)))
    precision, recall, f1, support = skm.precision_recall_fscore_support(truth, predicted, labels=labels, zero_division=0)
    absent = [name for name, count in zip(data.classes, support) if not count]
    if absent:
        log.warning("evaluate: no test images of %s (see split.csv): recall not measured, and macro F1 counts such "
                    "a class only where the model answered it", ", ".join(map(repr, absent)))  # fmt: skip
    answered = np.bincount(predicted, minlength=len(labels))
    confusion = skm.confusion_matrix(truth, predicted, labels=labels)
    intervals = _bootstrap(truth, predicted, calibration.positive_index, params.bootstrap, params.seed)
    report = {
        "accuracy": float(skm.accuracy_score(truth, predicted)),
        "accuracy_ci95": intervals["accuracy"]["ci95"],
        "n_test": int(len(rows)),
        "untested_classes": absent,  # the scores say nothing of these
        # Over the classes seen or answered (sklearn's own default): one with neither has no F1.
        "macro_f1": float(skm.f1_score(truth, predicted, average="macro", zero_division=0)),
        # A class with no test image has no recall; never answered either, no precision nor F1 (null, not 0).
        "per_class": {
            name: {"precision": float(precision[i]) if support[i] or answered[i] else None,
                   "recall": float(recall[i]) if support[i] else None,
                   "f1": float(f1[i]) if support[i] or answered[i] else None, "support": int(support[i])}
            for i, name in enumerate(data.classes)
        },
        "classes": data.classes,
        "confusion_matrix": confusion.tolist(),  # rows: true class, columns: predicted class
        "calibration": {
            **fitted,
            "temperature": calibration.temperature,
            "ece_test_uncalibrated": expected_calibration_error(raw, truth),
            "ece_test_calibrated": expected_calibration_error(probabilities, truth),
        },
    }
    if calibration.threshold is not None:
        report["operating_point"] = {
            "positive_class": calibration.positive_class,
            "target_recall": params.target_recall,
            "threshold": calibration.threshold,
            "val_recall": val_recall,
            "test": {name: intervals[name] for name in ("sensitivity", "specificity", "precision", "accuracy")},
        }
    plots_dir.mkdir(parents=True, exist_ok=True)
    both_seen = len(set(truth.tolist())) == len(data.classes)
    if len(data.classes) == 2:
        if both_seen:
            report["roc_auc"] = float(skm.roc_auc_score(truth, probabilities[:, 1]))
        _roc(truth == 1, probabilities[:, 1], f"positive: {data.classes[1]}", plots_dir)
    else:  # one-vs-rest, micro-averaged over classes
        _roc(np.eye(len(data.classes), dtype=bool)[truth].ravel(), probabilities.ravel(), "micro-average", plots_dir)
    _confusion(truth, predicted, confusion, data.classes, plots_dir)
    _reliability(raw, probabilities, truth, calibration.temperature, plots_dir / "reliability.png")
    _misclassified(data, rows, truth, predicted, probabilities, plots_dir / "misclassified.png")
    if train_json.exists():
        _training_curves(read_json(train_json).get("history", {}), plots_dir / "training_curves.png")
    _model_diagram(model, plots_dir / "model.png")
    # Stamped with the model file's sha256 (eval.json is not: `dvc repro` and the flow must write it byte for byte
    # alike, and a .keras file carries its save time): predict, export and publish check they go together.
    save_calibration(calibration, model_path.parent / CALIBRATION_JSON, sha256_file(model_path))
    out = metrics_dir / "eval.json"
    write_json(out, report)
    log.info("evaluate: test accuracy %.4f on %d images, macro F1 %.4f%s", report["accuracy"], report["n_test"],
             report["macro_f1"], f", ROC AUC {report['roc_auc']:.4f}" if "roc_auc" in report else "")  # fmt: skip
    scores = report["calibration"]
    log.info("evaluate: temperature %.3f, test ECE %.4f -> %.4f", calibration.temperature,
             scores["ece_test_uncalibrated"], scores["ece_test_calibrated"])  # fmt: skip
    if calibration.threshold is not None:
        test = report["operating_point"]["test"]
        log.info("evaluate: %s at threshold %.4f (val recall %.4f): test sensitivity %s, specificity %s, precision %s",
                 calibration.positive_class, calibration.threshold, val_recall,
                 *(_with_interval(test[name]) for name in ("sensitivity", "specificity", "precision")))  # fmt: skip
    return out


def _check_positive_class(params: EvaluateParams, classes: list[str]) -> None:
    if params.positive_class is None:
        return
    if len(classes) != 2:
        raise EvaluateError(f"evaluate.positive_class: {params.positive_class!r} is set, but the data has "
                            f"{len(classes)} classes; a threshold needs two (leave it and target_recall empty)")  # fmt: skip
    if params.positive_class not in classes:
        # YAML reads 010 as the number 8 and 01 as 1: a class named by zero-padded digits must be quoted.
        hint = "; quote a class named by digits, e.g. '01'" if params.positive_class.isdigit() else ""
        raise EvaluateError(f"evaluate.positive_class: {params.positive_class!r} is not one of the classes "
                            f"({', '.join(classes)}){hint}")  # fmt: skip


def _calibrate(params: EvaluateParams, model: keras.Model, data: CachedSet,
               split_csv: Path) -> tuple[Calibration, dict, float | None]:  # fmt: skip
    """Returns the calibration fitted on val (temperature, and the threshold when asked), what
    eval.json says of the fit, and the recall the threshold reaches on val (None without one)."""
    rows = data.rows["val"]
    if not len(rows):
        if params.positive_class is not None:
            raise EvaluateError(f"evaluate.target_recall: {split_csv} has no val rows to choose the threshold on "
                                "(set split.val above 0)")  # fmt: skip
        if params.calibrate:
            log.warning("evaluate: %s has no val rows: the probabilities stay uncalibrated", split_csv)
        return uncalibrated(data.classes), {"fitted_on": None, "n_val": 0}, None
    raw = class_probabilities(model, make_dataset(data, "val", EVAL_BATCH).map(lambda x, y: x))
    truth = data.labels[rows]
    lacking = [name for index, name in enumerate(data.classes) if not (truth == index).any()] if params.calibrate else []
    if lacking:
        # Fitted to the classes val has, a temperature sharpens the model's doubts away: a 4-class model whose
        # val held one class answered everything, wrong answers too, with probability 1.0.
        log.warning("evaluate: the val split has no images of %s: the probabilities stay uncalibrated",
                    ", ".join(map(repr, lacking)))  # fmt: skip
    calibrate = params.calibrate and not lacking
    temperature = fit_temperature(raw, truth, data.classes) if calibrate else 1.0
    calibration = Calibration(temperature, data.classes)
    fitted = {"fitted_on": "val" if calibrate else None, "n_val": int(len(rows)), "val_lacks": lacking}
    if params.positive_class is None:
        return calibration, fitted, None
    positive = data.classes.index(params.positive_class)
    scores = calibrated_probabilities(raw, calibration)[truth == positive, positive]
    if not len(scores):
        raise EvaluateError(f"evaluate.positive_class: the val split of {split_csv} holds no {params.positive_class!r} "
                            "image to choose the threshold on")  # fmt: skip
    threshold = threshold_for_recall(scores, params.target_recall)
    return Calibration(temperature, data.classes, params.positive_class, threshold), fitted, float((scores >= threshold).mean())


def _bootstrap(truth: np.ndarray, predicted: np.ndarray, positive: int | None, resamples: int, seed: int) -> dict:
    """Returns {name: {"value", "ci95"}} for accuracy and, with a positive class, sensitivity,
    specificity and precision: the value on the test split and the 2.5th-97.5th percentiles over
    `resamples` resamples of its rows with replacement. A ratio with nothing to divide by is None."""
    draws = np.random.default_rng(seed).integers(0, len(truth), size=(resamples, len(truth)))
    counted = {"accuracy": (truth == predicted, np.ones_like(truth, dtype=bool))}
    if positive is not None:
        actual, said = truth == positive, predicted == positive
        counted |= {"sensitivity": (actual & said, actual), "specificity": (~actual & ~said, ~actual),
                    "precision": (actual & said, said)}  # fmt: skip
    found = {}
    for name, (hits, of) in counted.items():
        resampled = hits[draws].sum(axis=1) / np.maximum(of[draws].sum(axis=1), 1)
        resampled = resampled[of[draws].any(axis=1)]  # resamples with nothing to divide by say nothing
        found[name] = {
            "value": float(hits.sum() / of.sum()) if of.any() else None,
            "ci95": [float(v) for v in np.percentile(resampled, [2.5, 97.5])] if len(resampled) else None,
        }
    return found


def _with_interval(scored: dict) -> str:
    if scored["value"] is None:
        return "n/a"
    return f"{scored['value']:.4f}" + (" [{:.4f}, {:.4f}]".format(*scored["ci95"]) if scored["ci95"] else "")


def _save_figure(figure, path: Path) -> None:
    with atomic_file(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)


def _confusion(truth, predicted, confusion, classes: list[str], plots_dir: Path) -> None:
    # One row per test image: what `dvc plots` draws with its confusion template.
    write_csv(plots_dir / "confusion.csv", ["actual", "predicted"],
              ((classes[t], classes[p]) for t, p in zip(truth, predicted)))
    figure, axes = plt.subplots(figsize=(1.2 * len(classes) + 3, 1.2 * len(classes) + 2))
    axes.imshow(confusion, cmap="Blues")
    for (i, j), count in np.ndenumerate(confusion):
        color = "white" if count > confusion.max() / 2 else "black"
        axes.text(j, i, str(count), ha="center", va="center", color=color)
    axes.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axes.set_yticks(range(len(classes)), classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("actual")
    axes.set_title("Confusion matrix (test split)")
    _save_figure(figure, plots_dir / "confusion_matrix.png")


def _roc(positive, scores, title: str, plots_dir: Path) -> None:
    # With one class absent from the test split the curve is undefined: the files say so, empty.
    fpr, tpr = (skm.roc_curve(positive, scores)[:2]) if 0 < positive.sum() < len(positive) else ([], [])
    write_csv(plots_dir / "roc.csv", ["fpr", "tpr"], zip(np.asarray(fpr).tolist(), np.asarray(tpr).tolist()))
    figure, axes = plt.subplots(figsize=(5, 5))
    if len(fpr):
        axes.plot(fpr, tpr, label=f"AUC {skm.auc(fpr, tpr):.4f}")
        axes.legend(loc="lower right")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey")
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate")
    axes.set_title(f"ROC, test split ({title})")
    _save_figure(figure, plots_dir / "roc.png")


def _reliability(raw, calibrated, truth, temperature: float, path: Path) -> None:
    figure, axes = plt.subplots(figsize=(5, 5))
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    for name, probabilities in (("uncalibrated", raw), (f"temperature {temperature:.2f}", calibrated)):
        table = reliability_table(probabilities, truth)
        ece = expected_calibration_error(probabilities, truth)
        axes.plot([row["confidence"] for row in table], [row["accuracy"] for row in table], marker="o",
                  label=f"{name} (ECE {ece:.4f})")  # fmt: skip
    axes.set_xlabel("confidence (top probability)")
    axes.set_ylabel("accuracy")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.legend(loc="upper left")
    axes.set_title("Reliability, test split")
    _save_figure(figure, path)


def _training_curves(history: dict[str, list[float]], path: Path) -> None:
    figure, panels = plt.subplots(1, 2, figsize=(10, 4))
    for panel, metric in zip(panels, ("loss", "accuracy")):
        for key in (metric, f"val_{metric}"):
            if history.get(key):
                panel.plot(range(1, len(history[key]) + 1), history[key], marker="o", label=key)
        panel.set_xlabel("epoch")
        panel.set_title(metric)
        panel.legend()
    _save_figure(figure, path)


def _misclassified(data: CachedSet, rows, truth, predicted, probabilities, path: Path, most: int = 16) -> None:
    wrong = np.flatnonzero(truth != predicted)
    wrong = wrong[np.argsort(-probabilities[wrong, predicted[wrong]], kind="stable")][:most]
    columns = 4
    figure, axes = plt.subplots(max(1, -(-len(wrong) // columns)), columns, figsize=(10, 2.8 * max(1, -(-len(wrong) // columns))))
    for axis in np.ravel(axes):
        axis.axis("off")
    for axis, i in zip(np.ravel(axes), wrong):
        image = data.images[rows[i]]
        axis.imshow(image[:, :, 0] if image.shape[2] == 1 else image, cmap="gray" if image.shape[2] == 1 else None)
        axis.set_title(f"true {data.classes[truth[i]]}\npred {data.classes[predicted[i]]} "
                       f"({probabilities[i, predicted[i]]:.2f})", fontsize=8)  # fmt: skip
    figure.suptitle(f"Most confident mistakes: {len(wrong)} shown of {int((truth != predicted).sum())}")
    _save_figure(figure, path)


def _model_diagram(model: keras.Model, path: Path) -> None:
    try:
        with atomic_path(path) as temp:
            keras.utils.plot_model(model, to_file=str(temp), show_shapes=True)
    except (ImportError, OSError) as exc:  # pydot or the graphviz `dot` program is missing
        log.info("evaluate: no %s (%s)", path.name, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
