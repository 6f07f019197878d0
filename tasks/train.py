"""Stage train: cache + split -> `models/model.keras`, `models/model.json`, `metrics/train.json`.

The whole loop is here: pick the devices (MirroredStrategy over GPUs, mixed float16 and
XLA there; a deterministic CPU otherwise, in mixed bfloat16 where it has the instructions),
feed uint8 batches from the memory-mapped cache in an order drawn from the seed and the
epoch, fit as `train.recipe` says (by default a cosine-decayed rate, early stopping on val
loss once `train.min_steps` batches have run, the best epoch kept; the seed notebook's plain
loop for `recipe: seed`), back up the whole training state every epoch (a killed run resumes
at its last epoch and ends with the weights it would have had), and log each epoch with
dvclive for `dvc plots` and `dvc exp show`. Transfer models train their head on a frozen
base first, then fine-tune the base's top layers. A loss that turns NaN or infinite stops
the run before anything is saved.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import keras
import numpy as np
import tensorflow as tf
from sklearn.utils.class_weight import compute_class_weight

from tasks.errors import Interrupted, StageError, stop_requested
from tasks.dataset import CachedSet, load_cached_set, make_dataset, without
from tasks.files import MODEL_JSON, atomic_file, atomic_path, write_json
from tasks.layout import BACKUP_FOLDER
from tasks.model import Head, build_model, unfreeze_top
from tasks.multi_worker import fit_multi_worker, local_scores
from tasks.params import AugmentParams, TrainParams, recipe_settings

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


def read_tf_config(tf_config: str | None) -> dict:
    """Returns TF_CONFIG's cluster and task ({} without it); a TrainError naming TF_CONFIG when it is not that."""
    try:
        config = json.loads(tf_config) if tf_config else {}
    except ValueError as exc:
        raise TrainError(f"TF_CONFIG: not JSON ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("cluster", {}), dict):
        raise TrainError('TF_CONFIG: not {"cluster": {"worker": ["host:port", ...]}, "task": {"type": ..., "index": ...}}')
    return config


def is_chief(tf_config: str | None) -> bool:
    """True for TF_CONFIG's chief, or worker 0 of a cluster without one, or without TF_CONFIG."""
    config = read_tf_config(tf_config)
    task = config.get("task", {})
    if "chief" in config.get("cluster", {}):
        return task.get("type") == "chief"
    return task.get("type") in (None, "worker") and int(task.get("index", 0)) == 0


def cpu_flags() -> str:
    """Returns the CPU's feature flags as /proc/cpuinfo lists them ("" where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line.partition(":")[2] for line in text.splitlines() if line.startswith("flags")), "")


# x86 instructions that compute in bfloat16 (AVX512_BF16 dot products, AMX tiles); oneDNN uses them
# under mixed_bfloat16. Without them bfloat16 is emulated and slower than float32.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def resolve_precision(requested: str, gpus: int, flags: str) -> str:
    """Returns the Keras dtype policy for train.precision: auto is mixed_float16 on GPUs, mixed_bfloat16
    on a CPU with native bfloat16 (its `flags`, as cpu_flags() reads them), float32 elsewhere."""
    if requested != "auto":
        return requested
    if gpus:
        return "mixed_float16"
    return "mixed_bfloat16" if NATIVE_BF16_FLAGS & set(flags.split()) else "float32"


def choose_devices(params: TrainParams) -> Devices:
    """Returns the strategy, precision and XLA setting for the devices this process sees."""
    if params.strategy == "multi_worker":
        hosts = [host for listed in read_tf_config(os.environ.get("TF_CONFIG")).get("cluster", {}).values() for host in listed]
        if len(hosts) < 2:
            log.warning("train: train.strategy multi_worker, but TF_CONFIG names no cluster of two hosts or more: this "
                        "process trains alone")  # fmt: skip
        else:  # TensorFlow itself says nothing while it waits, however long
            log.info("train: joining the cluster of TF_CONFIG (%s); training starts once every host has joined",
                     ", ".join(hosts))  # fmt: skip
        # Before anything else touches TensorFlow's devices: this sets up the collectives.
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        precision = resolve_precision(params.precision, len(tf.config.list_logical_devices("GPU")), cpu_flags())
        keras.mixed_precision.set_global_policy(precision)
        return Devices(strategy, precision, False, f"multi-worker, {strategy.num_replicas_in_sync} replica(s)",
                       multi_worker=True, chief=is_chief(os.environ.get("TF_CONFIG")))  # fmt: skip
    gpus = tf.config.list_logical_devices("GPU")
    precision = resolve_precision(params.precision, len(gpus), cpu_flags())
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


def train(
    params: TrainParams, augment: AugmentParams, cache_dir: Path, split_csv: Path, model_dir: Path, metrics_dir: Path
) -> Path:
    """Returns the path of the saved model, trained on the train split and early-stopped on val."""
    params, augment = recipe_settings(params, augment)  # what `train.recipe` makes of them
    devices = choose_devices(params)
    keras.utils.set_random_seed(params.seed)
    # Only the chief writes the model, metrics and logs; other workers use a scratch folder.
    scratch = None if devices.chief else Path(tempfile.mkdtemp(prefix="imgclf-worker-"))
    if scratch is not None:
        model_dir, metrics_dir = scratch / "models", scratch / "metrics"
    exclusion = read_exclusion(params.exclude)
    data = _load(cache_dir, split_csv, exclusion)
    batch = params.batch_size * devices.strategy.num_replicas_in_sync
    steps = math.ceil(len(data.rows["train"]) / batch)  # per epoch
    val_ds = make_dataset(data, "val", batch) if len(data.rows["val"]) else None
    class_weight = _class_weight(data, params.class_weight)
    with devices.strategy.scope():
        model, base = build_model(params, augment, tuple(data.meta["image_size"]), int(data.meta["channels"]),
                                  len(data.classes))  # fmt: skip
        _compile(model, _rate(params, params.learning_rate, params.epochs * steps), params, len(data.classes),
                 devices.jit_compile)  # fmt: skip
    log.info("train: recipe %s, %s on %s, %s, %d train / %d val images, batch %d",
             params.recipe, params.model, devices.description, devices.precision, len(data.rows["train"]), len(data.rows["val"]), batch)  # fmt: skip

    backup_root = model_dir / BACKUP_FOLDER
    if not devices.multi_worker:  # (no backups there: its loop does not resume)
        _open_backup(backup_root, _fingerprint(params, augment, cache_dir, split_csv) | {"exclude": exclusion.sha256})
    # One dvclive log for the whole run: every epoch of both phases, the backed-up ones replayed.
    loop = _Loop(model, devices, data, batch, params, class_weight, val_ds, _live(metrics_dir / "live"), backup_root)
    started = time.perf_counter()
    phases = [_fit(loop, _Phase("head", params.epochs, params.learning_rate, "train.learning_rate", first_epoch=0))]
    if base is not None and params.fine_tune_layers and params.fine_tune_epochs:
        keep_best = params.restore_best and not devices.multi_worker
        head_weights = {weight.path: weight.numpy() for weight in model.weights} if keep_best else {}  # its best epoch's
        with devices.strategy.scope():
            unfreeze_top(base, params.fine_tune_layers)
            _compile(model, _rate(params, params.fine_tune_lr, params.fine_tune_epochs * steps), params,
                     len(data.classes), devices.jit_compile)  # fmt: skip
        phases.append(_fit(loop, _Phase("fine_tune", params.fine_tune_epochs, params.fine_tune_lr, "train.fine_tune_lr",
                                        first_epoch=params.epochs)))  # fmt: skip
        if keep_best:
            _keep_the_better_phase(model, "val_loss" if val_ds is not None else "loss", phases, head_weights)
    seconds = time.perf_counter() - started
    loop.live.end()

    final = _final_scores(loop)
    report = _report(loop, phases, seconds, final)
    # Valid JSON or nothing: a NaN that got past the per-epoch check fails here, before any file is written.
    text = json.dumps(report, indent=2, allow_nan=False)
    model_path = _save(model, data, params, augment, devices.precision, exclusion, model_dir)
    with atomic_file(metrics_dir / "train.json") as handle:
        handle.write(text)
    shutil.rmtree(backup_root, ignore_errors=True)
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("train: %d epochs, %.0f images/s, %s accuracy %.4f -> %s", report["epochs_run"], report["images_per_second"],
             "val" if report["n_val"] else "train (no val split)", final["accuracy"], model_path)  # fmt: skip
    return model_path


@dataclass(frozen=True)
class Exclusion:
    """train.exclude: the images to leave out of train and val, and the sha256 of the file that lists them.

    DVC sees train.exclude's value (the file's name), not the file: the sha256 recorded in
    model.json says which list a model was trained without.
    """

    file: str | None = None
    sha256: str = ""
    paths: frozenset[str] = frozenset()

    def described(self) -> dict | None:
        return {"file": self.file, "sha256": self.sha256, "paths": len(self.paths)} if self.file else None


def read_exclusion(file: str | None) -> Exclusion:
    """Returns the paths listed in the `path` column of `file` (train.exclude); none when it is unset."""
    if not file:
        return Exclusion()
    try:
        data = Path(file).read_bytes()
        reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig")))
        paths = frozenset(row["path"] for row in reader) if "path" in (reader.fieldnames or ()) else None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TrainError(f"train.exclude: {file}: cannot read it ({exc})") from None
    if paths is None:
        raise TrainError(f"train.exclude: {file} has no `path` column (a CSV like data/label_issues.csv)")
    return Exclusion(file, hashlib.sha256(data).hexdigest(), paths)


def _load(cache_dir: Path, split_csv: Path, exclusion: Exclusion) -> CachedSet:
    """Returns the cache joined with the split, less the excluded images in train and val; a TrainError
    unless it holds two classes or more and train rows."""
    data = load_cached_set(cache_dir, split_csv)
    unknown = exclusion.paths.difference(data.paths)
    if unknown:  # else a list written with other paths (absolute, from the project root) would leave out nothing
        # A list typed or saved on macOS may spell é as e + a combining accent: the same text to the eye.
        composed = {unicodedata.normalize("NFC", path) for path in data.paths}
        hint = ("; some differ from the set's paths only in Unicode form (accents composed or decomposed): write "
                "them as data/label_issues.csv does" if any(unicodedata.normalize("NFC", path) in composed for path in unknown)
                else "")  # fmt: skip
        raise TrainError(f"train.exclude: {exclusion.file}: {len(unknown)} of its {len(exclusion.paths)} paths are not "
                         f"images of this data set (e.g. {ascii(min(unknown))}); paths are relative to data/extracted/, "
                         f"as in data/label_issues.csv{hint}")  # fmt: skip
    if exclusion.file:
        kept = without(data, exclusion.paths, ("train", "val"))
        dropped = sum(len(data.rows[name]) - len(kept.rows[name]) for name in ("train", "val"))
        log.info("train: train.exclude %s lists %d images; %d of them left out of train and val",
                 exclusion.file, len(exclusion.paths), dropped)  # fmt: skip
        data = kept
    if len(data.classes) < 2:
        raise TrainError(f"train: {cache_dir} holds {len(data.classes)} class(es); a classifier needs two or more")
    if not len(data.rows["train"]):
        raise TrainError(f"train: {split_csv} has no train rows")
    # A class the model never sees in training, it still answers: never right, and nothing says why.
    untrained = sorted(set(data.classes) - {data.classes[label] for label in data.labels[data.rows["train"]]})
    if untrained:
        why = f"after train.exclude ({exclusion.file})" if exclusion.file else f"in {split_csv}"
        raise TrainError(f"train: no train images of {', '.join(map(repr, untrained))} {why}; a model would never learn "
                         f"{'it' if len(untrained) == 1 else 'them'}")  # fmt: skip
    return data


def _rate(params: TrainParams, start: float, steps: int) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """Returns a phase's learning rate: `start` throughout, or cosine-decayed from it to 0 over the phase's steps.

    The schedule reads the optimizer's step count, which each epoch's backup keeps: a resumed
    run continues the schedule where the killed one was.
    """
    if params.schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(start, decay_steps=max(steps, 1))
    return start


def _compile(model: keras.Model, rate, params: TrainParams, n_classes: int, jit: bool) -> None:
    """Compiles the model with Adam (AdamW when train.weight_decay is set) at `rate`, a float or a schedule."""
    if params.weight_decay:
        optimizer = keras.optimizers.AdamW(rate, weight_decay=params.weight_decay)
    else:
        optimizer = keras.optimizers.Adam(rate)
    model.compile(optimizer=optimizer, loss=Head(n_classes).loss(), metrics=["accuracy"], jit_compile=jit)


def _class_weight(data: CachedSet, mode: str) -> dict[int, float] | None:
    """Returns {class index: weight} for train.class_weight: balanced, as scikit-learn computes it."""
    if mode != "balanced":
        return None
    labels = data.labels[data.rows["train"]]
    # Only the classes the train split holds: the others never meet a weight (scikit-learn refuses them).
    present = np.unique(labels)
    weights = compute_class_weight("balanced", classes=present, y=labels)
    return {int(c): float(w) for c, w in zip(present, weights)}


@dataclass(frozen=True)
class _Loop:
    """What every phase of the run trains with."""

    model: keras.Model
    devices: Devices
    data: CachedSet
    batch: int  # global: train.batch_size per replica
    params: TrainParams
    class_weight: dict[int, float] | None
    val_ds: tf.data.Dataset | None
    live: Any  # the run's dvclive logger
    backup_root: Path


class _Phase(NamedTuple):
    """One fit of the model: its head (on a frozen base), or then the base's top layers too."""

    name: str
    epochs: int
    learning_rate: float
    rate_key: str  # the param that sets it, named when the loss blows up
    first_epoch: int  # in the whole run: each epoch's order is drawn from the seed and the run's epoch


