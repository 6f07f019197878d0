"""The plain-PNG decoder: libpng's pixels for every row filter, either way, and None for what it declines."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import imagecodecs
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from tasks.png import SIGNATURE, _chunks, _inflate, _undo_one_filter, decode_plain_png, png_damage
from tests.conftest import encode, noise, png_chunk


def _predictor(kind: int, a: int, b: int, c: int) -> int:
    """The PNG specification's predictor for one byte (a left, b up, c up-left)."""
    if kind == 0:
        return 0
    if kind == 1:
        return a
    if kind == 2:
        return b
    if kind == 3:
        return (a + b) // 2
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else b if pb <= pc else c


def filtered_png(pixels: np.ndarray, filters: list[int], idat_parts: int = 1, ihdr: dict | None = None) -> bytes:
    """Returns an 8-bit PNG of `pixels` (h, w) gray or (h, w, 3) RGB whose row y uses filter filters[y]."""
    height, width = pixels.shape[:2]
    bpp = 1 if pixels.ndim == 2 else pixels.shape[2]
    rows = pixels.reshape(height, width * bpp).astype(int)
    raw = bytearray()
    for y in range(height):
        raw.append(filters[y])
        for i in range(width * bpp):
            a = rows[y, i - bpp] if i >= bpp else 0
            b = rows[y - 1, i] if y else 0
            c = rows[y - 1, i - bpp] if y and i >= bpp else 0
            raw.append((rows[y, i] - _predictor(filters[y], a, b, c)) % 256)
    header = {"depth": 8, "colour": 0 if bpp == 1 else 2, "interlace": 0} | (ihdr or {})
    stream = zlib.compress(bytes(raw))
    cuts = np.linspace(0, len(stream), idat_parts + 1).astype(int)
    return (
        SIGNATURE
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, header["depth"], header["colour"], 0, 0, header["interlace"]))
        + b"".join(png_chunk(b"IDAT", stream[start:end]) for start, end in zip(cuts, cuts[1:]))
        + png_chunk(b"IEND", b"")
    )


def pillow_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def one_filter_way(data: bytes) -> np.ndarray | None:
    """The one-filter way alone: pixels, or None when the file is not one-filter."""
    width, height, _, colour = struct.unpack_from(">IIBB", data, 16)
    channels = 1 if colour == 0 else 3
    return _undo_one_filter(_inflate(memoryview(data), _chunks(data), height, width, channels), channels)


# --- the pixels are libpng's and Pillow's ----------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kind", [0, 1, 2, 3, 4])
def test_every_row_filter_is_undone_exactly(kind, channels):
    pixels = noise(9, 11, channels=channels, seed=kind)
    data = filtered_png(pixels, [kind] * 9)
    decoded = decode_plain_png(data)
    assert decoded is not None
    assert np.array_equal(decoded.reshape(pixels.shape), pixels)
    assert np.array_equal(decoded.reshape(pixels.shape), imagecodecs.png_decode(data))


@pytest.mark.parametrize("channels", [1, 3])
def test_mixed_filters_from_row_to_row_and_several_idat_chunks(channels):
    pixels = noise(15, 7, channels=channels, seed=3)
    filters = [4, 3, 1, 2, 0, 4, 4, 3, 3, 2, 1, 0, 1, 4, 2]
    data = filtered_png(pixels, filters, idat_parts=4)
    assert np.array_equal(decode_plain_png(data).reshape(pixels.shape), pillow_pixels(data))


@pytest.mark.parametrize("size", [(1, 1), (1, 40), (40, 1), (57, 83)])
def test_pillow_written_png_with_adaptive_filters_matches_pillow(size):
    data = encode(Image.fromarray(noise(*size, seed=size[1])), "PNG", optimize=True)
    assert np.array_equal(decode_plain_png(data), pillow_pixels(data))


def test_opencv_written_png_matches_opencv():
    pixels = noise(31, 45, seed=8)
    ok, encoded = cv2.imencode(".png", pixels)
    assert ok
    rgb = decode_plain_png(encoded.tobytes())
    assert np.array_equal(rgb[:, :, ::-1], cv2.imdecode(encoded, cv2.IMREAD_COLOR))


def test_smooth_photo_like_image_matches_libpng():
    gradient = np.add.outer(np.arange(120), np.arange(160)).astype(np.uint8)
    pixels = np.stack([gradient, gradient[::-1], 255 - gradient], axis=2)
    data = encode(Image.fromarray(pixels), "PNG", compress_level=9)
    assert np.array_equal(decode_plain_png(data), imagecodecs.png_decode(data))


