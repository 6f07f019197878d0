"""Image reading: judge, decode (fast PNG path and Pillow path) and resize."""

from __future__ import annotations

import io
import struct

import cv2
import numpy as np
import pytest
import simplejpeg
from PIL import Image, ImageOps, PngImagePlugin

from tasks.images import decode, judge, read_image, read_image_file, resize
from tasks.png import decode_plain_png
from tests.conftest import encode, noise, png_chunk

MAX_PIXELS = 50_000_000


def pillow_rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def orientation_exif(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


# --- decode: shapes and dtypes across modes -------------------------------------------------

H, W = 13, 21


def _image_in_mode(mode: str) -> bytes:
    rgb = Image.fromarray(noise(H, W, seed=1))
    if mode == "I;16":
        return encode(Image.fromarray((noise(H, W, channels=1).astype(np.uint16) * 257)), "PNG")
    if mode == "CMYK":
        return encode(rgb.convert("CMYK"), "JPEG")
    return encode(rgb.convert(mode), "PNG")


MODES = ["RGB", "L", "LA", "RGBA", "P", "1", "I;16", "CMYK"]


@pytest.mark.parametrize("mode", MODES)
def test_decode_rgb_is_uint8_height_width_3(mode):
    data = _image_in_mode(mode)
    assert Image.open(io.BytesIO(data)).mode == mode
    image = decode(data, 3)
    assert image.dtype == np.uint8
    assert image.shape == (H, W, 3)


@pytest.mark.parametrize("mode", MODES)
def test_decode_gray_is_uint8_height_width_1(mode):
    image = decode(_image_in_mode(mode), 1)
    assert image.dtype == np.uint8
    assert image.shape == (H, W, 1)


def _with_transparency(mode: str) -> bytes:
    """A PNG in `mode` with a tRNS chunk naming a colour that its pixels use."""
    image = Image.fromarray(noise(H, W, seed=2)).convert(mode)
    key = image.getpixel((0, 0))
    data = encode(image, "PNG", transparency=key)
    assert b"tRNS" in data
    return data


def _la() -> bytes:
    gray, alpha = (Image.fromarray(noise(H, W, channels=1, seed=seed)) for seed in (3, 4))
    return encode(Image.merge("LA", (gray, alpha)), "PNG")


# Modes that the fast path declines, each decoded the general way: Pillow's own conversion.
PILLOW_CONVERTED = {
    "P": lambda: encode(Image.fromarray(noise(H, W, seed=1)).convert("P"), "PNG"),
    "P with tRNS": lambda: _with_transparency("P"),
    "RGB with tRNS": lambda: _with_transparency("RGB"),
    "L with tRNS": lambda: _with_transparency("L"),
    "LA": _la,
    "1": lambda: encode(Image.fromarray(noise(H, W, seed=5)).convert("1"), "PNG"),
    "CMYK JPEG": lambda: encode(Image.fromarray(noise(H, W, channels=3, seed=6)).convert("CMYK"), "JPEG"),
}


@pytest.mark.parametrize("kind", PILLOW_CONVERTED)
def test_decode_gives_pillows_own_rgb_pixels(kind):
    data = PILLOW_CONVERTED[kind]()
    assert Image.open(io.BytesIO(data)).mode == kind.split()[0]
    assert np.array_equal(decode(data, 3), pillow_rgb(data))


def _sixteen_bit_png(channels: int) -> tuple[bytes, np.ndarray]:
    """A 16-bit gray or RGB PNG of random samples, and those samples (RGB order)."""
    samples = np.random.default_rng(channels).integers(0, 65536, (H, W, channels), dtype=np.uint16)
    ok, encoded = cv2.imencode(".png", samples[:, :, ::-1])  # OpenCV takes BGR
    assert ok and encoded[24] == 16  # IHDR bit depth
    return encoded.tobytes(), samples


@pytest.mark.parametrize("channels", [1, 3])
def test_16bit_png_decodes_to_the_high_byte_of_every_sample(channels):
    data, samples = _sixteen_bit_png(channels)
    assert Image.open(io.BytesIO(data)).mode == ("I;16" if channels == 1 else "RGB")
    high = np.broadcast_to(samples >> 8, (H, W, 3)).astype(np.uint8)
    assert np.array_equal(decode(data, 3), high)


def test_decode_rgba_drops_alpha_without_compositing():
    pixels = np.zeros((4, 6, 4), dtype=np.uint8)
    pixels[..., :3] = (200, 100, 50)  # fully transparent, but the colour is kept
    image = decode(encode(Image.fromarray(pixels), "PNG"), 3)
    assert (image == np.array([200, 100, 50], dtype=np.uint8)).all()


def test_decode_cmyk_jpeg_gives_rgb_colours():
    data = encode(Image.new("CMYK", (16, 8), (0, 255, 255, 0)), "JPEG", quality=95)  # pure red
    red, green, blue = decode(data, 3)[4, 8].astype(int)
    assert red > 200 and green < 60 and blue < 60


# --- the fast PNG path gives Pillow's pixels ------------------------------------------------


@pytest.mark.parametrize("size", [(1, 1), (17, 31), (33, 7), (101, 63)])
def test_fast_png_path_matches_pillow_for_8bit_rgb(size):
    data = encode(Image.fromarray(noise(*size, seed=size[0])), "PNG")
    assert decode_plain_png(data) is not None, "expected the fast path to be taken"
    assert np.array_equal(decode(data, 3), pillow_rgb(data))


@pytest.mark.parametrize("size", [(1, 1), (17, 31), (33, 7), (101, 63)])
def test_fast_png_path_matches_pillow_for_8bit_gray(size):
    data = encode(Image.fromarray(noise(*size, channels=1, seed=size[1])), "PNG")
    assert decode_plain_png(data) is not None, "expected the fast path to be taken"
    assert np.array_equal(decode(data, 3), pillow_rgb(data))


def test_fast_png_path_matches_pillow_for_opencv_written_png():
    pixels = noise(29, 43, seed=9)
    ok, encoded = cv2.imencode(".png", pixels)
    data = encoded.tobytes()
    assert ok and decode_plain_png(data) is not None
    assert np.array_equal(decode(data, 3), pillow_rgb(data))


def test_gray_png_with_one_channel_keeps_its_exact_values():
    pixels = noise(19, 23, channels=1, seed=4)
    assert np.array_equal(decode(encode(Image.fromarray(pixels), "PNG"), 1)[:, :, 0], pixels)


def test_png_with_exif_orientation_before_idat_is_decoded_upright():
    data = encode(Image.fromarray(noise(20, 30, seed=2)), "PNG", exif=orientation_exif(6))
    assert decode(data, 3).shape == (30, 20, 3)


@pytest.mark.parametrize("orientation, shape", [(6, (30, 20)), (8, (30, 20)), (3, (20, 30)), (1, (20, 30))])
@pytest.mark.parametrize("format, draft", [("JPEG", None), ("JPEG", 4), ("PNG", None)])
def test_the_verdict_gives_the_sides_of_the_upright_image(orientation, shape, format, draft):
    # The manifest's width and height are the cached image's, not the stored one's.
    data = encode(Image.fromarray(noise(20, 30, seed=2)), format, exif=orientation_exif(orientation))
    verdict, pixels = read_image(data, MAX_PIXELS, 3, draft)
    assert (verdict.height, verdict.width) == shape
    if draft is None:
        assert pixels.shape[:2] == shape


def test_png_with_exif_orientation_after_idat_is_decoded_upright():
    plain = encode(Image.fromarray(noise(20, 30, seed=2)), "PNG")
    assert plain.endswith(png_chunk(b"IEND", b""))
    data = plain[:-12] + png_chunk(b"eXIf", orientation_exif(6)) + plain[-12:]
    assert decode(data, 3).shape == (30, 20, 3)


def raw_profile_exif(value: int) -> str:
    """The EXIF text ImageMagick (and Pillow) write under "Raw profile type exif": hex after a header."""
    exif = orientation_exif(value)
    return f"\nexif\n{len(exif):8}\n{exif.hex()}\n"


XMP_ORIENTATION_6 = (
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    '<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
)


def orientation_text_png(chunk: str) -> bytes:
    """A 20x30 PNG whose only orientation (6) sits in a text chunk of kind `chunk`."""
    info = PngImagePlugin.PngInfo()
    if chunk == "tEXt":
        info.add_text("Raw profile type exif", raw_profile_exif(6))
    elif chunk == "tEXt exif":
        info.add_text("exif", b"Exif\x00\x00" + orientation_exif(6))  # Pillow takes its bytes as the EXIF block
    elif chunk == "zTXt":
        info.add_text("Raw profile type exif", raw_profile_exif(6), zip=True)
    elif chunk == "iTXt":
        info.add_itxt("Raw profile type exif", raw_profile_exif(6))
    else:
        info.add_itxt("XML:com.adobe.xmp", XMP_ORIENTATION_6)
    data = encode(Image.fromarray(noise(20, 30, seed=2)), "PNG", pnginfo=info)
    assert chunk[:4].encode() in data
    return data


ORIENTATION_TEXT_CHUNKS = ["tEXt", "tEXt exif", "zTXt", "iTXt", "iTXt XMP"]


@pytest.mark.parametrize("chunk", ORIENTATION_TEXT_CHUNKS)
def test_png_with_orientation_in_a_text_chunk_is_decoded_as_pillow_rotates_it(chunk):
    data = orientation_text_png(chunk)
    rotated = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert rotated.shape == (30, 20, 3)
    assert decode_plain_png(data) is None
    assert np.array_equal(decode(data, 3), rotated)


# --- 16-bit ---------------------------------------------------------------------------------


def test_16bit_gray_keeps_the_high_byte():
    data = encode(Image.fromarray(np.full((5, 7), 0x1234, dtype=np.uint16)), "PNG")
    assert (decode(data, 3) == 0x12).all()
    assert (decode(data, 1) == 0x12).all()


def test_16bit_rgb_keeps_the_high_byte_per_channel():
    pixels = np.empty((5, 7, 3), dtype=np.uint16)
    pixels[...] = (0xAB00, 0x1234, 0x56FF)  # OpenCV order: blue, green, red
    ok, encoded = cv2.imencode(".png", pixels)
    assert ok
    assert (decode(encoded.tobytes(), 3) == np.array([0x56, 0x12, 0xAB], dtype=np.uint8)).all()


# --- EXIF orientation and JPEG draft --------------------------------------------------------


def test_jpeg_exif_orientation_6_is_rotated_upright():
    pixels = np.zeros((40, 64, 3), dtype=np.uint8)
    pixels[:8] = 255  # a white band along the stored top edge
    data = encode(Image.fromarray(pixels), "JPEG", quality=95, exif=orientation_exif(6))
    image = decode(data, 3)
    assert image.shape == (64, 40, 3)
    # Orientation 6 means "rotate 90 degrees clockwise to view": the top edge becomes the right edge.
    assert image[:, -4:].mean() > 200
    assert image[:, :4].mean() < 50


def test_draft_size_decodes_large_jpeg_smaller_but_not_below_draft_size():
    pixels = cv2.resize(noise(12, 16, seed=3), (1600, 1200), interpolation=cv2.INTER_LINEAR)
    data = encode(Image.fromarray(pixels), "JPEG", quality=85)
    assert decode(data, 3).shape == (1200, 1600, 3)
    image = decode(data, 3, draft_size=300)
    assert image.dtype == np.uint8 and image.shape[2] == 3
    assert min(image.shape[:2]) >= 300
    assert image.shape[0] < 1200 and image.shape[1] < 1600


# --- resize ---------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [(20, 30), (64, 48), (7, 90)])
def test_stretch_gives_exact_size_and_keeps_channel_dim(channels, size):
    image = noise(37, 53, channels=3, seed=5)[:, :, :channels]
    out = resize(image, size, "stretch")
    assert out.shape == (*size, channels) and out.dtype == np.uint8


@pytest.mark.parametrize("channels", [1, 3])
def test_pad_keeps_aspect_with_black_borders(channels):
    image = np.full((20, 40, channels), 255, dtype=np.uint8)  # wide: pad above and below
    out = resize(image, (40, 40), "pad")
    assert out.shape == (40, 40, channels)
    assert (out[:10] == 0).all() and (out[30:] == 0).all()
    assert (out[10:30] == 255).all()


def test_pad_tall_image_gets_left_and_right_borders():
    image = np.full((60, 20, 3), 200, dtype=np.uint8)
    out = resize(image, (30, 30), "pad")
    assert (out[:, :10] == 0).all() and (out[:, 20:] == 0).all()
    assert (out[:, 10:20] == 200).all()


@pytest.mark.parametrize("channels", [1, 3])
def test_crop_fills_the_whole_target(channels):
    image = np.full((20, 40, channels), 255, dtype=np.uint8)
    out = resize(image, (40, 40), "crop")
    assert out.shape == (40, 40, channels)
    assert (out == 255).all()


def test_crop_keeps_the_centre():
    image = np.zeros((10, 30, 3), dtype=np.uint8)
    image[:, 10:20] = 255  # only the middle third is white
    out = resize(image, (10, 10), "crop")
    assert (out == 255).all()


@pytest.mark.parametrize("mode", ["stretch", "pad", "crop"])
@pytest.mark.parametrize("channels", [1, 3])
def test_upscaling_small_image_works(mode, channels):
    image = np.full((3, 5, channels), 90, dtype=np.uint8)
    out = resize(image, (64, 48), mode)
    assert out.shape == (64, 48, channels)
    assert (out == 90).any()


@pytest.mark.parametrize("mode", ["stretch", "pad", "crop"])
def test_large_downscale_keeps_flat_colour(mode):
    # The >=2x path (bilinear then area) must not shift a flat image's value.
    image = np.full((400, 600, 3), 123, dtype=np.uint8)
    out = resize(image, (50, 75), mode)
    assert out.shape == (50, 75, 3)
    assert (out == 123).all()


# --- judge ----------------------------------------------------------------------------------


def test_judge_accepts_a_good_png_with_its_header_facts():
    verdict = judge(encode(Image.fromarray(noise(13, 21)), "PNG"), MAX_PIXELS)
    assert (verdict.reason, verdict.format, verdict.mode, verdict.width, verdict.height) == ("", "PNG", "RGB", 21, 13)


def test_judge_rejects_png_with_flipped_byte_in_idat():
    data = bytearray(encode(Image.fromarray(noise(40, 50, seed=8)), "PNG"))
    start = data.index(b"IDAT") + 4
    length = struct.unpack(">I", data[start - 8 : start - 4])[0]
    data[start + length // 2] ^= 0xFF
    verdict = judge(bytes(data), MAX_PIXELS)
    assert verdict.reason in ("truncated", "corrupt"), verdict


@pytest.mark.parametrize(("form", "cut"), [("JPEG", 12), ("PNG", 22), ("BMP", 22)])
def test_a_file_cut_inside_its_header_is_truncated_not_corrupt(form, cut):
    data = encode(Image.fromarray(noise(40, 50, seed=3)), form)
    verdict = judge(data[:cut], MAX_PIXELS)  # past the signature, inside the header
    assert (verdict.reason, verdict.detail) == ("truncated", "header: Truncated File Read")


def test_judge_max_pixels_is_inclusive():
    data = encode(Image.fromarray(noise(10, 10)), "PNG")
    assert judge(data, 100).reason == ""
    assert judge(data, 99).reason == "too_large"


def test_judge_accepts_multi_picture_jpeg():
    frame = Image.fromarray(noise(40, 60, seed=6))
    data = encode(frame, "MPO", save_all=True, append_images=[frame])
    assert data[:2] == b"\xff\xd8" and decode(data, 3).shape == (40, 60, 3)
    assert judge(data, MAX_PIXELS).reason == ""


# --- judge: JPEGs whose data ends early ----------------------------------------------------


def photo(height: int = 128, width: int = 128, seed: int = 0) -> np.ndarray:
    """Smooth colour plus grain: compresses like a photo, unlike pure noise."""
    rng = np.random.default_rng(seed)
    base = cv2.resize(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)


def photo_jpeg(**kwargs) -> bytes:
    return encode(Image.fromarray(photo()), "JPEG", quality=90, **kwargs)


def scan_start(data: bytes) -> int:
    """Returns where the first scan's entropy-coded data begins (after the SOS segment)."""
    sos = data.index(b"\xff\xda")
    return sos + 2 + struct.unpack(">H", data[sos + 2 : sos + 4])[0]


END = b"\xff\xd9"


def assert_truncated(verdict, width: int = 128, height: int = 128) -> None:
    assert verdict.reason == "truncated", verdict
    assert "premature end" in verdict.detail.lower() or "marker 0xd9" in verdict.detail.lower(), verdict
    assert (verdict.format, verdict.width, verdict.height) == ("JPEG", width, height)


def test_jpeg_cut_to_a_tenth_with_end_marker_is_rejected_as_truncated():
    data = photo_jpeg()
    cut = len(data) // 10
    assert cut > scan_start(data)  # the cut falls inside the pixel data, not the header
    assert_truncated(judge(data[:cut] + END, MAX_PIXELS))


def test_jpeg_header_with_only_an_end_marker_is_rejected_as_truncated():
    data = photo_jpeg()
    assert_truncated(judge(data[: scan_start(data)] + END, MAX_PIXELS))


def test_jpeg_whose_header_claims_more_pixels_than_its_data_holds_is_rejected_as_truncated():
    data = bytearray(encode(Image.fromarray(noise(16, 16, seed=1)), "JPEG", quality=90))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 6000, 6000)  # height, width
    assert_truncated(judge(bytes(data), MAX_PIXELS), 6000, 6000)


def test_progressive_jpeg_cut_short_with_end_marker_is_rejected_as_truncated():
    data = photo_jpeg(progressive=True)
    assert_truncated(judge(data[: len(data) // 2] + END, MAX_PIXELS))


def test_cmyk_jpeg_cut_short_with_end_marker_is_rejected_as_truncated():
    data = encode(Image.fromarray(photo()).convert("CMYK"), "JPEG", quality=90)
    verdict = judge(data[: len(data) // 2] + END, MAX_PIXELS)
    assert (verdict.reason, verdict.mode) == ("truncated", "CMYK"), verdict


def test_jpeg_cut_at_a_restart_marker_with_end_marker_is_rejected_as_truncated():
    data = photo_jpeg(restart_marker_blocks=4)
    assert_truncated(judge(data[: data.index(b"\xff\xd3")] + END, MAX_PIXELS))


def _padded_between_header_markers(data: bytes) -> bytes:
    dqt = data.index(b"\xff\xdb")
    return data[:dqt] + bytes(3) + data[dqt:]  # libjpeg warns, skips them, and the pixels are whole


def _unknown_jfif_revision(data: bytes) -> bytes:
    at = data.index(b"JFIF\x00") + 5
    return data[:at] + b"\x02" + data[at + 1 :]  # libjpeg warns; nothing else changes


WHOLE_JPEGS = {
    "baseline": photo_jpeg,
    "progressive": lambda: photo_jpeg(progressive=True),
    "gray": lambda: encode(Image.fromarray(photo()).convert("L"), "JPEG"),
    "CMYK": lambda: encode(Image.fromarray(photo()).convert("CMYK"), "JPEG"),
    "restart markers": lambda: photo_jpeg(restart_marker_blocks=4),
    "MPO": lambda: encode(Image.fromarray(photo()), "MPO", save_all=True, append_images=[Image.fromarray(photo(1))]),
    "junk after the end marker": lambda: photo_jpeg() + b"appended by some uploader\x00" * 8,
    "padding before the end marker": lambda: photo_jpeg()[:-2] + bytes(7) + END,  # libjpeg: 7 extraneous bytes
    "0xFF padding before the end marker": lambda: photo_jpeg()[:-2] + b"\xff" * 7 + END,
    # The walk to the end marker skips segments by their length: an end marker inside one is not it.
    "padding, an end marker in a comment": lambda: photo_jpeg(comment=b"thumb\xff\xd9")[:-2] + bytes(7) + END,
    "padding between header markers": lambda: _padded_between_header_markers(photo_jpeg()),
    "unknown JFIF revision": lambda: _unknown_jfif_revision(photo_jpeg()),
}


def test_padding_before_the_end_marker_leaves_the_pixels_whole():
    data = photo_jpeg()
    assert np.array_equal(decode(data[:-2] + bytes(7) + END, 3), decode(data, 3))


def _flipped_out_of_step() -> bytes:
    """Returns the photo with one scan byte flipped so that libjpeg's only complaint is extraneous bytes
    before the end marker: it decoded every block too soon, from scan data out of step."""
    data = photo_jpeg()
    for at in range(scan_start(data) + 16, len(data) - 2):
        flipped = data[:at] + bytes([data[at] ^ 0x5A]) + data[at + 1 :]
        try:
            simplejpeg.decode_jpeg(flipped, colorspace="GRAY", strict=True)
        except ValueError as exc:
            if "extraneous bytes before marker 0xd9" in str(exc):
                return flipped
    raise AssertionError("no byte of the photo throws the scan out of step")


@pytest.mark.parametrize("junk", ["a damaged byte", "non-zero junk"])
def test_extraneous_bytes_before_the_end_marker_that_are_not_padding_are_corrupt(junk):
    data = _flipped_out_of_step() if junk == "a damaged byte" else photo_jpeg()[:-2] + b"uploader" + END
    verdict = judge(data, MAX_PIXELS)
    assert verdict.reason == "corrupt" and "extraneous bytes before marker 0xd9" in verdict.detail, verdict


@pytest.mark.parametrize("kind", WHOLE_JPEGS)
def test_whole_jpeg_is_valid(kind):
    verdict = judge(WHOLE_JPEGS[kind](), MAX_PIXELS)
    assert (verdict.reason, verdict.width, verdict.height) == ("", 128, 128), verdict


# --- one decode gives the verdict and the pixels -------------------------------------------

def _cut(data: bytes, fraction: float) -> bytes:
    return data[: int(len(data) * fraction)]


def _scrambled(data: bytes) -> bytes:
    return data[:800] + bytes(b ^ 0x5A for b in data[800:1000]) + data[1000:]


BROKEN_JPEGS = {
    "cut to a tenth": lambda: _cut(photo_jpeg(), 0.1) + END,
    "header only": lambda: photo_jpeg()[: scan_start(photo_jpeg())] + END,
    "progressive, cut": lambda: _cut(photo_jpeg(progressive=True), 0.5) + END,
    "cut without an end marker": lambda: _cut(photo_jpeg(), 0.5),
    "scrambled scan data": lambda: _scrambled(photo_jpeg()),
}


@pytest.mark.parametrize("kind", [*WHOLE_JPEGS, *BROKEN_JPEGS])
@pytest.mark.parametrize("draft_size", [16, 40])
def test_jpeg_verdict_does_not_depend_on_the_draft_size_validate_decodes_at(kind, draft_size):
    data = {**WHOLE_JPEGS, **BROKEN_JPEGS}[kind]()
    verdict, pixels = read_image(data, MAX_PIXELS, 3, draft_size)
    assert verdict == judge(data, MAX_PIXELS)
    assert (pixels is None) == bool(verdict.reason) == (kind in BROKEN_JPEGS)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("channels", [1, 3])
def test_pixels_with_the_verdict_are_the_pixels_decode_gives(mode, channels):
    data = _image_in_mode(mode)
    verdict, pixels = read_image(data, MAX_PIXELS, channels, draft_size=8)
    assert verdict.reason == ""
    assert np.array_equal(pixels, decode(data, channels, draft_size=8))


def test_decode_of_a_broken_file_raises_naming_the_reason():
    data = encode(Image.fromarray(noise(40, 50)), "PNG")
    with pytest.raises(ValueError, match="^truncated: "):
        decode(data[: len(data) // 2], 3)


def test_crop_of_an_extreme_strip_cuts_before_it_scales():
    # Scaled whole before the cut, this 1 x 4M strip would need a 64 x 256M x 3 buffer (49 GB).
    image = np.full((1, 4_000_000, 3), 77, dtype=np.uint8)
    out = resize(image, (64, 64), "crop")
    assert out.shape == (64, 64, 3) and (out == 77).all()


# --- read_image_file: what is read of a file --------------------------------------------------

def test_a_large_image_is_read_whole(tmp_path):
    path = tmp_path / "poster.bmp"  # uncompressed: past the first 64 MiB
    Image.new("RGB", (4800, 4800), (200, 30, 90)).save(path)
    assert path.stat().st_size > 64 * 2**20
    assert read_image_file(path) == path.read_bytes()


def test_a_large_file_that_is_no_image_is_judged_without_being_read_into_memory(tmp_path):
    import tracemalloc

    movie = tmp_path / "holiday.mp4"
    with open(movie, "wb") as handle:
        handle.write(b"\x00\x00\x00\x18ftypmp42")
        handle.truncate(2**30)  # sparse: 1 GiB on disk costs nothing
    tracemalloc.start()
    try:
        verdict = judge(read_image_file(movie), MAX_PIXELS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert verdict.reason == "not_an_image"
    assert peak < 100 * 2**20