class _Fitted(NamedTuple):
    history: dict[str, list[float]]  # per epoch, resumed ones included
    images_per_second: float  # 0.0 when nothing was left to train
    resumed_from: int  # the epochs a killed run had done


def _fit(loop: _Loop, phase: _Phase) -> _Fitted:
    """Trains the compiled model for one phase, resumed from its backup if a killed run left one."""
    batches = functools.partial(_epoch_batches, loop.data, loop.batch, loop.params.seed, phase.first_epoch)
    if loop.devices.multi_worker:  # its loop builds a plain Adam: the schedule, but no weight decay
        if loop.params.weight_decay:
            log.warning("train: strategy multi_worker trains without train.weight_decay (%g)", loop.params.weight_decay)
        schedule = _rate(loop.params, phase.learning_rate, phase.epochs * math.ceil(len(loop.data.rows["train"]) / loop.batch))
        history, rate = fit_multi_worker(loop.model, loop.devices.strategy, batches, phase.epochs, schedule,
                                         len(loop.data.classes), loop.class_weight,
                                         [_StopOnNonFiniteLoss(phase), _Curves(loop.live)])  # fmt: skip
        return _Fitted(history, rate, 0)
    # Keep the best epoch's weights (train.restore_best); stop early only when train.patience is set,
    # and not before train.min_steps batches.
    steps = math.ceil(len(loop.data.rows["train"]) / loop.batch)
    stopper = _EarlyStopping(math.ceil(loop.params.min_steps / steps),
                             monitor="val_loss" if loop.val_ds is not None else "loss",
                             patience=loop.params.patience or loop.params.epochs + loop.params.fine_tune_epochs,
                             restore_best_weights=loop.params.restore_best)  # fmt: skip
    backup = _Backup(loop.backup_root / phase.name, stopper, phase.epochs)
    resumed = backup.epoch
    if resumed:
        log.info("train: %s phase resumed after epoch %d, from the backup a stopped run left", phase.name, resumed)
    _log_epochs(loop.live, backup.history)  # the epochs a killed run did, so the curves keep them
    if backup.done:  # killed in a later phase: this one's result is all it needs
        backup.restore_end(loop.model)
        return _Fitted(backup.history, 0.0, resumed)
    throughput = _Throughput(len(loop.data.rows["train"]))
    loop.model.fit(
        functools.reduce(tf.data.Dataset.concatenate, map(batches, range(resumed, phase.epochs))),
        steps_per_epoch=steps,
        validation_data=loop.val_ds,
        epochs=phase.epochs,
        initial_epoch=resumed,
        shuffle=False,  # each epoch's order is drawn in _epoch_batches
        class_weight=loop.class_weight,
        # At each epoch's end, in this order: a NaN loss stops the run before it is backed up or logged.
        callbacks=[_StopOnNonFiniteLoss(phase), stopper, backup, _Curves(loop.live), throughput, _StopWhenAsked()],
        verbose=1 if sys.stdout.isatty() else 2,
    )
    return _Fitted(backup.history, throughput.rate(), resumed)


