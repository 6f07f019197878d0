"""Training, evaluation and prediction on small generated sets (1-3 epochs, seconds each)."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from tasks.cache import cache
from tasks.demo_data import make_demo_archive
from tasks.extract import extract
from tasks.params import AugmentParams, DataParams, PrepareParams, SplitParams, TrainParams, ValidateParams
from tasks.split import split
from tasks.validate import validate
from tests.conftest import REPO, free_port, in_process

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from tasks.dataset import load_cached_set, make_dataset  # noqa: E402
from tasks.evaluate import evaluate  # noqa: E402
from tasks.model import RandomAffine, build_model, class_probabilities, load_base  # noqa: E402
from tasks.predict import predict  # noqa: E402
from tasks.train import TrainError, _class_weight, resolve_precision, train  # noqa: E402

NO_AUGMENT = AugmentParams(flip="none", rotation=0, zoom=0, translation=0)
FAST = dict(batch_size=8, learning_rate=1e-3, patience=0)


def prepare(root: Path, extracted: Path, size: int = 32) -> Path:
    """Runs validate, cache and split on a folder of class folders; returns the data folder."""
    validate(ValidateParams(), extracted, root / "manifest.csv", in_process)
    cache(PrepareParams(image_size=size), root / "manifest.csv", extracted, root / "cache", in_process)
    split(SplitParams(val=0.2, test=0.2, seed=0), root / "manifest.csv", root / "split.csv")
    return root


@pytest.fixture(scope="session")
def cells(tmp_path_factory) -> Path:
    """The demo's two malaria-like classes, 300 each, cached at 32x32."""
    root = tmp_path_factory.mktemp("cells")
    archive = make_demo_archive(root / "demo.zip", per_class=300)
    extract(DataParams(url=str(archive)), archive, root / "extracted", root / "skipped.csv")
    return prepare(root, root / "extracted")


@pytest.fixture(scope="session")
def colours(tmp_path_factory) -> Path:
    """Three classes of blobs told apart by colour, 40 each."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(3)
    for label, bgr in (("red", (40, 40, 220)), ("green", (40, 200, 40)), ("blue", (220, 60, 40))):
        folder = root / "extracted" / label
        folder.mkdir(parents=True)
        for i in range(40):
            image = rng.integers(0, 60, size=(48, 48, 3), dtype=np.uint8)
            cv2.circle(image, tuple(int(v) for v in rng.integers(14, 34, 2)), 10, bgr, -1)
            cv2.imwrite(str(folder / f"{i}.png"), image)
    return prepare(root, root / "extracted")


def run_train(data: Path, out: Path, augment: AugmentParams = NO_AUGMENT, split_csv: Path | None = None,
              **overrides) -> Path:  # fmt: skip
    params = TrainParams(**(FAST | overrides))
    return train(params, augment, data / "cache", split_csv or data / "split.csv", out / "models", out / "metrics")


class Interrupted(Exception):
    """Stands in for a kill: raised once an epoch's backup is written."""


def interrupt_after(monkeypatch, epochs: int) -> None:
    """Makes the next train() die at the end of its `epochs`-th epoch, after the backup, as a killed run would."""
    from tasks import train as stage

    original, seen = stage._Throughput.on_epoch_end, []  # the last callback of each epoch

    def on_epoch_end(self, epoch, logs=None):
        original(self, epoch, logs)
        seen.append(epoch)
        if len(seen) == epochs:
            raise Interrupted

    monkeypatch.setattr(stage._Throughput, "on_epoch_end", on_epoch_end)


def weights_of(model_path: Path) -> list[np.ndarray]:
    return keras.models.load_model(model_path, compile=False).get_weights()


