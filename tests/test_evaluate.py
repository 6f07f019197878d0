"""Calibration and the operating threshold: fitted on val by evaluate, reported on test.

The calibration test runs on a real class-per-folder set shipped inside an installed package:
scikit-learn's handwritten digits (load_digits: 1,797 8x8 images, 10 classes, bundled with
the package, no download), written as one folder per digit and cached at 32x32 grayscale.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from tasks.cache import cache
from tasks.calibration import (
    Calibration,
    CalibrationError,
    calibrated_probabilities,
    expected_calibration_error,
    fit_temperature,
    load_calibration,
    predicted_indices,
    save_calibration,
    threshold_for_recall,
)
from tasks.demo_data import make_demo_archive
from tasks.extract import extract
from tasks.params import AugmentParams, DataParams, EvaluateParams, PrepareParams, SplitParams, TrainParams, ValidateParams
from tasks.split import split
from tasks.validate import validate
from tests.conftest import in_process

pytest.importorskip("tensorflow")

from tasks.dataset import load_cached_set, make_dataset  # noqa: E402
from tasks.evaluate import EvaluateError, _calibrate, evaluate  # noqa: E402
from tasks.model import class_probabilities  # noqa: E402
from tasks.predict import load_inference_model  # noqa: E402
from tasks.train import Exclusion, read_exclusion, train  # noqa: E402

NO_AUGMENT = AugmentParams(flip="none", rotation=0, zoom=0, translation=0)
TINY_CNN = {"filters": [8, 16], "dense_units": 16}


def prepare(root: Path, size: int, channels: int = 3) -> Path:
    validate(ValidateParams(), root / "extracted", root / "manifest.csv", in_process)
    cache(PrepareParams(image_size=size, channels=channels), root / "manifest.csv", root / "extracted", root / "cache",
          in_process)  # fmt: skip
    split(SplitParams(val=0.25, test=0.25, seed=0), root / "manifest.csv", root / "split.csv")
    return root


def trained(root: Path, epochs: int) -> Path:
    params = TrainParams(model="cnn", cnn=TINY_CNN, epochs=epochs, batch_size=32, patience=0, seed=0)
    return train(params, NO_AUGMENT, root / "cache", root / "split.csv", root / "models", root / "metrics")


def run_evaluate(root: Path, **settings) -> dict:
    out = evaluate(root / "models" / "model.keras", root / "cache", root / "split.csv", root / "metrics" / "train.json",
                   root / "metrics", root / "plots", EvaluateParams(**settings))  # fmt: skip
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """scikit-learn's digits as class folders at 32x32 gray, and a tiny CNN trained on them for 2 epochs."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits")
    found = load_digits()
    for i, (image, label) in enumerate(zip(found.images, found.target)):
        folder = root / "extracted" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{i:04d}.png"), np.round(image * (255 / 16)).astype(np.uint8))
    prepare(root, 32, channels=1)
    trained(root, epochs=2)
    return root


@pytest.fixture(scope="module")
def cells(tmp_path_factory) -> Path:
    """The demo's two malaria-like classes, 120 each, at 24x24, and a tiny CNN trained for 2 epochs."""
    root = tmp_path_factory.mktemp("cells")
    archive = make_demo_archive(root / "demo.zip", per_class=120)
    extract(DataParams(url=str(archive)), archive, root / "extracted", root / "skipped.csv")
    prepare(root, 24)
    trained(root, epochs=2)
    return root


