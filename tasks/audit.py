"""Stage audit: grouped k-fold cross-validation on train+val -> `data/oof.csv`, `data/label_issues.csv`,
`metrics/audit.json`.

Outside the path to publish, and off unless `audit.folds` is 2 or more. The train and val
images of `data/split.csv` (never test) are cut into k folds, stratified by label, that keep
each block whole (split.csv's `block`: a `split.group_pattern` group joined with its
near-duplicate clusters), so no patient and no re-saved copy is on both sides of a fold. For
each fold the train stage's own function trains on the other folds (with the train and augment
params, `train.exclude` included; its val split carved from them by block, at the share val
has of train+val in split.csv) and predicts the fold. Every train+val image thus gets a
probability from a model that never saw it: `data/oof.csv`. Accuracy and macro F1 per fold, as
a mean with a 95% t interval across folds, go to `metrics/audit.json`. cleanlab's
`find_label_issues` reads the out-of-fold probabilities and ranks the images whose label the
models doubt most: `data/label_issues.csv` (rank, path, label, suggested, score: the
probability the models gave the image's own label). Review it; pass the rows you agree with as
`train.exclude`.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from tasks.errors import StageError
from tasks.files import read_csv, write_csv, write_json
from tasks.params import AugmentParams, AuditParams, TrainParams

log = logging.getLogger("imgclf")

PREDICT_BATCH = 256
LABEL_ISSUE_COLUMNS = ["rank", "path", "label", "suggested", "score"]


class AuditError(StageError, ValueError):
    """The train+val images cannot be cut into the folds asked for; the message says why."""


def fold_of(labels: list[str], blocks: list[str], folds: int, seed: int) -> np.ndarray:
    """Returns each image's fold (0..folds-1): stratified by label, each block whole, seeded."""
    from sklearn.model_selection import StratifiedGroupKFold

    distinct = len(set(blocks))
    if distinct < folds:
        raise AuditError(f"audit: audit.folds={folds}, but train+val hold only {distinct} block(s) of images that stay "
                         "together (split.group_pattern groups, near-duplicate clusters)")  # fmt: skip
    largest, count = Counter(labels).most_common(1)[0]
    if count < folds:  # scikit-learn's own words for it name n_splits, not the param
        raise AuditError(f"audit: audit.folds={folds}, but the largest class in train+val, {largest!r}, has only "
                         f"{count} images; lower audit.folds")  # fmt: skip
    assigned = np.empty(len(labels), dtype=np.int64)
    # scikit-learn warns at each split (each fold's inner one too) of a class with fewer images than folds,
    # naming its own file; the stage says it once, in its words (audit()). A filter added for good, not
    # `catch_warnings`, which swaps the process's filters while audit runs beside train in the flow's threads.
    warnings.filterwarnings("ignore", "The least populated class", UserWarning)  # once: it replaces its duplicate
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels, blocks)):
        assigned[held_out] = fold
    return assigned


def interval(values: list[float]) -> dict:
    """Returns the mean of per-fold scores with a 95% Student-t interval across folds, and the scores."""
    from scipy import stats

    scores = np.asarray(values, dtype=np.float64)
    mean = float(scores.mean())
    half = float(stats.t.ppf(0.975, len(scores) - 1) * scores.std(ddof=1) / np.sqrt(len(scores)))
    return {"mean": mean, "ci95": [max(0.0, mean - half), min(1.0, mean + half)], "per_fold": scores.tolist()}


OFF = "audit.folds is 0: set it to 2 or more to run the audit"


def _off(oof_csv: Path, label_issues_csv: Path, audit_json: Path, note: str = OFF) -> Path:
    """Writes the outputs of an audit that did not run, and why (`note`)."""
    for path, header in ((oof_csv, ["path", "label", "fold", "predicted"]), (label_issues_csv, LABEL_ISSUE_COLUMNS)):
        write_csv(path, header, [])
    write_json(audit_json, {"enabled": False, "folds": 0, "note": note})
    if note == OFF:
        log.info("audit: off (audit.folds: 0)")
    else:
        log.warning("audit: not run: %s", note)
    return audit_json


