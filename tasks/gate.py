"""The gate: may this run's model (the challenger) replace the published one (the champion)?

Both models are scored on two labelled sets of raw image files: this run's test split, and
the champion's reference set (the test split it was promoted with, published beside it and
frozen since). This run's split alone cannot catch broken new data: with shuffled labels
both models score alike there; on the frozen set the damage shows. Each model prepares the
files by its own description (model.json: size, resize mode, channels), as `imgclf predict`
does, and labels them with its own calibration and threshold (calibration.json) when it has
one, so a champion trained at another image size still compares.

Reference images whose bytes the challenger trained or validated on are left out of that set.
Promoted when, on both sets, challenger minus champion is at least minus `gate.tolerance`;
each difference comes with a paired bootstrap 95% interval (the same resampled images for
both models), which informs the reader but does not decide. Whatever the champion, and on the
first run when there is none, a challenger whose macro F1 on its test split is no better than
always answering one class is not promoted: a run that learned nothing must not become the
model a schedule serves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tasks.calibration import CALIBRATION_JSON, Calibration, calibrated_probabilities, predicted_indices
from tasks.errors import StageError
from tasks.files import read_csv, sha256_file
from tasks.manifest import read_valid_rows
from tasks.params import GateParams, ValidateParams

# What each set is called in reasons and reports.
SET_NAMES = {"test": "this run's test split", "reference": "the champion's reference set"}


class GateError(StageError):
    """The challenger or its test split cannot be scored; the message names the file."""


@dataclass(frozen=True)
class LabelledFiles:
    """Image files, relative to `root`, with their class names."""

    root: Path
    paths: list[str]
    labels: list[str]


def run_test_set(extracted_dir: Path, split_csv: Path) -> LabelledFiles:
    """Returns the test rows of split.csv: raw files below the extracted root, with their labels."""
    rows = [row for row in read_csv(split_csv) if row["split"] == "test"]
    if not rows:
        raise GateError(f"{split_csv}: no test rows to gate on (split.test is 0?)")
    return LabelledFiles(extracted_dir, [row["path"] for row in rows], [row["label"] for row in rows])


def reference_set(labels_csv: Path, images_dir: Path) -> LabelledFiles:
    """Returns the reference set published with a champion: `labels.csv` (path, label) and the files it names."""
    rows = read_csv(labels_csv)
    if not rows or not {"path", "label"} <= rows[0].keys():
        raise GateError(f"{labels_csv}: no rows of path,label")
    if lacking := next((number for number, row in enumerate(rows, start=1) if not row["path"] or not row["label"]), None):
        raise GateError(f"{labels_csv}: row {lacking} of {len(rows)} lacks its path or its label")
    return LabelledFiles(images_dir, [row["path"] for row in rows], [row["label"] for row in rows])


def trained_on(manifest_csv: Path, split_csv: Path) -> set[str]:
    """Returns the sha256 of every image in this run's train and val splits."""
    digest = {row["path"]: row["sha256"] for row in read_valid_rows(manifest_csv)}
    used = [row["path"] for row in read_csv(split_csv) if row["split"] in ("train", "val")]
    if stale := [path for path in used if path not in digest]:
        raise GateError(f"{split_csv}: {len(stale)} train/val image(s) are not valid rows of {manifest_csv} "
                        f"(first: {stale[0]}): the split is older than the manifest; run the split stage again")  # fmt: skip
    return {digest[path] for path in used}


def _unseen(files: LabelledFiles, seen: set[str]) -> LabelledFiles:
    """Returns the files whose bytes are none of `seen`."""
    kept = [(path, label) for path, label in zip(files.paths, files.labels) if sha256_file(files.root / path) not in seen]
    return LabelledFiles(files.root, [path for path, _ in kept], [label for _, label in kept])


@dataclass(frozen=True)
class Contender:
    """A model ready to score: its description, the Keras model, and how it turns outputs into classes."""

    described: dict
    model: object
    calibration: Calibration

    @property
    def classes(self) -> list[str]:
        return list(self.described["classes"])


