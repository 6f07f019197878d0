"""The whole run, side by side: `imgclf run` from a URL to metrics/eval.json against the seed notebook's path.

On the malaria-sized set of bench_cache.py (27,558 PNG cells of 100-200 px, built once),
zipped as the NIH archive is (`cell_images/<class>/*.png`, deflated) and served over loopback
HTTP, each path in a fresh process, in the same run:
  ours   `imgclf init DIR --url URL`, then `imgclf run --set train.epochs=E --set train.patience=0
         evaluate` in DIR: params.yaml's defaults otherwise (the default recipe, `train.precision:
         auto`, DVC commits after each stage), from the URL to metrics/eval.json. Each stage's time
         is its Prefect task run's, as the flow recorded it; "other" is the rest of the wall time
         (start-up, Prefect's server, versioning at the end). Then, timed apart, the same `imgclf
         run` without the target: the release stages the seed's path has no counterpart for
         (export, publish with its gate, report; the rest skipped), and the whole run's ratio.
  seed   the notebook in one script: urllib download, zipfile extract,
         `ImageDataGenerator(rescale=1/255.0, validation_split=v).flow_from_directory(...,
         class_mode='binary', batch_size=64, subset='training' / 'validation')` (still
         importable as `tensorflow.keras.preprocessing.image.ImageDataGenerator` in Keras 3; it
         decodes every PNG every epoch), the notebook's Conv2D/MaxPooling CNN, Adam, binary
         cross-entropy, `fit(train, validation_data=val, epochs=E)`, float32.
Equal work: the same image size (prepare.image_size), epochs, and train and val sizes (v is
chosen so the seed's training subset is as large as our train split); our test split's files
are set aside from the seed's folder after unzipping (not timed), and both models are scored
on them. Prints both wall times, the ratio, our stages' shares, the share of everything but
training, test accuracy of both, and the CPU seconds each used (other work on a shared
machine moves wall times, less so CPU time). Targets (issue 14): ours >= 1.8x faster, our
accuracy >= the seed's - 0.01, everything but training <= 10% of our wall time.

    python benchmarks/bench_e2e.py [--images 27558] [--epochs 10]
"""

from __future__ import annotations

import argparse
import csv
import functools
import http.server
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT / "benchmarks" / ".data"
FULL = 27_558
SEED_BATCH = 64  # the notebook's


def archive(images: int) -> Path:
    """Returns a zip of `images` malaria-like PNGs as cell_images/<class>/<name>.png, made once."""
    from bench_cache import build_set

    cells = build_set(DATA / "cells" if images == FULL else DATA / f"cells-{images}", images)
    out = DATA / "e2e" / f"cell_images-{images}.zip"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".part")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as zipped:
        for path in sorted(cells.glob("*/*.png")):
            zipped.write(path, f"cell_images/{path.parent.name}/{path.name}")
    partial.rename(out)
    return out


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # a line per request would bury the report
        pass


def serve(directory: Path) -> http.server.ThreadingHTTPServer:
    """Returns a loopback HTTP server of `directory`, serving from a daemon thread."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str], cwd: Path, env: dict) -> tuple[float, float, str]:
    """Returns (wall seconds, CPU seconds of it and its children, stdout) of a command that must succeed."""
    cpu, started = children_cpu_seconds(), time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode:
        sys.exit(f"bench_e2e: {' '.join(command[:3])} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return wall, children_cpu_seconds() - cpu, result.stdout


# Run with the project's PREFECT_HOME: Prefect's ephemeral API over the database the run wrote.
TASK_RUNS = """
import asyncio, json
from prefect.client.orchestration import get_client

async def main():
    async with get_client() as client:
        runs = await client.read_task_runs()
    print(json.dumps({str(run.id): [run.name, run.total_run_time.total_seconds(), run.state_name] for run in runs}))

asyncio.run(main())
"""


def task_runs(env: dict, cwd: Path) -> dict[str, list]:
    """Returns {task run id: [name, seconds, state name]} from PREFECT_HOME's database (made, if new: a usual run finds it there)."""
    output = subprocess.run([sys.executable, "-c", TASK_RUNS], cwd=cwd, env=env, check=True, capture_output=True, text=True)
    return json.loads(output.stdout.strip().splitlines()[-1])


def stage_seconds(env: dict, project: Path, before: dict[str, list]) -> dict[str, float]:
    """Returns {stage: seconds} of the stage task runs since `before` (task_runs), as Prefect recorded them, in
    dvc.yaml's order; skipped stages left out."""
    import yaml

    runs = [(name, seconds) for run_id, (name, seconds, state) in task_runs(env, project).items()
            if run_id not in before and state != "Skipped"]  # fmt: skip
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    # Task runs are named for what ran (cache-64x64, train-cnn-e10): the stage is the first word.
    found = {stage: sum(s for name, s in runs if name == stage or name.startswith(f"{stage}-")) for stage in stages}
    return {stage: seconds for stage, seconds in found.items() if seconds}