def _keep_the_better_phase(model: keras.Model, monitor: str, phases: list[_Fitted], head_weights: dict) -> None:
    """Sets the head phase's best weights back when fine-tuning never beat its best `monitor`: each phase's
    early stopping restores only its own best epoch (train.restore_best is over the whole run)."""
    head, fine_tune = (min(phase.history.get(monitor) or [math.inf]) for phase in phases)
    if fine_tune <= head:
        return
    for weight in model.weights:
        weight.assign(head_weights[weight.path])
    log.info("train: fine-tuning's best %s %.4f did not beat the head phase's %.4f: the model keeps the head "
             "phase's best weights", monitor, fine_tune, head)  # fmt: skip


def _epoch_batches(data: CachedSet, batch: int, seed: int, first_epoch: int, epoch: int) -> tf.data.Dataset:
    """Returns the train batches of a phase's epoch, in an order drawn from (seed, the run's epoch) alone.

    tf.data's own reshuffling depends on how many epochs this process has run, so a resumed
    run would see other orders than the killed one; this way it sees the same.
    """
    order = np.random.default_rng([seed, first_epoch + epoch]).permutation(data.rows["train"])
    return make_dataset(replace(data, rows=data.rows | {"train": order}), "train", batch)


def _final_scores(loop: _Loop) -> dict:
    """Returns {"loss", "accuracy", ...} of the final weights on val (on train when there is no val)."""
    scored = loop.val_ds if loop.val_ds is not None else make_dataset(loop.data, "train", loop.batch)
    if loop.devices.multi_worker:  # in this process alone: Keras' evaluate does not run multi-worker either
        return local_scores(loop.model, scored, len(loop.data.classes))
    return loop.model.evaluate(scored, verbose=0, return_dict=True)