def load_contender(model_path: Path) -> Contender:
    """Returns the model at `model_path` with its description and calibration (none beside it: uncalibrated)."""
    from tasks.predict import load_described_model, load_model_calibration

    described, model = load_described_model(model_path)
    return Contender(described, model, load_model_calibration(model_path, described["classes"]))


def predicted_classes(contender: Contender, files: LabelledFiles, prepared: dict, max_pixels: int) -> np.ndarray:
    """Returns the class index the contender gives each file, the files prepared by its own description.

    `prepared` keeps the set's arrays by (size, channels, resize): two models described alike decode it once.
    """
    from tasks.model import class_probabilities
    from tasks.predict import prepare_file

    described = contender.described
    key = (tuple(described["image_size"]), int(described["channels"]), described["resize"])
    if key not in prepared:
        images = []
        for path in files.paths:
            try:
                images.append(prepare_file(files.root / path, described, max_pixels))
            except (OSError, ValueError) as exc:
                raise GateError(f"{files.root / path}: cannot be prepared for the gate ({exc})") from None
        prepared[key] = np.stack(images)
    probabilities = class_probabilities(contender.model, prepared[key])
    return predicted_indices(calibrated_probabilities(probabilities, contender.calibration), contender.calibration)


def _resample_weights(n: int, resamples: int, seed: int) -> np.ndarray:
    """Returns (resamples, n) counts: how often each of the n images is drawn in each bootstrap resample."""
    drawn = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    offsets = np.arange(resamples)[:, None] * n
    return np.bincount((drawn + offsets).ravel(), minlength=resamples * n).reshape(resamples, n)


def scores(truth: np.ndarray, predicted: np.ndarray, weights: np.ndarray, n_classes: int, metric: str,
           positive: int | None) -> np.ndarray:  # fmt: skip
    """Returns the metric once per row of `weights` (how often each image counts): macro F1 over the classes
    seen or predicted (as evaluate counts it: a class with neither has no F1), or the positive class's
    recall (NaN without positives)."""
    cells = np.zeros((len(truth), n_classes * n_classes))
    cells[np.arange(len(truth)), truth * n_classes + predicted] = 1
    confusion = (weights @ cells).reshape(-1, n_classes, n_classes)  # [resample, true, predicted]
    hits = np.diagonal(confusion, axis1=1, axis2=2)
    actual, called = confusion.sum(axis=2), confusion.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        if metric == "sensitivity":
            return np.where(actual[:, positive] > 0, hits[:, positive] / actual[:, positive], np.nan)
        denominator = actual + called
        return np.nanmean(np.where(denominator > 0, 2 * hits / denominator, np.nan), axis=1)


@dataclass(frozen=True)
class Comparison:
    """Challenger against champion on one set: scores, their difference and its paired bootstrap 95% interval."""

    n: int
    challenger: float
    champion: float
    difference: float
    interval: tuple[float, float]

    def holds(self, tolerance: float) -> bool:
        # Scores are ratios of counts: 19/20 - 20/20 is -0.05000000000000004 in floats, and must hold at 0.05.
        return bool(self.difference >= -tolerance - 1e-9)  # NaN (no positives to measure) never holds

    def as_json(self) -> dict:
        """Returns the comparison as JSON has it: an undefined score (sensitivity without positives) is null, not NaN."""
        def number(value: float) -> float | None:
            return None if np.isnan(value) else value

        return {"n": self.n, "challenger": number(self.challenger), "champion": number(self.champion),
                "difference": number(self.difference), "interval": [number(bound) for bound in self.interval]}  # fmt: skip

    def describe(self, metric: str) -> str:
        if np.isnan(self.difference):
            return f"{metric} undefined: none of its n={self.n} images is of the positive class"
        low, high = self.interval
        return (f"{metric} {self.challenger:.4f} vs {self.champion:.4f} ({self.difference:+.4f}, "
                f"95% CI [{low:+.4f}, {high:+.4f}], n={self.n})")  # fmt: skip


