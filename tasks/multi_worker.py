"""Training across hosts: a plain loop under MultiWorkerMirroredStrategy (TF_CONFIG names the hosts).

Keras 3's `fit` does not run under MultiWorkerMirroredStrategy (keras-team/keras#20585), so
the multi-worker path steps the same model with `strategy.run`: each worker takes its share
of every global batch (the dataset is sharded by data), gradients are all-reduced, and the
loss is averaged over the examples the global batch holds, as `fit` does in one process.
Under mixed_float16 the optimizer scales the loss, as `compile` would arrange.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from tasks.model import Head


def make_step(model: keras.Model, strategy: tf.distribute.Strategy, learning_rate: float, n_classes: int,
              class_weight: dict[int, float] | None) -> tuple[Callable, keras.optimizers.Optimizer]:  # fmt: skip
    """Returns (step, optimizer): step(images, labels) trains on one global batch, returns (its mean loss, its size)."""
    scaling = keras.mixed_precision.global_policy().name == "mixed_float16"
    with strategy.scope():
        optimizer = keras.optimizers.Adam(learning_rate)
        if scaling:
            # float16 gradients underflow to zero: scale the loss up, and the gradients back down before the update.
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(model.trainable_variables)  # here, not inside the replicas' first step
    head = Head(n_classes)
    loss_fn = head.loss(reduction=None)
    weights = tf.constant([(class_weight or {}).get(i, 1.0) for i in range(n_classes)], dtype=tf.float32)

    def replica_step(images, labels):
        context = tf.distribute.get_replica_context()
        local = tf.cast(tf.shape(labels)[0], tf.float32)
        # The mean over the examples this global batch holds: a partial last batch is not divided by the full size.
        examples = context.all_reduce(tf.distribute.ReduceOp.SUM, local)
        with tf.GradientTape() as tape:
            probabilities = tf.cast(model(images, training=True), tf.float32)
            per_example = loss_fn(head.targets(labels), probabilities) * tf.gather(weights, labels)
            loss = tf.reduce_sum(per_example) / tf.maximum(examples, 1.0)
            scaled = optimizer.scale_loss(loss)  # the loss itself unless loss scaling is on
        gradients = tape.gradient(scaled, model.trainable_variables)
        if scaling:
            # The loss-scale optimizer skips a step whose gradients overflow, judging this replica's
            # alone; all must agree, or one skips the gradient all-reduce the others wait in.
            finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in gradients])
            overflowed = context.all_reduce(tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(finite, tf.float32))
            gradients = [g + tf.cast(tf.where(overflowed > 0, float("nan"), 0.0), g.dtype) for g in gradients]
        optimizer.apply(gradients, model.trainable_variables)  # unscales the gradients, all-reduces them, steps
        return loss, local

    @tf.function(reduce_retracing=True)
    def step(images, labels):
        loss, examples = strategy.run(replica_step, args=(images, labels))
        total = strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)
        return total, strategy.reduce(tf.distribute.ReduceOp.SUM, examples, axis=None)

    return step, optimizer


def fit_multi_worker(model: keras.Model, strategy: tf.distribute.Strategy,
                     epoch_batches: Callable[[int], tf.data.Dataset], epochs: int, learning_rate: float,
                     n_classes: int, class_weight: dict[int, float] | None,
                     callbacks: Sequence[keras.callbacks.Callback] = ()) -> tuple[dict[str, list[float]], float]:  # fmt: skip
    """Returns ({"loss": per-epoch mean loss}, training images/s) after epochs of `epoch_batches(epoch)`;
    each callback's on_epoch_end(epoch, {"loss": ...}) runs after each epoch, as under `fit`."""
    step, _ = make_step(model, strategy, learning_rate, n_classes, class_weight)
    history: dict[str, list[float]] = {"loss": []}
    rates = []
    for epoch in range(epochs):
        started, total, seen = time.perf_counter(), 0.0, 0.0
        for images, labels in strategy.experimental_distribute_dataset(epoch_batches(epoch)):
            loss, examples = step(images, labels)
            total, seen = total + float(loss) * float(examples), seen + float(examples)
        rates.append(seen / (time.perf_counter() - started))
        history["loss"].append(total / max(seen, 1.0))
        for callback in callbacks:
            callback.on_epoch_end(epoch, {"loss": history["loss"][-1]})
    steady = rates[1:] or rates
    return history, float(np.median(steady))


def local_scores(model: keras.Model, dataset: tf.data.Dataset, n_classes: int) -> dict[str, float]:
    """Returns {"loss", "accuracy"} of the model over the whole dataset, computed in this process alone."""
    losses, correct, count = [], 0, 0
    head = Head(n_classes)
    loss_fn = head.loss(reduction=None)
    for images, labels in dataset:
        probabilities = tf.cast(model(images, training=False), tf.float32)
        losses.append(loss_fn(head.targets(labels), probabilities).numpy())
        predicted = head.probabilities(probabilities.numpy()).argmax(axis=1)
        correct += int((predicted == labels.numpy()).sum())
        count += len(predicted)
    return {"loss": float(np.concatenate(losses).mean()), "accuracy": correct / max(count, 1)}
