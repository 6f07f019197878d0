"""Is an archive whole? What each format lets us check without extracting it.

A zip ends in a central directory that lists every member: a file cut short has none (or a
damaged one). A tar has no index: it ends with zero blocks after the last member's padded
data, and Python's tarfile stops quietly at a header cut short, so a tar cut at a member
boundary reads as a smaller, valid archive. Compressed tars also end their stream with a
marker that the decompressor checks when it reaches it.
"""

from __future__ import annotations

import lzma
import tarfile
import zipfile
import zlib
from pathlib import Path

ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header; an empty zip's end record
NOT_AN_ARCHIVE = "not a zip or tar archive"
# What the readers raise on a damaged archive (bad CRC, cut short, broken compression).
BROKEN_ARCHIVE = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError)


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
    """Returns why an opened tar whose members were all read is cut short, or None if its end block is there."""
    tf.fileobj.seek(tf.offset)  # type: ignore[union-attr]
    tail = tf.fileobj.read(tarfile.BLOCKSIZE)  # type: ignore[union-attr]
    if len(tail) < tarfile.BLOCKSIZE or tail.count(0) != tarfile.BLOCKSIZE:
        return f"truncated archive: no end-of-archive block after {len(tf.getmembers())} members"
    return None


def completeness_problem(path: Path) -> str | None:
    """Returns why the zip or tar at `path` is incomplete or damaged, or None when it reads to its end."""
    with open(path, "rb") as handle:
        magic = handle.read(4)
    try:
        if magic in ZIP_MAGIC:
            with zipfile.ZipFile(path) as zf:  # its central directory was found and read: is it its own?
                return "truncated archive: the last central directory is a stored zip's" if found_a_zip_inside(zf) else None
        if not tarfile.is_tarfile(path):
            return NOT_AN_ARCHIVE
        with tarfile.open(path) as tf:
            tf.getmembers()
            return tar_end_problem(tf)
    except BROKEN_ARCHIVE as exc:
        return " ".join(f"damaged or truncated archive ({type(exc).__name__}: {exc})".split())
