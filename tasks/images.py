"""Image reading shared by validate, cache and predict: judge a file, decode it, resize it.

One strict decode gives both the verdict and the pixels (`read_image`), so validate can hand
its pixels on and a file decodes the same wherever it is read. Plain 8-bit RGB/gray PNGs, the
bulk of real sets, take `tasks.png` once their chunks pass their CRCs: libpng's pixels, faster.
Other files go through Pillow, whose full decode raises on truncated and broken streams; for
JPEG, libjpeg-turbo's strict mode first catches data that ends early behind an end marker.
Every decoded image is normalised to uint8 RGB (or gray), upright per its EXIF orientation,
alpha dropped.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

from tasks.png import decode_plain_png, plain_png_header, png_damage

# We enforce validate.max_pixels ourselves, from the header, before any decoding.
Image.MAX_IMAGE_PIXELS = None
# A damaged EXIF block only loses the orientation (the image is read as stored); Pillow's
# warning for it would print once per file on large real sets.
warnings.filterwarnings("ignore", message="Corrupt EXIF data", category=UserWarning)

# MPO: a JPEG with more pictures (phones, stereo cameras); the first one is used.
SUPPORTED_FORMATS = {"JPEG", "MPO", "PNG", "BMP", "GIF", "WEBP", "TIFF"}

# Image formats Pillow cannot open, so "unsupported format" is told apart from "not an image".
_OTHER_IMAGE_SIGNATURES = (
    (4, b"ftypheic"), (4, b"ftypheix"), (4, b"ftypmif1"), (4, b"ftypavif"),
    (0, b"\xff\x0a"), (0, b"\x00\x00\x00\x0cJXL "), (0, b"8BPS"), (0, b"<svg"), (0, b"<?xml"),
)  # fmt: skip
_HEAD_BYTES = 64 * 2**20

# A JPEG whose entropy-coded data ends early (cut, then an end marker; or a header claiming
# more pixels than the data holds) only makes libjpeg warn and fill the rest with grey: Pillow
# drops the warning, OpenCV prints it, imagecodecs ignores it. simplejpeg's strict mode
# (libjpeg-turbo stopping on the first warning) raises it. Decoding at 1/8 scale in gray
# still entropy-decodes every block, which is what finds the end of the data, and skips most
# of the rest: ~57 us for a 128x128 photo, about half of Pillow's full decode (~120 us). Bytes
# after the end marker are never read, so trailing junk and an MPO's later pictures still pass.
# The warning's text tells the damage; other warnings (an unknown JFIF revision, padding
# between header markers) leave the pixels whole, as Pillow decodes them.
_JPEG_DAMAGE = (
    ("truncated", ("premature end", "found marker 0xd9")),  # the data ran out before the last block
    ("corrupt", ("bad huffman", "instead of rst")),  # the scan data does not parse
)
# "N extraneous bytes before marker 0xd9": the blocks were all decoded N bytes before the end marker.
# Zero or 0xFF padding there, which some cameras and uploaders leave (Kaggle's cats and dogs), leaves
# the pixels whole; anything else is scan data a damaged byte threw out of step (garbage pixels).
_EXTRANEOUS = re.compile(r"(\d+) extraneous bytes before marker 0xd9", re.IGNORECASE)


@dataclass(frozen=True)
class Verdict:
    """What validate learns of a file: `reason` is empty when the image is usable."""

    reason: str
    detail: str = ""
    format: str = ""
    mode: str = ""
    width: int = 0
    height: int = 0


def judge(data: bytes, max_pixels: int) -> Verdict:
    """Returns the verdict on an image file's bytes, decoding it fully unless the header rules it out."""
    return read_image(data, max_pixels, 3)[0]


def decode(data: bytes, channels: int, draft_size: int | None = None, max_pixels: int | None = None) -> np.ndarray:
    """Returns the image as a uint8 array (height, width, channels), RGB or gray; raises ValueError
    naming the reason when the bytes are not a usable image, as `judge` would find it with `max_pixels`.

    `draft_size` lets JPEG decode at 1/2, 1/4 or 1/8 scale in the DCT domain, keeping both
    sides at least that many pixels: far less work when the target is much smaller.
    """
    verdict, pixels = read_image(data, max_pixels, channels, draft_size)
    if pixels is None:
        raise ValueError(verdict.reason + (f": {verdict.detail}" if verdict.detail else ""))
    return pixels


def read_image_file(path: Path) -> bytes:
    """Returns a file's bytes to judge or decode: all of them, but for a file over 64 MiB that starts
    as no supported format does: its first 64 MiB, where the verdict is found, so a large file that
    is no image (a video among the photos) is ruled out without being read into memory whole."""
    with open(path, "rb") as handle:
        head = handle.read(_HEAD_BYTES)
        return head + handle.read() if _may_be_supported(head) else head


