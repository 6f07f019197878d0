"""Training input speed and memory: our tf.data pipeline against its upper bound and the seed's way.

On the malaria-sized set of bench_cache.py (27,558 PNGs, built once), cached at 64x64, the
seed CNN with the default augmentation trains for the same number of steps fed three ways,
each in a fresh process:
  ours        tf.data over the memory-mapped uint8 cache, augmentation layers in the model
  in-memory   the same model fed from the train images pre-loaded as one in-memory tensor
              (the upper bound: no input cost at all)
  seed-idg    ImageDataGenerator(rescale, rotation, flip).flow_from_directory over the PNGs,
              as the seed notebook (decodes every image every epoch)
Target: ours >= 0.9x in-memory. Each feed runs under every precision of --precisions
(default: float32, and what `train.precision: auto` picks on this CPU when that differs,
e.g. mixed_bfloat16 on a CPU with AVX512_BF16), with its speed-up over float32. Then memory:
one epoch of our input pipeline over a 27,558-image cache at 224x224 (a 4.1 GB file), peak
anonymous memory (RssAnon) sampled every 10 ms. Target: under 2 GB.

    python benchmarks/bench_train.py [--steps 120] [--precisions float32,mixed_bfloat16] [--skip-memory]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

DATA = ROOT / "benchmarks" / ".data"
BATCH = 32


def auto_precision() -> str:
    """Returns what `train.precision: auto` picks on this machine's CPU."""
    from tasks.train import cpu_flags, resolve_precision

    return resolve_precision("auto", 0, cpu_flags())


def prepared(size: int) -> Path:
    """Returns a folder with cache/ at `size` and split.csv for the benchmark set, made once."""
    from bench_cache import build_set

    from tasks.cache import cache
    from tasks.params import PrepareParams, SplitParams, ValidateParams
    from tasks.split import split
    from tasks.validate import validate

    cells = build_set(DATA / "cells", 27_558)
    manifest = DATA / "manifest.csv"
    if not manifest.exists():
        validate(ValidateParams(), cells, manifest)
    root = DATA / f"prepared-{size}"
    if not (root / "split.csv").exists():
        cache(PrepareParams(image_size=size), manifest, cells, root / "cache")
        split(SplitParams(), manifest, root / "split.csv")
    return root


def _model(with_input_layers: bool, precision: str):
    import keras

    from tasks.model import Head, _cnn_body, build_model
    from tasks.params import AugmentParams, TrainParams

    keras.mixed_precision.set_global_policy(precision)
    params = TrainParams()
    if with_input_layers:
        model, _ = build_model(params, AugmentParams(), (64, 64), 3, 2)
    else:  # the generator already rescales and augments: the same CNN on its float input
        inputs = keras.Input((64, 64, 3))
        model = keras.Model(inputs, Head(2).layer()(_cnn_body(inputs, params.cnn)))
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    return model


def _timed_fit(model, dataset, steps: int) -> dict:
    """Returns images per second and per CPU second (this process's threads: other work on a shared
    machine moves the first more than the second)."""
    model.fit(dataset, epochs=1, steps_per_epoch=10, verbose=0)  # tracing and warm-up
    started, cpu = time.perf_counter(), time.process_time()
    model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0)
    images = steps * BATCH
    return {"images_per_s": images / (time.perf_counter() - started), "images_per_cpu_s": images / (time.process_time() - cpu)}


def run_ours(steps: int, precision: str) -> dict:
    import keras

    from tasks.dataset import load_cached_set, make_dataset

    keras.utils.set_random_seed(0)
    data = load_cached_set(prepared(64) / "cache", prepared(64) / "split.csv")
    return _timed_fit(_model(True, precision), make_dataset(data, "train", BATCH, shuffle=True).repeat(), steps)


def run_in_memory(steps: int, precision: str) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    from tasks.dataset import load_cached_set

    keras.utils.set_random_seed(0)
    data = load_cached_set(prepared(64) / "cache", prepared(64) / "split.csv")
    rows = data.rows["train"]
    images, labels = np.asarray(data.images[rows]), data.labels[rows]
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).shuffle(len(rows), seed=0).batch(BATCH).repeat()
    return _timed_fit(_model(True, precision), dataset.prefetch(tf.data.AUTOTUNE), steps)


