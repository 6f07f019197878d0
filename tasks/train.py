"""Stage train: cache + split -> `models/model.keras`, `models/labels.json`, `metrics/train.json`.

The whole loop is here: pick the devices (MirroredStrategy over GPUs, mixed precision and
XLA there; plain, deterministic CPU otherwise), feed uint8 batches from the memory-mapped
cache, fit with early stopping on val loss, back up every epoch so a killed run resumes at
its last epoch, and log each epoch with dvclive for `dvc plots` and `dvc exp show`. Transfer
models train their head on a frozen base first, then fine-tune the base's top layers.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tasks.errors import StageError
from tasks.dataset import CachedSet, load_cached_set, make_dataset
from tasks.files import atomic_file
from tasks.model import build_model, unfreeze_top
from tasks.multi_worker import fit_multi_worker, local_scores
from tasks.params import AugmentParams, TrainParams

log = logging.getLogger("imgclf")


class TrainError(StageError, ValueError):
    """Training cannot start as asked; the message says why."""


@dataclass(frozen=True)
class Devices:
    strategy: tf.distribute.Strategy
    precision: str
    jit_compile: bool
    description: str
    multi_worker: bool = False
    chief: bool = True  # writes the model, metrics and backups: the only process, or TF_CONFIG's chief


def is_chief(tf_config: str | None) -> bool:
    """True for TF_CONFIG's chief, or worker 0 of a cluster without one, or without TF_CONFIG."""
    if not tf_config:
        return True
    config = json.loads(tf_config)
    task = config.get("task", {})
    if "chief" in config.get("cluster", {}):
        return task.get("type") == "chief"
    return task.get("type") in (None, "worker") and int(task.get("index", 0)) == 0


def choose_devices(params: TrainParams) -> Devices:
    """Returns the strategy, precision and XLA setting for the devices this process sees."""
    if params.strategy == "multi_worker":
        # Before anything else touches TensorFlow's devices: this sets up the collectives.
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        precision = params.precision if params.precision != "auto" else "float32"
        keras.mixed_precision.set_global_policy(precision)
        return Devices(strategy, precision, False, f"multi-worker, {strategy.num_replicas_in_sync} replica(s)",
                       multi_worker=True, chief=is_chief(os.environ.get("TF_CONFIG")))  # fmt: skip
    gpus = tf.config.list_logical_devices("GPU")
    precision = params.precision if params.precision != "auto" else ("mixed_float16" if gpus else "float32")
    keras.mixed_precision.set_global_policy(precision)
    jit = params.jit_compile == "true" or (params.jit_compile == "auto" and bool(gpus))
    if params.strategy == "mirrored" or len(gpus) > 1:
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy: tf.distribute.Strategy = tf.distribute.MirroredStrategy(devices)
    else:
        strategy = tf.distribute.get_strategy()
    if not gpus:
        # Same seed, same weights: CPU kernels have deterministic variants, at little cost.
        tf.config.experimental.enable_op_determinism()
    kind = f"{len(gpus)} GPU" if gpus else "CPU"
    return Devices(strategy, precision, jit, f"{kind}, {strategy.num_replicas_in_sync} replica(s)")


def _compile(model: keras.Model, learning_rate: float, n_classes: int, jit: bool) -> None:
    binary = n_classes == 2
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="binary_crossentropy" if binary else "sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=jit,
    )


def _class_weight(data: CachedSet, mode: str) -> dict[int, float] | None:
    if mode != "balanced":
        return None
    counts = np.bincount(data.labels[data.rows["train"]], minlength=len(data.classes))
    # n_samples / (n_classes * count), as scikit-learn's "balanced".
    return {i: float(counts.sum() / (len(counts) * c)) for i, c in enumerate(counts) if c}


