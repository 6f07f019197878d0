"""Is an archive whole? What each format lets us check without extracting it.

A zip ends in a central directory that lists every member: a file cut short has none (or a
damaged one). A tar has no index: it ends with zero blocks after the last member's padded
data, and Python's tarfile stops quietly at a header cut short, so a tar cut at a member
boundary reads as a smaller, valid archive. Compressed tars also end their stream with a
checksum or marker (gzip's CRC, xz's and bzip2's), which the decompressor checks only when
it is read to its end: past the end block too.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import tarfile
import zipfile
import zlib
from pathlib import Path

ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header; an empty zip's end record
_COMPRESSED = ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open))  # what tarfile opens
NOT_AN_ARCHIVE = "not a zip or tar archive"
# What the readers raise on a damaged archive (bad CRC, cut short, broken compression); gzip's and
# bzip2's decompressors raise an OSError too, without the errno a disk's error carries (is_broken_archive).
BROKEN_ARCHIVE = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError)


def is_broken_archive(exc: BaseException) -> bool:
    """Whether a reader's exception says the archive is damaged, not the disk."""
    return isinstance(exc, BROKEN_ARCHIVE) or (isinstance(exc, OSError) and exc.errno is None)


def zip_end_missing(path: Path) -> bool:
    """Whether a zip has no end-of-central-directory record where one must be (its last 64 KiB + 22 bytes):
    cut short, rather than damaged."""
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - (65_535 + 22)))
        return b"PK\x05\x06" not in handle.read()


def found_a_zip_inside(zf: zipfile.ZipFile) -> bool:
    """Whether the central directory zipfile found lists none of the entries the file starts with: a zip stored inside
    the archive, whose end zipfile took for the archive's own, the archive being cut before its own directory."""
    return bool(zf.infolist()) and min(info.header_offset for info in zf.infolist()) > 0


def tar_end_problem(tf: tarfile.TarFile) -> str | None:
    """Returns why an opened tar whose members were all read is cut short, or None if its end block is there.
    Reads the compressed stream to its end, where its checksum is checked: raises as `is_broken_archive` tells."""
    tf.fileobj.seek(tf.offset)  # type: ignore[union-attr]
    tail = tf.fileobj.read(tarfile.BLOCKSIZE)  # type: ignore[union-attr]
    # First: tarfile stops quietly at a header that damaged compression garbled; the stream's check tells.
    while tf.fileobj.read(1 << 20):  # type: ignore[union-attr]
        pass
    if len(tail) < tarfile.BLOCKSIZE or tail.count(0) != tarfile.BLOCKSIZE:
        return f"truncated archive: no end-of-archive block after {len(tf.getmembers())} members"
    return None


def no_tar_problem(path: Path) -> str:
    """Returns why a file tarfile cannot open is refused: its compressed stream is damaged, or it is no archive."""
    with open(path, "rb") as handle:
        head = handle.read(6)
    opener = next((opener for magic, opener in _COMPRESSED if head.startswith(magic)), None)
    if opener is not None:
        try:
            with opener(path) as stream:  # a damaged first block reads as no tar at all to tarfile
                while stream.read(1 << 20):
                    pass
        except Exception as exc:
            if not is_broken_archive(exc):
                raise
            return _damaged(exc)
    return NOT_AN_ARCHIVE


def _damaged(exc: BaseException) -> str:
    return " ".join(f"damaged or truncated archive ({type(exc).__name__}: {exc})".split())


def completeness_problem(path: Path) -> str | None:
    """Returns why the zip or tar at `path` is incomplete or damaged, or None when it reads to its end."""
    with open(path, "rb") as handle:
        magic = handle.read(4)
    try:
        if magic in ZIP_MAGIC:
            with zipfile.ZipFile(path) as zf:  # its central directory was found and read: is it its own?
                return "truncated archive: the last central directory is a stored zip's" if found_a_zip_inside(zf) else None
        if not tarfile.is_tarfile(path):
            return no_tar_problem(path)
        with tarfile.open(path) as tf:
            tf.getmembers()
            return tar_end_problem(tf)
    except Exception as exc:
        if not is_broken_archive(exc):
            raise
        return _damaged(exc)