def test_temperature_fitted_on_val_lowers_the_test_calibration_error_on_digits(digits):
    scores = run_evaluate(digits)
    fitted = scores["calibration"]
    print(f"digits: temperature {fitted['temperature']:.3f}, test ECE {fitted['ece_test_uncalibrated']:.4f} "
          f"uncalibrated -> {fitted['ece_test_calibrated']:.4f} calibrated")  # fmt: skip
    assert fitted["fitted_on"] == "val" and fitted["n_val"] > 400
    assert fitted["ece_test_calibrated"] < fitted["ece_test_uncalibrated"]
    # Temperature scaling keeps the likelier class: accuracy is the model's own.
    data = load_cached_set(digits / "cache", digits / "split.csv")
    raw = class_probabilities(load_inference_model(digits / "models" / "model.keras"),
                              make_dataset(data, "test", 64).map(lambda x, y: x))  # fmt: skip
    assert scores["accuracy"] == pytest.approx((raw.argmax(axis=1) == data.labels[data.rows["test"]]).mean())
    assert load_calibration(digits / "models" / "calibration.json").temperature == fitted["temperature"]
    low, high = scores["accuracy_ci95"]
    assert low <= scores["accuracy"] <= high and high - low < 0.2
    assert (digits / "plots" / "reliability.png").read_bytes().startswith(b"\x89PNG")


def test_calibrate_false_keeps_the_models_own_probabilities(digits):
    data = load_cached_set(digits / "cache", digits / "split.csv")
    model = load_inference_model(digits / "models" / "model.keras")
    calibration, fitted, _ = _calibrate(EvaluateParams(calibrate=False), model, data, digits / "split.csv")
    assert calibration == Calibration(1.0, data.classes) and fitted["fitted_on"] is None
    raw = class_probabilities(model, np.asarray(data.images[data.rows["test"][:20]]))
    assert np.array_equal(calibrated_probabilities(raw, calibration), raw)


def test_positive_class_on_ten_classes_is_refused_in_one_line(digits):
    with pytest.raises(EvaluateError, match=r"^evaluate.positive_class: '3' is set, but the data has 10 classes") as info:
        run_evaluate(digits, positive_class="3", target_recall=0.9)
    assert "\n" not in str(info.value)


def test_positive_class_that_is_not_a_class_is_refused_in_one_line(cells):
    with pytest.raises(EvaluateError, match=r"^evaluate.positive_class: 'Malaria' is not one of the classes "
                                            r"\(Parasitized, Uninfected\)$"):  # fmt: skip
        run_evaluate(cells, positive_class="Malaria", target_recall=0.9)
    # `positive_class: 010` in YAML is the number 8: the line says to quote a class named by digits.
    with pytest.raises(EvaluateError, match=r"^evaluate.positive_class: '8' is not one of the classes \(Parasitized, "
                                            r"Uninfected\); quote a class named by digits, e.g. '01'$"):  # fmt: skip
        run_evaluate(cells, positive_class=8, target_recall=0.9)


def test_threshold_chosen_on_val_reaches_the_target_recall_there(cells):
    scores = run_evaluate(cells, positive_class="Parasitized", target_recall=0.9, bootstrap=200)
    calibration = load_calibration(cells / "models" / "calibration.json")
    assert (calibration.positive_class, calibration.classes) == ("Parasitized", ["Parasitized", "Uninfected"])
    data = load_cached_set(cells / "cache", cells / "split.csv")
    model = load_inference_model(cells / "models" / "model.keras")
    val = calibrated_probabilities(class_probabilities(model, make_dataset(data, "val", 64).map(lambda x, y: x)),
                                   calibration)  # fmt: skip
    positives = val[data.labels[data.rows["val"]] == 0, 0]
    recall = (positives >= calibration.threshold).mean()
    assert recall >= 0.9 and recall == scores["operating_point"]["val_recall"]
    # The highest such threshold: any higher one misses the target.
    assert (positives > calibration.threshold).mean() < 0.9
    test = scores["operating_point"]["test"]
    truth = data.labels[data.rows["test"]]
    said = predicted_indices(calibrated_probabilities(
        class_probabilities(model, make_dataset(data, "test", 64).map(lambda x, y: x)), calibration), calibration)
    assert test["sensitivity"]["value"] == pytest.approx((said[truth == 0] == 0).mean())
    assert test["specificity"]["value"] == pytest.approx((said[truth == 1] == 1).mean())
    assert test["precision"]["value"] == pytest.approx((truth[said == 0] == 0).mean())
    assert test["accuracy"]["value"] == pytest.approx(scores["accuracy"]) == pytest.approx((said == truth).mean())
    for name in ("sensitivity", "specificity", "precision", "accuracy"):
        low, high = test[name]["ci95"]
        assert 0 <= low <= test[name]["value"] <= high <= 1, name


