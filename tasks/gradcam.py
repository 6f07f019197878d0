"""Grad-CAM: where in an image a model found the evidence for a class (Selvaraju et al., 2017).

The map weighs the last convolutional feature map by the gradient of the class score (the
score before the sigmoid or softmax, as the paper does), averaged over its positions; its
positive part, stretched to the image size and scaled from its minimum to its maximum, is
the heatmap. It works for every model tasks/model.py builds: the cnn's last conv block, and
the last conv layer inside a keras.applications base (VGG16's block5_conv3, before its last
pooling). Under mixed precision the maps are computed in float32.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import cv2
import keras
import numpy as np
import tensorflow as tf

from tasks.errors import StageError
from tasks.files import atomic_file, chunked
from tasks.params import ValidateParams

BATCH = 32
OVERLAY_ALPHA = 0.45  # the heatmap's share of each overlay pixel
OVERLAY_SIDE = 128  # smaller images are enlarged to this (nearest neighbour), so a map of a 32 px image reads


class GradCamError(StageError, ValueError):
    """The model has no convolutional feature map to explain; the message names it."""


def _spatial(layer: keras.layers.Layer) -> bool:
    output = getattr(layer, "output", None)
    return output is not None and len(output.shape) == 4 and not isinstance(layer, keras.Model)


def _pooling(layer: keras.layers.Layer) -> bool:
    return "pool" in type(layer).__name__.lower()


def _last_conv(model: keras.Model) -> keras.layers.Layer | None:
    """Returns the last layer of `model` with a spatial output that is not a pooling layer."""
    found = [layer for layer in model.layers if _spatial(layer) and not _pooling(layer)]
    return found[-1] if found else None


def _output_layer(model: keras.Model) -> keras.layers.Dense:
    names = [layer.name for layer in model.layers]
    layer = model.get_layer("probabilities") if "probabilities" in names else model.layers[-1]
    if not isinstance(layer, keras.layers.Dense):
        raise GradCamError(f"{model.name}: its last layer is {type(layer).__name__}, not a Dense layer of class scores")
    return layer


def _explained(model: keras.Model) -> Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
    """Returns a function of images -> (feature map, input of the output layer), the second computed from the first."""
    penultimate = _output_layer(model).input
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model) and len(layer.output.shape) == 4]
    if not nested:
        target = _last_conv(model)
        if target is None:
            raise GradCamError(f"{model.name}: no convolutional layer to explain")
        whole = keras.Model(model.input, [target.output, penultimate])
        return lambda images: whole(images, training=False)
    # A transfer model, as build_model makes it: a chain of layers with the base in it. Keras cannot
    # cut a graph at a tensor inside a nested model, so the three parts run one after another.
    base = nested[-1]
    at = model.layers.index(base)
    target = _last_conv(base) or base.layers[-1]
    # (`base.input` is the base's own input layer, not the outer tensor fed to it.)
    before = keras.Model(model.input, model.layers[at - 1].output)
    inside = keras.Model(base.input, [target.output, base.output])
    head = model.layers[at + 1 : model.layers.index(_output_layer(model))]

    def run(images):
        features, x = inside(before(images, training=False), training=False)
        for layer in head:
            x = layer(x, training=False)
        return features, x

    return run


def heatmaps(model: keras.Model, images: np.ndarray, classes: Iterable[int] | None = None) -> np.ndarray:
    """Returns (N, height, width) float32 Grad-CAM maps scaled to [0, 1], one per image, for the given
    class indices (default: each image's predicted class). A map with no evidence anywhere is all 0."""
    explained = _explained(model)
    output = _output_layer(model)
    kernel, bias = (tf.cast(weight, tf.float32) for weight in (output.kernel, output.bias))
    wanted = None if classes is None else np.asarray(list(classes), dtype=np.int64)
    height, width = images.shape[1:3]
    maps = []
    for start in range(0, len(images), BATCH):
        batch = tf.convert_to_tensor(images[start : start + BATCH])
        with tf.GradientTape() as tape:
            features, penultimate = explained(batch)
            logits = tf.cast(penultimate, tf.float32) @ kernel + bias
            # One sigmoid unit: class 1's score is the logit, class 0's its negation.
            scores = tf.concat([-logits, logits], axis=1) if logits.shape[1] == 1 else logits
            chosen = (tf.argmax(scores, axis=1) if wanted is None
                      else tf.constant(wanted[start : start + BATCH]))  # fmt: skip
            score = tf.gather(scores, chosen, axis=1, batch_dims=1)
        gradients = tf.cast(tape.gradient(score, features), tf.float32)
        features = tf.cast(features, tf.float32)
        weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
        cams = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1)).numpy()
        for cam in cams:
            cam = cv2.resize(cam, (width, height), interpolation=cv2.INTER_LINEAR)
            # Minimum to maximum, as pytorch-grad-cam scales: a floor shared by every position says nothing of where.
            cam -= cam.min()
            peak = float(cam.max())
            maps.append(cam / peak if peak > 0 else cam)
    return np.stack(maps).astype(np.float32) if maps else np.zeros((0, height, width), np.float32)