def test_demo_classes_are_learnt_in_three_epochs(cells, tmp_path):
    model_path = run_train(cells, tmp_path, epochs=3)
    report = evaluate(model_path, cells / "cache", cells / "split.csv", tmp_path / "metrics" / "train.json",
                      tmp_path / "metrics", tmp_path / "plots")  # fmt: skip
    scores = json.loads(report.read_text())
    assert scores["accuracy"] >= 0.95, scores
    assert scores["n_test"] == 120
    assert set(scores["per_class"]) == {"Parasitized", "Uninfected"}
    assert 0.9 <= scores["roc_auc"] <= 1.0
    assert np.array(scores["confusion_matrix"]).sum() == 120
    for plot in ("confusion_matrix.png", "roc.png", "misclassified.png", "training_curves.png"):
        assert (tmp_path / "plots" / plot).read_bytes().startswith(b"\x89PNG"), plot
    with open(tmp_path / "plots" / "confusion.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 120
    assert "imgclf_cnn" in (tmp_path / "models" / "summary.txt").read_text()


def test_reloaded_model_scores_what_training_reported(cells, tmp_path):
    # float32: here the preprocessing must agree to the last bit; under bfloat16 the model's own
    # rounding depends on the batch's size and can flip an image at the boundary.
    model_path = run_train(cells, tmp_path, epochs=1, precision="float32")
    reported = json.loads((tmp_path / "metrics" / "train.json").read_text())["val_accuracy"]
    model = keras.models.load_model(model_path)
    data = load_cached_set(cells / "cache", cells / "split.csv")
    predicted = class_probabilities(model, make_dataset(data, "val", 32).map(lambda x, y: x)).argmax(axis=1)
    assert abs((predicted == data.labels[data.rows["val"]]).mean() - reported) < 1e-3


def test_predict_on_raw_files_matches_the_model_on_cached_rows(cells, tmp_path):
    model_path = run_train(cells, tmp_path, epochs=1, precision="float32")  # as above: preprocessing alone
    data = load_cached_set(cells / "cache", cells / "split.csv")
    rows = data.rows["test"][:12]
    on_cache = class_probabilities(keras.models.load_model(model_path), np.asarray(data.images[rows]))
    files = [cells / "extracted" / data.paths[r] for r in rows]
    junk = tmp_path / "not_an_image.png"
    junk.write_text("hello")
    predicted = predict(model_path, [*files, junk])
    assert [row["path"] for row in predicted] == [str(f) for f in [*files, junk]]
    for row, probabilities in zip(predicted, on_cache):
        assert row["error"] == ""
        assert row["label"] == data.classes[int(probabilities.argmax())]
        assert abs(float(row["probability"]) - probabilities.max()) < 1e-5
    assert predicted[-1]["error"].startswith("not_an_image") and predicted[-1]["label"] == ""


def test_three_classes_train_with_softmax(colours, tmp_path):
    model_path = run_train(colours, tmp_path, epochs=3, class_weight="balanced")
    model = keras.models.load_model(model_path)
    assert model.output_shape == (None, 3)
    described = json.loads((tmp_path / "models" / "model.json").read_text())
    assert described["classes"] == ["blue", "green", "red"] and described["image_size"] == [32, 32]
    scores = json.loads(evaluate(model_path, colours / "cache", colours / "split.csv", tmp_path / "none.json",
                                 tmp_path / "metrics", tmp_path / "plots").read_text())  # fmt: skip
    assert scores["accuracy"] >= 0.9 and "roc_auc" not in scores
    assert np.array(scores["confusion_matrix"]).shape == (3, 3)


def test_auto_precision_is_bfloat16_only_on_a_cpu_with_bfloat16_instructions():
    sapphire_rapids = "fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile"
    assert resolve_precision("auto", 0, sapphire_rapids) == "mixed_bfloat16"
    assert resolve_precision("auto", 0, "fpu avx2 amx_bf16") == "mixed_bfloat16"
    # avx512f alone (Skylake, Ice Lake) would emulate bfloat16: slower than float32.
    assert resolve_precision("auto", 0, "fpu sse2 avx2 avx512f avx512_vnni") == "float32"
    assert resolve_precision("auto", 0, "") == "float32"
    assert resolve_precision("auto", 1, sapphire_rapids) == "mixed_float16"
    assert resolve_precision("float32", 0, sapphire_rapids) == "float32"
    assert resolve_precision("mixed_bfloat16", 0, "") == "mixed_bfloat16"


def test_mixed_bfloat16_trains_a_model_with_float32_probabilities_that_evaluate_reads(colours, tmp_path):
    model_path = run_train(colours, tmp_path, epochs=2, precision="mixed_bfloat16")
    report = json.loads((tmp_path / "metrics" / "train.json").read_text())
    assert report["precision"] == "mixed_bfloat16"
    assert json.loads((tmp_path / "models" / "model.json").read_text())["precision"] == "mixed_bfloat16"
    model = keras.models.load_model(model_path)
    convolutions = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert convolutions and all(layer.compute_dtype == "bfloat16" for layer in convolutions)
    assert model.layers[-1].compute_dtype == "float32"  # the softmax itself, not just a cast after it
    data = load_cached_set(colours / "cache", colours / "split.csv")
    outputs = model.predict(np.asarray(data.images[data.rows["val"]]), verbose=0)
    assert outputs.dtype == np.float32
    assert np.allclose(outputs.sum(axis=1), 1, atol=1e-6)  # bfloat16 probabilities would be off by ~1e-3
    scores = json.loads(evaluate(model_path, colours / "cache", colours / "split.csv", tmp_path / "metrics" / "train.json",
                                 tmp_path / "metrics", tmp_path / "plots").read_text())  # fmt: skip
    assert scores["accuracy"] >= 0.9, scores


def test_seed_recipe_builds_the_seed_notebooks_layer_stack():
    # Whatever train.cnn and augment say: the recipe is the notebook's CNN, nothing added.
    params = TrainParams(recipe="seed", cnn={"filters": [8], "kernel_size": 5, "dropout": 0.5, "batch_norm": True})
    model, _ = build_model(params, AugmentParams(rotation=0.2, zoom=0.2, contrast=0.3), (32, 32), 3, 10)
    layers = keras.layers
    found = [layer for layer in model.layers if not isinstance(layer, (layers.InputLayer, layers.Rescaling))]
    expected = [(layers.Conv2D, {"filters": 32, "kernel_size": (3, 3), "activation": "relu", "padding": "valid"}),
                (layers.MaxPooling2D, {"pool_size": (2, 2)}),
                (layers.Conv2D, {"filters": 64, "kernel_size": (3, 3), "activation": "relu", "padding": "valid"}),
                (layers.MaxPooling2D, {"pool_size": (2, 2)}),
                (layers.Conv2D, {"filters": 64, "kernel_size": (3, 3), "activation": "relu", "padding": "valid"}),
                (layers.Flatten, {}),
                (layers.Dense, {"units": 64, "activation": "relu"}),
                (layers.Dense, {"units": 10, "activation": "softmax"})]  # fmt: skip
    assert [type(layer) for layer in found] == [kind for kind, _ in expected]
    for layer, (_, settings) in zip(found, expected):
        config = layer.get_config()
        assert {key: config[key] for key in settings} == {key: value for key, value in settings.items()}, layer.name
    # Rescaled to 0-1 as the notebook's images / 255; no augmentation, dropout or normalisation anywhere.
    assert [layer.get_config()["scale"] for layer in model.layers if isinstance(layer, layers.Rescaling)] == [1.0, 1 / 255]


def test_seed_recipe_trains_as_the_notebook_and_the_model_json_records_it(colours, tmp_path):
    run_train(colours, tmp_path, AugmentParams(), recipe="seed", epochs=2, learning_rate=0.01, patience=1)
    described = json.loads((tmp_path / "models" / "model.json").read_text())
    assert described["recipe"] == "seed"
    trained = described["train"]
    assert trained["cnn"] == {"filters": [32, 64, 64], "kernel_size": 3, "pool_size": 2, "padding": "valid",
                              "dense_units": 64, "dropout": 0.0, "batch_norm": False, "separable": False}  # fmt: skip
    assert (trained["learning_rate"], trained["schedule"], trained["weight_decay"]) == (1e-3, "constant", 0.0)
    assert (trained["patience"], trained["min_steps"], trained["restore_best"]) == (0, 0, False)
    augment = described["augment"]
    assert augment["flip"] == "none"
    assert [augment[key] for key in ("rotation", "zoom", "translation", "contrast", "brightness")] == [0.0] * 5
    report = json.loads((tmp_path / "metrics" / "train.json").read_text())
    assert report["recipe"] == "seed" and report["epochs_run"] == 2


def test_default_recipe_records_its_own_settings_in_the_model_json(colours, tmp_path):
    augment = AugmentParams(rotation=0.05)
    run_train(colours, tmp_path, augment, epochs=1, weight_decay=0.01)
    described = json.loads((tmp_path / "models" / "model.json").read_text())
    assert described["recipe"] == "default"
    assert described["train"] == TrainParams(**(FAST | {"epochs": 1, "weight_decay": 0.01})).model_dump(mode="json")
    assert described["augment"] == augment.model_dump(mode="json")


def test_cosine_schedule_decays_the_rate_to_zero_over_the_phase():
    from tasks.train import _rate

    schedule = _rate(TrainParams(schedule="cosine"), 1e-3, 100)
    assert [float(schedule(step)) for step in (0, 50, 100)] == pytest.approx([1e-3, 5e-4, 0.0], abs=1e-9)
    assert _rate(TrainParams(schedule="constant"), 1e-3, 100) == 1e-3


def test_early_stopping_waits_min_epochs_yet_keeps_the_best_epoch_from_the_first():
    from tasks.train import _EarlyStopping

    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    stopper = _EarlyStopping(4, monitor="val_loss", patience=1, restore_best_weights=True)
    stopper.set_model(model)
    stopper.on_train_begin()
    stopped = None
    for epoch, loss in enumerate([0.5, 0.9, 0.8, 0.7, 0.6, 0.55]):
        model.stop_training = False
        stopper.on_epoch_end(epoch, {"val_loss": loss})
        if model.stop_training:
            stopped = epoch
            break
    assert stopped == 3  # patience ran out after the 2nd epoch; min_epochs held it to the 4th
    assert stopper.best_epoch == 0 and stopper.best == 0.5  # an epoch before min_epochs can be the best


def test_same_seed_trains_the_same_weights_on_cpu(cells, tmp_path):
    augment = AugmentParams(flip="horizontal", rotation=0.1, zoom=0.1, translation=0.1)
    first = keras.models.load_model(run_train(cells, tmp_path / "a", augment, epochs=1))
    second = keras.models.load_model(run_train(cells, tmp_path / "b", augment, epochs=1))
    for a, b in zip(first.get_weights(), second.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_balanced_class_weight_matches_scikit_learn_on_an_imbalanced_split(cells):
    from sklearn.utils.class_weight import compute_class_weight

    data = load_cached_set(cells / "cache", cells / "split.csv")
    # Three classes, 3:1 in train, the third with no train rows at all (it sits in val only).
    labels = np.zeros(len(data.labels), dtype=np.int32)
    labels[data.rows["train"][::4]] = 1
    labels[data.rows["val"][:5]] = 2
    imbalanced = replace(data, labels=labels, classes=["a", "b", "c"])
    train_labels = labels[data.rows["train"]]
    expected = compute_class_weight("balanced", classes=np.array([0, 1]), y=train_labels)
    assert _class_weight(imbalanced, "balanced") == pytest.approx({0: expected[0], 1: expected[1]})
    assert expected[1] > 2.5 * expected[0]
    assert _class_weight(imbalanced, "none") is None


def test_transfer_base_loads_weights_from_a_local_file(tmp_path):
    base = load_base("mobilenet_v3_small", "none", (32, 32, 3))
    rng = np.random.default_rng(0)
    base.set_weights([rng.normal(size=w.shape).astype(w.dtype) for w in base.get_weights()])
    path = tmp_path / "mobilenet_v3_small_notop.weights.h5"
    base.save_weights(path)
    params = TrainParams(model="mobilenet_v3_small", weights=str(path))
    _, loaded = build_model(params, NO_AUGMENT, (32, 32), 3, 2)
    for a, b in zip(base.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.fixture
def in_float32():
    """Keras in float32 for the test, whatever an earlier training in this process left (bf16 rounds at 1e-2)."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy(previous)


def test_efficientnet_from_a_local_weights_file_computes_what_keras_imagenet_build_does(tmp_path, monkeypatch, in_float32):
    from keras.src.applications import efficientnet

    path = tmp_path / "efficientnetb0_notop.weights.h5"
    keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(path)
    # Keras's own imagenet path, its download answered by the same file.
    monkeypatch.setattr(efficientnet.file_utils, "get_file", lambda *args, **kwargs: str(path))
    keras_build = keras.applications.EfficientNetB0(include_top=False, weights="imagenet", input_shape=(32, 32, 3))
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    ours = load_base("efficientnet_b0", str(path), (32, 32, 3))

    def stem_input(model):  # what the first convolution sees: the pixels as the weights expect them (O(1))
        return np.asarray(keras.Model(model.input, model.get_layer("stem_conv_pad").output)(images))

    np.testing.assert_allclose(stem_input(ours), stem_input(keras_build), rtol=1e-5, atol=1e-5)


def test_transfer_model_trains_head_then_fine_tunes_top_layers(cells, tmp_path):
    model_path = run_train(cells, tmp_path, model="mobilenet_v3_small", weights="none", epochs=1,
                           fine_tune_layers=6, fine_tune_epochs=1)  # fmt: skip
    report = json.loads((tmp_path / "metrics" / "train.json").read_text())
    assert report["epochs_run"] == 2
    base = next(layer for layer in keras.models.load_model(model_path).layers if isinstance(layer, keras.Model))
    top, rest = base.layers[-6:], base.layers[:-6]
    assert any(layer.trainable and layer.weights for layer in top)
    assert not any(layer.trainable for layer in rest if layer.weights)
    assert not any(layer.trainable for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization))


def test_without_a_val_split_the_log_says_its_scores_are_the_train_splits(cells, tmp_path, caplog):
    rows = list(csv.DictReader(open(cells / "split.csv", newline="")))
    no_val = tmp_path / "split.csv"
    with open(no_val, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**row, "split": "train" if row["split"] == "val" else row["split"]} for row in rows)
    with caplog.at_level(logging.INFO, logger="imgclf"):
        run_train(cells, tmp_path, split_csv=no_val, epochs=1)
    reported = json.loads((tmp_path / "metrics" / "train.json").read_text())
    assert reported["n_val"] == 0 and "val_accuracy" not in reported and "val_loss" not in reported
    assert 0 <= reported["train_accuracy"] <= 1 and reported["train_loss"] > 0
    assert "train (no val split) accuracy" in caplog.text


def test_fine_tuning_that_never_beats_the_head_phase_ends_with_the_head_phases_best_weights():
    from tasks.train import _Fitted, _keep_the_better_phase

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.BatchNormalization(), keras.layers.Dense(2)])
    head_best = {weight.path: weight.numpy() for weight in model.weights}
    tuned = [np.full(weight.shape, 7.0, dtype="float32") for weight in model.weights]
    model.set_weights(tuned)
    head = _Fitted({"val_loss": [0.5, 0.3, 0.4]}, 0.0, 0)
    # Fine-tuning's best epoch beat the head phase's: its weights stay.
    _keep_the_better_phase(model, "val_loss", [head, _Fitted({"val_loss": [0.35, 0.25]}, 0.0, 0)], head_best)
    assert all((weight.numpy() == 7.0).all() for weight in model.weights)
    # It never did: the head phase's best weights come back, every one (BatchNormalization's statistics too).
    _keep_the_better_phase(model, "val_loss", [head, _Fitted({"val_loss": [0.35, 0.6]}, 0.0, 0)], head_best)
    assert all(np.array_equal(weight.numpy(), head_best[weight.path]) for weight in model.weights)


def test_mirrored_strategy_trains_on_two_logical_cpus(cells, tmp_path):
    script = f"""
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from pathlib import Path
from tasks.params import AugmentParams, TrainParams
from tasks.train import train
train(TrainParams(strategy="mirrored", epochs=1, batch_size=8), AugmentParams(), Path({str(cells / "cache")!r}),
      Path({str(cells / "split.csv")!r}), Path({str(tmp_path / "models")!r}), Path({str(tmp_path / "metrics")!r}))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                            env=os.environ | {"TF_CPP_MIN_LOG_LEVEL": "2"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "metrics" / "train.json").read_text())
    assert report["device"] == "CPU, 2 replica(s)"
    assert (tmp_path / "models" / "model.keras").exists()


def saved_epoch(backup: Path) -> int:
    """Returns the epochs done in the newest complete backup folder of a phase (0 if none yet)."""
    for state in sorted(backup.glob("[0-9]*/state.json"), reverse=True):
        try:
            return json.loads(state.read_text())["epoch"]
        except (OSError, ValueError):  # replaced while being read
            continue
    return 0


def test_a_killed_fit_resumes_at_its_last_epoch_and_ends_with_the_uninterrupted_weights(cells, tmp_path, cli_env):
    # Augmentation on: its random draws must carry over too, as must Adam's moments, early
    # stopping's best epoch and weights, and each epoch's shuffle order.
    epochs = 12
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    for name in ("cache", "split.csv"):
        os.symlink(cells / name, project / "data" / name)
    (project / "params.yaml").write_text(yaml.safe_dump({"train": {"epochs": epochs, "patience": 0, "batch_size": 8}}))
    command = [sys.executable, "-m", "flows.cli", "stage", "train"]
    env = cli_env | {"PYTHONPATH": str(REPO)}
    run = subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    backup, deadline = project / "models" / ".backup" / "head", time.monotonic() + 120
    while time.monotonic() < deadline and run.poll() is None and saved_epoch(backup) < 3:
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not (project / "models" / "model.keras").exists()
    killed_at = saved_epoch(backup)
    assert 3 <= killed_at < epochs

    finished = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-3000:]
    report = json.loads((project / "metrics" / "train.json").read_text())
    assert report["resumed_from_epoch"] == killed_at
    assert report["epochs_run"] == epochs and len(report["history"]["val_loss"]) == epochs
    assert not (project / "models" / ".backup").exists()

    uninterrupted = train(TrainParams(epochs=epochs, patience=0, batch_size=8), AugmentParams(), cells / "cache",
                          cells / "split.csv", tmp_path / "once" / "models", tmp_path / "once" / "metrics")  # fmt: skip
    once = json.loads((tmp_path / "once" / "metrics" / "train.json").read_text())
    for key, values in once["history"].items():
        assert report["history"][key] == pytest.approx(values, rel=1e-6), key
    for resumed, straight in zip(weights_of(project / "models" / "model.keras"), weights_of(uninterrupted)):
        np.testing.assert_allclose(resumed, straight, rtol=0, atol=1e-6)


def test_backup_from_other_split_is_discarded(colours, tmp_path, monkeypatch, caplog):
    interrupt_after(monkeypatch, 1)
    with pytest.raises(Interrupted):
        run_train(colours, tmp_path, epochs=2)
    assert (tmp_path / "models" / ".backup").exists()
    other = tmp_path / "other_split.csv"
    split(SplitParams(val=0.2, test=0.2, seed=1), colours / "manifest.csv", other)

    with caplog.at_level(logging.INFO, logger="imgclf"):
        run_train(colours, tmp_path, epochs=2, split_csv=other)
    report = json.loads((tmp_path / "metrics" / "train.json").read_text())
    assert report["resumed_from_epoch"] == 0 and report["epochs_run"] == 2
    discarded = [record.getMessage() for record in caplog.records if "discarding the backup" in record.getMessage()]
    assert len(discarded) == 1 and "(split: changed since it was made)" in discarded[0], discarded


def test_backup_from_other_params_is_discarded(colours, tmp_path, monkeypatch, caplog):
    interrupt_after(monkeypatch, 1)
    with pytest.raises(Interrupted):
        run_train(colours, tmp_path, epochs=2)
    with caplog.at_level(logging.INFO, logger="imgclf"):
        run_train(colours, tmp_path, AugmentParams(flip="horizontal", rotation=0, zoom=0, translation=0), epochs=2)
    assert json.loads((tmp_path / "metrics" / "train.json").read_text())["resumed_from_epoch"] == 0
    assert "(train/augment params: changed since it was made)" in caplog.text


def test_nan_loss_stops_training_and_saves_no_model(cells, tmp_path):
    # A huge (finite) step size sends the weights, then the loss, to inf and NaN in the first epoch.
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.keras").write_bytes(b"the last good model")
    with pytest.raises(TrainError) as caught:
        run_train(cells, tmp_path, epochs=3, learning_rate=1e30)
    message = str(caught.value)
    assert "\n" not in message and "epoch 1:" in message, message
    assert "lower train.learning_rate (now 1e+30)" in message, message
    assert (tmp_path / "models" / "model.keras").read_bytes() == b"the last good model"
    assert not (tmp_path / "models" / "model.json").exists()
    assert not (tmp_path / "metrics" / "train.json").exists()


def test_curves_keep_every_epoch_across_fine_tune_and_resume(colours, tmp_path, monkeypatch):
    transfer = dict(model="mobilenet_v3_small", weights="none", epochs=2, fine_tune_layers=6, fine_tune_epochs=2)
    interrupt_after(monkeypatch, 3)  # killed after the first fine-tuning epoch
    with pytest.raises(Interrupted):
        run_train(colours, tmp_path, **transfer)
    run_train(colours, tmp_path, **transfer)

    report = json.loads((tmp_path / "metrics" / "train.json").read_text())
    assert report["resumed_from_epoch"] == 3 and report["epochs_run"] == 4
    for curve, key in (("train/loss", "loss"), ("eval/loss", "val_loss"), ("eval/accuracy", "val_accuracy")):
        with open(tmp_path / "metrics" / "live" / "plots" / "metrics" / f"{curve}.tsv", newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
        assert [int(row["step"]) for row in rows] == [0, 1, 2, 3], curve
        assert [float(row[curve.split("/")[1]]) for row in rows] == pytest.approx(report["history"][key]), curve
    assert all(len(values) == 4 for values in report["history"].values())


def test_offline_imagenet_weights_fail_with_one_line_on_how_to_pass_a_file(tmp_path):
    # The proxy is a closed port on loopback: the fetch fails at once, nothing leaves 127.0.0.1.
    script = """
from tasks.model import ModelError, load_base
try:
    load_base("mobilenet_v3_small", "imagenet", (32, 32, 3))
except ModelError as exc:
    print(exc)
"""
    proxy = "http://127.0.0.1:9"
    env = os.environ | {"KERAS_HOME": str(tmp_path / "keras"), "HTTPS_PROXY": proxy, "https_proxy": proxy,
                        "HTTP_PROXY": proxy, "http_proxy": proxy, "TF_CPP_MIN_LOG_LEVEL": "3"}  # fmt: skip
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    message = result.stdout.strip().splitlines()[-1]  # after Keras's own "Downloading data from ..."
    assert message.startswith("train.weights: the imagenet weights of mobilenet_v3_small could not be fetched or loaded")
    assert "set train.weights to its local path" in message


WORKER = """
import json, sys
from pathlib import Path
from tasks.params import AugmentParams, TrainParams
from tasks.train import train
out, cache, split = (Path(a) for a in sys.argv[1:4])
train(TrainParams(**json.loads(sys.argv[4])), AugmentParams(**json.loads(sys.argv[5])), cache, split, out / "models",
      out / "metrics")
"""


def run_workers(data: Path, tmp_path: Path, augment: AugmentParams, **overrides) -> None:
    """Trains with strategy multi_worker on two workers on loopback (worker i writes to tmp_path/worker<i>)."""
    ports = [free_port(), free_port()]
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    params = json.dumps({"strategy": "multi_worker"} | overrides)
    workers = []
    for index in range(2):
        config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        env = os.environ | {"TF_CONFIG": config, "TF_CPP_MIN_LOG_LEVEL": "2"}
        command = [sys.executable, "-c", WORKER, str(tmp_path / f"worker{index}"), str(data / "cache"),
                   str(data / "split.csv"), params, augment.model_dump_json()]  # fmt: skip
        workers.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [worker.communicate(timeout=300)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]


def test_multi_worker_training_on_loopback_finishes_and_only_the_chief_writes(cells, tmp_path):
    run_workers(cells, tmp_path, AugmentParams(), epochs=2, batch_size=16)
    report = json.loads((tmp_path / "worker0" / "metrics" / "train.json").read_text())
    assert report["device"] == "multi-worker, 2 replica(s)" and report["epochs_run"] == 2
    assert (tmp_path / "worker0" / "models" / "model.keras").exists()
    assert (tmp_path / "worker0" / "metrics" / "live" / "plots" / "metrics" / "train" / "loss.tsv").exists()
    assert not (tmp_path / "worker1").exists()  # the other worker wrote nothing of its own


def test_two_workers_match_one_process_on_a_partial_last_batch(colours, tmp_path):
    data = load_cached_set(colours / "cache", colours / "split.csv")
    assert len(data.rows["train"]) % 16 == 8  # the last global batch holds 8 images: 4 per worker
    # float32: bfloat16 rounds each worker's half-batch sums, which one process adds in another order.
    run_workers(colours, tmp_path, NO_AUGMENT, epochs=1, batch_size=8, learning_rate=1e-3, precision="float32")
    one_process = run_train(colours, tmp_path / "one", epochs=1, batch_size=16, learning_rate=1e-3, precision="float32")
    for two, one in zip(weights_of(tmp_path / "worker0" / "models" / "model.keras"), weights_of(one_process)):
        np.testing.assert_allclose(two, one, rtol=0, atol=1e-5)


def test_multi_worker_step_scales_the_loss_under_mixed_float16():
    from tasks.multi_worker import make_step

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        model, _ = build_model(TrainParams(cnn={"filters": [8], "dense_units": 8}), NO_AUGMENT, (16, 16), 3, 2)
        step, optimizer = make_step(model, tf.distribute.get_strategy(), 1e-3, 2, None)
        assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
        labels = np.array([0, 1, 0, 1, 1, 0], dtype=np.int32)
        before = model.get_weights()
        for _ in range(3):
            loss, examples = step(images, labels)
        after = model.get_weights()
        assert float(examples) == 6 and np.isfinite(float(loss))
        assert all(np.isfinite(w).all() for w in after)
        assert any(not np.array_equal(a, b) for a, b in zip(before, after))
        assert float(optimizer.dynamic_scale.numpy()) > 1  # the loss was scaled (and the updates unscaled)
    finally:
        keras.mixed_precision.set_global_policy(previous)


def test_the_chief_is_tf_config_s_chief_or_worker_zero():
    from tasks.train import is_chief

    workers = {"worker": ["a:1", "b:2"]}
    assert is_chief(None)
    assert is_chief(json.dumps({"cluster": workers, "task": {"type": "worker", "index": 0}}))
    assert not is_chief(json.dumps({"cluster": workers, "task": {"type": "worker", "index": 1}}))
    with_chief = workers | {"chief": ["c:3"]}
    assert is_chief(json.dumps({"cluster": with_chief, "task": {"type": "chief", "index": 0}}))
    assert not is_chief(json.dumps({"cluster": with_chief, "task": {"type": "worker", "index": 0}}))
    # A TF_CONFIG cut short or of another shape: one line naming it, not a JSONDecodeError's.
    from tasks.train import TrainError

    with pytest.raises(TrainError, match=r"^TF_CONFIG: not JSON \(Expecting value: line 1 column 12"):
        is_chief('{"cluster":')
    with pytest.raises(TrainError, match=r'^TF_CONFIG: not \{"cluster"'):
        is_chief('["a:1", "b:2"]')


@pytest.mark.parametrize("flip, views", [("horizontal", {"as is", "mirrored"}), ("vertical", {"as is", "upside down"}),
                                         ("both", {"as is", "mirrored", "upside down", "turned"})])  # fmt: skip
def test_random_affine_flips_are_exact_and_drawn_per_image(flip, views):
    images = np.random.default_rng(0).integers(0, 256, (64, 12, 16, 3)).astype("float32")
    out = np.asarray(RandomAffine(flip, seed=1)(images, training=True))
    candidates = {"as is": images, "mirrored": images[:, :, ::-1], "upside down": images[:, ::-1],
                  "turned": images[:, ::-1, ::-1]}  # fmt: skip
    seen = [{name for name, view in candidates.items() if (out[i] == view[i]).all()} for i in range(len(images))]
    assert all(len(found) == 1 for found in seen)  # each image is exactly one view, nothing resampled
    assert set().union(*seen) == views


def test_random_affine_moves_pixels_only_in_training_and_survives_saving(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (32, 20, 20, 3)).astype("float32")
    layer = RandomAffine("none", rotation=0.1, zoom=0.1, translation=0.2, seed=3)
    assert (np.asarray(layer(images, training=False)) == images).all()
    moved = np.asarray(layer(images, training=True))
    assert sum(not (moved[i] == images[i]).all() for i in range(len(images))) >= 30
    # nearest resampling, edges reflected: every pixel is one of the image's own
    assert all(np.isin(moved[i], images[i]).all() for i in range(len(images)))
    again = np.asarray(layer(images, training=True))
    assert not (again == moved).all()  # the generator moves on: each batch draws anew
    inputs = keras.Input((20, 20, 3))
    keras.Model(inputs, layer(inputs)).save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras").layers[-1]
    assert isinstance(loaded, RandomAffine) and loaded.get_config() == layer.get_config()


@pytest.mark.parametrize("augment", [AugmentParams(flip="none", rotation=0, translation=0, contrast=0.5),
                                     AugmentParams(flip="none", rotation=0, translation=0, brightness=0.5)])
def test_a_saved_model_called_directly_does_not_augment_and_trains_augmented(tmp_path, augment):
    # Keras' RandomContrast and RandomBrightness default to training=True: model(x) changed its input.
    model, _ = build_model(TrainParams(cnn={"filters": [4]}), augment, (16, 16), 3, 2)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    for used in (model, loaded):
        assert np.array_equal(np.asarray(used(images)), np.asarray(used(images)))
        assert np.allclose(np.asarray(used(images)), used.predict(images, verbose=0), atol=1e-6)  # graph vs eager
    randomised = [layer for layer in loaded.layers if "Random" in type(layer).__name__]
    assert len(randomised) == 1
    floats = images.astype("float32")  # as the model's cast hands them on
    assert not np.array_equal(np.asarray(randomised[0](floats, training=True)), floats)
