"""Small helpers shared by the stages: atomic outputs, hashing, progress, parallel shards."""

from __future__ import annotations

import contextlib
import ctypes
import csv
import errno
import functools
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import tenacity

from tasks.errors import Interrupted, StageError, stop_requested

log = logging.getLogger("imgclf")

T = TypeVar("T")
R = TypeVar("R")

# (function, shards) -> results in shard order, yielded as they are ready. A shard's result is
# its own output: workers (maybe on other hosts) write no shared file, the caller assembles.
# Scripts, tests and the flow's `processes` runner use `process_pool_map`; the flow's
# `threads` runner `thread_pool_map`, its `dask` runner Dask futures (flows/pipeline.py).
ShardMap = Callable[[Callable[[T], R], Sequence[T]], Iterable[R]]

CHUNK = 1 << 20
PR_SET_PDEATHSIG = 1  # prctl(2)
MODEL_JSON = "model.json"  # beside model.keras: what the model is (classes, image size, channels, resize, params)


def sha256_file(path: Path) -> str:
    """Returns the hex sha256 of a file's bytes."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def made_for_another_model(path: Path, model_sha256: str) -> bool:
    """Whether a JSON file evaluate or export wrote (calibration.json, eval.json, export.json) names, as its
    `model_sha256`, another model than this one: a later train left it behind. A file without one is older
    than the stamp, and is taken as it is."""
    try:
        stamped = json.loads(path.read_text()).get("model_sha256")
    except (OSError, ValueError, AttributeError):
        return False
    return stamped is not None and stamped != model_sha256


def model_json(model_dir: Path) -> Path:
    """Returns the path of the model's description: model.json, or labels.json beside an older model."""
    path, old = model_dir / MODEL_JSON, model_dir / "labels.json"
    return old if old.exists() and not path.exists() else path


