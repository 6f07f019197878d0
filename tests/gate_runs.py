"""Runs ready to publish, built in a second: raw test images on disk, split.csv, and a Keras model with fixed
weights (so every gate outcome is known in advance), as train and evaluate would leave them."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np

from tasks.files import sha256_file
from tasks.layout import Layout
from tasks.manifest import MANIFEST_COLUMNS

CLASSES = ("bright", "dark")
PER_CLASS = 12


def _images(seed: int = 7) -> list[tuple[str, np.ndarray]]:
    """Returns (true class, image) pairs: dark cells are 0-90 grey levels, bright ones 165-255, each of its own size."""
    rng = np.random.default_rng(seed)
    found = []
    for index in range(2 * PER_CLASS):
        label = CLASSES[index % 2]
        low = 0 if label == "dark" else 165
        height, width = rng.integers(18, 40, size=2)
        found.append((label, rng.integers(low, low + 91, size=(height, width, 3), dtype=np.uint8)))
    return found


def fixed_model(image_size: int, channels: int, inverted: bool = False, padding_units: int = 0):
    """Returns a model that calls an image dark (the second class) when its mean grey level is under half;
    `inverted` calls it the other way round. `padding_units` adds a dense branch with zero say in the
    output, only to make the saved file large."""
    import keras

    inputs = keras.Input(shape=(image_size, image_size, channels), dtype="uint8", name="image")
    scaled = keras.layers.Rescaling(1.0 / 255)(inputs)
    features = keras.layers.GlobalAveragePooling2D()(scaled)
    if padding_units:
        padding = keras.layers.Dense(padding_units)(keras.layers.Flatten()(scaled))
        features = keras.layers.Concatenate()([features, padding])
    output = keras.layers.Dense(1, activation="sigmoid", name="probabilities")
    output(features)
    sign = -1.0 if inverted else 1.0
    kernel = np.zeros((channels + padding_units, 1), dtype=np.float32)
    kernel[:channels] = -sign * 20.0 / channels
    output.set_weights([kernel, np.array([sign * 10.0], dtype=np.float32)])
    return keras.Model(inputs, output(features))


def make_run(root: Path, *, image_size: int = 16, channels: int = 3, inverted: bool = False, shuffled: bool = False,
             classes: tuple[str, str] = CLASSES, calibration: dict | None = None, padding_units: int = 0,
             train_copies: int = 0) -> Layout:  # fmt: skip
    """Returns the layout of a finished run at `root`: data/extracted/<label>/, data/split.csv (test rows), the manifest,
    models/ (model.keras, model.json, summary.txt, calibration.json), metrics/ and a plot.

    `shuffled`: the archive's folders are wrong for half of each class, as after a broken relabelling.
    `train_copies`: the first n test images are in the train split too, under other names.
    """
    layout = Layout(root)
    rows = []
    for index, (truth, image) in enumerate(_images()):
        label = classes[CLASSES.index(truth)]
        if shuffled and index % 4 >= 2:
            label = classes[1 - classes.index(label)]
        path = f"{label}/cell_{index:03d}.png"
        (layout.extracted_dir / label).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(layout.extracted_dir / path), image[:, :, ::-1])
        rows.append(f"{path},{label},test")
        if index < train_copies:
            shutil.copyfile(layout.extracted_dir / path, layout.extracted_dir / label / f"train_{index:03d}.png")
            rows.append(f"{label}/train_{index:03d}.png,{label},train")
    layout.split_csv.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    with open(layout.manifest_csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, MANIFEST_COLUMNS, restval="")
        writer.writeheader()
        for row in rows:
            path, label, _ = row.split(",")
            writer.writerow({"path": path, "label": label, "status": "valid",
                             "sha256": sha256_file(layout.extracted_dir / path)})  # fmt: skip
    layout.model_dir.mkdir(parents=True)
    fixed_model(image_size, channels, inverted, padding_units).save(layout.model_dir / "model.keras")
    described = {"classes": list(classes), "image_size": [image_size, image_size], "channels": channels, "resize": "stretch"}
    (layout.model_dir / "model.json").write_text(json.dumps(described))
    # As evaluate leaves it: temperature 1 unless the test asks for another calibration.
    (layout.model_dir / "calibration.json").write_text(json.dumps({"classes": list(classes), "temperature": 1.0,
                                                                   **(calibration or {})}))  # fmt: skip
    (layout.model_dir / "summary.txt").write_text("fixed weights\n")
    layout.metrics_dir.mkdir()
    (layout.metrics_dir / "train.json").write_text("{}")
    (layout.metrics_dir / "eval.json").write_text(json.dumps({"accuracy": 0.5 if shuffled else 1.0, "macro_f1": 0.5,
                                                               "n_test": len(rows)}))  # fmt: skip
    layout.plots_dir.mkdir()
    (layout.plots_dir / "roc.csv").write_text("fpr,tpr\n")
    return layout