def _may_be_supported(head: bytes) -> bool:
    Image.init()  # the plugins' own tests of a file's first bytes, as Image.open applies them
    return any(accept is None or accept(head) for name, (_, accept) in Image.OPEN.items() if name in SUPPORTED_FORMATS)


def read_image(data: bytes, max_pixels: int | None, channels: int,
               draft_size: int | None = None) -> tuple[Verdict, np.ndarray | None]:  # fmt: skip
    """Returns (verdict, pixels): one strict decode gives both, the pixels as `decode` describes
    them when the image is usable, else None. `max_pixels` None: no limit.

    The verdict does not depend on `draft_size`: a JPEG decoded at a reduced scale still
    entropy-decodes every block, which is where its damage shows.
    """
    verdict, rgb = _read_plain_png(data, max_pixels) or _read_with_pillow(data, max_pixels, draft_size)
    if rgb is None:
        return verdict, None
    if rgb.shape[2] == 1:
        rgb = np.repeat(rgb, 3, axis=2)
    if channels == 1:
        return verdict, cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)[:, :, None]
    return verdict, np.ascontiguousarray(rgb)


def _read_plain_png(data: bytes, max_pixels: int | None) -> tuple[Verdict, np.ndarray] | None:
    """Returns (verdict, pixels) of a plain PNG whose header, chunks and data all pass, else None:
    the bulk of real sets, without Pillow. Anything else is Pillow's to judge, as before."""
    header = plain_png_header(data)
    if header is None:
        return None
    width, height, bands = header
    if (max_pixels is not None and width * height > max_pixels) or png_damage(data):
        return None
    rgb = decode_plain_png(data)
    if rgb is None:
        return None
    return Verdict("", format="PNG", mode="L" if bands == 1 else "RGB", width=width, height=height), rgb


def _read_with_pillow(data: bytes, max_pixels: int | None, draft_size: int | None) -> tuple[Verdict, np.ndarray | None]:
    if not data:
        return Verdict("empty"), None
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if any(data[offset : offset + len(sig)] == sig for offset, sig in _OTHER_IMAGE_SIGNATURES):
            return Verdict("unsupported_format", "not readable by Pillow"), None
        return Verdict("not_an_image"), None
    except Exception as exc:  # Pillow raises many types on a broken header
        return Verdict(_damage(exc), f"header: {exc}"), None
    header = dict(format=image.format or "", mode=image.mode, width=image.width, height=image.height)
    if image.format not in SUPPORTED_FORMATS:
        return Verdict("unsupported_format", image.format or "", **header), None
    if image.mode == "F":
        # 0..1 or 0..255 or any other range: a guess would cache some sets black, silently.
        return Verdict("unsupported_format", "floating-point pixels: no range to map to 8 bits", **header), None
    if max_pixels is not None and image.width * image.height > max_pixels:
        return Verdict("too_large", f"{image.width}x{image.height} > validate.max_pixels", **header), None
    if image.format == "PNG" and (damage := png_damage(data)):
        return Verdict(*damage, **header), None
    if image.format in ("JPEG", "MPO") and (damage := _jpeg_damage(data, image.mode)):
        return Verdict(*damage, **header), None
    try:
        pixels = _decode_with_pillow(image, draft_size)
    except _NoEightBitMapping as exc:
        return Verdict("unsupported_format", str(exc), **header), None
    except OSError as exc:
        return Verdict(_damage(exc), str(exc), **header), None
    except Exception as exc:
        return Verdict("corrupt", str(exc), **header), None
    if pixels.shape[1] != image.width:  # turned a quarter by its EXIF orientation: the sides as decoded
        header |= dict(width=header["height"], height=header["width"])
    return Verdict("", **header), pixels


def _damage(exc: Exception) -> str:
    # Pillow says "Truncated File Read" for a file cut in its header, "image file is truncated" in its data.
    return "truncated" if "truncated" in str(exc).lower() else "corrupt"


def _jpeg_damage(data: bytes, mode: str) -> tuple[str, str] | None:
    """Returns (reason, libjpeg's message) when the JPEG's data is cut short or broken, else None."""
    try:
        colorspace = "CMYK" if mode == "CMYK" else "GRAY"  # libjpeg-turbo cannot turn CMYK into gray
        simplejpeg.decode_jpeg(data, colorspace=colorspace, min_height=1, min_width=1, strict=True)
    except ValueError as exc:
        message = str(exc)
        for reason, signs in _JPEG_DAMAGE:
            if any(sign in message.lower() for sign in signs):
                return reason, message
        if (extraneous := _EXTRANEOUS.search(message)) and not _padding_before_end(data, int(extraneous.group(1))):
            return "corrupt", message
        # Any other warning or error: Pillow's own decode, next, gives the verdict.
    return None