def audit(params: AuditParams, train_params: TrainParams, augment: AugmentParams, cache_dir: Path, split_csv: Path,
          oof_csv: Path, label_issues_csv: Path, audit_json: Path) -> Path:  # fmt: skip
    """Returns `audit_json`, written with the cross-validated scores; `oof_csv` and `label_issues_csv` beside it."""
    if params.folds < 2:
        return _off(oof_csv, label_issues_csv, audit_json)
    rows = [row for row in read_csv(split_csv) if row["split"] in ("train", "val")]
    if not rows:
        raise AuditError(f"audit: {split_csv} has no train or val rows")
    labels = [row["label"] for row in rows]
    blocks = [row.get("block") or row["path"] for row in rows]  # a split.csv from before blocks: each image alone
    folds = fold_of(labels, blocks, params.folds, params.seed)
    if few := {label: count for label, count in sorted(Counter(labels).items()) if count < params.folds}:
        log.warning("audit: fewer train+val images than audit.folds=%d of %s: some folds hold none of them, and "
                    "some folds' val splits neither", params.folds, ", ".join(f"{label!r} ({n})" for label, n in few.items()))
    val_share = sum(row["split"] == "val" for row in rows) / len(rows)
    predicted: dict[int, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="imgclf-audit-") as scratch:
        fold_csvs = [_write_fold_split(Path(scratch) / f"split-{fold}.csv", rows, folds, fold, val_share, params.seed)
                     for fold in range(params.folds)]  # fmt: skip
        for fold, fold_csv in enumerate(fold_csvs):
            untrained = set(labels) - {row["label"] for row in read_csv(fold_csv) if row["split"] == "train"}
            if untrained:
                # Outside the path to publish: the run goes on, and its report says why there is no audit.
                return _off(oof_csv, label_issues_csv, audit_json,
                            f"fold {fold + 1} of {params.folds} leaves no images of {', '.join(map(repr, sorted(untrained)))} "
                            "to train on (one group or near-duplicate cluster holds them all, or nearly): fewer "
                            "audit.folds, or a finer split.group_pattern, lets every fold train on every class")  # fmt: skip
        for fold, fold_csv in enumerate(fold_csvs):
            log.info("audit: fold %d of %d: %d images held out", fold + 1, params.folds, int((folds == fold).sum()))
            work = Path(scratch) / str(fold)
            classes, predicted[fold] = _train_and_predict(train_params, augment, cache_dir, fold_csv, work)
    probabilities = np.zeros((len(rows), len(classes)))
    for fold, fold_probabilities in predicted.items():
        probabilities[folds == fold] = fold_probabilities
    return _write_outputs(params, rows, folds, classes, probabilities, oof_csv, label_issues_csv, audit_json)


def _write_fold_split(path: Path, rows: list[dict], folds: np.ndarray, fold: int, val_share: float, seed: int) -> Path:
    """Writes a split.csv for one fold: the fold is test; the rest train, with val carved from it by block."""
    training = np.flatnonzero(folds != fold)
    role = np.where(folds == fold, "test", "train").astype(object)
    if val_share > 0:
        inner = max(round(1 / val_share), 2)  # the number of inner folds whose one is val's share
        labels = [rows[i]["label"] for i in training]
        blocks = [rows[i].get("block") or rows[i]["path"] for i in training]
        # Too few to carve val from (split.val's share, not audit.folds): the fold trains without one.
        if len(set(blocks)) >= inner and Counter(labels).most_common(1)[0][1] >= inner:
            role[training[fold_of(labels, blocks, inner, (seed + fold) % 2**32) == 0]] = "val"
    write_csv(path, ["path", "label", "split"], ((row["path"], row["label"], name) for row, name in zip(rows, role)))
    return path


