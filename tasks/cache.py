"""Stage cache: the valid images of the manifest, decoded once -> `data/cache/`.

`images.npy` holds every valid image as uint8 (N, height, width, channels) in manifest path
order, memory-mappable with `np.load(..., mmap_mode="r")`; `index.csv` maps each row to its
path, label, content hash and the sha256 of the row's pixels; `meta.json` says how the arrays
were made, down to a fingerprint of the decoding code and library versions. Each shard's
worker returns its rows as one array (with their sha256 and its decoder fingerprint) and
writes no file, so workers on other hosts never share one; this process alone writes the
array file, a shard at a time, in row order.
A re-run reuses a row only when its content hash, the settings and the decoder fingerprint
are unchanged and its pixels still match their recorded sha256, so adding ten images decodes
ten images, a damaged row is decoded again, and the bytes are always a fresh run's.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import importlib
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import tasks.images
import tasks.png
from tasks.errors import StageError
from tasks.files import Progress, ShardMap, atomic_dir, process_pool_map, read_csv, shards_of
from tasks.images import decode, resize
from tasks.manifest import read_valid_rows
from tasks.params import PrepareParams

log = logging.getLogger("imgclf")

FORMAT_VERSION = 2  # 2: index.csv has pixels_sha256; meta.json has decoder
SHARD_IMAGES = 512  # the smallest shard; a larger set gets larger ones (shards_of), up to
SHARD_BYTES = 16 << 20  # of pixels: what a worker sends back at once

# What turns a file into a row: a cache made by other code or library versions is not reused.
DECODER_SOURCES = (Path(tasks.images.__file__), Path(tasks.png.__file__), Path(__file__))
DECODER_LIBRARIES = ("numpy", "cv2", "PIL", "pyspng", "imagecodecs")


class CacheError(StageError, RuntimeError):
    """A worker decoded with other code or libraries than the run that assembles the cache."""


@dataclass(frozen=True)
class CacheResult:
    path: Path
    decoded: int
    reused: int


def decoder_fingerprint() -> str:
    """Returns the sha256 of the decoding code's source and the versions of the libraries it calls."""
    digest = hashlib.sha256()
    for path in DECODER_SOURCES:
        digest.update(b"%s\0%s\0" % (path.name.encode(), path.read_bytes()))
    for name in DECODER_LIBRARIES:
        digest.update(f"{name}=={importlib.import_module(name).__version__}\0".encode())
    return digest.hexdigest()


def pixels_sha256(pixels: np.ndarray) -> str:
    """Returns the hex sha256 of one cache row's bytes (about 9 us for 64x64x3)."""
    return hashlib.sha256(np.ascontiguousarray(pixels)).hexdigest()


def _settings(params: PrepareParams, decoder: str) -> dict:
    return {
        "format": FORMAT_VERSION,
        "image_size": list(params.image_size),
        "resize": params.resize,
        "channels": params.channels,
        "decoder": decoder,
    }


@dataclass(frozen=True)
class DecodedShard:
    pixels: np.ndarray  # (rows, height, width, channels) uint8, in the shard's order
    digests: list[str]  # pixels_sha256 of each row
    decoder: str  # decoder_fingerprint() where the shard was decoded


def _decode_shard(root: str, params: PrepareParams, paths: Sequence[str]) -> DecodedShard:
    """Returns the shard's images decoded and resized, one row each, with each row's sha256."""
    height, width = params.image_size
    pixels = np.empty((len(paths), height, width, params.channels), dtype=np.uint8)
    draft = max(params.image_size)
    for row, path in enumerate(paths):
        pixels[row] = resize(decode((Path(root) / path).read_bytes(), params.channels, draft_size=draft),
                             params.image_size, params.resize)  # fmt: skip
    return DecodedShard(pixels, [pixels_sha256(row) for row in pixels], decoder_fingerprint())


def _previous_rows(cache_dir: Path, settings: dict) -> tuple[np.ndarray | None, dict[str, tuple[int, str]]]:
    """Returns the previous cache's images and {sha256: (row, pixels_sha256)}, if it was made with the
    same settings and decoder."""
    try:
        meta = json.loads((cache_dir / "meta.json").read_text())
        if {key: meta.get(key) for key in settings} != settings:
            if meta.get("format") == FORMAT_VERSION and meta.get("decoder") != settings["decoder"]:
                log.info("cache: the previous cache was made by other decoding code or libraries; nothing is reused")
            return None, {}
        images = np.load(cache_dir / "images.npy", mmap_mode="r")
        if images.dtype != np.uint8 or images.shape[1:] != tuple(meta["shape"][1:]):
            return None, {}
        rows = {
            row["sha256"]: (int(row["row"]), row["pixels_sha256"])
            for row in read_csv(cache_dir / "index.csv")
            if 0 <= int(row["row"]) < len(images)
        }
    except (OSError, ValueError, KeyError, TypeError):
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
    settings = _settings(params, decoder_fingerprint())
    previous, previous_rows = _previous_rows(cache_dir, settings)
    with atomic_dir(cache_dir) as temp:
        images_npy = temp / "images.npy"
        images = np.lib.format.open_memmap(
            images_npy, mode="w+", dtype=np.uint8, shape=(len(rows), height, width, params.channels)
        )
        todo, digests, damaged = [], [""] * len(rows), 0
        for index, row in enumerate(rows):
            if row["sha256"] in previous_rows:
                old_row, recorded = previous_rows[row["sha256"]]
                pixels = np.array(previous[old_row])
                if pixels_sha256(pixels) == recorded:  # reused only once verified
                    images[index], digests[index] = pixels, recorded
                    continue
                damaged += 1
            todo.append(index)
        if damaged:
            log.warning("cache: %d rows of the previous cache no longer match their pixels_sha256; decoding them again",
                        damaged)  # fmt: skip
        decode_shard = functools.partial(_decode_shard, str(extracted_dir.resolve()), params)
        progress = Progress(len(todo), "cache", "images")
        shards = shards_of(todo, SHARD_IMAGES, largest=SHARD_BYTES // (height * width * params.channels))
        paths = [[rows[index]["path"] for index in shard] for shard in shards]
        for shard, decoded in zip(shards, map_shards(decode_shard, paths), strict=True):
            if decoded.decoder != settings["decoder"]:
                raise CacheError(f"{cache_dir}: a worker decodes with other code or library versions than this "
                                 f"run (decoder {decoded.decoder[:12]}, here {settings['decoder'][:12]}); "
                                 "install the same versions on every worker")  # fmt: skip
            images[shard] = decoded.pixels
            for index, digest in zip(shard, decoded.digests, strict=True):
                digests[index] = digest
            progress.update(len(shard))
        progress.close()
        images.flush()
        del images
        _write_index(temp / "index.csv", rows, digests)
        meta = settings | {
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


def _write_index(path: Path, rows: list[dict], digests: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "path", "label", "sha256", "pixels_sha256"])
        writer.writerows((index, row["path"], row["label"], row["sha256"], digest)
                         for index, (row, digest) in enumerate(zip(rows, digests, strict=True)))  # fmt: skip
