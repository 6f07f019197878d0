"""PNG files: the chunk check every PNG gets, and fast decoding of plain ones (8-bit gray or RGB,
no transparency or orientation chunks), the bulk of real sets.

`png_damage` walks the chunks to IEND and checks each one's CRC, which Pillow does only for the
chunks before the pixel data and libspng (as pyspng runs it) not at all: with it, a plain PNG that decodes here is
one that libpng would read too, so the decode that gives the pixels can also give the verdict.

Each plain PNG is inflated once, by libdeflate in one call (the header gives the exact size,
and it checks the stream's Adler-32): about 2.4x zlib, which libpng and libspng use. Then two
ways to the same pixels as libpng, byte for byte:
- A file whose rows all use one simple filter (None, Sub or Up) has it undone by one cumulative
  sum over the whole image: about 2x libpng in all. OpenCV's `imwrite` writes such files (Sub on
  every row), and many image sets were written by OpenCV.
- Every other plain PNG (libpng's default picks a filter per row, Paeth and Average among
  them) has its filters undone by libspng, which gets the inflated rows wrapped as stored
  (uncompressed) deflate blocks, so it only copies them: about 1.25x libspng on its own.
A stream libdeflate refuses goes to libspng whole; if libspng refuses it too, the general
decoder says why.
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
_ORIENTATION_KEYWORDS = (b"Raw profile type exif\0", b"XML:com.adobe.xmp\0", b"exif\0")  # Pillow reads all three
_CRITICAL_CHUNKS = {b"IHDR", b"PLTE", b"IDAT", b"IEND"}
_CHANNELS = {0: 1, 2: 3}  # colour type: gray, RGB
_NONE, _SUB, _UP = 0, 1, 2
_IEND = b"\0\0\0\0IEND\xaeB`\x82"


def png_damage(data: bytes) -> tuple[str, str] | None:
    """Returns (reason, detail) when a PNG ends before its IEND chunk or a chunk fails its CRC, else None."""
    view, offset, size = memoryview(data), 8, len(data)
    while offset + 8 <= size:
        length, kind = struct.unpack_from(">I4s", data, offset)
        end = offset + 8 + length
        if end + 4 > size:
            return "truncated", f"the file ends inside its {kind.decode('latin-1')} chunk"
        if imagecodecs.deflate_crc32(view[offset + 4 : end]) != struct.unpack_from(">I", data, end)[0]:
            return "corrupt", f"bad CRC in the {kind.decode('latin-1')} chunk at byte {offset}"
        if kind[:1].isupper() and kind not in _CRITICAL_CHUNKS:  # Pillow skips it; libpng, as the PNG spec asks, stops
            return "corrupt", f"unknown critical chunk {kind.decode('latin-1')} at byte {offset}"
        if kind == b"IEND":
            return None
        offset = end + 4
    return "truncated", "the file ends before its IEND chunk"


def plain_png_header(data: bytes) -> tuple[int, int, int] | None:
    """Returns (width, height, channels) from the header of a plain 8-bit gray or RGB PNG, else None."""
    if len(data) < 33 or not data.startswith(SIGNATURE) or data[8:16] != b"\0\0\0\x0dIHDR":
        return None
    width, height, depth, colour, compression, filtering, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    channels = _CHANNELS.get(colour)
    if depth != 8 or channels is None or (compression, filtering, interlace) != (0, 0, 0) or not width or not height:
        return None
    return width, height, channels


def decode_plain_png(data: bytes) -> np.ndarray | None:
    """Returns the pixels (height, width, 1 or 3) of a plain 8-bit gray or RGB PNG, else None."""
    header = plain_png_header(data)
    if header is None:
        return None
    width, height, channels = header
    chunks = _chunks(data)
    if chunks is None:
        return None
    rows = _inflate(memoryview(data), chunks, height, width, channels)
    if rows is None:
        pixels = _libspng(data)
    else:
        pixels = _undo_one_filter(rows, channels)
        if pixels is None:
            pixels = _libspng(data[:33] + _chunk(b"IDAT", imagecodecs.deflate_encode(rows, level=0)) + _IEND)
    return None if pixels is None else pixels.reshape(height, width, channels)


def _chunks(data: bytes) -> list[tuple[bytes, int, int]] | None:
    """Returns (kind, start, end) of each chunk's payload up to IEND; None on a declined chunk or a truncated file.

    Also None for IDAT chunks with another chunk between them, which libpng refuses: the general
    decoder judges those.
    """
    chunks: list[tuple[bytes, int, int]] = []
    offset = 8
    while offset + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, offset)
        start, end = offset + 8, offset + 8 + length
        if kind in _DECLINED_CHUNKS or end + 4 > len(data):
            return None
        if kind == b"IDAT" and chunks[-1][0] != b"IDAT" and any(seen == b"IDAT" for seen, _, _ in chunks):
            return None
        if kind in _TEXT_CHUNKS and data.startswith(_ORIENTATION_KEYWORDS, start, end):
            return None
        if kind == b"IEND":
            return chunks
        chunks.append((kind, start, end))
        offset = end + 4
    return None


def _inflate(data: memoryview, chunks: list, height: int, width: int, channels: int) -> np.ndarray | None:
    """Returns the filtered rows (height, 1 + width * channels), each led by its filter type, else None."""
    idat = [data[start:end] for kind, start, end in chunks if kind == b"IDAT"]
    row_bytes = 1 + width * channels
    try:
        inflated = imagecodecs.deflate_decode(b"".join(idat), out=height * row_bytes)
    except imagecodecs.DeflateError:
        return None
    if len(inflated) != height * row_bytes:
        return None
    return np.frombuffer(inflated, dtype=np.uint8).reshape(height, row_bytes)


def _undo_one_filter(rows: np.ndarray, channels: int) -> np.ndarray | None:
    """Returns the pixels (height, width, channels) when every row uses the same simple filter, else None."""
    kind = rows[0, 0]
    if kind not in (_NONE, _SUB, _UP) or np.any(rows[:, 0] != kind):
        return None
    filtered = rows[:, 1:].reshape(len(rows), -1, channels)
    if kind == _NONE:
        return filtered.copy()
    # Sub adds the pixel to the left, Up the pixel above, both modulo 256: a running sum
    # along the row, or down the column, in uint8.
    return imagecodecs.delta_decode(filtered, axis=1 if kind == _SUB else 0)


def _libspng(data: bytes) -> np.ndarray | None:
    try:
        return pyspng.load(data)
    except (RuntimeError, ValueError):  # a stream libspng rejects: the general decoder says why
        return None


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = imagecodecs.deflate_crc32(payload, imagecodecs.deflate_crc32(kind))
    return struct.pack(">I4s", len(payload), kind) + payload + struct.pack(">I", crc)
