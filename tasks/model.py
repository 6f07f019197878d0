"""The models: the seed notebook's CNN, or a keras.applications base with a pooled head.

Every model takes raw uint8 images: casting, augmentation (active in training only) and the
model's own preprocessing are its first layers, so they run on the accelerator and the saved
file predicts on raw pixels. One sigmoid unit for two classes, softmax otherwise: `Head`
makes that choice, for the output layer, the loss and the reading of the outputs alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras
import numpy as np
from keras import layers

from tasks.errors import StageError
from tasks.params import AugmentParams, CnnParams, TrainParams, recipe_settings


class ModelError(StageError, ValueError):
    """The model cannot be built as asked; the message names the key and the fix."""


@keras.saving.register_keras_serializable(package="imgclf")
class CaffePreprocess(layers.Layer):
    """VGG16's ImageNet preprocessing: RGB -> BGR, minus the ImageNet channel means (0-255 input)."""

    MEAN_BGR = (103.939, 116.779, 123.68)

    def call(self, inputs):
        bgr = keras.ops.flip(inputs, axis=-1)
        return bgr - keras.ops.cast(keras.ops.convert_to_tensor(self.MEAN_BGR), bgr.dtype)


@dataclass(frozen=True)
class Head:
    """The output for n classes: one sigmoid unit and binary cross-entropy for two, else a softmax
    over n and sparse categorical cross-entropy."""

    n_classes: int

    @property
    def binary(self) -> bool:
        return self.n_classes == 2

    def layer(self) -> layers.Dense:
        """Returns the output layer: float32 probabilities, also under mixed precision."""
        units, activation = (1, "sigmoid") if self.binary else (self.n_classes, "softmax")
        return layers.Dense(units, activation=activation, dtype="float32", name="probabilities")

    def loss(self, reduction: str | None = "sum_over_batch_size") -> keras.losses.Loss:
        """Returns the loss on (targets, outputs); reduction None gives one value per example."""
        loss = keras.losses.BinaryCrossentropy if self.binary else keras.losses.SparseCategoricalCrossentropy
        return loss(reduction=reduction)

    def targets(self, labels):
        """Returns int class labels as the loss takes them: a float column for the sigmoid unit."""
        return keras.ops.cast(labels, "float32")[:, None] if self.binary else labels

    @staticmethod
    def probabilities(outputs) -> np.ndarray:
        """Returns (N, n_classes) probabilities from a model's outputs: a sigmoid unit's p as [1 - p, p]."""
        scores = np.asarray(outputs, dtype=np.float64)
        return np.hstack([1 - scores, scores]) if scores.shape[1] == 1 else scores


# name -> (constructor, preprocessing layer for 0-255 RGB input, or None when built in)
def _applications() -> dict:
    apps = keras.applications
    return {
        "vgg16": (apps.VGG16, CaffePreprocess, {}),
        "mobilenet_v3_small": (apps.MobileNetV3Small, None, {"include_preprocessing": True}),
        "efficientnet_b0": (apps.EfficientNetB0, None, {}),
    }


