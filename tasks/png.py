"""Decoding of plain PNGs (8-bit gray or RGB, no transparency or orientation chunks), the bulk of real sets.

Two ways to the same pixels as libpng, byte for byte:
- A file whose rows all use one simple filter (None, Sub or Up) is inflated by libdeflate in
  one call, the header giving the exact size, and its filter is undone by one cumulative sum
  over the whole image: about 2x libpng. OpenCV's `imwrite` writes such files (Sub on every
  row), and many image sets were written by OpenCV.
- Every other plain PNG (libpng's default picks a filter per row, Paeth and Average among
  them) goes to libspng, about 1.2x libpng, mostly for its faster inflate.
Which kind a file is shows only once it is inflated, so a miss costs one wasted inflate. The
files of one set come from one writer: after a miss, the next files skip the attempt and only
every 64th tries again.
"""

from __future__ import annotations

import struct

import imagecodecs
import numpy as np
import pyspng

SIGNATURE = b"\x89PNG\r\n\x1a\n"

# tRNS changes the pixels; eXIf (before or after IDAT) may rotate them.
_DECLINED_CHUNKS = {b"tRNS", b"eXIf"}
# So may a text chunk under the two keywords Pillow reads an orientation from: EXIF as hex
# (ImageMagick's "Raw profile type exif") and XMP's tiff:Orientation. Other text is only text.
_TEXT_CHUNKS = {b"tEXt", b"zTXt", b"iTXt"}
_ORIENTATION_KEYWORDS = (b"Raw profile type exif\0", b"XML:com.adobe.xmp\0")
_CHANNELS = {0: 1, 2: 3}  # colour type: gray, RGB
_NONE, _SUB, _UP = 0, 1, 2
_RETRY_EVERY = 64
_skip_one_filter = 0  # files left to decode without trying the one-filter way


def decode_plain_png(data: bytes) -> np.ndarray | None:
    """Returns the pixels (height, width, 1 or 3) of a plain 8-bit gray or RGB PNG, else None."""
    global _skip_one_filter
    if len(data) < 33 or not data.startswith(SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height, depth, colour, compression, filtering, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    channels = _CHANNELS.get(colour)
    if depth != 8 or channels is None or (compression, filtering, interlace) != (0, 0, 0) or not width or not height:
        return None
    chunks = _chunks(data)
    if chunks is None:
        return None
    pixels = None
    if _skip_one_filter:
        _skip_one_filter -= 1
    else:
        pixels = _decode_one_filter(memoryview(data), chunks, height, width, channels)
        _skip_one_filter = 0 if pixels is not None else _RETRY_EVERY - 1
    if pixels is None:
        try:
            pixels = pyspng.load(data)
        except (RuntimeError, ValueError):  # a stream libspng rejects: the general decoder says why
            return None
    return pixels.reshape(height, width, channels)


def _chunks(data: bytes) -> list[tuple[bytes, int, int]] | None:
    """Returns (kind, start, end) of each chunk's payload up to IEND; None on a declined chunk or a truncated file."""
    chunks = []
    offset = 8
    while offset + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, offset)
        start, end = offset + 8, offset + 8 + length
        if kind in _DECLINED_CHUNKS or end + 4 > len(data):
            return None
        if kind in _TEXT_CHUNKS and data.startswith(_ORIENTATION_KEYWORDS, start, end):
            return None
        if kind == b"IEND":
            return chunks
        chunks.append((kind, start, end))
        offset = end + 4
    return None


def _decode_one_filter(data: memoryview, chunks: list, height: int, width: int, channels: int) -> np.ndarray | None:
    """Returns the pixels (height, width, channels) when every row uses the same simple filter, else None."""
    idat = [data[start:end] for kind, start, end in chunks if kind == b"IDAT"]
    row_bytes = 1 + width * channels
    try:
        inflated = imagecodecs.deflate_decode(b"".join(idat), out=height * row_bytes)
    except imagecodecs.DeflateError:
        return None
    if len(inflated) != height * row_bytes:
        return None
    rows = np.frombuffer(inflated, dtype=np.uint8).reshape(height, row_bytes)
    kind = rows[0, 0]
    if kind not in (_NONE, _SUB, _UP) or np.any(rows[:, 0] != kind):
        return None
    filtered = rows[:, 1:].reshape(height, width, channels)
    if kind == _NONE:
        return filtered.copy()
    # Sub adds the pixel to the left, Up the pixel above, both modulo 256: a running sum
    # along the row, or down the column, in uint8.
    return imagecodecs.delta_decode(filtered, axis=1 if kind == _SUB else 0)
