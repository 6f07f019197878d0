"""The offline demo archive: a small, malaria-like, two-class set with the real set's junk.

Round pink cells on black, 100-200 px, named like the NIH files (`C<patient>P<slide>...`);
the `Parasitized` ones carry dark purple stained spots. Beside them, what real archives
hold: a `Thumbs.db` per class and a `__MACOSX/` resource fork (extract skips those), an
empty file, a truncated PNG, a text file named `.png`, and an exact duplicate (validate
rejects or folds those). Same arguments, same archive bytes.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import cv2
import numpy as np

from tasks.files import named_output

CLASSES = ("Parasitized", "Uninfected")
TOP = "cell_images"
_FIXED_TIME = (2018, 4, 1, 0, 0, 0)

# What validate and extract must report for any demo archive, beside 2 x per_class valid images.
EXPECTED_REJECTED = {"empty": 1, "truncated": 1, "not_an_image": 1}
EXPECTED_DUPLICATES = 1
EXPECTED_SKIPPED = {"os_junk": 3}


def _cell(rng: np.random.Generator, parasitized: bool) -> np.ndarray:
    height, width = (int(v) for v in rng.integers(100, 200, size=2))
    image = np.zeros((height, width, 3), dtype=np.uint8)
    center = (width // 2 + int(rng.integers(-4, 5)), height // 2 + int(rng.integers(-4, 5)))
    axes = (width // 2 - int(rng.integers(6, 14)), height // 2 - int(rng.integers(6, 14)))
    pink = tuple(int(c) for c in rng.integers((190, 120, 130), (235, 160, 175)))
    cv2.ellipse(image, center, axes, float(rng.uniform(0, 180)), 0, 360, pink, thickness=-1)
    inside = image.any(axis=2)
    noise = rng.normal(0, 6, size=image.shape)
    image = np.where(inside[:, :, None], np.clip(image + noise, 0, 255), 0).astype(np.uint8)
    if parasitized:
        for _ in range(int(rng.integers(1, 4))):
            angle, radius = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.6)
            spot = (int(center[0] + np.cos(angle) * axes[0] * radius), int(center[1] + np.sin(angle) * axes[1] * radius))
            purple = tuple(int(c) for c in rng.integers((50, 10, 90), (90, 40, 130)))
            cv2.circle(image, spot, int(rng.integers(7, 12)), purple, thickness=-1)
    return cv2.GaussianBlur(image, (3, 3), 0)


def _png(rgb: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return encoded.tobytes()


def _name(rng: np.random.Generator, index: int) -> str:
    patient, slide = int(rng.integers(40, 240)), int(rng.integers(1, 120))
    return f"C{patient}P{slide}ThinF_IMG_20150604_{index:06d}_cell_{int(rng.integers(1, 250))}.png"


def make_demo_archive(out: Path, per_class: int = 200, seed: int = 0) -> Path:
    """Returns `out`, a zip of `per_class` valid images per class plus the junk listed above."""
    if per_class < 4:
        raise ValueError("per_class must be at least 4: the split needs train, val and test images per class")
    rng = np.random.default_rng(seed)
    entries: list[tuple[str, bytes]] = []
    for label in CLASSES:
        for index in range(per_class):
            entries.append((f"{TOP}/{label}/{_name(rng, index)}", _png(_cell(rng, label == "Parasitized"))))
        entries.append((f"{TOP}/{label}/Thumbs.db", b"\xd0\xcf\x11\xe0" + bytes(60)))
    first_path, first_bytes = entries[0]
    entries += [
        (f"{TOP}/Uninfected/C999P1ThinF_empty.png", b""),
        (f"{TOP}/Uninfected/C999P2ThinF_truncated.png", _png(_cell(rng, False))[:300]),
        (f"{TOP}/Parasitized/C999P3ThinF_notes.png", b"scanned by the lab, see slide log\n"),
        (first_path.replace(".png", "_copy.png"), first_bytes),
        (f"__MACOSX/{TOP}/Parasitized/._{Path(first_path).name}", b"\x00\x05\x16\x07" + bytes(28)),
    ]
    with named_output(out, "wb") as handle, zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED) as archive:
        for name, payload in entries:
            info = zipfile.ZipInfo(name, date_time=_FIXED_TIME)
            archive.writestr(info, payload)
    return out