def run_ours(url: str, epochs: int, base: Path, env: dict) -> dict:
    project = base / "project"
    subprocess.run(["imgclf", "init", str(project), "--url", url], env=env, check=True, capture_output=True)
    before = task_runs(env, project)  # Prefect creates its database outside the timed run
    settings = ["--set", f"train.epochs={epochs}", "--set", "train.patience=0"]
    # The seed's path ends at a test score: ours to metrics/eval.json, then (apart) the release stages.
    wall, cpu, _ = timed(["imgclf", "run", *settings, "evaluate"], project, env)
    stages = stage_seconds(env, project, before)
    before = task_runs(env, project)
    release_wall, _, _ = timed(["imgclf", "run", *settings], project, env)
    release = stage_seconds(env, project, before)
    trained = json.loads((project / "metrics" / "train.json").read_text())
    if trained["epochs_run"] != epochs:
        sys.exit(f"bench_e2e: imgclf run trained {trained['epochs_run']} epochs, not {epochs}: not equal work")
    scores = json.loads((project / "metrics" / "eval.json").read_text())
    with open(project / "data" / "split.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {"seconds": wall, "cpu_seconds": cpu, "stages": stages, "release_seconds": release_wall, "release": release,
            "train_fit_seconds": trained["seconds"], "precision": trained["precision"],
            "image_size": json.loads((project / "models" / "model.json").read_text())["image_size"],
            "n_train": trained["n_train"], "n_val": trained["n_val"], "accuracy": scores["accuracy"],
            "n_test": scores["n_test"], "test_paths": [row["path"] for row in rows if row["split"] == "test"]}  # fmt: skip


def seed_notebook(url: str, epochs: int, image_size: list[int], n_train: int, n_val: int, test_paths: list[str],
                  folder: Path) -> dict:  # fmt: skip
    """The seed notebook's path in this process; returns its phases' seconds, sizes and test accuracy."""
    import urllib.request

    started = time.perf_counter()
    zip_path = folder / "cell_images.zip"
    urllib.request.urlretrieve(url, zip_path)
    downloaded = time.perf_counter()
    with zipfile.ZipFile(zip_path) as zipped:
        zipped.extractall(folder)
    unzipped = time.perf_counter()
    # Not the notebook's: our test split's files set aside, so both models are scored on the same images.
    for path in test_paths:
        (folder / "test" / path).parent.mkdir(parents=True, exist_ok=True)
        os.rename(folder / "cell_images" / path, folder / "test" / path)
    set_aside = time.perf_counter() - unzipped

    import keras
    from tensorflow.keras import layers
    from tensorflow.keras.models import Sequential
    from tensorflow.keras.preprocessing.image import ImageDataGenerator

    keras.utils.set_random_seed(42)  # not the notebook's: reruns of the benchmark draw the same
    height, width = image_size
    datagen = ImageDataGenerator(rescale=1 / 255.0, validation_split=n_val / (n_train + n_val))
    flow = functools.partial(datagen.flow_from_directory, directory=str(folder / "cell_images"),
                             target_size=(height, width), class_mode="binary", batch_size=SEED_BATCH)  # fmt: skip
    train, val = flow(subset="training"), flow(subset="validation")
    model = Sequential([
        layers.Input((height, width, 3)),
        layers.Conv2D(32, (3, 3), activation="relu"),
        layers.MaxPooling2D((2, 2)),
        layers.Conv2D(64, (3, 3), activation="relu"),
        layers.MaxPooling2D((2, 2)),
        layers.Conv2D(64, (3, 3), activation="relu"),
        layers.Flatten(),
        layers.Dense(64, activation="relu"),
        layers.Dense(1, activation="sigmoid"),
    ])  # fmt: skip
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    fit_started = time.perf_counter()
    model.fit(train, validation_data=val, epochs=epochs, verbose=2)
    trained = time.perf_counter()
    test = ImageDataGenerator(rescale=1 / 255.0).flow_from_directory(
        str(folder / "test"), target_size=(height, width), class_mode="binary", batch_size=SEED_BATCH, shuffle=False)
    _, accuracy = model.evaluate(test, verbose=0)
    ended = time.perf_counter()
    return {"download": downloaded - started, "unzip": unzipped - downloaded, "setup": fit_started - unzipped - set_aside,
            "train": trained - fit_started, "test": ended - trained, "set_aside": set_aside,
            "n_train": train.samples, "n_val": val.samples, "n_test": test.samples, "accuracy": float(accuracy)}  # fmt: skip