@keras.saving.register_keras_serializable(package="imgclf")
class RandomAffine(layers.Layer):
    """Flip, rotation, zoom and translation drawn per image and applied as one affine resampling.

    Keras' RandomFlip, RandomRotation, RandomZoom and RandomTranslation each resample the whole
    batch in turn: on a 2-core CPU the default three took a fifth of a training step. Composed,
    draws from the same ranges cost one pass, and the edges are filled once instead of at each.
    """

    def __init__(self, flip="none", rotation=0.0, zoom=0.0, translation=0.0, fill_mode="reflect",
                 interpolation="nearest", seed=None, **kwargs):  # fmt: skip
        super().__init__(**kwargs)
        self.flip, self.rotation, self.zoom, self.translation = flip, rotation, zoom, translation
        self.fill_mode, self.interpolation, self.seed = fill_mode, interpolation, seed
        self.generator = keras.random.SeedGenerator(seed)

    def get_config(self) -> dict:
        return super().get_config() | {
            "flip": self.flip, "rotation": self.rotation, "zoom": self.zoom, "translation": self.translation,
            "fill_mode": self.fill_mode, "interpolation": self.interpolation, "seed": self.seed,
        }  # fmt: skip

    def _uniform(self, count, bound: float):
        return keras.random.uniform((count,), -bound, bound, seed=self.generator)

    def _mirror(self, count, axis: str):
        """Returns -1 (mirrored) or 1 per image: half the images, when `flip` names this axis."""
        if self.flip not in (axis, "both"):
            return keras.ops.ones((count,))
        return keras.ops.where(keras.random.uniform((count,), seed=self.generator) < 0.5, -1.0, 1.0)

    def call(self, images, training=None):
        if not training:
            return images
        ops = keras.ops
        count, height, width = ops.shape(images)[0], images.shape[1], images.shape[2]
        # Output pixel p samples the input at centre + A (p - centre) + shift, where A mirrors,
        # rotates and scales (scale > 1 shows more of the image: zooms out).
        angle = self._uniform(count, self.rotation * 2 * math.pi)
        scale = 1.0 + self._uniform(count, self.zoom)
        mirror_x, mirror_y = self._mirror(count, "horizontal"), self._mirror(count, "vertical")
        cos, sin = ops.cos(angle) * scale, ops.sin(angle) * scale
        a00, a01, a10, a11 = mirror_x * cos, -mirror_x * sin, mirror_y * sin, mirror_y * cos
        centre_x, centre_y = (width - 1) / 2, (height - 1) / 2
        shift_x = centre_x - a00 * centre_x - a01 * centre_y + self._uniform(count, self.translation * width)
        shift_y = centre_y - a10 * centre_x - a11 * centre_y + self._uniform(count, self.translation * height)
        zeros = ops.zeros((count,))
        transform = ops.stack([a00, a01, shift_x, a10, a11, shift_y, zeros, zeros], axis=1)
        return ops.image.affine_transform(images, transform, interpolation=self.interpolation, fill_mode=self.fill_mode)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="imgclf")
class RandomContrast(layers.RandomContrast):
    """Keras' layer, inactive unless training: its own `training` defaults to True, so a saved model called as
    `model(x)` would change its input."""

    def call(self, inputs, training=None):
        return super().call(inputs, training=bool(training))


@keras.saving.register_keras_serializable(package="imgclf")
class RandomBrightness(layers.RandomBrightness):
    """Keras' layer, inactive unless training (as RandomContrast)."""

    def call(self, inputs, training=None):
        return super().call(inputs, training=bool(training))


def augmentation(params: AugmentParams, seed: int) -> list[layers.Layer]:
    """Returns the random-transform layers the params ask for (inactive outside training)."""
    found: list[layers.Layer] = []
    if params.flip != "none" or params.rotation or params.zoom or params.translation:
        found.append(RandomAffine(params.flip, params.rotation, params.zoom, params.translation,
                                  params.fill_mode, params.interpolation, seed=seed))  # fmt: skip
    if params.contrast:
        found.append(RandomContrast(params.contrast, value_range=(0, 255), seed=seed + 4))
    if params.brightness:
        found.append(RandomBrightness(params.brightness, value_range=(0, 255), seed=seed + 5))
    return found


def _cnn_body(x, params: CnnParams):
    conv = layers.SeparableConv2D if params.separable else layers.Conv2D
    for block, filters in enumerate(params.filters):
        if block:
            x = layers.MaxPooling2D(params.pool_size)(x)
        if params.batch_norm:  # conv, then normalise, then relu: the bias is BatchNorm's
            x = conv(filters, params.kernel_size, padding=params.padding, use_bias=False)(x)
            x = layers.Activation("relu")(layers.BatchNormalization()(x))
        else:  # the seed notebook's Conv2D(..., activation="relu")
            x = conv(filters, params.kernel_size, padding=params.padding, activation="relu")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(params.dense_units, activation="relu")(x)
    if params.dropout:
        x = layers.Dropout(params.dropout)(x)
    return x