def _report(loop: _Loop, phases: list[_Fitted], seconds: float, final: dict) -> dict:
    """Returns train.json: the run's devices, sizes, speed, final scores and per-epoch history."""
    keys = dict.fromkeys(key for phase in phases for key in phase.history)
    history = {key: [value for phase in phases for value in phase.history.get(key, [])] for key in keys}
    rates = [phase.images_per_second for phase in phases if phase.images_per_second]
    scored = "val" if loop.val_ds is not None else "train"
    return {
        "recipe": loop.params.recipe,
        "model": loop.params.model,
        "device": loop.devices.description,
        "precision": loop.devices.precision,
        "jit_compile": loop.devices.jit_compile,
        "n_train": len(loop.data.rows["train"]),
        "n_val": len(loop.data.rows["val"]),
        "epochs_run": len(next(iter(history.values()), [])),  # every epoch, resumed ones included
        "resumed_from_epoch": sum(phase.resumed_from for phase in phases),
        "seconds": round(seconds, 3),
        "images_per_second": round(float(np.mean(rates or [0.0])), 1),
        # After restoring the best weights: what the saved model scores on val (train if no val),
        # named for the split scored so that no train figure passes for a val one.
        f"{scored}_loss": float(final["loss"]),
        f"{scored}_accuracy": float(final["accuracy"]),
        "history": history,
    }