def run_seed(url: str, epochs: int, ours: dict, base: Path, env: dict) -> dict:
    """Runs the seed notebook's path in a fresh process; returns its figures, wall time and CPU seconds."""
    folder = base / "seed"
    folder.mkdir()
    job = {"url": url, "epochs": epochs, "image_size": ours["image_size"], "n_train": ours["n_train"],
           "n_val": ours["n_val"], "test_paths": ours["test_paths"], "folder": str(folder)}  # fmt: skip
    (base / "seed.json").write_text(json.dumps(job))
    wall, cpu, stdout = timed([sys.executable, __file__, "--seed-job", str(base / "seed.json")], ROOT, env)
    figures = json.loads(stdout.strip().splitlines()[-1])
    # The test files' set-aside is not the notebook's: its wall time without it.
    return figures | {"seconds": wall - figures["set_aside"], "cpu_seconds": cpu}


def report(images: int, epochs: int, ours: dict, seed: dict) -> str:
    ratio = seed["seconds"] / ours["seconds"]
    accuracy_gap = ours["accuracy"] - seed["accuracy"]
    train_share = ours["stages"].get("train", 0.0) / ours["seconds"]
    height, width = ours["image_size"]
    lines = [
        f"whole-run benchmark: {images} PNGs zipped, served over loopback HTTP, {height}x{width}, {epochs} epochs, "
        f"{os.cpu_count()} cores",
        f"{'path':<22} {'seconds':>8} {'CPU s':>7} {'train':>6} {'val':>6} {'test':>6} {'test accuracy':>14}",
        f"{'seed notebook':<22} {seed['seconds']:>8.1f} {seed['cpu_seconds']:>7.0f} {seed['n_train']:>6} "
        f"{seed['n_val']:>6} {seed['n_test']:>6} {seed['accuracy']:>14.4f}",
        f"{'imgclf run':<22} {ours['seconds']:>8.1f} {ours['cpu_seconds']:>7.0f} {ours['n_train']:>6} "
        f"{ours['n_val']:>6} {ours['n_test']:>6} {ours['accuracy']:>14.4f}",
        f"ours is {ratio:.2f}x the seed's speed (target >= 1.8x: {'ok' if ratio >= 1.8 else 'MISSED'}); "
        f"accuracy {accuracy_gap:+.4f} (target >= -0.01: {'ok' if accuracy_gap >= -0.01 else 'MISSED'})",
        f"seed phases: download {seed['download']:.1f} s, unzip {seed['unzip']:.1f} s, "
        f"imports, model and generators {seed['setup']:.1f} s, training {seed['train']:.1f} s "
        f"({seed['n_train'] * epochs / seed['train']:.0f} images/s, validation included), test {seed['test']:.1f} s",
        f"our stages ({ours['precision']}), Prefect task-run times:",
    ]
    for stage, seconds in ours["stages"].items():
        lines.append(f"  {stage:<16} {seconds:>7.1f} s {seconds / ours['seconds']:>6.1%}")
    other = ours["seconds"] - sum(ours["stages"].values())
    lines.append(f"  {'other':<16} {other:>7.1f} s {other / ours['seconds']:>6.1%}  (start-up, Prefect, versioning)")
    lines.append(f"  train's fit loop alone: {ours['train_fit_seconds']:.1f} s "
                 f"({ours['n_train'] * epochs / ours['train_fit_seconds']:.0f} images/s, validation included)")
    lines.append(f"everything but training: {1 - train_share:.1%} of our wall time "
                 f"(target <= 10%: {'ok' if 1 - train_share <= 0.10 else 'MISSED'})")
    whole = ours["seconds"] + ours["release_seconds"]
    lines.append(f"then the release stages the seed's path does not have (`imgclf run`: the rest skipped): "
                 f"{ours['release_seconds']:.1f} s, "
                 + ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in ours["release"].items())
                 + f"; URL to published model and report {whole:.1f} s, {seed['seconds'] / whole:.2f}x the seed's time")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=FULL, help="PNGs in the archive (half per class)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed-job", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.seed_job:
        job = json.loads(args.seed_job.read_text())
        print(json.dumps(seed_notebook(job["url"], job["epochs"], job["image_size"], job["n_train"], job["n_val"],
                                       job["test_paths"], Path(job["folder"]))))  # fmt: skip
        return

    zipped = archive(args.images)
    base = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "TF_CPP_MIN_LOG_LEVEL": "3", "PREFECT_HOME": str(base / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
        "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost",
    }  # fmt: skip
    server = serve(zipped.parent)
    url = f"http://127.0.0.1:{server.server_address[1]}/{zipped.name}"
    try:
        ours = run_ours(url, args.epochs, base, env)
        seed = run_seed(url, args.epochs, ours, base, env)
    finally:
        server.shutdown()
        shutil.rmtree(base, ignore_errors=True)
    print(report(args.images, args.epochs, ours, seed))


if __name__ == "__main__":
    main()
