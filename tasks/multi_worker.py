"""Training across hosts: a plain loop under MultiWorkerMirroredStrategy (TF_CONFIG names the hosts).

Keras 3's `fit` does not run under MultiWorkerMirroredStrategy (keras-team/keras#20585), so
the multi-worker path steps the same model with `strategy.run`: each worker takes its share
of every global batch (the dataset is sharded by data), gradients are all-reduced, and the
loss is averaged over the global batch.
"""

from __future__ import annotations

import time

import keras
import numpy as np
import tensorflow as tf


def _per_example_loss(n_classes: int) -> keras.losses.Loss:
    loss = keras.losses.BinaryCrossentropy if n_classes == 2 else keras.losses.SparseCategoricalCrossentropy
    return loss(reduction=None)


def fit_multi_worker(model: keras.Model, strategy: tf.distribute.Strategy, dataset: tf.data.Dataset, epochs: int,
                     learning_rate: float, n_classes: int, global_batch: int, class_weight: dict[int, float] | None,
                     on_epoch=None) -> tuple[dict[str, list[float]], float]:  # fmt: skip
    """Returns ({"loss": per-epoch mean loss}, training images/s) after `epochs` passes over `dataset`."""
    binary = n_classes == 2
    with strategy.scope():
        optimizer = keras.optimizers.Adam(learning_rate)
    loss_fn = _per_example_loss(n_classes)
    weights = tf.constant([(class_weight or {}).get(i, 1.0) for i in range(n_classes)], dtype=tf.float32)

    def replica_step(images, labels):
        with tf.GradientTape() as tape:
            probabilities = tf.cast(model(images, training=True), tf.float32)
            targets = tf.cast(labels, tf.float32)[:, None] if binary else labels
            per_example = loss_fn(targets, probabilities) * tf.gather(weights, labels)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss

    @tf.function
    def step(images, labels):
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(replica_step, args=(images, labels)), axis=None)

    distributed = strategy.experimental_distribute_dataset(dataset)
    history: dict[str, list[float]] = {"loss": []}
    rates = []
    for epoch in range(epochs):
        started, total, batches = time.perf_counter(), 0.0, 0
        for images, labels in distributed:
            total += float(step(images, labels))
            batches += 1
        rates.append(batches * global_batch / (time.perf_counter() - started))
        history["loss"].append(total / max(batches, 1))
        if on_epoch is not None:
            on_epoch(epoch, history["loss"][-1])
    steady = rates[1:] or rates
    return history, float(np.median(steady))


def local_scores(model: keras.Model, dataset: tf.data.Dataset, n_classes: int) -> dict[str, float]:
    """Returns {"loss", "accuracy"} of the model over the whole dataset, computed in this process alone."""
    losses, correct, count = [], 0, 0
    loss_fn = _per_example_loss(n_classes)
    for images, labels in dataset:
        probabilities = tf.cast(model(images, training=False), tf.float32)
        if n_classes == 2:
            losses.append(loss_fn(tf.cast(labels, tf.float32)[:, None], probabilities).numpy())
            predicted = (probabilities.numpy()[:, 0] >= 0.5).astype(np.int32)
        else:
            losses.append(loss_fn(labels, probabilities).numpy())
            predicted = probabilities.numpy().argmax(axis=1)
        correct += int((predicted == labels.numpy()).sum())
        count += len(predicted)
    return {"loss": float(np.concatenate(losses).mean()), "accuracy": correct / max(count, 1)}
