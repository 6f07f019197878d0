"""Stage export: the evaluated model -> `models/serving/<version>/` (TensorFlow Serving) and `models/model.tflite`.

Both serve one signature, `serving_default`: raw uint8 images [batch, height, width, channels]
in, at the model's input size (resized on the client as `resize` says), and out the calibrated
class probabilities, the predicted class index and its label. Everything between is in the
graph: the model's own scaling of the pixels, then the calibration and threshold evaluate fitted
(`models/calibration.json`), as `tasks.calibration` computes them. The model runs in float32,
whatever precision it trained in (TFLite has no bfloat16 kernels).

The version folder is the model's save time as an integer (YYYYMMDDhhmmss, from the `.keras`
file's own metadata): TensorFlow Serving serves the highest version under a base path, so a
newer model must get a higher number; and re-exporting the same model file (as DVC restores
it) gives the same version, where an export-time clock would not. `assets/model.json` in it
describes the export (model.json's content plus signature, preprocessing, classes,
calibration, threshold): a serving client, of either file, needs nothing else.

Before anything is written, a parity check on the test split: the SavedModel loaded with
`tf.saved_model.load` alone (no Keras) and the TFLite interpreter must give the Keras model's
calibrated probabilities within PARITY_TOLERANCE, and the same classes (but where the Keras
probabilities are themselves within the tolerance of the decision); otherwise the stage fails.
`metrics/export.json` records what the check found.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
import zipfile
from datetime import datetime, timezone
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tensorflow as tf

from tasks.calibration import Calibration, calibrated_probabilities, load_calibration, predicted_indices
from tasks.dataset import load_cached_set
from tasks.errors import StageError
from tasks.files import atomic_dir, atomic_file, chunked, made_for_another_model, sha256_file, write_json
from tasks.model import class_probabilities
from tasks.predict import load_described_model

log = logging.getLogger("imgclf")

SIGNATURE = "serving_default"
DESCRIPTION = "model.json"  # in the version folder's assets/
# Largest difference from the Keras model's calibrated probabilities, both for the SavedModel and for
# TFLite: both compute in float32 what NumPy computes in float64 (measured: about 1e-7).
PARITY_TOLERANCE = 1e-5
BATCH = 64

# What the model does to the raw pixels itself (tasks/model.py), by train.model.
IN_GRAPH_SCALING = {
    "cnn": "x / 255",
    "vgg16": "RGB -> BGR, minus the ImageNet channel means (103.939, 116.779, 123.68)",
    "mobilenet_v3_small": "MobileNetV3's built-in rescaling of 0-255 input to [-1, 1]",
    "efficientnet_b0": "EfficientNet's built-in rescaling and normalisation of 0-255 input",
}
# How tasks/images.py's resize() places an (h0, w0) image in (height, width), rounding included.
RESIZE_MODES = {
    "stretch": "the whole image resized to (height, width), the aspect ratio not kept",
    "pad": "resized to (max(1, round(h0 s)), max(1, round(w0 s))), s = min(height / h0, width / w0), and placed on black at "
           "row (height - its height) // 2, column (width - its width) // 2 (letterbox)",
    "crop": "the centre (min(h0, max(1, round(height / s))), min(w0, max(1, round(width / s)))), s = max(height / "
            "h0, width / w0), cut at row (h0 - its height) // 2, column (w0 - its width) // 2, resized to (height, width)",
}


class ExportError(StageError, ValueError):
    """The model cannot be exported, or the export does not match it; the message says which and by how much."""


def export(model_path: Path, calibration_json: Path, cache_dir: Path, split_csv: Path, serving_dir: Path,
           tflite_path: Path, record: Path) -> Path:  # fmt: skip
    """Returns the version folder written below `serving_dir`; also writes `tflite_path`, and `record`
    (the parity check's findings). Nothing is written when the check fails."""
    # On Ampere and later GPUs TensorFlow computes float32 matmuls and convolutions in TF32 (10-bit
    # mantissa) unless told not to: the Keras reference would then be ~1e-3 off TFLite's float32.
    tf32 = tf.config.experimental.tensor_float_32_execution_enabled()
    tf.config.experimental.enable_tensor_float_32_execution(False)
    try:
        return _export(model_path, calibration_json, cache_dir, split_csv, serving_dir, tflite_path, record)
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(tf32)


def _export(model_path: Path, calibration_json: Path, cache_dir: Path, split_csv: Path, serving_dir: Path,
            tflite_path: Path, record: Path) -> Path:  # fmt: skip
    described, model = load_described_model(model_path)
    model_sha256 = sha256_file(model_path)
    if made_for_another_model(calibration_json, model_sha256):
        raise ExportError(f"{calibration_json}: fitted for another model than {model_path} (trained since?); re-run evaluate")
    calibration = load_calibration(calibration_json)
    if calibration.classes != described["classes"]:
        raise ExportError(f"{calibration_json}: calibrated for classes {calibration.classes}, but the model has "
                          f"{described['classes']} (re-run evaluate)")  # fmt: skip
    data = load_cached_set(cache_dir, split_csv)
    rows = data.rows["test"]
    if not len(rows):
        raise ExportError(f"export: {split_csv} has no test rows to check the export on (split.test is 0?)")
    if data.classes != calibration.classes:
        raise ExportError(f"export: {cache_dir} holds classes {data.classes}, the model {calibration.classes}")
    version = model_version(model_path)
    height, width = described["image_size"]
    channels = int(described["channels"])
    images = [np.asarray(data.images[batch]) for batch in chunked(rows, BATCH)]
    keras_probabilities = calibrated_probabilities(class_probabilities(model, np.concatenate(images)), calibration)
    description = _description(described, calibration, version, (height, width, channels))
    with atomic_dir(serving_dir) as temp, tempfile.TemporaryDirectory(prefix="imgclf-export-") as scratch:
        written = Path(scratch) / DESCRIPTION  # the asset's file name is what SavedModel keeps
        written.write_text(json.dumps(description, indent=2))
        module = _ServingModule(model, calibration, (height, width, channels), written)
        version_dir = temp / str(version)
        tf.saved_model.save(module, str(version_dir), signatures={SIGNATURE: module.serve})
        loaded = tf.saved_model.load(str(version_dir))
        tflite = tf.lite.TFLiteConverter.from_concrete_functions([loaded.signatures[SIGNATURE]], loaded).convert()
        found = {
            "saved_model": _check("SavedModel", _saved_model_runner(loaded), images, keras_probabilities, calibration),
            "tflite": _check("TFLite", _tflite_runner(tflite), images, keras_probabilities, calibration),
        }
        with atomic_file(tflite_path, "wb") as handle:
            handle.write(tflite)
    write_json(record, {"version": version, "model_sha256": model_sha256, "n_test": int(len(rows)),
                        "tolerance": PARITY_TOLERANCE, **found})  # fmt: skip
    log.info("export: version %d -> %s and %s; on %d test images the SavedModel is within %.1e of Keras, TFLite %.1e",
             version, serving_dir / str(version), tflite_path, len(rows),
             found["saved_model"]["max_abs_difference"], found["tflite"]["max_abs_difference"])  # fmt: skip
    return serving_dir / str(version)


def model_version(model_path: Path) -> int:
    """Returns the model's save time in UTC as YYYYMMDDhhmmss. Keras writes the local time into the .keras file's
    metadata.json; it is read in this process's time zone, the training's when the export runs in the same run
    (a newer model must be a higher version whatever the machine's time zone)."""
    try:
        with zipfile.ZipFile(model_path) as archive:
            saved = json.loads(archive.read("metadata.json"))["date_saved"]  # e.g. 2025-03-01@14:05:09
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise ExportError(f"{model_path}: no save date in the model file's metadata.json ({type(exc).__name__})") from None
    try:
        local = datetime.strptime(str(saved), "%Y-%m-%d@%H:%M:%S")
    except ValueError:
        raise ExportError(f"{model_path}: unexpected save date {saved!r} in metadata.json") from None
    return int(local.astimezone(timezone.utc).strftime("%Y%m%d%H%M%S"))


class _ServingModule(tf.Module):
    """The serving graph: the model, then its calibration and decision, and the description as an asset."""

    def __init__(self, model, calibration: Calibration, shape: tuple[int, int, int], description: Path):
        super().__init__()
        self.model = model
        # Every variable the graph reads, the random layers' seed states too (not weights, so a
        # Keras model does not expose them to tf.Module's tracking): a SavedModel must reach them.
        self.model_variables = list(model.variables)
        self.description = tf.saved_model.Asset(str(description))
        self.calibration = calibration
        self.serve = tf.function(self._serve, input_signature=[tf.TensorSpec([None, *shape], tf.uint8, name="images")])

    def _serve(self, images):
        calibration = self.calibration
        outputs = tf.cast(self.model(images, training=False), tf.float32)
        probabilities = tf.concat([1.0 - outputs, outputs], axis=1) if outputs.shape[-1] == 1 else outputs
        calibrated = probabilities
        if calibration.temperature != 1.0:  # as tasks.calibration: clipped log-probabilities over T, softmax
            logits = tf.math.log(tf.clip_by_value(probabilities, calibration.floor, 1.0)) / calibration.temperature
            calibrated = tf.nn.softmax(logits, axis=1)
        if calibration.threshold is None:
            index = tf.argmax(calibrated, axis=1, output_type=tf.int32)
        else:
            positive = calibration.positive_index
            index = tf.where(calibrated[:, positive] >= calibration.threshold, positive, 1 - positive)
        return {"probabilities": calibrated, "class_index": index,
                "class_label": tf.gather(tf.constant(calibration.classes), index)}  # fmt: skip


Runner = Callable[[np.ndarray], dict]


def _saved_model_runner(loaded) -> Runner:
    signature = loaded.signatures[SIGNATURE]
    return lambda batch: {name: value.numpy() for name, value in signature(images=tf.constant(batch)).items()}


def _tflite_runner(flatbuffer: bytes) -> Runner:
    with warnings.catch_warnings():  # its deprecation notice: LiteRT's interpreter is the same runtime, packaged apart
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(model_content=flatbuffer)
    signature = interpreter.get_signature_runner(SIGNATURE)  # resizes its input to each batch
    return lambda batch: signature(images=batch)


def _check(name: str, run: Runner, images: list[np.ndarray], expected: np.ndarray, calibration: Calibration) -> dict:
    """Returns the largest probability difference from `expected` and the class disagreements; an
    ExportError when the difference passes the tolerance, or a class differs away from the decision boundary."""
    outputs = [run(batch) for batch in images]
    probabilities = np.concatenate([out["probabilities"] for out in outputs]).astype(np.float64)
    indices = np.concatenate([out["class_index"] for out in outputs])
    labels = [label.decode() for out in outputs for label in out["class_label"]]
    difference = float(np.abs(probabilities - expected).max())
    if not difference <= PARITY_TOLERANCE:  # NaN fails too
        raise ExportError(f"export: the {name} export's calibrated probabilities differ from the Keras model's by up "
                          f"to {difference:.3g} on the test split (tolerance {PARITY_TOLERANCE:g}); nothing was written")  # fmt: skip
    expected_indices = predicted_indices(expected, calibration)
    disagree = indices != expected_indices
    if labels != [calibration.classes[index] for index in indices]:
        raise ExportError(f"export: the {name} export's class labels do not match its class indices")
    close = _near_decision(expected, calibration)
    if np.any(disagree & ~close):
        raise ExportError(f"export: the {name} export predicts another class than the Keras model for "
                          f"{int((disagree & ~close).sum())} test image(s); nothing was written")  # fmt: skip
    return {"max_abs_difference": difference, "class_disagreements": int(disagree.sum())}


def _near_decision(probabilities: np.ndarray, calibration: Calibration) -> np.ndarray:
    """Returns which rows are within the tolerance of the decision, where float32 rounding may tip the class."""
    if calibration.threshold is not None:
        return np.abs(probabilities[:, calibration.positive_index] - calibration.threshold) <= PARITY_TOLERANCE
    top_two = np.sort(probabilities, axis=1)[:, -2:]
    return top_two[:, 1] - top_two[:, 0] <= 2 * PARITY_TOLERANCE


def client_preparation(size: tuple[int, int], channels: int, resize: str) -> str:
    """Returns the steps that turn an image file into the pixels training saw (tasks/images.py's read_image
    and resize, as imgclf predict runs them), for a client without imgclf: each changes the pixels."""
    height, width = size
    side = max(size)
    steps = [
        "decode to RGB uint8 (0-255, no scaling), upright per the EXIF orientation (PIL.ImageOps.exif_transpose; "
        "tf.io.decode_image and OpenCV's IMREAD_UNCHANGED ignore it), alpha dropped, 16-bit values by their high byte",
        f"a JPEG at the smallest DCT scale (1/2, 1/4 or 1/8) that keeps both sides at least {side} pixels, as "
        f"Pillow's Image.draft('RGB', ({side}, {side})) picks it before loading",
        *(["then gray = 0.299 R + 0.587 G + 0.114 B (OpenCV's COLOR_RGB2GRAY of those RGB pixels, not a "
           "decoder's own gray)"] if channels == 1 else []),  # fmt: skip
        f"then, with (h0, w0) its size and (height, width) = ({height}, {width}): {RESIZE_MODES[resize]}",
        "each resize from (h0, w0) to (h, w) with OpenCV: f = min(h0 // h, w0 // w); f >= 2: cv2.resize "
        "INTER_LINEAR to (f h, f w), then INTER_AREA to (h, w); else INTER_LINEAR",
    ]
    return "; ".join(steps) + " (imgclf predict does exactly this)"


def _description(described: dict, calibration: Calibration, version: int, shape: tuple[int, int, int]) -> dict:
    """Returns the export's model.json: train's description, plus all a serving client needs."""
    height, width, channels = shape
    n = len(calibration.classes)
    rule = ("the likelier class" if calibration.threshold is None else
            f"{calibration.positive_class} when its calibrated probability >= threshold, else the other class")  # fmt: skip
    return {
        **described,
        "version": version,
        "signature": {
            "name": SIGNATURE,
            "inputs": {"images": {"dtype": "uint8", "shape": [-1, height, width, channels]}},
            "outputs": {"probabilities": {"dtype": "float32", "shape": [-1, n], "meaning": "calibrated, in class order"},
                        "class_index": {"dtype": "int32", "shape": [-1], "meaning": "the predicted class"},
                        "class_label": {"dtype": "string", "shape": [-1], "meaning": "its name"}},  # fmt: skip
        },
        "preprocessing": {
            "client": client_preparation((height, width), channels, described["resize"]),
            "in_graph": f"uint8 -> float32, then {IN_GRAPH_SCALING[described.get('train', {}).get('model', 'cnn')]}",
        },
        "calibration": {
            "temperature": calibration.temperature,
            "method": "softmax(log(clip(p, floor, 1)) / temperature) of the model's probabilities p "
                      f"(floor {calibration.floor:g}); a sigmoid model's p is read as [1 - p, p]",
            "positive_class": calibration.positive_class,
            "threshold": calibration.threshold,
            "decision": rule,
        },
        "files": {"saved_model": f"serving/{version}/", "tflite": "model.tflite (the same signature)"},
    }