# --- which way a file takes ----------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kind", [0, 1, 2])
def test_one_simple_filter_on_every_row_is_undone_the_one_filter_way(kind, channels):
    pixels = noise(12, 10, channels=channels, seed=kind)
    decoded = one_filter_way(filtered_png(pixels, [kind] * 12, idat_parts=3))
    assert decoded is not None
    assert np.array_equal(decoded.reshape(pixels.shape), pixels)


@pytest.mark.parametrize("filters", [[3] * 6, [4] * 6, [1, 1, 1, 1, 1, 2], [0, 0, 0, 0, 0, 4]])
def test_mixed_or_paeth_or_average_rows_are_not_for_the_one_filter_way(filters):
    assert one_filter_way(filtered_png(noise(6, 5, seed=1), filters)) is None


@pytest.mark.parametrize("filters", [[1] * 6, [1, 1, 1, 1, 1, 4]])
def test_each_file_is_inflated_once_either_way(monkeypatch, filters):
    inflates = []
    real = imagecodecs.deflate_decode
    monkeypatch.setattr(imagecodecs, "deflate_decode", lambda *args, **kwargs: inflates.append(1) or real(*args, **kwargs))
    pixels = noise(6, 5, seed=1)
    assert np.array_equal(decode_plain_png(filtered_png(pixels, filters)), pixels)
    assert len(inflates) == 1


# --- what it declines, so the caller decodes the general way --------------------------------


@pytest.mark.parametrize("mode", ["P", "RGBA", "LA", "1"])
def test_other_colour_types_are_declined(mode):
    data = encode(Image.fromarray(noise(6, 6, seed=1)).convert(mode), "PNG")
    assert decode_plain_png(data) is None


def test_16bit_is_declined():
    data = encode(Image.fromarray(np.full((4, 4), 513, dtype=np.uint16)), "PNG")
    assert decode_plain_png(data) is None


def test_interlaced_is_declined():
    assert decode_plain_png(filtered_png(noise(4, 4, seed=2), [0] * 4, ihdr={"interlace": 1})) is None


def with_chunk(kind: bytes, payload: bytes, after_idat: bool = False) -> bytes:
    """A plain 4x4 RGB PNG with one more chunk, right after IHDR or right before IEND."""
    data = filtered_png(noise(4, 4, seed=2), [0] * 4)
    at = len(data) - 12 if after_idat else 33
    return data[:at] + png_chunk(kind, payload) + data[at:]


@pytest.mark.parametrize("kind", [b"tRNS", b"eXIf"])
def test_chunk_that_changes_or_rotates_pixels_is_declined(kind):
    assert decode_plain_png(with_chunk(kind, b"\x00\x00")) is None


# Text chunks under the keywords Pillow reads an orientation from: EXIF as hex, and XMP.
ORIENTATION_TEXT = [
    (b"tEXt", b"Raw profile type exif\0\nexif\n      26\n4578..."),
    (b"zTXt", b"Raw profile type exif\0\0" + zlib.compress(b"\nexif\n      26\n4578...")),
    (b"iTXt", b"Raw profile type exif\0\0\0\0\0\nexif\n      26\n4578..."),
    (b"iTXt", b'XML:com.adobe.xmp\0\0\0\0\0<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'),
]


@pytest.mark.parametrize("after_idat", [False, True])
@pytest.mark.parametrize(("kind", "payload"), ORIENTATION_TEXT, ids=["tEXt exif", "zTXt exif", "iTXt exif", "iTXt XMP"])
def test_text_chunk_that_may_hold_an_orientation_is_declined(kind, payload, after_idat):
    assert decode_plain_png(with_chunk(kind, payload, after_idat)) is None


@pytest.mark.parametrize(
    ("kind", "payload"),
    [
        (b"tEXt", b"Comment\0Raw profile type exif"),
        (b"zTXt", b"Software\0\0" + zlib.compress(b"OpenCV")),
        (b"iTXt", b"Comment\0\0\0\0\0XML:com.adobe.xmp"),
        (b"iTXt", b"Raw profile type iptc\0\0\0\0\0\n"),
    ],
    ids=["tEXt Comment", "zTXt Software", "iTXt Comment", "iTXt iptc"],
)
def test_other_text_chunks_keep_the_fast_path(kind, payload):
    assert np.array_equal(decode_plain_png(with_chunk(kind, payload)), noise(4, 4, seed=2))


