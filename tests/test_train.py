"""Training, evaluation and prediction on small generated sets (1-3 epochs, seconds each)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
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
from tasks.model import build_model, class_probabilities, load_base  # noqa: E402
from tasks.predict import predict  # noqa: E402
from tasks.train import _class_weight, train  # noqa: E402

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


def run_train(data: Path, out: Path, augment: AugmentParams = NO_AUGMENT, **overrides) -> Path:
    params = TrainParams(**(FAST | overrides))
    return train(params, augment, data / "cache", data / "split.csv", out / "models", out / "metrics")


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
    model_path = run_train(cells, tmp_path, epochs=1)
    reported = json.loads((tmp_path / "metrics" / "train.json").read_text())["val_accuracy"]
    model = keras.models.load_model(model_path)
    data = load_cached_set(cells / "cache", cells / "split.csv")
    predicted = class_probabilities(model, make_dataset(data, "val", 32).map(lambda x, y: x)).argmax(axis=1)
    assert abs((predicted == data.labels[data.rows["val"]]).mean() - reported) < 1e-3


def test_predict_on_raw_files_matches_the_model_on_cached_rows(cells, tmp_path):
    model_path = run_train(cells, tmp_path, epochs=1)
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
    described = json.loads((tmp_path / "models" / "labels.json").read_text())
    assert described["classes"] == ["blue", "green", "red"] and described["image_size"] == [32, 32]
    scores = json.loads(evaluate(model_path, colours / "cache", colours / "split.csv", tmp_path / "none.json",
                                 tmp_path / "metrics", tmp_path / "plots").read_text())  # fmt: skip
    assert scores["accuracy"] >= 0.9 and "roc_auc" not in scores
    assert np.array(scores["confusion_matrix"]).shape == (3, 3)


def test_same_seed_trains_the_same_weights_on_cpu(cells, tmp_path):
    augment = AugmentParams(flip="horizontal", rotation=0.1, zoom=0.1, translation=0.1)
    first = keras.models.load_model(run_train(cells, tmp_path / "a", augment, epochs=1))
    second = keras.models.load_model(run_train(cells, tmp_path / "b", augment, epochs=1))
    for a, b in zip(first.get_weights(), second.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_balanced_class_weight_comes_from_the_train_split(cells):
    data = load_cached_set(cells / "cache", cells / "split.csv")
    weights = _class_weight(data, "balanced")
    counts = np.bincount(data.labels[data.rows["train"]])
    assert weights == pytest.approx({i: counts.sum() / (2 * c) for i, c in enumerate(counts)})
    assert _class_weight(data, "none") is None


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


def test_a_killed_fit_resumes_at_its_last_epoch(cells, tmp_path, cli_env):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    for name in ("cache", "split.csv"):
        os.symlink(cells / name, project / "data" / name)
    (project / "params.yaml").write_text(yaml.safe_dump({"train": {"epochs": 40, "patience": 0, "batch_size": 8}}))
    command = [sys.executable, "-m", "flows.cli", "stage", "train"]
    env = cli_env | {"PYTHONPATH": str(REPO)}
    run = subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metadata = project / "models" / ".backup" / "head" / "training_metadata.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and run.poll() is None:
        try:
            if json.loads(metadata.read_text())["epoch"] >= 3:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not (project / "models" / "model.keras").exists()

    finished = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-3000:]
    report = json.loads((project / "metrics" / "train.json").read_text())
    assert report["resumed_from_epoch"] >= 3
    assert report["resumed_from_epoch"] + report["epochs_run"] == 40
    assert not (project / "models" / ".backup").exists()


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
    assert message.startswith("train.weights: the imagenet weights of mobilenet_v3_small could not be downloaded")
    assert "set train.weights to its local path" in message


def test_multi_worker_training_on_loopback_finishes_and_only_the_chief_writes(cells, tmp_path):
    ports = [free_port(), free_port()]
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    script = """
import sys
from pathlib import Path
from tasks.params import AugmentParams, TrainParams
from tasks.train import train
out, cache, split = (Path(a) for a in sys.argv[1:4])
train(TrainParams(strategy="multi_worker", epochs=2, batch_size=16), AugmentParams(), cache, split, out / "models",
      out / "metrics")
"""
    workers = []
    for index in range(2):
        config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        out = tmp_path / f"worker{index}"
        env = os.environ | {"TF_CONFIG": config, "TF_CPP_MIN_LOG_LEVEL": "2"}
        command = [sys.executable, "-c", script, str(out), str(cells / "cache"), str(cells / "split.csv")]
        workers.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [worker.communicate(timeout=300)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    report = json.loads((tmp_path / "worker0" / "metrics" / "train.json").read_text())
    assert report["device"] == "multi-worker, 2 replica(s)" and report["epochs_run"] == 2
    assert (tmp_path / "worker0" / "models" / "model.keras").exists()
    assert (tmp_path / "worker0" / "metrics" / "live" / "plots" / "metrics" / "loss.tsv").exists()
    assert not (tmp_path / "worker1").exists()  # the other worker wrote nothing of its own


def test_the_chief_is_tf_config_s_chief_or_worker_zero():
    from tasks.train import is_chief

    workers = {"worker": ["a:1", "b:2"]}
    assert is_chief(None)
    assert is_chief(json.dumps({"cluster": workers, "task": {"type": "worker", "index": 0}}))
    assert not is_chief(json.dumps({"cluster": workers, "task": {"type": "worker", "index": 1}}))
    with_chief = workers | {"chief": ["c:3"]}
    assert is_chief(json.dumps({"cluster": with_chief, "task": {"type": "chief", "index": 0}}))
    assert not is_chief(json.dumps({"cluster": with_chief, "task": {"type": "worker", "index": 0}}))
