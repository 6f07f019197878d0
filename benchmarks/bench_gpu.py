"""Our models on a GPU: mixed float16 (what `train.precision: auto` picks there) against float32.

Builds the models with the pipeline's own `build_model` (the seed-style CNN with the default
augmentation, and VGG16 with no pretrained weights, its base frozen as in train's head phase)
and trains each on a synthetic, learnable 64x64 two-class set held in memory (class 1 carries
a few dark dots, as parasitized cells carry stained ones), in float32 and then in
mixed_float16, each from the same seed. Prints images/s, the speed-up over float32 in the same
run, the loss of the last epoch (it must be finite: float16 overflow shows here first) and
accuracy on a held-out part. Runs under any Keras 3 backend
(KERAS_BACKEND): the pipeline trains through TensorFlow, but a GPU machine without TensorFlow can
still check that the models, their custom layers and the loss scaling work in float16 there.

    KERAS_BACKEND=jax python benchmarks/bench_gpu.py [--images 16384] [--epochs 3] [--models cnn,vgg16]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import keras
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.model import Head, build_model  # noqa: E402
from tasks.params import AugmentParams, TrainParams  # noqa: E402

SIZE = 64


def synthetic_cells(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (uint8 images, int labels): pinkish noise, and in class 1 three to six dark dots."""
    rng = np.random.default_rng(seed)
    images = rng.normal((200, 150, 170), 12, size=(count, SIZE, SIZE, 3)).clip(0, 255).astype(np.uint8)
    labels = rng.integers(0, 2, count)
    ys, xs = np.mgrid[:SIZE, :SIZE]
    for index in np.flatnonzero(labels):
        for y, x in rng.integers(12, SIZE - 12, size=(rng.integers(3, 7), 2)):
            images[index][(ys - y) ** 2 + (xs - x) ** 2 <= 9] = (90, 40, 110)
    return images, labels


def train(model_name: str, precision: str, data, epochs: int, batch: int) -> dict:
    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(0)
    params = TrainParams(model=model_name, weights="none")
    model, _ = build_model(params, AugmentParams(), (SIZE, SIZE), 3, 2)
    # As tasks/train.py compiles: under mixed_float16 Keras wraps Adam in its LossScaleOptimizer itself.
    model.compile(optimizer=keras.optimizers.Adam(params.learning_rate), loss=Head(2).loss(), metrics=["accuracy"])
    (train_x, train_y), (test_x, test_y) = data
    model.fit(train_x[: batch * 20], train_y[: batch * 20], batch_size=batch, epochs=1, verbose=0)  # compile, warm up
    started = time.perf_counter()
    history = model.fit(train_x, train_y, batch_size=batch, epochs=epochs, verbose=0)
    seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as folder:  # the saved model loads back with its custom layers
        path = Path(folder) / "model.keras"
        model.save(path)
        reloaded = keras.saving.load_model(path)
    probabilities = Head.probabilities(reloaded.predict(test_x, batch_size=256, verbose=0))
    return {"images_per_s": len(train_x) * epochs / seconds, "loss": history.history["loss"][-1],
            "accuracy": float(np.mean(probabilities.argmax(1) == test_y))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16384, help="training images (a quarter as many more are held out)")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per model and precision")
    parser.add_argument("--models", default="cnn,vgg16", help="comma-separated train.model values")
    parser.add_argument("--batch", type=int, default=TrainParams().batch_size, help="batch size (default: train.batch_size's)")
    args = parser.parse_args()
    images, labels = synthetic_cells(args.images + args.images // 4, seed=0)
    data = (images[: args.images], labels[: args.images]), (images[args.images :], labels[args.images :])
    devices = keras.distribution.list_devices()
    print(f"GPU benchmark: Keras {keras.__version__} on {keras.backend.backend()}, devices {devices}, "
          f"{args.images} images {SIZE}x{SIZE}, batch {args.batch}, {args.epochs} epochs")  # fmt: skip
    print(f"{'model':<8} {'precision':<14} {'images/s':>9} {'vs float32':>11} {'last loss':>10} {'test acc':>9}")
    failed = False
    for model_name in args.models.split(","):
        baseline = None
        for precision in ("float32", "mixed_float16"):
            result = train(model_name, precision, data, args.epochs, args.batch)
            baseline = baseline or result
            failed |= not math.isfinite(result["loss"])
            print(f"{model_name:<8} {precision:<14} {result['images_per_s']:>9.0f} "
                  f"{result['images_per_s'] / baseline['images_per_s']:>10.2f}x {result['loss']:>10.4f} "
                  f"{result['accuracy']:>9.3f}", flush=True)  # fmt: skip
    if failed:
        sys.exit("bench_gpu: a loss was not finite")


if __name__ == "__main__":
    main()