def run_seed_idg(steps: int, precision: str) -> dict:
    import keras

    # Keras 3 keeps ImageDataGenerator only as a legacy class, no longer exported.
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    keras.utils.set_random_seed(0)
    generator = ImageDataGenerator(rescale=1.0 / 255, rotation_range=36, horizontal_flip=True)
    flow = generator.flow_from_directory(str(DATA / "cells"), target_size=(64, 64), batch_size=BATCH,
                                         class_mode="binary", seed=0)  # fmt: skip
    return _timed_fit(_model(False, precision), flow, steps)


def run_memory(_: int, __: str) -> dict:
    import numpy as np

    from tasks.dataset import CachedSet, load_cached_set, make_dataset

    data = load_cached_set(prepared(224) / "cache", prepared(224) / "split.csv")
    everything = CachedSet(data.images, data.labels, data.classes, {"all": np.arange(len(data.labels))}, data.paths, data.meta)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak[0] = max(peak[0], int(line.split()[1]))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started, count = time.perf_counter(), 0
    for images, _ in make_dataset(everything, "all", BATCH, shuffle=True):
        count += int(images.shape[0])
    done.set()
    sampler.join()
    return {"images": count, "seconds": time.perf_counter() - started, "peak_rss_anon_mb": peak[0] / 1024,
            "cache_gb": data.images.nbytes / 1e9}  # fmt: skip


METHODS = {"ours": run_ours, "in-memory": run_in_memory, "seed-idg": run_seed_idg, "memory": run_memory}


def child(name: str, steps: int, precision: str = "float32") -> dict:
    command = [sys.executable, __file__, "--only", name, "--steps", str(steps), "--precisions", precision]
    output = subprocess.run(command, check=True, capture_output=True, text=True,
                            cwd=Path(__file__).parent)  # fmt: skip
    return json.loads(output.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120, help="timed training steps of 32 images per method")
    parser.add_argument("--precisions", default=",".join(dict.fromkeys(["float32", auto_precision()])),
                        help="comma-separated Keras dtype policies (default: float32 and auto's choice here)")  # fmt: skip
    parser.add_argument("--skip-memory", action="store_true", help="skip the 224x224 memory check (builds a 4 GB cache)")
    parser.add_argument("--only", choices=list(METHODS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    precisions = args.precisions.split(",")
    if args.only:
        print(json.dumps(METHODS[args.only](args.steps, precisions[0])))
        return
    prepared(64)
    feeds = ("ours", "in-memory", "seed-idg")
    # A feed's precisions back to back: the ratio between them sees the least drift in the machine's other work.
    speeds = {(name, precision): child(name, args.steps, precision) for name in feeds for precision in precisions}
    print(f"training input benchmark: seed CNN + default augmentation, 64x64, batch {BATCH}, "
          f"{args.steps} steps, {os.cpu_count()} cores")  # fmt: skip
    print(f"{'feed':<10} {'precision':<15} {'images/s':>9} {'vs in-memory':>13} {'vs float32':>11} "
          f"{'per CPU s':>10} {'vs float32':>11}")  # fmt: skip
    for (name, precision), speed in speeds.items():
        baseline = speeds.get((name, "float32"))
        ratios = [f"{speed[key] / baseline[key]:.2f}x" if baseline else "-" for key in ("images_per_s", "images_per_cpu_s")]
        rate, memory_rate = speed["images_per_s"], speeds["in-memory", precision]["images_per_s"]
        print(f"{name:<10} {precision:<15} {rate:>9.0f} {rate / memory_rate:>12.2f}x {ratios[0]:>11} "
              f"{speed['images_per_cpu_s']:>10.0f} {ratios[1]:>11}")  # fmt: skip
    if not args.skip_memory:
        prepared(224)
        memory = child("memory", 0)
        print(f"one epoch of our pipeline at 224x224 over {memory['images']} cached images "
              f"({memory['cache_gb']:.1f} GB cache): {memory['images'] / memory['seconds']:.0f} images/s, "
              f"peak RssAnon {memory['peak_rss_anon_mb']:.0f} MB")  # fmt: skip


if __name__ == "__main__":
    main()