def test_pillow_written_png_with_orientation_in_raw_profile_text_is_declined():
    exif = Image.Exif()
    exif[0x0112] = 6
    hexed = exif.tobytes().hex()
    info = PngImagePlugin.PngInfo()
    info.add_text("Raw profile type exif", f"\nexif\n{len(hexed) // 2:8}\n{hexed}\n")
    data = encode(Image.fromarray(noise(6, 9, seed=1)), "PNG", pnginfo=info)
    assert Image.open(io.BytesIO(data)).getexif()[0x0112] == 6  # Pillow reads it, so would rotate
    assert decode_plain_png(data) is None


def test_unknown_filter_type_is_declined():
    data = filtered_png(noise(4, 4, seed=2), [0, 1, 5, 0])
    assert decode_plain_png(data) is None


def test_stream_shorter_than_the_header_says_is_declined():
    data = filtered_png(noise(4, 4, seed=2), [0] * 4)
    taller = SIGNATURE + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 5, 8, 0, 0, 0, 0)) + data[33:]
    assert decode_plain_png(taller) is None


def test_stream_longer_than_the_header_says_is_declined():
    data = filtered_png(noise(4, 4, seed=2), [0] * 4)
    shorter = SIGNATURE + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 3, 8, 0, 0, 0, 0)) + data[33:]
    assert decode_plain_png(shorter) is None


@pytest.mark.parametrize("cut", [20, 40, -12, -1])
def test_truncated_file_is_declined(cut):
    assert decode_plain_png(filtered_png(noise(4, 4, seed=2), [0] * 4)[:cut]) is None


@pytest.mark.parametrize("data", [b"", b"GIF89a" + bytes(40), encode(Image.new("RGB", (4, 4)), "JPEG")])
def test_other_formats_are_declined(data):
    assert decode_plain_png(data) is None


# --- the chunk check every PNG gets ----------------------------------------------------------


def test_whole_png_and_bytes_after_its_end_chunk_pass_the_chunk_check():
    data = filtered_png(noise(4, 4, seed=2), [0] * 4, idat_parts=3)
    assert png_damage(data) is None
    assert png_damage(data + b"appended by some uploader") is None


@pytest.mark.parametrize("chunk", [0, 1, 2, 3])
def test_a_bad_crc_in_any_chunk_is_corrupt(chunk):
    data = bytearray(filtered_png(noise(4, 4, seed=2), [0] * 4, idat_parts=2))  # IHDR, IDAT, IDAT, IEND
    offset = 8
    for _ in range(chunk):
        offset += 12 + struct.unpack_from(">I", data, offset)[0]
    length, kind = struct.unpack_from(">I4s", data, offset)
    data[offset + 8 + length] ^= 0x80
    assert png_damage(bytes(data)) == ("corrupt", f"bad CRC in the {kind.decode()} chunk at byte {offset}")


@pytest.mark.parametrize(("cut", "detail"), [(60, "ends inside its IDAT chunk"), (40, "ends before its IEND chunk"),
                                             (-12, "ends before its IEND chunk"),
                                             (-1, "ends inside its IEND chunk")])  # fmt: skip
def test_a_png_cut_short_is_truncated(cut, detail):
    reason, said = png_damage(filtered_png(noise(4, 4, seed=2), [0] * 4)[:cut])
    assert reason == "truncated" and detail in said


def test_idat_chunks_with_a_chunk_between_them_are_declined():
    # libpng refuses them ("Too many IDATs found", or too little data): the general decoder judges.
    data = filtered_png(noise(4, 4, seed=2), [0] * 4, idat_parts=2)  # IHDR, IDAT, IDAT, IEND
    second_idat = 33 + 12 + struct.unpack_from(">I", data, 33)[0]
    assert decode_plain_png(data) is not None
    assert decode_plain_png(data[:second_idat] + png_chunk(b"tEXt", b"a\0b") + data[second_idat:]) is None


def test_an_unknown_critical_chunk_is_corrupt():
    # Pillow skips it; libpng, OpenCV and tf.io.decode_png refuse the file, as the PNG spec asks.
    assert png_damage(with_chunk(b"ABCD", b"xx")) == ("corrupt", "unknown critical chunk ABCD at byte 33")
    assert png_damage(with_chunk(b"abCD", b"xx")) is None  # ancillary: a decoder may skip it