def _padding_before_end(data: bytes, count: int) -> bool:
    """Whether the `count` bytes before the end marker of the first picture's scans are all 0x00 or all 0xFF."""
    end = _end_marker(data)
    if end is None or count > end:
        return False
    return set(data[end - count : end]) in ({0x00}, {0xFF})


def _end_marker(data: bytes) -> int | None:
    """Returns where the end marker (its fill bytes first) after the first picture's scan data starts; None
    when the markers do not lead there. Segments are skipped by their length, so an EXIF thumbnail's
    own end marker is not taken for it."""
    at = 2  # past the start marker
    while at < len(data) and data[at] == 0xFF:
        start = at
        while at < len(data) and data[at] == 0xFF:  # fill bytes before a marker
            at += 1
        if at + 1 > len(data):
            return None
        marker, at = data[at], at + 1
        if marker == 0xD9:
            return start
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            continue
        at += int.from_bytes(data[at : at + 2], "big")
        if marker == 0xDA:  # scan data, up to the next marker: 0xFF then neither a stuffed 0 nor a restart
            at = data.find(b"\xff", at)
            while 0 <= at < len(data) - 1 and (data[at + 1] == 0 or 0xD0 <= data[at + 1] <= 0xD7):
                at = data.find(b"\xff", at + 2)
            if at < 0:
                return None
    return None


class _NoEightBitMapping(ValueError):
    """Whole pixels, but no one way to make them 8-bit: a guess would cache some sets black or white."""


def _decode_with_pillow(image: Image.Image, draft_size: int | None) -> np.ndarray:
    """Returns the opened image decoded (raising as Pillow does on damage), upright, as uint8 RGB."""
    if draft_size and image.format in ("JPEG", "MPO"):
        image.draft("RGB", (draft_size, draft_size))
    image.load()
    image = ImageOps.exif_transpose(image)
    if image.mode == "I":  # 32-bit or signed; Pillow opens 16-bit gray PNGs and TIFFs as "I;16" (since 10.3)
        # 0..255, 0..4095 and 0..65535 all occur, and keeping a 16-bit image's high byte would
        # cache a 0..255 one black.
        raise _NoEightBitMapping("32-bit or signed integer pixels: no one range to map to 8 bits")
    if image.mode in ("I;16", "I;16B", "I;16L"):
        # 16-bit gray: keep the high byte, as Pillow's 8-bit modes and OpenCV do.
        gray = (np.asarray(image, dtype=np.int64) >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(image.convert("RGB"))


def resize(image: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """Returns `image` at (height, width) = `size`: stretched, padded (letterbox) or centre-cropped."""
    height, width = size
    h0, w0 = image.shape[:2]
    if mode == "stretch":
        return _shrink_or_grow(image, height, width)
    if mode == "crop":
        # Cut the centre at the target's aspect first, then resize: scaling the whole image up
        # first would ask a 1 x 40M strip for a 64 x 2.6G buffer.
        scale = max(height / h0, width / w0)
        crop_h, crop_w = min(h0, max(1, round(height / scale))), min(w0, max(1, round(width / scale)))
        top, left = (h0 - crop_h) // 2, (w0 - crop_w) // 2
        return _shrink_or_grow(np.ascontiguousarray(image[top : top + crop_h, left : left + crop_w]), height, width)
    scale = min(height / h0, width / w0)
    new_h, new_w = max(1, round(h0 * scale)), max(1, round(w0 * scale))
    out = np.zeros((height, width, image.shape[2]), dtype=np.uint8)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    out[top : top + new_h, left : left + new_w] = _shrink_or_grow(image, new_h, new_w)
    return out


def _shrink_or_grow(image: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    h0, w0 = image.shape[:2]
    factor = min(h0 // new_h, w0 // new_w)
    if factor >= 2:
        # Shrinking by 2x or more needs averaging against aliasing. Area averaging by a whole
        # factor is OpenCV's fast path (2.5x its general one, within 0.2 grey levels of it):
        # bilinear to factor x the target, then average.
        image = cv2.resize(image, (new_w * factor, new_h * factor), interpolation=cv2.INTER_LINEAR)
        return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA).reshape(new_h, new_w, -1)
    # Under 2x, bilinear reads every source pixel at least once: no averaging needed.
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR).reshape(new_h, new_w, -1)