class _Throughput(keras.callbacks.Callback):
    """Training images per second, per epoch, validation time excluded."""

    def __init__(self, images_per_epoch: int):
        super().__init__()
        self.images_per_epoch, self.rates = images_per_epoch, []

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._test_seconds = time.perf_counter(), 0.0

    def on_test_begin(self, logs=None):
        self._test_start = time.perf_counter()

    def on_test_end(self, logs=None):
        self._test_seconds += time.perf_counter() - self._test_start

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self._start - self._test_seconds
        self.rates.append(self.images_per_epoch / max(seconds, 1e-9))

    def rate(self) -> float:
        # The first epoch pays for tracing and warm-up.
        steady = self.rates[1:] or self.rates
        return float(np.median(steady)) if steady else 0.0


def _live(live_dir: Path, resume: bool):
    """Returns a dvclive logger; in a git repo with no commit yet it logs without DVC's experiment view."""
    from dvclive import Live
    from scmrepo.exceptions import SCMError

    class RepoTolerantLive(Live):
        def _init_dvc(self):
            try:
                super()._init_dvc()
            except SCMError as exc:  # dvclive reads the current commit, and there is none
                log.warning("train: dvclive: %s; per-epoch metrics are still written to %s", exc, live_dir)

    return RepoTolerantLive(str(live_dir), resume=resume, save_dvc_exp=False, dvcyaml=None)


def _callbacks(params: TrainParams, backup_dir: Path, live_dir: Path, has_val: bool, throughput) -> list:
    from dvclive.keras import DVCLiveCallback

    resuming = backup_dir.exists()
    found = [
        keras.callbacks.BackupAndRestore(str(backup_dir), double_checkpoint=True),
        DVCLiveCallback(live=_live(live_dir, resuming)),
        throughput,
    ]
    # Keep the best epoch's weights; stop early only when train.patience is set.
    patience = params.patience or params.epochs + params.fine_tune_epochs
    monitor = "val_loss" if has_val else "loss"
    found.insert(0, keras.callbacks.EarlyStopping(monitor=monitor, patience=patience, restore_best_weights=True))
    return found


def _fit(model, params, data, train_ds, val_ds, epochs: int, backup_dir: Path, live_dir: Path) -> keras.callbacks.History:
    throughput = _Throughput(len(data.rows["train"]))
    history = model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=epochs,
        shuffle=False,  # the dataset reshuffles itself, seeded, each epoch
        class_weight=_class_weight(data, params.class_weight),
        callbacks=_callbacks(params, backup_dir, live_dir, val_ds is not None, throughput),
        verbose=1 if sys.stdout.isatty() else 2,
    )
    history.images_per_second = throughput.rate()
    return history


def _resumed_epoch(backup_dir: Path) -> int:
    try:
        return int(json.loads((backup_dir / "training_metadata.json").read_text())["epoch"])
    except (OSError, ValueError, KeyError):
        return 0