def _digest(*parts: bytes) -> str:
    return hashlib.sha256(b"".join(hashlib.sha256(part).digest() for part in parts)).hexdigest()


def _fingerprint(params: TrainParams, augment: AugmentParams, cache_dir: Path, split_csv: Path) -> dict[str, str]:
    """Returns sha256 digests of what training depends on: the params, the split, the cache."""
    return {
        "train/augment params": _digest(params.model_dump_json().encode(), augment.model_dump_json().encode()),
        "split": _digest(split_csv.read_bytes()),
        "cache": _digest((cache_dir / "meta.json").read_bytes(), (cache_dir / "index.csv").read_bytes()),
    }


def _open_backup(root: Path, fingerprint: dict[str, str]) -> None:
    """Keeps a killed run's backup only for a run on the same params, split and cache; else discards it.

    Resumed weights trained on other params, or on rows that are now val or test, would leak
    into the new model unseen.
    """
    marker = root / "fingerprint.json"
    if root.exists():
        try:
            found = dict(json.loads(marker.read_text()))
        except (OSError, ValueError, TypeError):
            found = {}
        if found != fingerprint:
            changed = [key for key in fingerprint if key in found and found[key] != fingerprint[key]]
            why = f"{', '.join(changed)}: changed since it was made" if changed else "it has no fingerprint"
            log.warning("train: discarding the backup in %s (%s): training starts from epoch 1", root, why)
            shutil.rmtree(root)
    if not root.exists():
        write_json(marker, fingerprint)