def test_val_images_train_exclude_left_out_are_not_calibrated_on_either(cells, tmp_path):
    data = load_cached_set(cells / "cache", cells / "split.csv")
    listed = tmp_path / "issues.csv"
    listed.write_text("path\n" + "".join(f"{data.paths[row]}\n" for row in data.rows["val"][:5]))
    params = TrainParams(model="cnn", cnn=TINY_CNN, epochs=1, batch_size=32, patience=0, seed=0, exclude=str(listed))
    model = train(params, NO_AUGMENT, cells / "cache", cells / "split.csv", tmp_path / "models", tmp_path / "metrics")

    def scored(exclusion: Exclusion) -> dict:
        out = evaluate(model, cells / "cache", cells / "split.csv", tmp_path / "metrics" / "train.json", tmp_path / "metrics",
                       tmp_path / "plots", EvaluateParams(bootstrap=200), exclusion)  # fmt: skip
        return json.loads(out.read_text())

    assert scored(read_exclusion(str(listed)))["calibration"]["n_val"] == len(data.rows["val"]) - 5
    # Unset since, or edited under the same name (DVC sees only the name): not the list the model was trained without.
    with pytest.raises(EvaluateError, match=r"train.exclude: unset is not the list .* re-run train"):
        scored(Exclusion())
    listed.write_text("path\n" + "".join(f"{data.paths[row]}\n" for row in data.rows["val"][:4]))
    with pytest.raises(EvaluateError, match=f"train.exclude: {listed} is not the list"):
        scored(read_exclusion(str(listed)))


def evaluated_with_nines_moved_to_train(digits: Path, tmp_path: Path, splits: tuple[str, ...], **settings) -> dict:
    """Returns eval.json of the digits model on a split.csv whose 9s of `splits` went to train."""
    rows = list(csv.DictReader((digits / "split.csv").open()))
    for row in rows:
        if row["label"] == "9" and row["split"] in splits:
            row["split"] = "train"
    split_csv = tmp_path / "split.csv"
    with split_csv.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = evaluate(digits / "models" / "model.keras", digits / "cache", split_csv, digits / "metrics" / "train.json",
                   tmp_path, tmp_path / "plots", EvaluateParams(bootstrap=100, **settings))  # fmt: skip
    return json.loads(out.read_text())


def test_a_class_with_no_test_image_is_named_and_not_counted_as_f1_zero(digits, tmp_path, caplog):
    # The 9s' test images move to train, as a class too small to split would have none.
    report = evaluated_with_nines_moved_to_train(digits, tmp_path, ("test",))
    assert report["per_class"]["9"]["support"] == 0
    assert "no test images of '9' (see split.csv): recall not measured" in caplog.text
    assert report["per_class"]["9"]["recall"] is None
    f1 = [report["per_class"][name]["f1"] for name in report["classes"]]
    answered_nine = bool(np.array(report["confusion_matrix"])[:, 9].sum())
    assert (f1[9] is None) == (not answered_nine)
    # Nine classes' mean, or ten when the model answered 9 somewhere (each such answer is wrong: F1 0).
    assert report["macro_f1"] == pytest.approx(sum(f1[:9] + [0.0] * answered_nine) / (10 if answered_nine else 9))


