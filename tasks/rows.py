"""Cache rows, shared by validate and cache: how a file becomes one, and the folders that hold them.

A row is a file's pixels from one strict decode (`tasks.images.read_image`), resized to
`prepare.image_size` by `prepare.resize`: uint8 (height, width, channels). A folder of rows
(the cache itself, or the staging validate leaves for it) holds `images.npy`, `index.csv`
(row, path, label, the file's sha256, the row's pixels_sha256) and `meta.json` (the settings,
down to a fingerprint of the decoding code and library versions). A row is taken from such a
folder only when the file's content hash, the settings and the fingerprint are unchanged and its
pixels still match their pixels_sha256: whoever decoded it, it is then the row a fresh decode gives.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import io
import itertools
import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import imagecodecs
import numpy as np

import tasks.images
import tasks.png
from tasks.errors import StageError
from tasks.files import CHUNK, read_csv, write_csv
from tasks.images import Verdict, read_image, resize
from tasks.params import PrepareParams

log = logging.getLogger("imgclf")

FORMAT_VERSION = 2  # 2: index.csv has pixels_sha256; meta.json has decoder
SHARD_BYTES = 16 << 20  # of pixels: the most a worker sends back at once
INDEX_COLUMNS = ["row", "path", "label", "sha256", "pixels_sha256"]

# What turns a file into a row: rows made by other code or library versions are not reused.
DECODER_SOURCES = (Path(tasks.images.__file__), Path(tasks.png.__file__), Path(__file__))
DECODER_LIBRARIES = ("numpy", "cv2", "PIL", "pyspng", "imagecodecs", "simplejpeg")  # simplejpeg: JPEG verdicts


@dataclass(frozen=True)
class Staging:
    """Where validate leaves the rows it decodes, and the prepare params they are made for: a hint
    (validate's manifest does not depend on it), so a wrong or stale one only costs the cache a decode."""

    params: PrepareParams
    folder: Path
    # The cache the rows are for. When it holds them all already, DVC skips the cache stage, which
    # would have removed them: validate then removes them itself.
    cache_dir: Path | None = None


def staging_dir(cache_dir: Path) -> Path:
    """Returns where validate stages rows for `cache_dir`: beside it, outside every DVC output."""
    return cache_dir.with_name(cache_dir.name + "-staging")


def decoder_fingerprint() -> str:
    """Returns the sha256 of the decoding code's source and the versions of the libraries it calls."""
    digest = hashlib.sha256()
    for path in DECODER_SOURCES:
        digest.update(b"%s\0%s\0" % (path.name.encode(), path.read_bytes()))
    for name in DECODER_LIBRARIES:
        digest.update(f"{name}=={importlib.import_module(name).__version__}\0".encode())
    return digest.hexdigest()


def pixels_sha256(pixels: np.ndarray) -> str:
    """Returns the hex sha256 of one row's bytes (about 9 us for 64x64x3)."""
    return hashlib.sha256(np.ascontiguousarray(pixels)).hexdigest()


def settings(params: PrepareParams, decoder: str) -> dict:
    """Returns what a folder's rows were made with, as its meta.json records it."""
    return {
        "format": FORMAT_VERSION,
        "image_size": list(params.image_size),
        "resize": params.resize,
        "channels": params.channels,
        "decoder": decoder,
    }


def row_shape(params: PrepareParams) -> tuple[int, int, int]:
    return (*params.image_size, params.channels)


def shard_largest(params: PrepareParams) -> int:
    """Returns the most images a shard may hold so that its rows stay within SHARD_BYTES."""
    return max(1, SHARD_BYTES // int(np.prod(row_shape(params))))


def read_row(data: bytes, params: PrepareParams, max_pixels: int | None = None) -> tuple[Verdict, np.ndarray | None]:
    """Returns (verdict, the file's row, or None when the verdict rejects it)."""
    verdict, pixels = read_image(data, max_pixels, params.channels, draft_size=max(params.image_size))
    return verdict, None if pixels is None else resize(pixels, params.image_size, params.resize)


class StoredRows:
    """The rows of a folder made with the given settings; none when it is missing, or made otherwise.

    Rows are read with pread, not through a memory map, so they pass through this process
    without staying in its memory (a mapped file's pages count in its RSS)."""

    def __init__(self, folder: Path | None, wanted: dict, what: str):
        self.what, self.damaged = what, 0
        self._file: BinaryIO | None = None
        self._rows: dict[str, tuple[int, str]] = {}
        if folder is None:
            return
        try:
            meta = json.loads((folder / "meta.json").read_text())
            if {key: meta.get(key) for key in wanted} != wanted:
                if meta.get("format") == FORMAT_VERSION and meta.get("decoder") != wanted["decoder"]:
                    log.info("cache: the %s was made by other decoding code or libraries; nothing is reused", what)
                return
            images = np.load(folder / "images.npy", mmap_mode="r")  # the header only: no row is read
            if images.dtype != np.uint8 or images.shape[1:] != tuple(meta["shape"][1:]):
                return
            rows = {row["sha256"]: (int(row["row"]), row["pixels_sha256"])
                    for row in read_csv(folder / "index.csv") if 0 <= int(row["row"]) < len(images)}  # fmt: skip
            self._file = open(folder / "images.npy", "rb")  # noqa: SIM115 (closed by close())
        except (OSError, ValueError, KeyError, TypeError):
            return
        self._rows, self._shape, self._offset = rows, images.shape[1:], images.offset

    def take(self, sha256: str) -> tuple[np.ndarray, str] | None:
        """Returns (pixels, pixels_sha256) of the file with this content hash, if held and intact."""
        if sha256 not in self._rows:
            return None
        row, recorded = self._rows[sha256]
        size = int(np.prod(self._shape))
        data = os.pread(self._file.fileno(), size, self._offset + row * size)
        pixels = np.frombuffer(data, dtype=np.uint8)
        if len(data) != size or pixels_sha256(pixels) != recorded:
            self.damaged += 1
            return None
        return pixels.reshape(self._shape), recorded

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class CacheTooLarge(StageError):
    """The rows would not fit on the disk; the message says how much they need."""


class RowWriter:
    """A new images.npy of `shape` (zero-filled, sparse), written a row at a time with pwrite:
    the pages go to the OS's file cache, not this process's memory as a memory map's would.
    A context manager: the file is closed on leaving it."""

    def __init__(self, folder: Path, shape: tuple[int, ...]):
        # Sparse, the file is made at any size: a typo (6400 for 64) would fill the disk row by row first.
        needed, free = int(np.prod(shape)), shutil.disk_usage(folder).free
        if needed > free:
            raise CacheTooLarge(f"prepare.image_size: {shape[0]:,} images of {'x'.join(map(str, shape[1:]))} "
                                f"take {needed / 2**30:,.1f} GiB, and {folder.parent} has {free / 2**30:,.1f} GiB free")
        header = np.lib.format.open_memmap(folder / "images.npy", mode="w+", dtype=np.uint8, shape=shape)
        self._offset, self._shape, self._size = header.offset, shape, int(np.prod(shape[1:]))
        del header
        self._fd = os.open(folder / "images.npy", os.O_RDWR)

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)

    def put(self, row: int, pixels: np.ndarray) -> None:
        """Writes one row's pixels, or (rows, ...) pixels from `row` on."""
        os.pwrite(self._fd, np.ascontiguousarray(pixels, dtype=np.uint8).data, self._offset + row * self._size)

    def get(self, row: int) -> np.ndarray:
        """Returns one row's pixels, as written."""
        data = os.pread(self._fd, self._size, self._offset + row * self._size)
        return np.frombuffer(data, dtype=np.uint8).reshape(self._shape[1:])

    def shrink_to(self, rows: int) -> None:
        """Makes the array its first `rows` rows: the header says so, and the file ends there."""
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                      "shape": (rows, *self._shape[1:])})  # fmt: skip
        # numpy pads the header of any 4-d uint8 array to the same 128 bytes: the rows stay where they are.
        assert header.tell() == self._offset, (header.tell(), self._offset)
        os.pwrite(self._fd, header.getvalue(), 0)
        os.ftruncate(self._fd, self._offset + rows * self._size)