def compare(truth: np.ndarray, challenger: np.ndarray, champion: np.ndarray, n_classes: int, gate: GateParams,
            positive: int | None) -> Comparison:  # fmt: skip
    """Returns the challenger's and champion's scores on one set, and the paired bootstrap interval of the difference."""
    point = np.ones((1, len(truth)))
    ours, theirs = (scores(truth, p, point, n_classes, gate.metric, positive)[0] for p in (challenger, champion))
    weights = _resample_weights(len(truth), gate.bootstrap, gate.seed)
    differences = (scores(truth, challenger, weights, n_classes, gate.metric, positive)
                   - scores(truth, champion, weights, n_classes, gate.metric, positive))  # fmt: skip
    defined = differences[~np.isnan(differences)]
    low, high = np.percentile(defined, [2.5, 97.5]) if len(defined) else (np.nan, np.nan)
    return Comparison(len(truth), float(ours), float(theirs), float(ours - theirs), (float(low), float(high)))


@dataclass(frozen=True)
class Champion:
    """The published model latest.json points at, fetched: its run id, model file and reference set."""

    run_id: str
    model_path: Path
    reference: LabelledFiles


@dataclass(frozen=True)
class Decision:
    """The gate's verdict: whether latest.json moves to this run, why (one line), and the scores behind it."""

    promoted: bool
    reason: str
    champion: str | None = None
    forced: bool = False
    comparisons: dict[str, Comparison] = field(default_factory=dict)
    unreadable: bool = False  # the champion could not be read: the store wants mending, not this run

    @classmethod
    def refused(cls, why: str, champion: str | None = None, **more: Any) -> Decision:
        """Returns a verdict against promotion, its reason saying so first, as every refusal's does."""
        return cls(False, f"not promoted: {why}", champion, **more)

    def forced_through(self) -> Decision:
        """Returns this decision promoted by gate.force, its own reason kept."""
        if self.promoted:
            return self
        return Decision(True, f"forced by gate.force; the gate said: {self.reason}", self.champion, True, self.comparisons)

    def as_json(self, gate: GateParams) -> dict:
        return {"promoted": self.promoted, "reason": self.reason, "forced": self.forced, "champion": self.champion,
                "metric": gate.metric, "tolerance": gate.tolerance,
                "sets": {name: comparison.as_json() for name, comparison in self.comparisons.items()}}  # fmt: skip


FIRST_RUN = "first run: no champion yet (no latest.json); this run is promoted and its test split becomes the reference set"


