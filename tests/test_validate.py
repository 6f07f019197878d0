"""Stage validate: each file under extracted/ becomes one manifest row, judged by its content."""

from __future__ import annotations

import csv
import hashlib
import os
import re
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from tasks.manifest import MANIFEST_COLUMNS
from tasks.params import PrepareParams, ValidateParams
from tasks.rows import Staging
from tasks.validate import SHARD_FILES, ValidateError, validate
from tests.conftest import encode, in_process, noise, png_chunk


def png_bytes(height: int = 12, width: int = 20, seed: int = 0) -> bytes:
    return encode(Image.fromarray(noise(height, width, seed=seed)), "PNG")


def jpeg_bytes(height: int = 48, width: int = 64, seed: int = 0) -> bytes:
    return encode(Image.fromarray(noise(height, width, seed=seed)), "JPEG", quality=90)


def write(root: Path, rel: str, data: bytes) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def run_validate(root: Path, tmp_path: Path, max_pixels: int = 50_000_000, map_shards=in_process) -> dict[str, dict]:
    """Runs validate on `root` and returns the manifest's rows keyed by path."""
    manifest = tmp_path / "manifest.csv"
    try:
        validate(ValidateParams(max_pixels=max_pixels), root, manifest, map_shards)
    except ValidateError:
        pass  # a tree without a valid image stops validate after it writes the manifest, read below
    with open(manifest, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == MANIFEST_COLUMNS
        rows = list(reader)
    by_path = {row["path"]: row for row in rows}
    assert len(by_path) == len(rows), "a path appears twice in the manifest"
    return by_path


@pytest.fixture
def root(tmp_path) -> Path:
    folder = tmp_path / "extracted"
    folder.mkdir()
    return folder


def assert_rejected(row: dict, reason: str) -> None:
    assert (row["status"], row["reason"]) == ("rejected", reason), row


def assert_valid(row: dict, fmt: str, width: int, height: int) -> None:
    assert (row["status"], row["reason"]) == ("valid", ""), row
    assert (row["format"], int(row["width"]), int(row["height"])) == (fmt, width, height), row


# --- rejections -----------------------------------------------------------------------------


def test_empty_file_is_rejected_as_empty(root, tmp_path):
    write(root, "cat/empty.png", b"")
    assert_rejected(run_validate(root, tmp_path)["cat/empty.png"], "empty")


@pytest.mark.parametrize(("name", "encoded", "fmt"), [("cut.png", png_bytes, "PNG"), ("cut.jpg", jpeg_bytes, "JPEG")])
def test_truncated_image_is_rejected_with_reason_truncated(root, tmp_path, name, encoded, fmt):
    data = encoded(64, 80)
    write(root, f"cat/{name}", data[: len(data) // 2])
    row = run_validate(root, tmp_path)[f"cat/{name}"]
    assert_rejected(row, "truncated")
    assert row["format"] == fmt


def test_text_file_named_png_is_rejected_as_not_an_image(root, tmp_path):
    write(root, "cat/x.png", b"just some text, not pixels\n" * 10)
    assert_rejected(run_validate(root, tmp_path)["cat/x.png"], "not_an_image")


def test_psd_signature_is_rejected_as_unsupported_format(root, tmp_path):
    write(root, "cat/layers.png", b"8BPS\x00\x01" + bytes(64))
    assert_rejected(run_validate(root, tmp_path)["cat/layers.png"], "unsupported_format")


def test_format_pillow_opens_but_not_supported_is_rejected_as_unsupported_format(root, tmp_path):
    write(root, "cat/a.ppm", encode(Image.fromarray(noise(9, 11)), "PPM"))
    write(root, "cat/b.ico", encode(Image.fromarray(noise(16, 16)), "ICO"))
    rows = run_validate(root, tmp_path)
    assert_rejected(rows["cat/a.ppm"], "unsupported_format")
    assert rows["cat/a.ppm"]["format"] == "PPM"
    assert_rejected(rows["cat/b.ico"], "unsupported_format")
    assert rows["cat/b.ico"]["format"] == "ICO"


def test_floating_point_and_wide_integer_tiffs_are_rejected_not_cached_black_or_white(root, tmp_path):
    # Float pixels come in 0..1 as often as in 0..255: no mapping to 8 bits is right for both.
    write(root, "cat/float.tif", encode(Image.fromarray(np.random.default_rng(0).random((8, 8), dtype=np.float32)), "TIFF"))
    write(root, "cat/int16.tif", encode(Image.fromarray(noise(8, 8)[..., 0].astype(np.uint16) << 8), "TIFF"))
    # 32-bit integers in 0..255 (a high byte would be 0: black), in 0..65535, and beyond.
    for name, values in (("int32-8bit", np.arange(64) * 4), ("int32-16bit", np.arange(64) << 10),
                         ("int32", np.arange(64) << 14)):  # fmt: skip
        write(root, f"cat/{name}.tif", encode(Image.fromarray(values.astype(np.int32).reshape(8, 8)), "TIFF"))
    rows = run_validate(root, tmp_path)
    assert_rejected(rows["cat/float.tif"], "unsupported_format")
    assert "floating-point" in rows["cat/float.tif"]["detail"]
    for name in ("int32-8bit", "int32-16bit", "int32"):
        assert_rejected(rows[f"cat/{name}.tif"], "unsupported_format")
        assert "32-bit or signed integer pixels" in rows[f"cat/{name}.tif"]["detail"]
    assert_valid(rows["cat/int16.tif"], "TIFF", 8, 8)


def test_one_class_is_refused_here_not_at_train_with_its_subfolders_named(root, tmp_path):
    for split_folder in ("train", "test"):  # an extra level: train/images/{cat,dog}/
        for label in ("cat", "dog"):
            write(root, f"{split_folder}/images/{label}/{split_folder}-{label}.png", png_bytes(8 + len(label), 8))
    with pytest.raises(ValidateError, match=r"every valid image is of one class, 'images': a classifier needs two or "
                                            r"more class folders; its subfolders \(cat, dog\) may be the classes"):
        validate(ValidateParams(), root, tmp_path / "manifest.csv", in_process)
    assert (tmp_path / "manifest.csv").exists()  # written first, so every row can be read


def test_a_class_whose_every_file_is_rejected_is_warned_of_by_name(root, tmp_path, caplog):
    write(root, "cat/a.png", png_bytes(8, 8))
    write(root, "dog/b.png", png_bytes(9, 9))
    for i in range(3):
        write(root, f"heic/{i}.heic", b"\x00\x00\x00\x18ftypheic" + bytes(40))
    with caplog.at_level("WARNING", logger="imgclf"):
        run_validate(root, tmp_path)
    assert "class 'heic' has no valid image (unsupported_format 3): it is left out" in caplog.text
    assert "'cat'" not in caplog.text and "'dog'" not in caplog.text


def test_too_large_image_is_rejected_from_its_header_without_decoding(root, tmp_path):
    # The IHDR claims 30000x30000 but the pixel data is garbage: decoding would say
    # truncated/corrupt, so `too_large` proves the verdict came from the header alone.
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", b"garbage") + png_chunk(b"IEND", b"")
    write(root, "cat/huge.png", data)
    row = run_validate(root, tmp_path, max_pixels=100_000_000)["cat/huge.png"]
    assert_rejected(row, "too_large")
    assert (int(row["width"]), int(row["height"])) == (30000, 30000)


@pytest.mark.parametrize("chunk", [b"IHDR", b"IDAT", b"IEND"])
def test_png_with_a_bad_crc_is_rejected(root, tmp_path, chunk):
    data = bytearray(png_bytes(40, 50))
    at = data.index(chunk)
    length = struct.unpack(">I", data[at - 4 : at])[0]
    data[at + 4 + length + 3] ^= 1  # the chunk's CRC, one bit off; its contents intact
    write(root, "cat/crc.png", bytes(data))
    row = run_validate(root, tmp_path)["cat/crc.png"]
    # Pillow refuses a bad CRC before the pixel data as it opens the file; ours checks every chunk.
    assert_rejected(row, "not_an_image" if chunk == b"IHDR" else "corrupt")


def test_png_without_its_end_chunk_is_rejected_as_truncated(root, tmp_path):
    write(root, "cat/cut.png", png_bytes(40, 50)[:-12])
    assert_rejected(run_validate(root, tmp_path)["cat/cut.png"], "truncated")


def test_file_outside_any_class_folder_is_rejected_as_no_label(root, tmp_path):
    write(root, "loose.png", png_bytes())
    row = run_validate(root, tmp_path)["loose.png"]
    assert_rejected(row, "no_label")
    assert row["label"] == ""


# --- accepted and normalised ----------------------------------------------------------------


def test_grayscale_png_is_valid(root, tmp_path):
    write(root, "cat/g.png", encode(Image.fromarray(noise(13, 17, channels=1)), "PNG"))
    row = run_validate(root, tmp_path)["cat/g.png"]
    assert_valid(row, "PNG", 17, 13)
    assert row["mode"] == "L"


def test_rgba_png_is_valid(root, tmp_path):
    write(root, "cat/rgba.png", encode(Image.fromarray(noise(13, 17, channels=4)), "PNG"))
    row = run_validate(root, tmp_path)["cat/rgba.png"]
    assert_valid(row, "PNG", 17, 13)
    assert row["mode"] == "RGBA"


def test_16bit_grayscale_png_is_valid(root, tmp_path):
    pixels = (np.arange(13 * 17, dtype=np.uint16).reshape(13, 17) * 300).astype(np.uint16)
    assert cv2.imwrite(str(write(root, "cat/g16.png", b"")), pixels)
    row = run_validate(root, tmp_path)["cat/g16.png"]
    assert_valid(row, "PNG", 17, 13)
    assert row["mode"].startswith("I")


def test_16bit_rgb_png_is_valid(root, tmp_path):
    pixels = np.random.default_rng(3).integers(0, 65536, (13, 17, 3), dtype=np.uint16)
    path = write(root, "cat/rgb16.png", b"")
    assert cv2.imwrite(str(path), pixels)
    assert path.read_bytes()[24] == 16  # IHDR bit depth: really a 16-bit file
    assert_valid(run_validate(root, tmp_path)["cat/rgb16.png"], "PNG", 17, 13)


def test_palette_png_is_valid(root, tmp_path):
    write(root, "cat/p.png", encode(Image.fromarray(noise(13, 17)).convert("P"), "PNG"))
    row = run_validate(root, tmp_path)["cat/p.png"]
    assert_valid(row, "PNG", 17, 13)
    assert row["mode"] == "P"


def test_cmyk_jpeg_is_valid(root, tmp_path):
    write(root, "cat/cmyk.jpg", encode(Image.new("CMYK", (17, 13), (10, 200, 30, 0)), "JPEG"))
    row = run_validate(root, tmp_path)["cat/cmyk.jpg"]
    assert_valid(row, "JPEG", 17, 13)
    assert row["mode"] == "CMYK"


def test_upper_case_extensions_are_valid(root, tmp_path):
    write(root, "cat/A.PNG", png_bytes(12, 20))
    write(root, "cat/B.JPG", jpeg_bytes(48, 64))
    rows = run_validate(root, tmp_path)
    assert_valid(rows["cat/A.PNG"], "PNG", 20, 12)
    assert_valid(rows["cat/B.JPG"], "JPEG", 64, 48)


def test_non_ascii_file_name_is_valid_and_kept_in_manifest(root, tmp_path):
    write(root, "세포/세포.png", png_bytes(12, 20))
    row = run_validate(root, tmp_path)["세포/세포.png"]
    assert_valid(row, "PNG", 20, 12)
    assert row["label"] == "세포"


def test_jpeg_misnamed_png_is_judged_by_content(root, tmp_path):
    write(root, "cat/photo.png", jpeg_bytes(48, 64))
    assert_valid(run_validate(root, tmp_path)["cat/photo.png"], "JPEG", 64, 48)


def test_label_is_top_folder_for_nested_files(root, tmp_path):
    write(root, "cat/batch1/deep/a.png", png_bytes())
    row = run_validate(root, tmp_path)["cat/batch1/deep/a.png"]
    assert (row["label"], row["status"]) == ("cat", "valid")


def test_file_name_not_utf8_does_not_crash_validate(root, tmp_path):
    write(root, "cat/good.png", png_bytes(seed=1))
    (root / "cat").joinpath(os.fsdecode(b"caf\xe9.png")).write_bytes(png_bytes(seed=2))
    rows = run_validate(root, tmp_path)
    assert len(rows) == 2
    assert rows["cat/good.png"]["status"] == "valid"
    assert (rows["cat/caf\\xe9.png"]["status"], rows["cat/caf\\xe9.png"]["reason"]) == ("rejected", "bad_name")


def test_a_class_folder_name_holding_a_newline_or_a_tab_is_a_bad_name(root, tmp_path):
    write(root, "cat/good.png", png_bytes(seed=1))
    write(root, "a\nb/one.png", png_bytes(seed=2))
    write(root, "tab\there/two.png", png_bytes(seed=3))
    rows = run_validate(root, tmp_path)
    assert rows["cat/good.png"]["status"] == "valid"
    for path, label in (("a\nb/one.png", "a\nb"), ("tab\there/two.png", "tab\there")):
        assert (rows[path]["status"], rows[path]["reason"]) == ("rejected", "bad_name")
        assert rows[path]["detail"] == f"class folder name {label!r} holds a control character"


# --- labels ---------------------------------------------------------------------------------


@pytest.mark.parametrize("names", [("train", "val", "test"), ("Training", "Validation", "Testing"), ("train", "valid")],
                         ids=["short", "long_capitalised", "without_test"])  # fmt: skip
def test_train_test_layout_gets_class_labels_and_its_archive_split(root, tmp_path, names):
    for i, folder in enumerate(names):
        write(root, f"{folder}/NORMAL/{i}.png", png_bytes(seed=2 * i))
        write(root, f"{folder}/PNEUMONIA/{i}.png", png_bytes(seed=2 * i + 1))
    write(root, f"{names[0]}/README.png", png_bytes(seed=99))
    rows = run_validate(root, tmp_path)
    expected = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                "test": "test", "testing": "test"}  # fmt: skip
    for i, folder in enumerate(names):
        for label in ("NORMAL", "PNEUMONIA"):
            row = rows[f"{folder}/{label}/{i}.png"]
            assert (row["status"], row["label"], row["archive_split"]) == ("valid", label, expected[folder.lower()])
    assert_rejected(rows[f"{names[0]}/README.png"], "no_label")


def test_classes_one_level_down_beside_a_flat_folder_are_warned_of(root, tmp_path, caplog):
    # Kaggle's dogs-vs-cats: train/{cat,dog}/ and an unlabelled test1/.
    for i, path in enumerate(["train/cat/1.png", "train/dog/2.png", "test1/3.png", "test1/4.png"]):
        write(root, path, png_bytes(seed=i))
    with caplog.at_level("WARNING", logger="imgclf"):
        rows = run_validate(root, tmp_path)
    assert {row["label"] for row in rows.values()} == {"train", "test1"}
    assert "class folders that hold only folders (train holds cat, dog) beside ones that hold images (test1)" in caplog.text


def test_top_folders_not_all_named_like_splits_are_the_labels(root, tmp_path):
    write(root, "train/a.png", png_bytes(seed=1))
    write(root, "cat/b.png", png_bytes(seed=2))
    rows = run_validate(root, tmp_path)
    assert [(row["label"], row["archive_split"]) for row in rows.values()] == [("cat", ""), ("train", "")]


@pytest.mark.parametrize(("first", "second", "named"), [
    ("Cat/a.png", "cat/b.png", "'Cat', 'cat'"),
    ("Parasitized /a.png", "Parasitized/b.png", "'Parasitized', 'Parasitized '"),
    ("train/Cat/a.png", "test/cat/b.png", "'Cat', 'cat'"),
    ("Caf\u00e9/a.png", "Cafe\u0301/b.png", "'Cafe\\u0301' (decomposed Unicode), 'Caf\u00e9'"),
], ids=["case", "trailing_space", "across_archive_splits", "unicode_form"])  # fmt: skip
def test_class_folders_differing_by_case_stop_validate(root, tmp_path, first, second, named):
    write(root, first, png_bytes(seed=1))
    write(root, second, png_bytes(seed=2))
    message = f"{root}: class folders differ only by case, spaces or Unicode form: {named}; rename or merge them"
    with pytest.raises(ValidateError, match=f"^{re.escape(message)}$"):
        validate(ValidateParams(), root, tmp_path / "manifest.csv", in_process)
    assert not (tmp_path / "manifest.csv").exists()


def test_archive_without_valid_images_stops_at_validate(root, tmp_path):
    write(root, "cat/notes.png", b"not pixels")
    write(root, "cat/empty.png", b"")
    write(root, "dog/cut.png", png_bytes(40, 40)[:100])
    manifest = tmp_path / "manifest.csv"
    with pytest.raises(ValidateError, match=re.escape("no valid images among 3 files (empty 1, not_an_image 1, "
                                                      f"truncated 1); see {manifest}")):  # fmt: skip
        validate(ValidateParams(), root, manifest, in_process)
    with open(manifest, newline="", encoding="utf-8") as handle:
        assert sorted(row["reason"] for row in csv.DictReader(handle)) == ["empty", "not_an_image", "truncated"]


# --- duplicates -----------------------------------------------------------------------------


def test_exact_duplicate_under_one_label_keeps_first_path_valid(root, tmp_path):
    data = png_bytes(seed=5)
    write(root, "cat/b_second.png", data)
    write(root, "cat/a_first.png", data)
    rows = run_validate(root, tmp_path)
    assert rows["cat/a_first.png"]["status"] == "valid"
    dup = rows["cat/b_second.png"]
    assert (dup["status"], dup["reason"]) == ("duplicate", "duplicate")
    assert "cat/a_first.png" in dup["detail"]


def test_same_bytes_under_two_labels_are_both_rejected_as_conflicting_labels(root, tmp_path):
    data = png_bytes(seed=6)
    write(root, "cat/x.png", data)
    write(root, "dog/y.png", data)
    write(root, "dog/other.png", png_bytes(seed=7))
    rows = run_validate(root, tmp_path)
    assert_rejected(rows["cat/x.png"], "conflicting_labels")
    assert_rejected(rows["dog/y.png"], "conflicting_labels")
    assert rows["dog/other.png"]["status"] == "valid"


# --- manifest as a whole --------------------------------------------------------------------


def mixed_tree(root: Path) -> dict[str, bytes]:
    """A little of everything: valid, rejected, duplicate, nested, unlabelled."""
    files = {
        "cat/a.png": png_bytes(seed=1),
        "cat/a_copy.png": png_bytes(seed=1),
        "cat/sub/b.jpg": jpeg_bytes(seed=2),
        "cat/empty.png": b"",
        "dog/c.png": png_bytes(seed=3),
        "dog/notes.txt": b"hello\n",
        "dog/cut.png": png_bytes(40, 40, seed=4)[:100],
        "root.png": png_bytes(seed=5),
    }
    for rel, data in files.items():
        write(root, rel, data)
    return files


def test_manifest_has_one_row_per_file(root, tmp_path):
    files = mixed_tree(root)
    rows = run_validate(root, tmp_path)
    assert sorted(rows) == sorted(files)


def test_reason_is_empty_exactly_for_valid_rows(root, tmp_path):
    mixed_tree(root)
    rows = run_validate(root, tmp_path)
    statuses = {row["status"] for row in rows.values()}
    assert statuses == {"valid", "rejected", "duplicate"}
    for row in rows.values():
        assert (row["reason"] == "") == (row["status"] == "valid"), row


def test_sha256_and_bytes_match_the_file(root, tmp_path):
    files = mixed_tree(root)
    rows = run_validate(root, tmp_path)
    for rel, data in files.items():
        assert rows[rel]["sha256"] == hashlib.sha256(data).hexdigest(), rel
        assert int(rows[rel]["bytes"]) == len(data), rel


def test_raw_files_are_unchanged_by_validate(root, tmp_path):
    files = mixed_tree(root)
    before = {rel: ((root / rel).read_bytes(), (root / rel).stat().st_mtime_ns) for rel in files}
    run_validate(root, tmp_path)
    after = {rel: ((root / rel).read_bytes(), (root / rel).stat().st_mtime_ns) for rel in files}
    assert after == before
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == sorted(files)


def test_process_pool_gives_same_manifest_as_in_process(root, tmp_path):
    # More than one shard, so the default map really fans out to worker processes.
    for i in range(SHARD_FILES + 40):
        label = ("cat", "dog", "owl")[i % 3]
        data = b"" if i % 50 == 7 else png_bytes(4, 5, seed=i % 200)
        write(root, f"{label}/{i:04d}.png", data)
    pooled = validate(ValidateParams(), root, tmp_path / "pooled.csv")
    serial = validate(ValidateParams(), root, tmp_path / "serial.csv", in_process)
    assert pooled.read_bytes() == serial.read_bytes()
    with open(pooled, newline="", encoding="utf-8") as handle:
        assert len(list(csv.DictReader(handle))) == SHARD_FILES + 40


def test_staging_cache_rows_leaves_the_manifest_unchanged(root, tmp_path):
    mixed_tree(root)
    plain = validate(ValidateParams(), root, tmp_path / "plain.csv", in_process)
    staging = Staging(PrepareParams(image_size=8), tmp_path / "staging")
    staged = validate(ValidateParams(), root, tmp_path / "staged.csv", in_process, staging)
    assert staged.read_bytes() == plain.read_bytes()
    with open(staging.folder / "index.csv", newline="", encoding="utf-8") as handle:
        index = {row["path"] for row in csv.DictReader(handle)}
    assert index == {"cat/a.png", "cat/sub/b.jpg", "dog/c.png"}  # the rows of the valid files, no others


def test_missing_folder_raises_file_not_found_naming_it(tmp_path):
    missing = tmp_path / "no_such_extracted"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        validate(ValidateParams(), missing, tmp_path / "manifest.csv", in_process)
    assert not (tmp_path / "manifest.csv").exists()
