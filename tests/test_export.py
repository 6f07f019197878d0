"""The export: a SavedModel in TensorFlow Serving's layout and a TFLite file, both matching the Keras model."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from tasks.cache import cache
from tasks.calibration import Calibration, calibrated_probabilities, load_calibration, predicted_indices, save_calibration
from tasks.demo_data import make_demo_archive
from tasks.extract import extract
from tasks.params import AugmentParams, DataParams, EvaluateParams, PrepareParams, SplitParams, TrainParams, ValidateParams
from tasks.split import split
from tasks.validate import validate
from tasks.rows import read_row
from tests.conftest import in_process, noise

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from tasks import export as export_module  # noqa: E402
from tasks.dataset import load_cached_set  # noqa: E402
from tasks.evaluate import evaluate  # noqa: E402
from tasks.export import PARITY_TOLERANCE, ExportError, client_preparation, export, model_version  # noqa: E402
from tasks.model import build_model, class_probabilities  # noqa: E402
from tasks.predict import load_inference_model, predict  # noqa: E402
from tasks.train import train  # noqa: E402

NO_AUGMENT = AugmentParams(flip="none", rotation=0, zoom=0, translation=0)
TINY_CNN = {"filters": [8, 16], "dense_units": 16}


def prepare(root: Path, size: int) -> Path:
    validate(ValidateParams(), root / "extracted", root / "manifest.csv", in_process)
    cache(PrepareParams(image_size=size), root / "manifest.csv", root / "extracted", root / "cache", in_process)
    split(SplitParams(val=0.25, test=0.25, seed=0), root / "manifest.csv", root / "split.csv")
    return root


def run_export(root: Path) -> Path:
    models = root / "models"
    return export(models / "model.keras", models / "calibration.json", root / "cache", root / "split.csv",
                  models / "serving", models / "model.tflite", root / "metrics" / "export.json")  # fmt: skip


@pytest.fixture(scope="module")
def cells(tmp_path_factory) -> Path:
    """The demo's two classes at 24x24; a tiny CNN with the default augmentation layers trained 2 epochs
    in mixed bfloat16, evaluated with a threshold on Parasitized, exported."""
    root = tmp_path_factory.mktemp("cells")
    archive = make_demo_archive(root / "demo.zip", per_class=100)
    extract(DataParams(url=str(archive)), archive, root / "extracted", root / "skipped.csv")
    prepare(root, 24)
    params = TrainParams(cnn=TINY_CNN, epochs=2, batch_size=32, patience=0, seed=0, precision="mixed_bfloat16")
    train(params, AugmentParams(), root / "cache", root / "split.csv", root / "models", root / "metrics")
    evaluate(root / "models" / "model.keras", root / "cache", root / "split.csv", root / "metrics" / "train.json",
             root / "metrics", root / "plots",
             EvaluateParams(positive_class="Parasitized", target_recall=0.9, bootstrap=100))  # fmt: skip
    run_export(root)
    return root


@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")
def test_saved_model_and_tflite_give_the_keras_models_calibrated_probabilities(cells):
    calibration = load_calibration(cells / "models" / "calibration.json")
    assert calibration.threshold is not None and calibration.temperature != 1.0
    data = load_cached_set(cells / "cache", cells / "split.csv")
    images = np.asarray(data.images[data.rows["test"]])
    expected = calibrated_probabilities(class_probabilities(load_inference_model(cells / "models" / "model.keras"), images),
                                        calibration)  # fmt: skip
    [version_dir] = (cells / "models" / "serving").iterdir()
    assert version_dir.name == str(model_version(cells / "models" / "model.keras"))
    assert (version_dir / "saved_model.pb").is_file() and (version_dir / "variables").is_dir()

    served = tf.saved_model.load(str(version_dir)).signatures["serving_default"](images=tf.constant(images))
    assert served["probabilities"].dtype == tf.float32
    saved_difference = np.abs(served["probabilities"].numpy() - expected).max()
    assert saved_difference <= PARITY_TOLERANCE
    assert np.array_equal(served["class_index"].numpy(), predicted_indices(expected, calibration))
    assert [label.decode() for label in served["class_label"].numpy()] == [
        calibration.classes[i] for i in predicted_indices(expected, calibration)]

    interpreter = tf.lite.Interpreter(model_path=str(cells / "models" / "model.tflite"))
    lite = interpreter.get_signature_runner("serving_default")(images=images)
    lite_difference = np.abs(lite["probabilities"] - expected).max()
    assert lite_difference <= PARITY_TOLERANCE
    assert np.array_equal(lite["class_index"], served["class_index"].numpy())
    print(f"parity on {len(images)} test images: SavedModel {saved_difference:.2e}, TFLite {lite_difference:.2e}")
    record = json.loads((cells / "metrics" / "export.json").read_text())
    assert record["saved_model"]["class_disagreements"] == record["tflite"]["class_disagreements"] == 0


def test_the_description_in_the_export_is_all_a_client_needs(cells):
    [version_dir] = (cells / "models" / "serving").iterdir()
    loaded = tf.saved_model.load(str(version_dir))
    described = json.loads(tf.io.read_file(loaded.description.asset_path).numpy())
    calibration = load_calibration(cells / "models" / "calibration.json")
    assert described["classes"] == ["Parasitized", "Uninfected"]
    assert described["version"] == int(version_dir.name)
    assert described["signature"]["inputs"]["images"] == {"dtype": "uint8", "shape": [-1, 24, 24, 3]}
    assert set(described["signature"]["outputs"]) == {"probabilities", "class_index", "class_label"}
    assert (described["image_size"], described["resize"], described["channels"]) == ([24, 24], "stretch", 3)
    assert "x / 255" in described["preprocessing"]["in_graph"]
    assert described["calibration"]["temperature"] == calibration.temperature
    assert (described["calibration"]["positive_class"], described["calibration"]["threshold"]) == (
        "Parasitized", calibration.threshold)


def _as_the_description_says(data: bytes, size: tuple[int, int], channels: int, mode: str) -> np.ndarray:
    """A client's preparation, written from the export's preprocessing.client text, not from tasks/images.py."""
    from PIL import Image, ImageOps

    image, height, width = Image.open(io.BytesIO(data)), *size
    if image.format == "JPEG":
        image.draft("RGB", (max(size), max(size)))
    pixels = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)[:, :, None] if channels == 1 else pixels
    h0, w0 = pixels.shape[:2]

    def resized(image: np.ndarray, h: int, w: int) -> np.ndarray:
        f = min(image.shape[0] // h, image.shape[1] // w)
        if f >= 2:
            image = cv2.resize(image, (f * w, f * h), interpolation=cv2.INTER_LINEAR)
        return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if f >= 2 else cv2.INTER_LINEAR).reshape(h, w, -1)

    if mode == "stretch":
        return resized(pixels, height, width)
    if mode == "pad":
        s = min(height / h0, width / w0)
        inner = resized(pixels, max(1, round(h0 * s)), max(1, round(w0 * s)))
        out = np.zeros((height, width, pixels.shape[2]), np.uint8)
        top, left = (height - inner.shape[0]) // 2, (width - inner.shape[1]) // 2
        out[top : top + inner.shape[0], left : left + inner.shape[1]] = inner
        return out
    s = max(height / h0, width / w0)
    crop_h, crop_w = min(h0, max(1, round(height / s))), min(w0, max(1, round(width / s)))
    top, left = (h0 - crop_h) // 2, (w0 - crop_w) // 2
    return resized(np.ascontiguousarray(pixels[top : top + crop_h, left : left + crop_w]), height, width)


@pytest.mark.parametrize("mode", ["stretch", "pad", "crop"])
@pytest.mark.parametrize("channels", [3, 1])
def test_a_client_following_the_description_gets_the_pixels_training_saw(mode, channels):
    # A JPEG decoded whole, or turned gray by its decoder, differs from the cache by up to ~40 grey levels:
    # the description must say every step (the reduced-scale decode, the two-step resize, the gray weights).
    from PIL import Image

    size = (40, 56)
    text = client_preparation(size, channels, mode)
    assert "Image.draft('RGB', (56, 56))" in text and "INTER_AREA" in text and ("0.299" in text) == (channels == 1)
    photo = cv2.GaussianBlur(noise(300, 410), (0, 0), 3)  # smooth enough for JPEG to keep detail
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown turned a quarter
    files = {"jpeg": Image.fromarray(photo), "png with alpha": Image.fromarray(np.dstack([photo, noise(300, 410, 1)])),
             "a strip": Image.fromarray(photo[:1])}  # padded, its height rounds to 0 rows
    for name, image in files.items():
        buffer = io.BytesIO()
        image.save(buffer, "JPEG" if name == "jpeg" else "PNG", exif=exif if name != "a strip" else None, quality=90)
        _, row = read_row(buffer.getvalue(), PrepareParams(image_size=size, resize=mode, channels=channels))
        assert np.array_equal(_as_the_description_says(buffer.getvalue(), size, channels, mode), row), name


def test_predict_with_a_threshold_labels_files_as_the_saved_model_does(cells, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(cells, root, ignore=shutil.ignore_patterns("extracted", "serving", "*.tflite"))
    data = load_cached_set(root / "cache", root / "split.csv")
    rows = data.rows["test"]
    images = np.asarray(data.images[rows])
    calibration = load_calibration(root / "models" / "calibration.json")
    # A threshold that decides otherwise than the likelier class for some files: the test can tell.
    scores = calibrated_probabilities(class_probabilities(load_inference_model(root / "models" / "model.keras"), images),
                                      calibration)[:, 0]  # fmt: skip
    threshold = float(np.quantile(scores, 0.7))
    assert ((scores >= threshold) != (scores >= 0.5)).any()
    save_calibration(Calibration(calibration.temperature, calibration.classes, "Parasitized", threshold),
                     root / "models" / "calibration.json")  # fmt: skip
    version_dir = run_export(root)

    files = [cells / "extracted" / data.paths[r] for r in rows]
    predicted = predict(root / "models" / "model.keras", files)
    served = tf.saved_model.load(str(version_dir)).signatures["serving_default"](images=tf.constant(images))
    assert [row["label"] for row in predicted] == [label.decode() for label in served["class_label"].numpy()]
    for row, probabilities, index in zip(predicted, served["probabilities"].numpy(), served["class_index"].numpy()):
        assert abs(float(row["probability"]) - probabilities[index]) < 1e-5


@pytest.mark.parametrize(("zone", "version"), [("UTC", 20261130150000), ("Asia/Seoul", 20261130060000),
                                               ("America/New_York", 20261130200000)])  # fmt: skip
def test_the_version_is_the_save_time_in_utc_whatever_the_time_zone(tmp_path, monkeypatch, zone, version):
    # Keras writes the local time: read as such, a model saved later is a higher version in any time zone.
    import time
    import zipfile

    with zipfile.ZipFile(tmp_path / "model.keras", "w") as archive:
        archive.writestr("metadata.json", json.dumps({"date_saved": "2026-11-30@15:00:00"}))
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        assert model_version(tmp_path / "model.keras") == version
    finally:
        monkeypatch.undo()
        time.tzset()


def test_a_softmax_model_trained_in_mixed_precision_exports_in_float32(tmp_path):
    root = tmp_path
    for k, label in enumerate(("a", "b", "c")):
        (root / "extracted" / label).mkdir(parents=True)
        for i in range(12):
            cv2.imwrite(str(root / "extracted" / label / f"{i}.png"), noise(16, 16, seed=100 * k + i))
    prepare(root, 16)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model, _ = build_model(TrainParams(cnn=TINY_CNN), NO_AUGMENT, (16, 16), 3, 3)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    (root / "models").mkdir()
    model.save(root / "models" / "model.keras")
    (root / "models" / "model.json").write_text(json.dumps({"classes": ["a", "b", "c"], "image_size": [16, 16],
                                                           "channels": 3, "resize": "stretch"}))  # fmt: skip
    save_calibration(Calibration(0.5, ["a", "b", "c"]), root / "models" / "calibration.json")
    version_dir = run_export(root)
    record = json.loads((root / "metrics" / "export.json").read_text())
    assert record["saved_model"]["max_abs_difference"] <= PARITY_TOLERANCE
    assert record["tflite"]["max_abs_difference"] <= PARITY_TOLERANCE
    images = np.asarray(load_cached_set(root / "cache", root / "split.csv").images[:5])
    served = tf.saved_model.load(str(version_dir)).signatures["serving_default"](images=tf.constant(images))
    assert served["probabilities"].dtype == tf.float32 and served["probabilities"].shape == (5, 3)


def test_an_export_that_does_not_match_fails_in_one_line_and_writes_nothing(cells, tmp_path, monkeypatch):
    root = tmp_path / "project"
    shutil.copytree(cells, root, ignore=shutil.ignore_patterns("extracted", "serving", "*.tflite", "export.json"))
    monkeypatch.setattr(export_module, "PARITY_TOLERANCE", 0.0)  # float32 rounding is then a mismatch
    with pytest.raises(ExportError, match=r"^export: the SavedModel export's calibrated probabilities differ from the "
                                          r"Keras model's by up to \S+ on the test split \(tolerance 0\); nothing "
                                          r"was written$"):  # fmt: skip
        run_export(root)
    assert not (root / "models" / "serving").exists() and not (root / "models" / "model.tflite").exists()
    assert not (root / "metrics" / "export.json").exists()


def test_a_calibration_fitted_for_another_model_is_refused_by_export_and_not_applied_by_predict(cells, tmp_path, caplog):
    # `imgclf run train` after a whole run: calibration.json is the last model's until evaluate runs again.
    root = tmp_path / "project"
    shutil.copytree(cells, root, ignore=shutil.ignore_patterns("extracted", "serving", "*.tflite", "export.json"))
    calibration = load_calibration(root / "models" / "calibration.json")
    save_calibration(Calibration(0.05, calibration.classes, "Parasitized", 0.99), root / "models" / "calibration.json",
                     model_sha256="0" * 64)  # fmt: skip
    with pytest.raises(ExportError, match=r"calibration.json: fitted for another model than .*model.keras \(trained "
                                          r"since\?\); re-run evaluate$"):  # fmt: skip
        run_export(root)
    assert not (root / "models" / "serving").exists()
    data = load_cached_set(root / "cache", root / "split.csv")
    files = [cells / "extracted" / data.paths[row] for row in data.rows["test"][:20]]
    raw = class_probabilities(load_inference_model(root / "models" / "model.keras"),
                              np.asarray(data.images[data.rows["test"][:20]]))  # fmt: skip
    with caplog.at_level("WARNING", logger="imgclf"):
        predicted = predict(root / "models" / "model.keras", files)
    assert "calibration.json: fitted for another model (trained since?)" in caplog.text
    assert [row["label"] for row in predicted] == [calibration.classes[i] for i in raw.argmax(axis=1)]