def _generator_states(model: keras.Model) -> list:
    # The random layers' (augmentation, dropout) generator states: model variables that are not
    # weights, so save_weights leaves them out, yet the next epoch's draws depend on them.
    weights = {w.path for w in model.weights}
    return [v for v in model.variables if v.path not in weights]


class _Backup(keras.callbacks.Callback):
    """Saves one phase's training state after every epoch; restores it when a killed run is resumed.

    The state is all the next epoch depends on: model and optimizer weights, the random layers'
    generator states, early stopping's best loss, patience count and best weights, and the
    per-epoch history. Each save is a new numbered folder, renamed into place once whole, and
    only then are the older ones removed: the newest complete save is there at every moment.
    (`atomic_dir`'s swap under one name would leave none, had a kill come between its two renames.)
    The last epoch's save is marked done, so a run killed in a later phase does not train this one again.
    """

    def __init__(self, folder: Path, stopper: _EarlyStopping, epochs: int):
        super().__init__()
        self.folder, self.stopper, self.epochs = folder, stopper, epochs
        saved = sorted(p for p in folder.glob("[0-9]*") if p.is_dir())
        self.latest = saved[-1] if saved else None
        self.state = json.loads((self.latest / "state.json").read_text()) if self.latest else {}
        self.epoch: int = self.state.get("epoch", 0)  # epochs done
        self.done: bool = self.state.get("done", False)
        self.history: dict[str, list[float]] = self.state.get("history", {})

    def restore(self, model: keras.Model) -> None:
        if self.latest is None:
            return
        with model.distribute_strategy.scope():
            if not model.optimizer.built:
                model.optimizer.build(model.trainable_variables)
            model.load_weights(self.latest / "model.weights.h5")
            for variable, value in zip(_generator_states(model), self.state["generators"]):
                variable.assign(np.asarray(value, dtype=variable.dtype))
        self.stopper.best, self.stopper.best_epoch, self.stopper.wait = self.state["stopper"]
        if (self.latest / "best.npz").exists():
            with np.load(self.latest / "best.npz") as best:
                self.stopper.best_weights = [best[f"arr_{i}"] for i in range(len(best.files))]

    def restore_end(self, model: keras.Model) -> None:
        """Sets the weights the phase ended with: the best epoch's, as early stopping restored them."""
        self.restore(model)
        if self.stopper.best_weights is not None:
            model.set_weights(self.stopper.best_weights)

    def on_train_begin(self, logs=None):
        self.restore(self.model)  # after EarlyStopping's on_train_begin, which resets its state

    def on_epoch_end(self, epoch, logs=None):
        self.epoch = epoch + 1
        for name, value in (logs or {}).items():
            self.history.setdefault(name, []).append(float(value))
        number = int(self.latest.name) + 1 if self.latest else 1
        with atomic_path(self.folder / f"{number:06d}") as temp:  # the folder appears whole or not at all
            temp.mkdir()
            self.model.save_weights(temp / "model.weights.h5")
            if self.stopper.best_weights is not None:
                np.savez(temp / "best.npz", *self.stopper.best_weights)
            best = None if self.stopper.best is None else float(self.stopper.best)
            state = {
                "epoch": self.epoch,
                "done": bool(self.model.stop_training) or self.epoch >= self.epochs,
                "history": self.history,
                "generators": [np.asarray(v.numpy()).tolist() for v in _generator_states(self.model)],
                "stopper": [best, int(self.stopper.best_epoch), int(self.stopper.wait)],
            }
            (temp / "state.json").write_text(json.dumps(state))
        self.latest = self.folder / f"{number:06d}"
        for older in self.folder.glob("[0-9]*"):
            if older != self.latest:
                shutil.rmtree(older)


