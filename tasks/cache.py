"""Stage cache: the valid images of the manifest, decoded once -> `data/cache/`.

`images.npy` holds every valid image as uint8 (N, height, width, channels) in manifest path
order, memory-mappable with `np.load(..., mmap_mode="r")`; `index.csv` maps each row to its
path, label and content hash; `meta.json` says how the arrays were made. Workers write their
rows straight into the array file, so nothing image-sized crosses process boundaries. A
re-run reuses every row whose content hash and settings are unchanged, so adding ten images
decodes ten images; the bytes are the same as a fresh run's.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.files import Progress, ShardMap, atomic_dir, chunked, process_pool_map, read_csv
from tasks.images import decode, resize
from tasks.manifest import read_valid_rows
from tasks.params import PrepareParams

log = logging.getLogger("imgclf")

FORMAT_VERSION = 1
SHARD_IMAGES = 512


@dataclass(frozen=True)
class CacheResult:
    path: Path
    decoded: int
    reused: int


def _settings(params: PrepareParams) -> dict:
    return {
        "format": FORMAT_VERSION,
        "image_size": list(params.image_size),
        "resize": params.resize,
        "channels": params.channels,
    }


def _decode_shard(root: str, images_npy: str, params: PrepareParams, shard: Sequence[tuple[int, str]]) -> int:
    images = np.load(images_npy, mmap_mode="r+")
    draft = max(params.image_size)
    for row, path in shard:
        pixels = decode((Path(root) / path).read_bytes(), params.channels, draft_size=draft)
        images[row] = resize(pixels, params.image_size, params.resize)
    images.flush()
    return len(shard)


def _previous_rows(cache_dir: Path, params: PrepareParams) -> tuple[np.ndarray | None, dict[str, int]]:
    """Returns the previous cache's images and {sha256: row}, if it was made with the same settings."""
    try:
        meta = json.loads((cache_dir / "meta.json").read_text())
        if {key: meta.get(key) for key in _settings(params)} != _settings(params):
            return None, {}
        images = np.load(cache_dir / "images.npy", mmap_mode="r")
        rows = {row["sha256"]: int(row["row"]) for row in read_csv(cache_dir / "index.csv")}
    except (OSError, ValueError, KeyError):
        return None, {}
    return images, rows


def cache(
    params: PrepareParams,
    manifest_csv: Path,
    extracted_dir: Path,
    cache_dir: Path,
    map_shards: ShardMap = process_pool_map,
) -> CacheResult:
    """Returns where the cache was written and how many images were decoded or reused."""
    rows = read_valid_rows(manifest_csv)
    height, width = params.image_size
    previous, previous_rows = _previous_rows(cache_dir, params)
    with atomic_dir(cache_dir) as temp:
        images_npy = temp / "images.npy"
        images = np.lib.format.open_memmap(
            images_npy, mode="w+", dtype=np.uint8, shape=(len(rows), height, width, params.channels)
        )
        todo = []
        for index, row in enumerate(rows):
            if row["sha256"] in previous_rows:
                images[index] = previous[previous_rows[row["sha256"]]]
            else:
                todo.append((index, row["path"]))
        images.flush()
        decode_shard = functools.partial(_decode_shard, str(extracted_dir.resolve()), str(images_npy), params)
        progress = Progress(len(todo), "cache", "images")
        for count in map_shards(decode_shard, chunked(todo, SHARD_IMAGES)):
            progress.update(count)
        progress.close()
        del images
        _write_index(temp / "index.csv", rows)
        meta = _settings(params) | {
            "count": len(rows),
            "shape": [len(rows), height, width, params.channels],
            "dtype": "uint8",
            "labels": dict(sorted(Counter(row["label"] for row in rows).items())),
        }
        (temp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    reused = len(rows) - len(todo)
    log.info("cache: %d images at %dx%dx%d in %s (decoded %d, reused %d)",
             len(rows), height, width, params.channels, cache_dir, len(todo), reused)  # fmt: skip
    return CacheResult(cache_dir, decoded=len(todo), reused=reused)


def _write_index(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "path", "label", "sha256"])
        writer.writerows((index, row["path"], row["label"], row["sha256"]) for index, row in enumerate(rows))