def train(
    params: TrainParams, augment: AugmentParams, cache_dir: Path, split_csv: Path, model_dir: Path, metrics_dir: Path
) -> Path:
    """Returns the path of the saved model, trained on the train split and early-stopped on val."""
    devices = choose_devices(params)
    keras.utils.set_random_seed(params.seed)
    scratch = None
    if not devices.chief:
        # Only the chief writes the model, metrics and logs; other workers use a scratch folder.
        scratch = Path(tempfile.mkdtemp(prefix="imgclf-worker-"))
        model_dir, metrics_dir = scratch / "models", scratch / "metrics"
    data = load_cached_set(cache_dir, split_csv)
    if len(data.classes) < 2:
        raise TrainError(f"train: {cache_dir} holds {len(data.classes)} class(es); a classifier needs two or more")
    if not len(data.rows["train"]):
        raise TrainError(f"train: {split_csv} has no train rows")
    batch = params.batch_size * devices.strategy.num_replicas_in_sync
    train_ds = make_dataset(data, "train", batch, shuffle=True, seed=params.seed)
    val_ds = make_dataset(data, "val", batch) if len(data.rows["val"]) else None
    image_size = tuple(data.meta["image_size"])
    channels = int(data.meta["channels"])
    with devices.strategy.scope():
        model, base = build_model(params, augment, image_size, channels, len(data.classes))
        _compile(model, params.learning_rate, len(data.classes), devices.jit_compile)
    log.info("train: %s on %s, %s, %d train / %d val images, batch %d",
             params.model, devices.description, devices.precision, len(data.rows["train"]), len(data.rows["val"]), batch)  # fmt: skip

    backup_root, live_dir = model_dir / ".backup", metrics_dir / "live"
    resumed_from = _resumed_epoch(backup_root / "head")
    live = _live(live_dir, False) if devices.multi_worker else None

    def phase(epochs: int, learning_rate: float, name: str) -> tuple[dict[str, list[float]], float]:
        if devices.multi_worker:
            def on_epoch(epoch: int, loss: float) -> None:
                live.log_metric("loss", loss)
                live.next_step()

            return fit_multi_worker(model, devices.strategy, train_ds, epochs, learning_rate, len(data.classes), batch,
                                    _class_weight(data, params.class_weight), on_epoch)  # fmt: skip
        history = _fit(model, params, data, train_ds, val_ds, epochs, backup_root / name, live_dir)
        return {k: list(map(float, v)) for k, v in history.history.items()}, history.images_per_second

    started = time.perf_counter()
    epochs, rate = phase(params.epochs, params.learning_rate, "head")
    rates = [rate]
    if base is not None and params.fine_tune_layers and params.fine_tune_epochs:
        with devices.strategy.scope():
            unfreeze_top(base, params.fine_tune_layers)
            _compile(model, params.fine_tune_lr, len(data.classes), devices.jit_compile)
        tuned, rate = phase(params.fine_tune_epochs, params.fine_tune_lr, "fine_tune")
        for key, values in tuned.items():
            epochs.setdefault(key, []).extend(values)
        rates.append(rate)
    seconds = time.perf_counter() - started
    if live is not None:
        live.end()

    scored = val_ds if val_ds is not None else train_ds
    if devices.multi_worker:  # in this process alone: Keras' evaluate does not run multi-worker either
        final = local_scores(model, scored, len(data.classes))
    else:
        final = model.evaluate(scored, verbose=0, return_dict=True)
    model_path = _save(model, data, params, augment, model_dir)
    report = {
        "model": params.model,
        "device": devices.description,
        "precision": devices.precision,
        "jit_compile": devices.jit_compile,
        "n_train": len(data.rows["train"]),
        "n_val": len(data.rows["val"]),
        "epochs_run": len(next(iter(epochs.values()), [])),
        "resumed_from_epoch": resumed_from,
        "seconds": round(seconds, 3),
        "images_per_second": round(float(np.mean(rates)), 1),
        # After restoring the best weights: what the saved model scores on val (train if no val).
        "val_loss": float(final["loss"]),
        "val_accuracy": float(final["accuracy"]),
        "history": epochs,
    }
    with atomic_file(metrics_dir / "train.json") as handle:
        json.dump(report, handle, indent=2)
    shutil.rmtree(backup_root, ignore_errors=True)
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("train: %d epochs, %.0f images/s, val accuracy %.4f -> %s",
             report["epochs_run"], report["images_per_second"], report["val_accuracy"], model_path)  # fmt: skip
    return model_path


def _save(model: keras.Model, data: CachedSet, params: TrainParams, augment: AugmentParams, model_dir: Path) -> Path:
    model_dir.mkdir(parents=True, exist_ok=True)
    model_path = model_dir / "model.keras"
    temp = model_dir / f".model.tmp-{os.getpid()}.keras"
    try:
        model.save(temp)
        os.replace(temp, model_path)
    finally:
        temp.unlink(missing_ok=True)
    described = {
        "classes": data.classes,
        "image_size": data.meta["image_size"],
        "channels": data.meta["channels"],
        "resize": data.meta["resize"],
        "train": params.model_dump(mode="json"),
        "augment": augment.model_dump(mode="json"),
    }
    with atomic_file(model_dir / "labels.json") as handle:
        json.dump(described, handle, indent=2)
    lines: list[str] = []
    model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line))
    with atomic_file(model_dir / "summary.txt") as handle:
        handle.write("\n".join(lines) + "\n")
    return model_path
