"""Stage evaluate: the saved model on the held-out test split -> `metrics/eval.json` and `plots/`.

Metrics: accuracy, n_test, per-class precision/recall/F1/support, macro F1, ROC AUC (two
classes) and the confusion matrix. Plots: the confusion matrix (as rows DVC draws and as a
PNG), the ROC curve, the training curves, and a grid of the test images the model got wrong
most confidently. The model is reloaded from its file, as a user would.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import keras
import matplotlib
import numpy as np
from sklearn import metrics as skm

from tasks.dataset import CachedSet, DatasetError, load_cached_set, make_dataset
from tasks.files import atomic_file, atomic_path
from tasks.model import class_probabilities

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger("imgclf")

EVAL_BATCH = 64


def evaluate(model_path: Path, cache_dir: Path, split_csv: Path, train_json: Path, metrics_dir: Path, plots_dir: Path) -> Path:
    """Returns the path of `eval.json`, written with the test-split metrics; plots go to `plots_dir`."""
    model = keras.models.load_model(model_path)
    data = load_cached_set(cache_dir, split_csv)
    rows = data.rows["test"]
    if not len(rows):
        raise DatasetError(f"evaluate: {split_csv} has no test rows (split.test is 0?)")
    probabilities = class_probabilities(model, make_dataset(data, "test", EVAL_BATCH).map(lambda x, y: x))
    truth, predicted = data.labels[rows], probabilities.argmax(axis=1)
    labels = list(range(len(data.classes)))
    precision, recall, f1, support = skm.precision_recall_fscore_support(truth, predicted, labels=labels, zero_division=0)
    confusion = skm.confusion_matrix(truth, predicted, labels=labels)
    report = {
        "accuracy": float(skm.accuracy_score(truth, predicted)),
        "n_test": int(len(rows)),
        "macro_f1": float(f1.mean()),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, name in enumerate(data.classes)
        },
        "classes": data.classes,
        "confusion_matrix": confusion.tolist(),  # rows: true class, columns: predicted class
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
    _misclassified(data, rows, truth, predicted, probabilities, plots_dir / "misclassified.png")
    if train_json.exists():
        _training_curves(json.loads(train_json.read_text()).get("history", {}), plots_dir / "training_curves.png")
    _model_diagram(model, plots_dir / "model.png")
    out = metrics_dir / "eval.json"
    with atomic_file(out) as handle:
        json.dump(report, handle, indent=2)
    log.info("evaluate: test accuracy %.4f on %d images, macro F1 %.4f%s", report["accuracy"], report["n_test"],
             report["macro_f1"], f", ROC AUC {report['roc_auc']:.4f}" if "roc_auc" in report else "")  # fmt: skip
    return out


def _save_figure(figure, path: Path) -> None:
    with atomic_file(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)


def _confusion(truth, predicted, confusion, classes: list[str], plots_dir: Path) -> None:
    # One row per test image: what `dvc plots` draws with its confusion template.
    with atomic_file(plots_dir / "confusion.csv", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["actual", "predicted"])
        writer.writerows((classes[t], classes[p]) for t, p in zip(truth, predicted))
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
    with atomic_file(plots_dir / "roc.csv", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["fpr", "tpr"])
        writer.writerows(zip(np.asarray(fpr).tolist(), np.asarray(tpr).tolist()))
    figure, axes = plt.subplots(figsize=(5, 5))
    if len(fpr):
        axes.plot(fpr, tpr, label=f"AUC {skm.auc(fpr, tpr):.4f}")
        axes.legend(loc="lower right")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey")
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate")
    axes.set_title(f"ROC, test split ({title})")
    _save_figure(figure, plots_dir / "roc.png")


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