def crc32(path: Path, offset: int = 0) -> int:
    """Returns the CRC-32 of a file's bytes from `offset` on (libdeflate: ~0.1 s a GB), read in
    chunks rather than mapped."""
    value, buffer = 0, bytearray(CHUNK)
    with open(path, "rb", buffering=0) as handle:
        handle.seek(offset)
        while size := handle.readinto(buffer):
            value = imagecodecs.deflate_crc32(memoryview(buffer)[:size], value)
    return value


def holds_exactly(folder: Path, wanted: dict, rows: list[tuple[str, str, str]]) -> bool:
    """Returns whether a folder of rows holds exactly `rows` ((path, label, sha256), in order), made
    with `wanted` settings, and its files are as they were written (the CRC-32 of the rows and of
    index.csv, in meta.json): its images.npy and index.csv are then the cache's, byte for byte."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if {key: meta.get(key) for key in wanted} != wanted or meta.get("count") != len(rows):
            return False
        with open(folder / "index.csv", newline="", encoding="utf-8") as handle:
            entries = itertools.islice(csv.reader(handle), 1, None)  # after the header
            held = [(path, label, sha256) for _, path, label, sha256, _ in entries]
        if held != rows:
            return False
        images = np.load(folder / "images.npy", mmap_mode="r")  # the header only: no row is read
        return (images.dtype == np.uint8 and list(images.shape) == meta["shape"]
                and crc32(folder / "images.npy", images.offset) == meta["rows_crc32"]
                and crc32(folder / "index.csv") == meta["index_crc32"])  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):
        return False


def same_rows(folder: Path, other: Path, wanted: dict) -> bool:
    """Returns whether `other` holds the rows of `folder`, both made with `wanted` settings: their index.csv
    (each row's path, label and pixels' sha256) the same, byte for byte."""
    try:
        meta = json.loads((other / "meta.json").read_text())
        return ({key: meta.get(key) for key in wanted} == wanted
                and (folder / "index.csv").read_bytes() == (other / "index.csv").read_bytes())  # fmt: skip
    except (OSError, ValueError):
        return False


def write_index(folder: Path, entries: Iterable[tuple[int, str, str, str, str]]) -> None:
    """Writes index.csv: one (row, path, label, sha256, pixels_sha256) a row held."""
    write_csv(folder / "index.csv", INDEX_COLUMNS, entries)


def write_meta(folder: Path, made_with: dict, shape: tuple[int, ...], labels: dict[str, int], **more: object) -> None:
    meta = made_with | {"count": shape[0], "shape": list(shape), "dtype": "uint8"}
    meta |= {"labels": dict(sorted(labels.items()))} | more
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
