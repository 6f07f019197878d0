"""Stage cache: the valid images of the manifest, each decoded once -> `data/cache/`.

`images.npy` holds every valid image as uint8 (N, height, width, channels) in manifest path
order, memory-mappable with `np.load(..., mmap_mode="r")`; `index.csv` maps each row to its
path, label, content hash and the sha256 of the row's pixels; `meta.json` says how the arrays
were made, down to a fingerprint of the decoding code and library versions (`tasks.rows`).
A row comes from the previous cache, from the rows validate staged while it judged the files
(its one decode made the pixels), or from a decode here; the first two only when its content
hash, the settings and the decoder fingerprint are unchanged and its pixels still match their
recorded sha256, so adding ten images decodes ten, a damaged row is decoded again, and the bytes
are always a fresh run's. Each shard's worker returns its rows as one array (with their sha256
and its decoder fingerprint) and writes no file, so workers on other hosts never share one; this
process alone writes the array file, a shard at a time, in row order.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.errors import StageError
from tasks.files import Progress, ShardMap, atomic_dir, process_pool_map, shards_of
from tasks.manifest import read_valid_rows
from tasks.params import PrepareParams
from tasks.rows import (RowWriter, StoredRows, decoder_fingerprint, holds_exactly, pixels_sha256, read_row, row_shape,
                        settings, shard_largest, write_index, write_meta)  # fmt: skip

log = logging.getLogger("imgclf")

SHARD_IMAGES = 512  # the smallest shard; a larger set gets larger ones (shards_of), up to rows.SHARD_BYTES


class CacheError(StageError, RuntimeError):
    """A worker decoded with other code or libraries than this run, or a valid file no longer decodes."""


@dataclass(frozen=True)
class CacheResult:
    path: Path
    decoded: int
    reused: int  # from the previous cache
    staged: int = 0  # decoded by validate


@dataclass(frozen=True)
class DecodedShard:
    pixels: np.ndarray  # (rows, height, width, channels) uint8, in the shard's order
    digests: list[str]  # pixels_sha256 of each row
    decoder: str  # decoder_fingerprint() where the shard was decoded


def _decode_shard(root: str, params: PrepareParams, files: Sequence[tuple[str, str]]) -> DecodedShard:
    """Returns the shard's images, (path, the manifest's sha256) each, decoded and resized, one row
    each, with each row's sha256."""
    pixels = np.empty((len(files), *row_shape(params)), dtype=np.uint8)
    for index, (path, sha256) in enumerate(files):
        data = (Path(root) / path).read_bytes()
        # A row is filed and reused under the manifest's sha256: it must hold those bytes' pixels.
        if hashlib.sha256(data).hexdigest() != sha256:
            raise CacheError(f"{Path(root) / path}: its bytes are not the ones validate judged (sha256 in "
                             "data/manifest.csv): the file changed since; run validate again")  # fmt: skip
        verdict, row = read_row(data, params)
        if row is None:
            raise CacheError(f"{Path(root) / path}: {verdict.reason} ({verdict.detail}), though the manifest says "
                             "valid: the file changed since validate ran; run validate again")  # fmt: skip
        pixels[index] = row
    return DecodedShard(pixels, [pixels_sha256(row) for row in pixels], decoder_fingerprint())


def cache(
    params: PrepareParams,
    manifest_csv: Path,
    extracted_dir: Path,
    cache_dir: Path,
    map_shards: ShardMap = process_pool_map,
    staging_dir: Path | None = None,
) -> CacheResult:
    """Returns where the cache was written and how many images were decoded, reused or taken from
    validate's staging (`staging_dir`, removed once the cache is written)."""
    rows = read_valid_rows(manifest_csv)
    made_with = settings(params, decoder_fingerprint())
    shape = (len(rows), *row_shape(params))
    progress = Progress(len(rows), "cache", "images")
    with atomic_dir(cache_dir) as temp:
        wanted = [(row["path"], row["label"], row["sha256"]) for row in rows]
        if staging_dir is not None and holds_exactly(staging_dir, made_with, wanted):
            # The common case: validate decoded every row of this cache, and wrote them as the cache holds them.
            for name in ("images.npy", "index.csv"):
                os.replace(staging_dir / name, temp / name)
            progress.update(len(rows))
            result = CacheResult(cache_dir, decoded=0, reused=0, staged=len(rows))
        else:
            result = _assemble(temp, params, rows, made_with, extracted_dir, cache_dir, map_shards, staging_dir,
                               progress)  # fmt: skip
        write_meta(temp, made_with, shape, Counter(row["label"] for row in rows))
    progress.close()
    if staging_dir is not None:
        shutil.rmtree(staging_dir, ignore_errors=True)  # used up: its rows are in the cache now
    by_validate = f"; {result.staged} decoded by validate" if result.staged else ""
    log.info("cache: %d images at %dx%dx%d in %s (decoded %d, reused %d)%s", len(rows), *shape[1:], cache_dir,
             result.decoded, result.reused, by_validate)  # fmt: skip
    return result


def _assemble(temp: Path, params: PrepareParams, rows: list[dict], made_with: dict, extracted_dir: Path,
              cache_dir: Path, map_shards: ShardMap, staging_dir: Path | None,
              progress: Progress) -> CacheResult:  # fmt: skip
    """Writes images.npy and index.csv into `temp`, each row reused, taken from the staging, or decoded."""
    with (contextlib.closing(StoredRows(cache_dir, made_with, "previous cache")) as previous,
          contextlib.closing(StoredRows(staging_dir, made_with, "staging validate left")) as staged,
          RowWriter(temp, (len(rows), *row_shape(params))) as images):  # fmt: skip
        todo, digests, taken = [], [""] * len(rows), Counter()
        for index, row in enumerate(rows):
            for source in (previous, staged):
                if found := source.take(row["sha256"]):  # reused only once verified
                    images.put(index, found[0])
                    digests[index] = found[1]
                    taken[source.what] += 1
                    break
            else:
                todo.append(index)
        for source in (previous, staged):
            if source.damaged:
                log.warning("cache: %d rows of the %s no longer match their pixels_sha256; decoding them again",
                            source.damaged, source.what)  # fmt: skip
        decode_shard = functools.partial(_decode_shard, str(extracted_dir.resolve()), params)
        progress.update(len(rows) - len(todo))
        shards = shards_of(todo, SHARD_IMAGES, largest=shard_largest(params))
        files = [[(rows[index]["path"], rows[index]["sha256"]) for index in shard] for shard in shards]
        for shard, decoded in zip(shards, map_shards(decode_shard, files), strict=True):
            if decoded.decoder != made_with["decoder"]:
                raise CacheError(f"{cache_dir}: a worker decodes with other code or library versions than this "
                                 f"run (decoder {decoded.decoder[:12]}, here {made_with['decoder'][:12]}); "
                                 "install the same versions on every worker")  # fmt: skip
            for index, pixels, digest in zip(shard, decoded.pixels, decoded.digests, strict=True):
                images.put(index, pixels)
                digests[index] = digest
            progress.update(len(shard))
    write_index(temp, ((index, row["path"], row["label"], row["sha256"], digest)
                       for index, (row, digest) in enumerate(zip(rows, digests, strict=True))))  # fmt: skip
    return CacheResult(cache_dir, decoded=len(todo), reused=taken[previous.what], staged=taken[staged.what])