def test_a_val_split_lacking_a_class_is_not_calibrated_on_and_an_untested_class_is_in_the_score_line(digits, tmp_path,
                                                                                                     caplog):  # fmt: skip
    from tasks.report import score_line

    # The 9s of val and test go to train, as a grouped or archive split may leave them.
    report = evaluated_with_nines_moved_to_train(digits, tmp_path, ("val", "test"))
    assert report["calibration"]["fitted_on"] is None and report["calibration"]["val_lacks"] == ["9"]
    assert report["calibration"]["temperature"] == 1.0
    assert "the val split has no images of '9': the probabilities stay uncalibrated" in caplog.text
    assert report["untested_classes"] == ["9"]
    assert score_line(report).endswith("; no test image of '9': not tested on it")
    caplog.clear()  # calibration not asked for: nothing to say of val
    report = evaluated_with_nines_moved_to_train(digits, tmp_path, ("val", "test"), calibrate=False)
    assert report["calibration"]["val_lacks"] == [] and "stay uncalibrated" not in caplog.text


def test_temperature_fit_recovers_the_temperature_that_made_the_labels():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(4000, 3))
    true = np.exp(logits / 2.5) / np.exp(logits / 2.5).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(3, p=p) for p in true])
    overconfident = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    temperature = fit_temperature(overconfident, labels, ["a", "b", "c"])
    assert temperature == pytest.approx(2.5, rel=0.1)
    calibrated = calibrated_probabilities(overconfident, Calibration(temperature, ["a", "b", "c"]))
    assert expected_calibration_error(calibrated, labels) < expected_calibration_error(overconfident, labels) / 2


def test_a_saturated_sigmoid_output_stays_finite_and_ordered():
    calibration = Calibration(3.0, ["a", "b"])
    probabilities = np.array([[0.0, 1.0], [1e-9, 1 - 1e-9], [0.5, 0.5], [1.0, 0.0]])
    calibrated = calibrated_probabilities(probabilities, calibration)
    assert np.isfinite(calibrated).all() and np.allclose(calibrated.sum(axis=1), 1)
    # Past float32's resolution near 1 a sigmoid unit says nothing more: 0 and 1e-9 are read alike.
    assert calibrated[0, 1] == pytest.approx(calibrated[1, 1], abs=1e-9) and calibrated[0, 1] > 0.99
    assert calibrated[2, 1] == 0.5 and calibrated[3, 1] < 0.01


def test_threshold_for_recall_is_the_highest_that_reaches_it():
    scores = np.linspace(0.05, 1.0, 20)  # 20 positives
    assert threshold_for_recall(scores, 0.95) == pytest.approx(0.1)  # 19 of 20 at or above
    assert threshold_for_recall(scores, 1.0) == pytest.approx(0.05)
    assert threshold_for_recall(scores, 0.01) == pytest.approx(1.0)


def test_calibration_round_trips_and_a_bad_file_is_named(tmp_path):
    calibration = Calibration(1.7, ["a", "b"], "b", 0.3)
    assert load_calibration(save_calibration(calibration, tmp_path / "calibration.json")) == calibration
    (tmp_path / "bad.json").write_text(json.dumps({"temperature": 1.0, "classes": ["a", "b", "c"], "positive_class": "c",
                                                   "threshold": 0.4}))  # fmt: skip
    with pytest.raises(CalibrationError, match=r"bad.json: a threshold needs two classes"):
        load_calibration(tmp_path / "bad.json")
    (tmp_path / "zero.json").write_text(json.dumps({"temperature": 0, "classes": ["a", "b"]}))
    with pytest.raises(CalibrationError, match=r"zero.json: temperature must be a positive number"):
        load_calibration(tmp_path / "zero.json")


def test_class_names_with_dollar_signs_are_drawn_as_they_are(tmp_path):
    # Two $ in a name are TeX to matplotlib by default: the plot raised, and evaluate wrote nothing.
    from tasks.evaluate import _confusion, _roc

    classes = ["tier_$1_to_$5", "tier_$5_to_$10"]
    truth, predicted = np.array([0, 1, 1]), np.array([0, 1, 0])
    _confusion(truth, predicted, np.array([[1, 0], [1, 1]]), classes, tmp_path)
    _roc(truth == 1, np.array([0.2, 0.9, 0.4]), f"positive: {classes[1]}", tmp_path)
    assert (tmp_path / "confusion_matrix.png").stat().st_size and (tmp_path / "roc.png").stat().st_size
