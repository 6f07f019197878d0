"""The input pipeline: `tf.data` batches of uint8 images, read from the memory-mapped cache.

The cache is never loaded whole, nor as float32: each batch gathers its rows from the
`np.memmap` (the OS pages them in and out), so memory stays flat whatever the set's size.
Shuffling is seeded; rescaling and augmentation live in the model, not here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import tensorflow as tf

from tasks.errors import StageError
from tasks.files import read_csv


class DatasetError(StageError, ValueError):
    """The cache and the split disagree; the message names the file and the path."""


@dataclass(frozen=True)
class CachedSet:
    images: np.ndarray  # memmap (N, height, width, channels) uint8
    labels: np.ndarray  # (N,) int32 class index, per cache row
    classes: list[str]  # class names, sorted; index = label value
    rows: dict[str, np.ndarray]  # split name -> cache rows, in path order
    paths: list[str]  # cache row -> manifest path
    meta: dict  # the cache's meta.json


def load_cached_set(cache_dir: Path, split_csv: Path) -> CachedSet:
    """Returns the cache joined with the split: which rows are train, val and test."""
    images = np.load(cache_dir / "images.npy", mmap_mode="r")
    meta = json.loads((cache_dir / "meta.json").read_text())
    # Placed by their row, not by their line: labels[i] and paths[i] are images.npy's row i.
    index = sorted(read_csv(cache_dir / "index.csv"), key=lambda entry: int(entry["row"]))
    if [int(entry["row"]) for entry in index] != list(range(len(images))):
        raise DatasetError(f"{cache_dir}: index.csv does not list images.npy's {len(images)} rows once each "
                           "(re-run the cache stage)")  # fmt: skip
    row_of = {entry["path"]: int(entry["row"]) for entry in index}
    classes = sorted({entry["label"] for entry in index})
    number = {name: i for i, name in enumerate(classes)}
    labels = np.array([number[entry["label"]] for entry in index], dtype=np.int32)
    rows: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for entry in read_csv(split_csv):
        if entry["path"] not in row_of:
            raise DatasetError(f"{split_csv}: {entry['path']} is not in {cache_dir} (re-run the cache stage)")
        rows[entry["split"]].append(row_of[entry["path"]])
    return CachedSet(
        images=images,
        labels=labels,
        classes=classes,
        rows={name: np.array(sorted(found), dtype=np.int64) for name, found in rows.items()},
        paths=[entry["path"] for entry in index],
        meta=meta,
    )


def without(data: CachedSet, paths: frozenset[str], splits: tuple[str, ...]) -> CachedSet:
    """Returns `data` with the images at `paths` left out of `splits` (train.exclude)."""
    kept = {name: np.array([row for row in data.rows[name] if data.paths[row] not in paths], dtype=np.int64)
            for name in splits}  # fmt: skip
    return replace(data, rows=data.rows | kept)


def make_dataset(data: CachedSet, split: str, batch_size: int, shuffle: bool = False, seed: int = 0) -> tf.data.Dataset:
    """Returns batches of (uint8 images, int32 labels) for one split; reshuffled each epoch when asked."""
    rows = data.rows[split]
    height, width, channels = data.images.shape[1:]

    def gather(batch_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Read the memmap in ascending row order (sequential on disk), then restore the batch order.
        order = np.argsort(batch_rows)
        images = np.empty((len(batch_rows), height, width, channels), dtype=np.uint8)
        images[order] = data.images[batch_rows[order]]
        return images, data.labels[batch_rows]

    def load(batch_rows: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        images, labels = tf.numpy_function(gather, [batch_rows], [tf.uint8, tf.int32], stateful=False)
        images.set_shape([None, height, width, channels])
        labels.set_shape([None])
        return images, labels

    dataset = tf.data.Dataset.from_tensor_slices(rows)
    if shuffle:
        dataset = dataset.shuffle(len(rows), seed=seed, reshuffle_each_iteration=True)
    options = tf.data.Options()
    # Across hosts, each worker takes its share of every batch (there are no files to split).
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = dataset.with_options(options)
    return dataset.batch(batch_size).map(load, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