def judge(gate: GateParams, challenger_model: Path, test: LabelledFiles, champion: Champion | None,
          seen: frozenset[str] = frozenset(), max_pixels: int = ValidateParams().max_pixels) -> Decision:  # fmt: skip
    """Returns the decision on the challenger against the champion (None: the first run), on this run's test split
    and the champion's reference set less the images the challenger trained on (sha256s in `seen`). A champion
    that cannot be read, or that knows other classes, is not replaced."""
    challenger = load_contender(challenger_model)
    classes, sets = challenger.classes, {"test": test}
    prepared = {"test": {}, "reference": {}}  # per set: two models described alike decode it once
    truth = {"test": _class_indices(test, classes)}
    ours = {"test": predicted_classes(challenger, test, prepared["test"], max_pixels)}
    chance = _no_better_than_one_class(truth["test"], ours["test"], classes)
    if champion is None:
        return Decision.refused(chance) if chance else Decision(True, FIRST_RUN)
    run_id = champion.run_id
    try:
        defender = load_contender(champion.model_path)
    except StageError as exc:
        return Decision.refused(f"the champion ({run_id}) cannot be read: {exc}", run_id, unreadable=True)
    if defender.classes != classes:
        return Decision.refused(f"classes differ: the champion ({run_id}) has {defender.classes}, "
                               f"this run {classes}", run_id)  # fmt: skip
    unknown = sorted(set(champion.reference.labels) - set(classes))
    if unknown:
        return Decision.refused(f"the champion's ({run_id}) reference set has classes this run lacks: "
                               f"{unknown}", run_id)  # fmt: skip
    positive = challenger.calibration.positive_index
    if gate.metric == "sensitivity" and positive is None:
        raise GateError(f"gate.metric sensitivity: {challenger_model.parent / CALIBRATION_JSON} names no "
                        "positive class (set evaluate.positive_class and evaluate.target_recall)")  # fmt: skip
    try:
        # A split drawn anew (other near-duplicate clusters, another seed) may train on the champion's test images.
        sets["reference"] = _unseen(champion.reference, seen)
        if not sets["reference"].paths:
            return Decision.refused(f"every image of the champion's ({run_id}) reference set is in this "
                                   "run's train or val split: none unseen to compare on (gate.force=true promotes)",
                            run_id)  # fmt: skip
        theirs = {"reference": predicted_classes(defender, sets["reference"], prepared["reference"], max_pixels)}
        ours["reference"] = predicted_classes(challenger, sets["reference"], prepared["reference"], max_pixels)
    except (GateError, OSError) as exc:
        return Decision.refused(f"the champion ({run_id}) cannot be read: its reference set: {exc}", run_id,
                                unreadable=True)  # fmt: skip
    truth["reference"] = _class_indices(sets["reference"], classes)
    theirs["test"] = predicted_classes(defender, test, prepared["test"], max_pixels)
    comparisons = {name: compare(truth[name], ours[name], theirs[name], len(classes), gate, positive) for name in sets}
    left_out = len(champion.reference.paths) - len(sets["reference"].paths)
    seen_note = (f"; {left_out} of the reference set's {len(champion.reference.paths)} images are in this run's "
                 "train or val split, left out") if left_out else ""  # fmt: skip
    metric = f"sensitivity ({classes[positive]})" if gate.metric == "sensitivity" else gate.metric
    failed = [name for name, comparison in comparisons.items() if not comparison.holds(gate.tolerance)]
    if failed:
        said = "; ".join(f"on {SET_NAMES[name]} {comparisons[name].describe(metric)}" for name in failed)
        reason = f"worse than the champion ({run_id}) by more than the tolerance {gate.tolerance}: {said}"
        if any(np.isnan(comparisons[name].difference) for name in failed):
            reason = f"the champion ({run_id}) cannot be compared: {said}"
        return Decision.refused(reason + seen_note, run_id, comparisons=comparisons)
    if chance:
        return Decision.refused(chance, run_id, comparisons=comparisons)
    said = ", ".join(f"{name} {comparison.difference:+.4f}" for name, comparison in comparisons.items())
    reason = (f"promoted: {metric} at least the champion's ({run_id}), within the tolerance {gate.tolerance}, "
              f"on both sets ({said}){seen_note}")  # fmt: skip
    return Decision(True, reason, run_id, comparisons=comparisons)


def _class_indices(files: LabelledFiles, classes: list[str]) -> np.ndarray:
    return np.array([classes.index(label) for label in files.labels])


def _no_better_than_one_class(truth: np.ndarray, predicted: np.ndarray, classes: list[str]) -> str | None:
    """Returns why the challenger's macro F1 on its test split is no better than always answering one class, or
    None when it is. Macro F1 whatever gate.metric is: always answering the positive class has full sensitivity."""
    present = {classes[index] for index in truth}
    if len(present) == 1:  # a perfect model ties always answering that class: no test split can show more
        return (f"this run's test split holds only {present.pop()}: it cannot show the model does better than "
                "always answering one class (gate.force=true promotes)")  # fmt: skip
    point = np.ones((1, len(truth)))
    ours = scores(truth, predicted, point, len(classes), "macro_f1", None)[0]
    constant = [scores(truth, np.full_like(truth, index), point, len(classes), "macro_f1", None)[0]
                for index in range(len(classes))]  # fmt: skip
    # Of equal constants, the class the model answers most: the one it actually collapsed to.
    best = max(range(len(classes)), key=lambda index: (constant[index], np.sum(predicted == index)))
    if ours > constant[best]:
        return None
    return (f"macro F1 {ours:.4f} on this run's test split is no better than always answering "
            f"{classes[best]} ({constant[best]:.4f}): the model learned nothing to serve")  # fmt: skip