def shown_name(name: str) -> str:
    """Returns a file name with the bytes that are not UTF-8 (Python keeps them as surrogates) escaped, \\xff,
    to print or write in a UTF-8 file."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def read_csv(path: Path) -> list[dict]:
    """Returns a UTF-8 CSV file's rows as dicts keyed by its header."""
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence]) -> None:
    """Writes a UTF-8 CSV file atomically: the header, then the rows."""
    with atomic_file(path, newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def read_json(path: Path) -> Any:
    """Returns a JSON file's value; {} when there is no file (the stage that writes it has not run)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except ValueError as exc:  # cut short or edited by hand: say which file
        raise StageError(f"{path}: not readable JSON ({exc}); re-run the stage that writes it") from None


def write_json(path: Path, value: Any, indent: int | None = 2) -> None:
    """Writes `value` as JSON atomically."""
    with atomic_file(path) as handle:
        json.dump(value, handle, indent=indent)


# Our temporaries sit beside their target: `.<name>.tmp-<pid>` (the suffix kept, for writers that
# go by it), and `.<name>.old-<pid>` while a folder is swapped. A killed run leaves them behind.
_TEMPORARY = re.compile(r"^\..+\.(?:tmp|old)-(\d+)(?:\.\w+)?$")


def _temp_sibling(path: Path, kind: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}{path.suffix}")


def remove_stale_temporaries(folders: Iterable[Path]) -> list[Path]:
    """Removes, from each folder, the temporaries of runs that are gone (by their naming); returns them."""
    removed = []
    for folder in folders:
        for entry in folder.iterdir() if folder.is_dir() else ():
            match = _TEMPORARY.match(entry.name)
            if not match or alive_elsewhere(int(match.group(1))):
                continue
            _remove(entry)
            removed.append(entry)
    for entry in removed:
        log.info("removed %s, left by an interrupted run", entry)
    return removed


def alive_elsewhere(pid: int) -> bool:
    """Returns whether `pid` is a live process other than this one."""
    if pid == os.getpid():
        return False  # this run has not written anything yet: the name was an earlier process's
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# What writing a file may fail with: disk full, quota, too large, the device, a read-only mount.
_STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temporary sibling path (same suffix) to write, a file or a new folder; renames it to
    `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_sibling(path)
    _remove(temp)  # an earlier process of the same pid left it
    try:
        yield temp
        os.replace(temp, path)
    except OSError as exc:
        if exc.filename is not None or exc.errno not in _STORAGE_ERRORS:
            raise  # a network error raised in the block is its own, not the output's
        # A write's own error names no file: "No space left on device" alone says not where.
        raise type(exc)(exc.errno, exc.strerror, str(path)) from exc
    finally:
        _remove(temp)


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w", **open_kwargs: Any) -> Iterator[Any]:
    """Yields a handle on a temporary sibling; renames it to `path` only if the block succeeds."""
    with atomic_path(path) as temp, open(temp, mode, **open_kwargs) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def named_output(path: Path, mode: str = "w", **open_kwargs: Any) -> Iterator[Any]:
    """Yields a handle to write a file a user named, as a shell's `>` writes it: through a symbolic link to its
    target (the link stays), into a FIFO or a device (/dev/stdout) as it is; a regular file atomically."""
    target = Path(os.path.realpath(path))
    if target.exists() and not target.is_file():
        with open(target, mode, **open_kwargs) as handle:
            yield handle
        return
    with atomic_file(target, mode, **open_kwargs) as handle:
        yield handle


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
        retired = _temp_sibling(path, "old")
        if path.exists():
            os.replace(path, retired)
        os.replace(temp, path)
        shutil.rmtree(retired, ignore_errors=True)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


class Progress:
    """Counts work done: a tqdm bar on a terminal; otherwise a log line at each 10% step, at
    most one every few seconds, and the last one if any came before it (work done within the
    first few seconds needs no progress report: the stage's summary line says it). Each count is
    also a safe point: once the run is stopped, the loop counting ends there (Interrupted); what it
    wrote is under temporary names, or a download's `.part` that the next run resumes."""

    LOG_EVERY_S = 3.0

    def __init__(self, total: int | None, desc: str, unit: str = "it", unit_scale: bool = False):
        self.total, self.desc, self.unit, self.done = total, desc, unit, 0
        self._next_percent = 10
        self._last_log = time.monotonic()
        self._logged = False
        self._bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, leave=False)

    def update(self, n: int) -> None:
        if stop_requested.is_set():
            raise Interrupted(f"{self.desc}: interrupted at {self.done} of {self.total} {self.unit}")
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        if not self.total:
            return
        percent = 100 * self.done // self.total
        now = time.monotonic()
        due = now - self._last_log >= self.LOG_EVERY_S or (self._logged and self.done >= self.total)
        if percent >= self._next_percent and due:
            log.info("%s: %d%% (%d/%d %s)", self.desc, percent, self.done, self.total, self.unit)
            self._next_percent = (percent // 10 + 1) * 10
            self._last_log, self._logged = now, True

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


MAX_RETRY_WAIT = 600.0  # seconds: data.retries: 20 would otherwise wait 2**19 s before its last try


def retrying(call: Callable[[], R], attempts: int, backoff: float, transient: type[BaseException], what: str) -> R:
    """Returns `call()`; a `transient` failure waits `backoff` seconds (doubling each time, at most
    MAX_RETRY_WAIT) and tries again, `attempts` tries in all. The last transient failure is raised as
    it came; a run stopped during a wait raises Interrupted at once."""

    def warn(state: tenacity.RetryCallState) -> None:
        log.warning("%s: %s; attempt %d of %d failed, the next in %.1fs", what, state.outcome.exception(),
                    state.attempt_number, attempts, state.next_action.sleep)  # fmt: skip

    def wait_unless_stopped(seconds: float) -> None:
        # A stage in a task runner's thread: Ctrl-C reaches the main thread, which sets stop_requested.
        if stop_requested.wait(seconds):
            raise Interrupted(f"{what}: interrupted while waiting to try again")

    return tenacity.Retrying(stop=tenacity.stop_after_attempt(attempts),
                             wait=tenacity.wait_exponential(multiplier=backoff, exp_base=2, max=MAX_RETRY_WAIT),
                             retry=tenacity.retry_if_exception_type(transient), sleep=wait_unless_stopped,
                             before_sleep=warn, reraise=True)(call)  # fmt: skip


def chunked(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """Returns consecutive slices of at most `size` items."""
    return [items[start : start + size] for start in range(0, len(items), size)]


SHARDS = 64  # per stage: enough to keep the workers busy to the end, few enough that each one's cost (ms) is lost


def shards_of(items: Sequence[T], smallest: int, largest: int = 4096) -> list[Sequence[T]]:
    """Returns `items` in consecutive shards: about SHARDS of them, each of `smallest` to `largest` items."""
    return chunked(items, max(1, min(largest, max(smallest, -(-len(items) // SHARDS)))))


def die_with_parent() -> None:
    """Asks Linux to stop this process when its parent dies: a killed run leaves no worker behind."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    # A parent killed while this worker was still starting sends no signal: check once.
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        os._exit(1)


def dask_setup(worker: object) -> None:
    """Runs in each worker of the flow's own Dask cluster (its preload): Ctrl-C is the run's to handle."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _single_threaded_worker() -> None:
    die_with_parent()
    # A terminal's Ctrl-C reaches the whole process group: the parent stops the pool, and a
    # traceback from each worker would bury its one line.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _one_opencv_thread()


def _one_opencv_thread() -> None:
    """Keeps OpenCV to one thread in this process: the pool already uses every core."""
    import cv2

    cv2.setNumThreads(1)


def on_one_thread(fn: Callable[[T], R], shard: T) -> R:
    """Returns `fn(shard)`, OpenCV kept to one thread: how a Dask worker (one core's worth) runs a shard."""
    _one_opencv_thread()
    return fn(shard)


def in_order(submit: Callable[[Callable[[T], R], T], Any], fn: Callable[[T], R], shards: Sequence[T],
             window: int) -> Iterator[R]:  # fmt: skip
    """Yields `fn(shard)` for each shard, in order, from the futures `submit(fn, shard)` returns.

    At most `window` shards are submitted and not yet yielded, so the results waiting behind a
    slow shard (in the workers or here) stay a few shards' worth. Left early, the rest are cancelled.
    """
    rest, pending = iter(shards), deque()
    try:
        pending.extend(submit(fn, shard) for shard in itertools.islice(rest, max(window, 1)))
        while pending:
            result = pending.popleft().result()
            pending.extend(submit(fn, shard) for shard in itertools.islice(rest, 1))
            yield result
    finally:
        for future in pending:
            future.cancel()


def _pool_map(executor: Callable[..., Any], fn: Callable[[T], R], shards: Sequence[T]) -> Iterator[R]:
    workers = min(len(shards), os.cpu_count() or 1)
    if workers <= 1:
        yield from map(fn, shards)  # one shard (a small set) or one core: workers would cost more than they save
        return
    pool = executor(max_workers=workers)
    try:
        yield from in_order(pool.submit, fn, shards, window=2 * workers)
    except BaseException:
        _abandon(pool)  # Ctrl-C, a failed shard, a reader gone: the shards still running are not waited for
        raise
    pool.shutdown()


def _abandon(pool: Any) -> None:
    """Ends `pool` without waiting for its running shards: worker processes are terminated (a
    shard writes under temporary names only, which the next run removes); threads finish theirs."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # a process pool's, until shutdown
    for process in processes:
        process.terminate()
    pool.shutdown(wait=False, cancel_futures=True)


def process_pool_map(fn: Callable[[T], R], shards: Sequence[T]) -> Iterator[R]:
    """Yields `fn(shard)` for each shard, in order, computed on one worker process per core."""
    # spawn, not fork: forking a process that runs threads (Prefect's, TensorFlow's) can
    # deadlock the child. Not forkserver either: its server outlives a SIGKILLed run, and so
    # do the workers it forked; spawned workers are this process's children and die with it.
    context = multiprocessing.get_context("spawn")
    return _pool_map(functools.partial(ProcessPoolExecutor, mp_context=context, initializer=_single_threaded_worker),
                     fn, shards)  # fmt: skip


def thread_pool_map(fn: Callable[[T], R], shards: Sequence[T]) -> Iterator[R]:
    """Yields `fn(shard)` for each shard, in order, computed on one thread per core of this process."""
    return _pool_map(ThreadPoolExecutor, fn, shards)
