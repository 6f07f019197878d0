"""Validate + cache speed and memory against the seed notebook's ways, measured in one run.

Builds (once, then reuses) a malaria-sized set: 27,558 PNG cells of 100-200 px in two class
folders, like the NIH archive after extraction. PNG decoding speed depends on the writer:
`--encoder opencv` (the default) writes like `cv2.imwrite` (the Sub filter on every row, fast
deflate); `--encoder libpng` writes like libpng's defaults, as Pillow, TensorFlow and most
tools do (a filter chosen per row, Paeth and Average among them). Then, each in a fresh process
so peak memory is its own:
  ours        the extracted folder -> validate (manifest, cache rows staged) -> cache: what a user
              waits for, on all cores, each image decoded once
  ours-twice  the same without staging: validate decodes to judge, cache decodes again
  cv2-loop    the seed notebook: for each file cv2.imread, cvtColor(BGR2RGB), resize, append
  tf-dir      one pass of tf.keras.utils.image_dataset_from_directory at the same size
Each method runs `--repeat` times (default 2), round after round, and its fastest run counts:
on a machine others share, the runs a busy spell slowed are dropped, from every method alike.
Prints images/s, peak RSS (the process and its workers) and each rate as a ratio to the
cv2 loop measured in the same run. Targets: ours >= 2x the cv2 loop, peak < 1 GB at 64x64.

    python benchmarks/bench_cache.py [--images 27558] [--size 64] [--encoder opencv|libpng] [--data DIR] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


ENCODERS = ("opencv", "libpng")


def png_writer(encoder: str):
    """Returns a function of RGB pixels -> PNG bytes, written the way `encoder` writes them."""
    import cv2
    import imagecodecs

    if encoder == "opencv":
        return lambda rgb: cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()
    return imagecodecs.png_encode


def build_set(data: Path, images: int, encoder: str = "opencv") -> Path:
    """Returns a folder of class folders with `images` PNGs in all, made once."""
    import numpy as np

    from tasks.demo_data import CLASSES, _cell

    done = data / f".complete-{images}"
    if done.exists():
        return data
    rng = np.random.default_rng(0)
    write_png = png_writer(encoder)
    started = time.perf_counter()
    for index in range(images):
        label = CLASSES[index % 2]
        folder = data / label
        folder.mkdir(parents=True, exist_ok=True)
        rgb = _cell(rng, label == "Parasitized")
        (folder / f"C{index % 200}P{index % 97}_cell_{index:06d}.png").write_bytes(write_png(rgb))
    done.touch()
    print(f"built {images} PNGs in {data} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return data


def peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, workers) / 1024


def run_ours(data: Path, size: int, stage: bool = True) -> dict:
    from tasks.cache import cache
    from tasks.params import PrepareParams, ValidateParams
    from tasks.rows import Staging
    from tasks.validate import validate

    prepare = PrepareParams(image_size=size)
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as temp:
        work = Path(temp)
        staging = Staging(prepare, work / "cache-staging") if stage else None
        started = time.perf_counter()
        manifest = validate(ValidateParams(), data, work / "manifest.csv", staging=staging)
        result = cache(prepare, manifest, data, work / "cache", staging_dir=staging.folder if staging else None)
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "images": result.decoded + result.staged + result.reused}


def run_ours_twice(data: Path, size: int) -> dict:
    return run_ours(data, size, stage=False)


def run_cv2_loop(data: Path, size: int) -> dict:
    import cv2
    import numpy as np

    started = time.perf_counter()
    images, labels = [], []
    for label in sorted(os.listdir(data)):
        folder = data / label
        if not folder.is_dir():
            continue
        for name in sorted(os.listdir(folder)):
            try:
                image = cv2.imread(str(folder / name))
                image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
                images.append(cv2.resize(image, (size, size)))
                labels.append(label)
            except Exception:
                continue
    np.array(images)
    return {"seconds": time.perf_counter() - started, "images": len(images)}


def run_tf_dir(data: Path, size: int) -> dict:
    import tensorflow as tf

    started = time.perf_counter()
    dataset = tf.keras.utils.image_dataset_from_directory(
        str(data), image_size=(size, size), batch_size=32, shuffle=False, verbose=False
    )
    count = sum(int(images.shape[0]) for images, _ in dataset)
    return {"seconds": time.perf_counter() - started, "images": count}


METHODS = {"ours": run_ours, "ours-twice": run_ours_twice, "cv2-loop": run_cv2_loop, "tf-dir": run_tf_dir}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=27_558)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--encoder", choices=ENCODERS, default="opencv", help="how the PNGs are written")
    parser.add_argument("--data", type=Path, help="where the set is built (default: benchmarks/.data/cells[-ENCODER])")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each method; the fastest counts")
    parser.add_argument("--only", choices=list(METHODS), help=argparse.SUPPRESS)  # one method, in a child
    args = parser.parse_args()
    if args.only:
        figures = METHODS[args.only](args.data, args.size)
        print(json.dumps(figures | {"peak_rss_mb": peak_rss_mb()}))
        return
    if args.data is None:
        args.data = ROOT / "benchmarks" / ".data" / ("cells" if args.encoder == "opencv" else f"cells-{args.encoder}")
    build_set(args.data, args.images, args.encoder)
    results: dict[str, dict] = {}
    for _ in range(args.repeat):  # round after round, so a busy spell on a shared machine hits every method alike
        for name in METHODS:
            child = [sys.executable, __file__, "--only", name, "--size", str(args.size), "--data", str(args.data)]
            output = subprocess.run(child, check=True, capture_output=True, text=True,
                                    env=os.environ | {"TF_CPP_MIN_LOG_LEVEL": "3"})  # fmt: skip
            figures = json.loads(output.stdout.strip().splitlines()[-1])
            best = results.setdefault(name, figures)
            if figures["seconds"] < best["seconds"]:
                best.update(seconds=figures["seconds"], images=figures["images"])
            best["peak_rss_mb"] = max(best["peak_rss_mb"], figures["peak_rss_mb"])
    baseline = results["cv2-loop"]["images"] / results["cv2-loop"]["seconds"]
    print(f"validate + cache benchmark: {args.images} PNGs of 100-200 px written by {args.encoder} -> "
          f"{args.size}x{args.size}, {os.cpu_count()} cores, fastest of {args.repeat} runs each")  # fmt: skip
    print(f"{'method':<10} {'images':>7} {'seconds':>8} {'images/s':>9} {'vs cv2-loop':>12} {'peak RSS MB':>12}")
    for name, figures in results.items():
        rate = figures["images"] / figures["seconds"]
        print(f"{name:<10} {figures['images']:>7} {figures['seconds']:>8.1f} {rate:>9.0f} {rate / baseline:>11.2f}x "
              f"{figures['peak_rss_mb']:>12.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