class _EarlyStopping(keras.callbacks.EarlyStopping):
    """Keras's early stopping, which never stops before `min_epochs` epochs; the best epoch is
    tracked from the first all the same (Keras's own start_from_epoch would ignore the early ones)."""

    def __init__(self, min_epochs: int, **kwargs):
        super().__init__(**kwargs)
        self.min_epochs = min_epochs

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if epoch + 1 < self.min_epochs:
            self.model.stop_training, self.stopped_epoch = False, 0


class _StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Raises a TrainError at the end of an epoch whose loss is NaN or infinite: nothing after it is worth keeping."""

    def __init__(self, phase: _Phase):
        super().__init__()
        self.phase = phase

    def on_epoch_end(self, epoch, logs=None):
        bad = ", ".join(f"{name} {float(value)}" for name, value in (logs or {}).items() if not math.isfinite(float(value)))
        if bad:
            where = f"epoch {epoch + 1}" + (" of fine-tuning" if self.phase.name == "fine_tune" else "")
            raise TrainError(f"train: {bad} in {where}: training stopped and no model was saved; "
                             f"lower {self.phase.rate_key} (now {self.phase.learning_rate:g}) and run again")  # fmt: skip


class _StopWhenAsked(keras.callbacks.Callback):
    """Raises Interrupted before the next batch once the run is stopped: the epochs backed up so far stay for the
    next run to resume from. (A batch's start, not its end: a batch-end hook would make Keras wait for every step.)"""

    def on_train_batch_begin(self, batch, logs=None):
        if stop_requested.is_set():
            raise Interrupted("train: interrupted; the next run resumes after the last finished epoch")


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


def _live(live_dir: Path):
    """Returns a fresh dvclive logger; in a git repo with no commit yet it logs without DVC's experiment view."""
    from dvclive import Live
    from scmrepo.exceptions import SCMError

    class RepoTolerantLive(Live):
        def _init_dvc(self):
            try:
                super()._init_dvc()
            except SCMError as exc:  # dvclive reads the current commit, and there is none
                log.warning("train: dvclive: %s; per-epoch metrics are still written to %s", exc, live_dir)

    return RepoTolerantLive(str(live_dir), resume=False, save_dvc_exp=False, dvcyaml=None)


def _log_epochs(live, history: dict[str, list[float]]) -> None:
    """Logs the epochs of the history to dvclive, one step each (train/loss, eval/loss, ...)."""
    from dvclive.utils import standardize_metric_name

    for epoch in range(len(next(iter(history.values()), []))):
        for name, values in history.items():
            live.log_metric(standardize_metric_name(name, "dvclive.keras"), values[epoch])
        live.next_step()


class _Curves(keras.callbacks.Callback):
    """Logs each epoch's metrics to dvclive, one step each."""

    def __init__(self, live):
        super().__init__()
        self.live = live

    def on_epoch_end(self, epoch, logs=None):
        _log_epochs(self.live, {name: [float(value)] for name, value in (logs or {}).items()})


def _save(model: keras.Model, data: CachedSet, params: TrainParams, augment: AugmentParams, precision: str,
          exclusion: Exclusion, model_dir: Path) -> Path:  # fmt: skip
    model_path = model_dir / "model.keras"
    with atomic_path(model_path) as temp:
        model.save(temp)
    described = {
        "classes": data.classes,
        "image_size": data.meta["image_size"],
        "channels": data.meta["channels"],
        "resize": data.meta["resize"],
        "recipe": params.recipe,
        # What train.precision resolved to: the dtype policy it trained in, which its saved layers carry.
        "precision": precision,
        # The settings the model was trained with: for recipe seed, the seed's, not the params file's.
        "train": params.model_dump(mode="json"),
        "augment": augment.model_dump(mode="json"),
        "exclude": exclusion.described(),  # train.exclude's file, its sha256 and how many paths it lists
    }
    write_json(model_dir / MODEL_JSON, described)
    lines: list[str] = []
    model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line))
    with atomic_file(model_dir / "summary.txt") as handle:
        handle.write("\n".join(lines) + "\n")
    return model_path