def load_base(name: str, weights: str, input_shape: tuple[int, int, int]) -> keras.Model:
    """Returns the application without its top; `weights` is imagenet, none, or a local file."""
    constructor, _, options = _applications()[name]
    if weights == "imagenet":
        try:
            return constructor(include_top=False, weights="imagenet", input_shape=input_shape, **options)
        except Exception as exc:  # keras raises plain Exceptions for a failed fetch
            raise ModelError(
                f"train.weights: the imagenet weights of {name} could not be fetched or loaded ({exc}). Offline, "
                f"fetch the '{name} ... notop' weights file elsewhere and set train.weights to its local path "
                "(or copy it into ~/.keras/models/), or use train.weights=none"
            ) from None
    base = constructor(include_top=False, weights=None, input_shape=input_shape, **options)
    if weights != "none":
        try:
            base.load_weights(weights)
        except (OSError, ValueError) as exc:
            raise ModelError(f"train.weights: cannot load {weights} into {name}: {exc}") from None
        if name == "efficientnet_b0":
            _scale_as_keras_imagenet_build(base)
    return base


# ImageNet's per-channel standard deviations (RGB), as keras.applications.efficientnet has them.
_IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)


def _scale_as_keras_imagenet_build(base: keras.Model) -> None:
    """Gives an EfficientNet loaded from a weights file the input scale its ImageNet weights expect.

    Keras adds a per-channel `Rescaling(1 / sqrt(stddev))` after the stem's Normalization only
    when it fetches the imagenet weights itself (tensorflow/tensorflow#49930): the same file
    loaded into the plain architecture sees inputs about 2x too large. Folding the factor into
    the Normalization's variance gives the very outputs of Keras's own build.
    """
    norm = next(layer for layer in base.layers if isinstance(layer, layers.Normalization))
    norm.adapt_variance.assign(norm.adapt_variance * np.array(_IMAGENET_STDDEV_RGB, dtype="float32"))
    norm.finalize_state()


def build_model(
    params: TrainParams, augment: AugmentParams, image_size: tuple[int, int], channels: int, n_classes: int
) -> tuple[keras.Model, keras.Model | None]:
    """Returns (model, transfer base or None). The model maps uint8 images to class probabilities.

    Built as the recipe says: `train.recipe: seed` is the seed notebook's CNN without augmentation.
    """
    params, augment = recipe_settings(params, augment)
    inputs = keras.Input(shape=(*image_size, channels), dtype="uint8", name="image")
    x = layers.Rescaling(1.0, name="to_float")(inputs)  # uint8 -> float, 0-255
    for layer in augmentation(augment, params.seed):
        x = layer(x)
    base = None
    if params.model == "cnn":
        x = layers.Rescaling(1.0 / 255)(x)
        x = _cnn_body(x, params.cnn)
    else:
        if channels == 1:
            x = layers.Concatenate()([x, x, x])  # ImageNet bases want three channels
        _, preprocess, _ = _applications()[params.model]
        if preprocess is not None:
            x = preprocess()(x)
        base = load_base(params.model, params.weights, (*image_size, 3))
        base.trainable = False
        # training=False keeps BatchNorm in inference mode, also when fine-tuning later.
        x = base(x, training=False)
        x = layers.GlobalAveragePooling2D()(x)
        x = layers.Dropout(0.2)(x)
    outputs = Head(n_classes).layer()(x)
    return keras.Model(inputs, outputs, name=f"imgclf_{params.model}"), base


def unfreeze_top(base: keras.Model, count: int) -> None:
    """Makes the top `count` layers of the base trainable, BatchNorm layers excepted."""
    base.trainable = True
    for index, layer in enumerate(base.layers):
        top = index >= len(base.layers) - count
        layer.trainable = top and not isinstance(layer, layers.BatchNormalization)


def class_probabilities(model: keras.Model, images) -> np.ndarray:
    """Returns (N, n_classes) probabilities; a one-unit sigmoid model gives [1 - p, p]."""
    return Head.probabilities(model.predict(images, verbose=0))