def overlay(image: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """Returns an RGB uint8 picture: the image with the heatmap blended over it in the jet colours
    (red: most evidence), enlarged as `enlarged` does."""
    colours = cv2.cvtColor(cv2.applyColorMap(np.uint8(255 * np.clip(heatmap, 0, 1)), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return enlarged(cv2.addWeighted(rgb_of(image), 1 - OVERLAY_ALPHA, colours, OVERLAY_ALPHA, 0))


def rgb_of(image: np.ndarray) -> np.ndarray:
    """Returns a (height, width, channels) uint8 image as RGB: a gray one's channel repeated."""
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else np.asarray(image)


def enlarged(image: np.ndarray) -> np.ndarray:
    """Returns the image enlarged by a whole factor (nearest neighbour) towards OVERLAY_SIDE; as is when not smaller."""
    scale = max(1, OVERLAY_SIDE // max(image.shape[:2]))
    return cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST) if scale > 1 else image


def png_bytes(rgb: np.ndarray) -> bytes:
    """Returns an RGB (or one-channel) uint8 image encoded as PNG."""
    ok, encoded = cv2.imencode(".png", rgb if rgb.ndim == 2 or rgb.shape[2] == 1 else cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("the image could not be encoded as PNG")
    return encoded.tobytes()


def write_overlay(path: Path, image: np.ndarray, heatmap: np.ndarray) -> Path:
    """Returns `path`, written (atomically) with the image's Grad-CAM overlay as a PNG."""
    with atomic_file(path, "wb") as handle:
        handle.write(png_bytes(overlay(image, heatmap)))
    return path


def explain_files(model_path: Path, files: Iterable[Path], out_dir: Path,
                  max_pixels: int = ValidateParams().max_pixels) -> list[Path]:  # fmt: skip
    """Returns the overlays written to `out_dir`: one `<name>.gradcam.png` per readable image file (as `expand`
    lists them), for the label `imgclf predict` gives it (calibration and threshold included), at the file's
    place below the inputs' common folder."""
    from tasks.calibration import calibrated_probabilities, predicted_indices
    from tasks.model import class_probabilities
    from tasks.predict import OVERLAY_SUFFIX, load_described_model, load_model_calibration, prepare_file

    described, model = load_described_model(model_path)
    calibration = load_model_calibration(model_path, described["classes"])
    files = [Path(os.path.abspath(file)) for file in files]  # not resolve(): a broken link points anywhere
    common = Path(os.path.commonpath([file.parent for file in files])) if files else out_dir
    written = []
    for batch in chunked(files, BATCH):
        ready = []
        for file in batch:
            try:
                ready.append((file, prepare_file(file, described, max_pixels)))
            except (OSError, ValueError):
                continue  # predict's rows say why this file could not be read
        if ready:
            images = np.stack([image for _, image in ready])
            labels = predicted_indices(calibrated_probabilities(class_probabilities(model, images), calibration), calibration)
            for (file, image), heatmap in zip(ready, heatmaps(model, images, labels)):
                relative = file.relative_to(common)
                written.append(write_overlay(out_dir / relative.with_name(relative.name + OVERLAY_SUFFIX), image, heatmap))
    return written
