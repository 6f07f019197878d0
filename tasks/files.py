"""Small helpers shared by the stages: atomic outputs, hashing, progress, parallel shards."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import logging
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger("imgclf")

T = TypeVar("T")
R = TypeVar("R")

# (function, shards) -> results in shard order, yielded as they are ready. The flow passes
# one backed by Prefect's task runner; scripts and tests get `process_pool_map`.
ShardMap = Callable[[Callable[[T], R], Sequence[T]], Iterable[R]]

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Returns the hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_csv(path: Path) -> list[dict]:
    """Returns a UTF-8 CSV file's rows as dicts keyed by its header."""
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w", **open_kwargs: Any) -> Iterator[Any]:
    """Yields a handle on a temporary sibling; renames it to `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_sibling(path)
    try:
        with open(temp, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yields an empty temporary directory that replaces `path` only if the block succeeds.

    The previous `path`, if any, stays readable until the swap, so a stage can reuse it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_sibling(path)
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    try:
        yield temp
        retired = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, retired)
        os.replace(temp, path)
        shutil.rmtree(retired, ignore_errors=True)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


class Progress:
    """Counts work done: a tqdm bar on a terminal; otherwise a log line at each 10% step,
    at most one every few seconds (and the last one always)."""

    LOG_EVERY_S = 3.0

    def __init__(self, total: int | None, desc: str, unit: str = "it", unit_scale: bool = False):
        self.total, self.desc, self.unit, self.done = total, desc, unit, 0
        self._next_percent = 10
        self._last_log = time.monotonic()
        self._bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, leave=False)

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        if not self.total:
            return
        percent = 100 * self.done // self.total
        now = time.monotonic()
        if percent >= self._next_percent and (now - self._last_log >= self.LOG_EVERY_S or self.done >= self.total):
            log.info("%s: %d%% (%d/%d %s)", self.desc, percent, self.done, self.total, self.unit)
            self._next_percent = (percent // 10 + 1) * 10
            self._last_log = now

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def retrying(call: Callable[[], R], attempts: int, backoff: float, transient: type[BaseException], what: str) -> R:
    """Returns `call()`; a `transient` failure waits `backoff` seconds (doubling each time) and tries
    again, `attempts` tries in all. The last transient failure is raised as it came."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except transient as exc:
            if attempt == attempts:
                raise
            delay = backoff * 2 ** (attempt - 1)
            log.warning("%s: %s; retry %d/%d in %.1fs", what, exc, attempt, attempts - 1, delay)
            time.sleep(delay)
    raise ValueError("attempts must be at least 1")


def chunked(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """Returns consecutive slices of at most `size` items."""
    return [items[start : start + size] for start in range(0, len(items), size)]


def _single_threaded_worker() -> None:
    # One decoder thread per process: the pool already uses every core.
    import cv2

    cv2.setNumThreads(1)


def process_pool_map(fn: Callable[[T], R], shards: Sequence[T]) -> Iterator[R]:
    """Yields `fn(shard)` for each shard, in order, computed on one worker process per core."""
    workers = min(len(shards), os.cpu_count() or 1)
    if workers <= 1:
        yield from map(fn, shards)
        return
    # forkserver, not fork: forking a process that runs threads (Prefect's, TensorFlow's) can
    # deadlock the child; a clean server process forks the workers instead.
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_single_threaded_worker) as pool:
        yield from pool.map(fn, shards)