def _train_and_predict(train_params: TrainParams, augment: AugmentParams, cache_dir: Path, fold_csv: Path,
                       work: Path) -> tuple[list[str], np.ndarray]:  # fmt: skip
    """Returns the classes and the probabilities, in the fold's row order, of a model trained as the train stage trains."""
    from tasks.dataset import load_cached_set, make_dataset
    from tasks.model import class_probabilities
    from tasks.predict import load_inference_model
    from tasks.train import train

    # In float32, as evaluate predicts, whatever precision train.precision trained in.
    model = load_inference_model(train(train_params, augment, cache_dir, fold_csv, work / "models", work / "metrics"))
    data = load_cached_set(cache_dir, fold_csv)
    predicted = class_probabilities(model, make_dataset(data, "test", PREDICT_BATCH).map(lambda images, labels: images))
    # The dataset holds the fold's cache rows in row order; the fold's rows in split.csv are in its own order.
    by_path = dict(zip((data.paths[row] for row in data.rows["test"]), predicted))
    held_out = [row["path"] for row in read_csv(fold_csv) if row["split"] == "test"]
    return data.classes, np.stack([by_path[path] for path in held_out])


def _write_outputs(params: AuditParams, rows: list[dict], folds: np.ndarray, classes: list[str], probabilities: np.ndarray,
                   oof_csv: Path, label_issues_csv: Path, audit_json: Path) -> Path:  # fmt: skip
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores
    from sklearn.metrics import accuracy_score, f1_score

    truth = np.array([classes.index(row["label"]) for row in rows])
    predicted = probabilities.argmax(axis=1)
    # folds counted from 1, as logged
    write_csv(oof_csv, ["path", "label", "fold", "predicted"] + [f"p_{name}" for name in classes],
              ([row["path"], row["label"], int(fold) + 1, classes[guess]] + [f"{p:.6f}" for p in scores]
               for row, fold, guess, scores in zip(rows, folds, predicted, probabilities)))

    # A fold model that answers one class doubts every label of the others: the issues it raises are
    # noise, left out; the other folds' stand.
    one_class = [k for k in range(params.folds) if len(np.unique(predicted[folds == k])) == 1]
    issues = find_label_issues(truth, probabilities, return_indices_ranked_by="self_confidence", n_jobs=1)
    noise = np.isin(folds[issues], one_class)
    issues = issues[~noise]
    quality = get_label_quality_scores(truth, probabilities, method="self_confidence")
    write_csv(label_issues_csv, LABEL_ISSUE_COLUMNS,
              ([rank, rows[index]["path"], rows[index]["label"], classes[predicted[index]], f"{quality[index]:.6f}"]
               for rank, index in enumerate(issues, start=1)))

    accuracy = [float(accuracy_score(truth[folds == k], predicted[folds == k])) for k in range(params.folds)]
    # Over the classes a fold held out or answered, as evaluate counts macro F1.
    macro_f1 = [float(f1_score(truth[folds == k], predicted[folds == k], average="macro", zero_division=0))
                for k in range(params.folds)]  # fmt: skip
    if one_class:
        log.warning("audit: the model of fold(s) %s answered one class for every image it held out: it learned "
                    "nothing, and the %d label issues among those images are left out of data/label_issues.csv "
                    "(train longer: train.epochs)", ", ".join(str(k + 1) for k in one_class), noise.sum())  # fmt: skip
    report = {
        "enabled": True,
        "folds": params.folds,
        "seed": params.seed,
        "images": len(rows),  # train + val of split.csv
        "accuracy": interval(accuracy),
        "macro_f1": interval(macro_f1),
        "label_issues": len(issues),
        "folds_answering_one_class": [k + 1 for k in one_class],
        "label_issues_left_out": int(noise.sum()),  # raised by those folds' models
        "classes": classes,
    }
    write_json(audit_json, report)
    log.info("audit: %d folds over %d train+val images: accuracy %.4f (95%% CI %.4f-%.4f), macro F1 %.4f "
             "(%.4f-%.4f); %d label issues ranked in %s", params.folds, len(rows), report["accuracy"]["mean"],
             *report["accuracy"]["ci95"], report["macro_f1"]["mean"], *report["macro_f1"]["ci95"], len(issues),
             label_issues_csv)  # fmt: skip
    return audit_json
