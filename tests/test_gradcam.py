"""Grad-CAM: it finds where the class signal is, for every model the project builds, and `predict --explain`."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from tasks.params import AugmentParams, CnnParams, TrainParams

keras = pytest.importorskip("keras")

from flows.cli import main  # noqa: E402
from tasks.gradcam import OVERLAY_SIDE, _explained, heatmaps  # noqa: E402
from tasks.model import Head, build_model, class_probabilities  # noqa: E402

NO_AUGMENT = AugmentParams(flip="none", rotation=0, zoom=0, translation=0)
SIDE = 32
HALF = SIDE // 2


def quadrant_set(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images, labels): noise everywhere; the top-left quadrant alone holds the class,
    horizontal stripes (class 0) or vertical ones (class 1), at a random phase."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(n, SIDE, SIDE, 3), dtype=np.uint8)
    labels = rng.integers(0, 2, size=n)
    for image, label, phase in zip(images, labels, rng.integers(0, 4, size=n)):
        stripes = ((np.arange(HALF) + phase) // 2 % 2 * 150).astype(np.uint8)
        pattern = np.tile(stripes[:, None], (1, HALF)) if label == 0 else np.tile(stripes[None, :], (HALF, 1))
        image[:HALF, :HALF] += pattern[:, :, None]
    return images, labels


@pytest.fixture(scope="module")
def quadrant_cnn():
    """The project's CNN (two conv blocks), trained 4 epochs on 480 quadrant images; with 160 test images."""
    params = TrainParams(model="cnn", cnn=CnnParams(filters=(16, 32), dense_units=32), seed=0)
    keras.utils.set_random_seed(0)
    model, _ = build_model(params, NO_AUGMENT, (SIDE, SIDE), 3, 2)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=Head(2).loss(), metrics=["accuracy"])
    images, labels = quadrant_set(480, seed=1)
    model.fit(images, labels.astype("float32")[:, None], batch_size=32, epochs=4, verbose=0)
    return model, *quadrant_set(160, seed=2)


def test_grad_cam_mass_of_the_trained_cnn_sits_in_the_quadrant_that_holds_the_class(quadrant_cnn):
    model, images, labels = quadrant_cnn
    predicted = class_probabilities(model, images).argmax(axis=1)
    correct = predicted == labels
    assert correct.mean() >= 0.9, "the CNN did not learn the set: the test would say nothing"
    maps = heatmaps(model, images[correct])
    in_quadrant = maps[:, :HALF, :HALF].sum() / maps.sum()
    print(f"Grad-CAM mass in the signal quadrant: {in_quadrant:.3f}")
    assert in_quadrant >= 0.6, f"{in_quadrant:.2f} of the Grad-CAM mass in the top-left quadrant (a quarter of the area)"


def test_maps_explain_the_class_asked_for(quadrant_cnn):
    model, images, labels = quadrant_cnn
    predicted = heatmaps(model, images[:8])
    np.testing.assert_array_equal(heatmaps(model, images[:8], classes=class_probabilities(model, images[:8]).argmax(1)),
                                  predicted)  # fmt: skip
    assert not np.array_equal(heatmaps(model, images[:8], classes=1 - labels[:8]), predicted)


@pytest.mark.parametrize(("name", "precision"), [("cnn", "float32"), ("cnn", "mixed_bfloat16"), ("vgg16", "float32"),
                                               ("mobilenet_v3_small", "float32"), ("efficientnet_b0", "mixed_bfloat16")])
def test_every_model_the_project_builds_is_explained_from_its_own_class_scores(name, precision):
    keras.mixed_precision.set_global_policy(precision)
    try:
        n_classes = 3 if name == "vgg16" else 2  # the softmax head too
        model, _ = build_model(TrainParams(model=name, weights="none"), NO_AUGMENT, (SIDE, SIDE), 3, n_classes)
        images = np.random.default_rng(0).integers(0, 256, size=(3, SIDE, SIDE, 3), dtype=np.uint8)
        _, penultimate = _explained(model)(images)
        # The explained path reaches the very class scores the model outputs: no layer skipped.
        recomputed = model.get_layer("probabilities")(penultimate)
        np.testing.assert_allclose(np.asarray(recomputed, dtype=np.float32), model.predict(images, verbose=0),
                                   atol=2e-2 if precision == "mixed_bfloat16" else 1e-5)  # fmt: skip
        maps = heatmaps(model, images)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert maps.shape == (3, SIDE, SIDE) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1


def test_predict_explain_writes_one_overlay_per_readable_file_in_the_inputs_layout(quadrant_cnn, tmp_path, capsys):
    model, images, _ = quadrant_cnn
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    model.save(model_dir / "model.keras")
    (model_dir / "model.json").write_text(json.dumps({"classes": ["horizontal", "vertical"], "image_size": [SIDE, SIDE],
                                                      "channels": 3, "resize": "stretch"}))  # fmt: skip
    inputs = tmp_path / "inputs"
    for relative, image in (("a/1.png", images[0]), ("a/2.png", images[1]), ("b/1.png", images[2])):
        (inputs / relative).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(inputs / relative), image)
    (inputs / "b" / "broken.png").write_bytes(b"not an image")
    (inputs / "b" / "gone.png").symlink_to("/nonexistent/gone.png")  # a row of its own; it moves no overlay
    out = tmp_path / "explained"
    assert main(["predict", "--model", str(model_dir / "model.keras"), "--explain", str(out), str(inputs)]) == 0
    written = sorted(path.relative_to(out).as_posix() for path in out.rglob("*") if path.is_file())
    assert written == ["a/1.png.gradcam.png", "a/2.png.gradcam.png", "b/1.png.gradcam.png"]
    overlay = cv2.imread(str(out / "a" / "1.png.gradcam.png"))
    assert overlay.shape == (OVERLAY_SIDE, OVERLAY_SIDE, 3)
    assert "3 Grad-CAM overlays" in capsys.readouterr().err
    # Its outputs inside the folder it reads: a second run reads neither as images.
    command = ["predict", "--model", str(model_dir / "model.keras"), "--explain", str(inputs / "explained"),
               "--out", str(inputs / "predictions.csv"), str(inputs)]  # fmt: skip
    assert main(command) == 0
    first = ((inputs / "predictions.csv").read_text(), sorted((inputs / "explained").rglob("*")))
    assert main(command) == 0
    assert ((inputs / "predictions.csv").read_text(), sorted((inputs / "explained").rglob("*"))) == first
    assert [line.split(",")[0] for line in first[0].splitlines()[1:]] == [
        str(inputs / relative) for relative in ("a/1.png", "a/2.png", "b/1.png", "b/broken.png", "b/gone.png")]
