"""The cache stage decodes each valid image once into a memory-mappable uint8 array."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import tasks.cache
import tasks.rows
import tasks.validate
from tasks.cache import CacheError, cache
from tasks.files import process_pool_map
from tasks.params import PrepareParams, ValidateParams
from tasks.rows import Staging, staging_dir
from tasks.validate import validate
from tests.conftest import PER_CLASS, encode, in_process, noise


def read_bytes(cache_dir: Path) -> dict[str, bytes]:
    return {name: (cache_dir / name).read_bytes() for name in ("images.npy", "index.csv", "meta.json")}


def test_cache_holds_every_valid_image_memory_mapped(validated_demo):
    result = cache(PrepareParams(image_size=[24, 32]), validated_demo / "manifest.csv",
                   validated_demo / "extracted", validated_demo / "cache", in_process)  # fmt: skip
    images = np.load(result.path / "images.npy", mmap_mode="r")
    assert isinstance(images, np.memmap)
    assert images.shape == (2 * PER_CLASS, 24, 32, 3) and images.dtype == np.uint8
    with open(result.path / "index.csv", newline="") as handle:
        index = list(csv.DictReader(handle))
    assert [int(row["row"]) for row in index] == list(range(2 * PER_CLASS))
    meta = json.loads((result.path / "meta.json").read_text())
    assert meta["labels"] == {"Parasitized": PER_CLASS, "Uninfected": PER_CLASS}
    # Row 7 is the image at index path 7, resized; close to OpenCV's area resize of cv2.imread's pixels.
    source = cv2.cvtColor(cv2.imread(str(validated_demo / "extracted" / index[7]["path"])), cv2.COLOR_BGR2RGB)
    expected = cv2.resize(source, (32, 24), interpolation=cv2.INTER_AREA)
    assert np.abs(images[7].astype(int) - expected).mean() < 1.0
    others = [np.abs(images[i].astype(int) - expected).mean() for i in range(len(images)) if i != 7]
    assert min(others) > 1.0


def test_same_inputs_give_the_same_bytes_in_process_or_on_a_pool(validated_demo):
    params = PrepareParams(image_size=20)
    first = cache(params, validated_demo / "manifest.csv", validated_demo / "extracted", validated_demo / "a", in_process)
    second = cache(params, validated_demo / "manifest.csv", validated_demo / "extracted", validated_demo / "b")
    assert read_bytes(first.path) == read_bytes(second.path)


def test_shards_write_no_file_and_this_process_assembles_the_cache(validated_demo):
    # A worker on another host must not share a file with any other: each shard returns its rows.
    def snapshot() -> dict[Path, bytes]:
        return {path: path.read_bytes() for path in validated_demo.rglob("*") if path.is_file()}

    def watched(fn, shards):
        for shard in shards:
            before = snapshot()
            result = fn(shard)
            assert snapshot() == before
            yield result

    params = PrepareParams(image_size=16)
    manifest, extracted = validated_demo / "manifest.csv", validated_demo / "extracted"
    watched_run = cache(params, manifest, extracted, validated_demo / "a", watched)
    plain = cache(params, manifest, extracted, validated_demo / "b", in_process)
    assert read_bytes(watched_run.path) == read_bytes(plain.path)


def test_a_worker_with_other_decoder_versions_fails_the_stage_and_keeps_the_previous_cache(validated_demo):
    manifest, extracted, cache_dir = (validated_demo / name for name in ("manifest.csv", "extracted", "cache"))
    cache(PrepareParams(image_size=16), manifest, extracted, cache_dir, in_process)
    before = read_bytes(cache_dir)

    def elsewhere(fn, shards):  # a worker whose OpenCV (say) is another version
        return (dataclasses.replace(fn(shard), decoder="0" * 64) for shard in shards)

    with pytest.raises(CacheError, match="a worker decodes with other code or library versions"):
        cache(PrepareParams(image_size=24), manifest, extracted, cache_dir, elsewhere)
    assert read_bytes(cache_dir) == before


def test_a_validate_worker_with_other_decoder_versions_fails_the_stage_and_keeps_the_manifest(validated_demo, tmp_path):
    root_demo = validated_demo / "extracted"
    validate(ValidateParams(), root_demo, tmp_path / "manifest.csv", in_process)
    before = (tmp_path / "manifest.csv").read_bytes()

    def elsewhere(fn, shards):  # a worker whose Pillow (say) is another version: its verdicts may differ too
        return (dataclasses.replace(fn(shard), decoder="0" * 64) for shard in shards)

    staging = Staging(PrepareParams(image_size=16), tmp_path / "staging")
    with pytest.raises(tasks.validate.ValidateError, match="a worker judges with other code or library versions"):
        validate(ValidateParams(), root_demo, tmp_path / "manifest.csv", elsewhere, staging)
    assert (tmp_path / "manifest.csv").read_bytes() == before and not staging.folder.exists()


def test_adding_ten_images_decodes_ten_and_matches_a_fresh_run(validated_demo):
    params = PrepareParams(image_size=16)
    manifest, extracted = validated_demo / "manifest.csv", validated_demo / "extracted"
    first = cache(params, manifest, extracted, validated_demo / "cache", in_process)
    assert (first.decoded, first.reused) == (2 * PER_CLASS, 0)
    rng = np.random.default_rng(1)
    for i in range(10):
        pixels = rng.integers(0, 255, size=(40 + i, 50, 3), dtype=np.uint8)
        cv2.imwrite(str(extracted / "Uninfected" / f"new_{i}.png"), pixels)
    validate(ValidateParams(), extracted, manifest, in_process)
    second = cache(params, manifest, extracted, validated_demo / "cache", in_process)
    assert (second.decoded, second.reused) == (10, 2 * PER_CLASS)
    fresh = cache(params, manifest, extracted, validated_demo / "fresh", in_process)
    assert read_bytes(second.path) == read_bytes(fresh.path)


def test_changed_settings_decode_everything_again(validated_demo):
    manifest, extracted = validated_demo / "manifest.csv", validated_demo / "extracted"
    cache(PrepareParams(image_size=16), manifest, extracted, validated_demo / "cache", in_process)
    again = cache(PrepareParams(image_size=16, resize="pad"), manifest, extracted, validated_demo / "cache", in_process)
    assert (again.decoded, again.reused) == (2 * PER_CLASS, 0)


def test_tampered_cache_rows_are_decoded_again(validated_demo, caplog):
    params = PrepareParams(image_size=16)
    manifest, extracted = validated_demo / "manifest.csv", validated_demo / "extracted"
    cache(params, manifest, extracted, validated_demo / "cache", in_process)
    images = np.load(validated_demo / "cache" / "images.npy", mmap_mode="r+")
    tampered = sorted(np.random.default_rng(5).choice(len(images), size=50, replace=False).tolist())
    images[tampered[:-1]] = 0  # overwritten rows, same shape
    images[tampered[-1], 3, 4, 1] ^= 1  # and one bit of one more row
    images.flush()
    del images
    with caplog.at_level("INFO", logger="imgclf"):
        again = cache(params, manifest, extracted, validated_demo / "cache", in_process)
    assert (again.decoded, again.reused) == (50, 2 * PER_CLASS - 50)
    assert "50 rows of the previous cache no longer match" in caplog.text
    assert "(decoded 50, reused 10)" in caplog.text
    fresh = cache(params, manifest, extracted, validated_demo / "fresh", in_process)
    assert read_bytes(again.path) == read_bytes(fresh.path)


def edited_copy(source: Path, folder: Path) -> Path:
    """Returns a copy of a source file, one comment longer: the same behaviour under other code."""
    folder.mkdir(exist_ok=True)
    copy = folder / source.name
    copy.write_text(source.read_text() + "# edited\n")
    return copy


@pytest.mark.parametrize("change", ["decoding source", "resizing library", "meta.json fingerprint"])
def test_cache_from_other_decoder_code_is_not_reused(validated_demo, monkeypatch, tmp_path, change):
    params = PrepareParams(image_size=16)
    manifest, extracted, cache_dir = validated_demo / "manifest.csv", validated_demo / "extracted", validated_demo / "cache"
    cache(params, manifest, extracted, cache_dir, in_process)
    before = json.loads((cache_dir / "meta.json").read_text()).get("decoder")
    if change == "decoding source":  # tasks/images.py as after an edit
        sources = [edited_copy(p, tmp_path / "src") if p.name == "images.py" else p for p in tasks.rows.DECODER_SOURCES]
        monkeypatch.setattr(tasks.rows, "DECODER_SOURCES", tuple(sources))
    elif change == "resizing library":  # OpenCV as after an upgrade
        monkeypatch.setattr(cv2, "__version__", cv2.__version__ + ".post1")
    else:  # a cache written by another checkout
        meta = json.loads((cache_dir / "meta.json").read_text())
        (cache_dir / "meta.json").write_text(json.dumps(meta | {"decoder": "0" * 64}, indent=2) + "\n")
    again = cache(params, manifest, extracted, cache_dir, in_process)
    assert (again.decoded, again.reused) == (2 * PER_CLASS, 0)
    after = json.loads((cache_dir / "meta.json").read_text())["decoder"]
    assert (after != before) == (change != "meta.json fingerprint")
    assert after == tasks.cache.decoder_fingerprint()


def test_grayscale_cache_has_one_channel(validated_demo):
    result = cache(PrepareParams(image_size=16, channels=1), validated_demo / "manifest.csv",
                   validated_demo / "extracted", validated_demo / "cache", in_process)  # fmt: skip
    assert np.load(result.path / "images.npy", mmap_mode="r").shape == (2 * PER_CLASS, 16, 16, 1)


def test_a_failed_run_keeps_the_previous_cache_and_leaves_no_temp(validated_demo):
    manifest, extracted = validated_demo / "manifest.csv", validated_demo / "extracted"
    cache_dir = validated_demo / "cache"
    cache(PrepareParams(image_size=16), manifest, extracted, cache_dir, in_process)
    before = read_bytes(cache_dir)
    shutil.rmtree(extracted / "Parasitized")  # files the manifest lists are gone
    with pytest.raises(FileNotFoundError):
        cache(PrepareParams(image_size=24), manifest, extracted, cache_dir, in_process)
    assert read_bytes(cache_dir) == before
    assert sorted(p.name for p in validated_demo.iterdir() if p.name.startswith(".")) == []


def test_a_cache_larger_than_the_free_disk_is_refused_naming_the_size_before_any_row_is_written(validated_demo):
    from tasks.rows import CacheTooLarge

    manifest, extracted, cache_dir = validated_demo / "manifest.csv", validated_demo / "extracted", validated_demo / "cache"
    cache(PrepareParams(image_size=16), manifest, extracted, cache_dir, in_process)
    before = read_bytes(cache_dir)
    with pytest.raises(CacheTooLarge, match=rf"^prepare.image_size: {2 * PER_CLASS} images of 100000x100000x3 take "
                                            rf"[\d,.]+ GiB, and {validated_demo} has [\d,.]+ GiB free$"):  # fmt: skip
        cache(PrepareParams(image_size=100_000), manifest, extracted, cache_dir, in_process)
    assert read_bytes(cache_dir) == before
    assert sorted(p.name for p in validated_demo.iterdir() if p.name.startswith(".")) == []


# --- rows validate staged ------------------------------------------------------------------


def staged_run(root: Path, params: PrepareParams, map_shards=in_process) -> Path:
    """Validates root/extracted with `params` as the hint; returns the staging folder it left."""
    staging = Staging(params, staging_dir(root / "cache"))
    validate(ValidateParams(), root / "extracted", root / "manifest.csv", map_shards, staging)
    return staging.folder


def test_validate_leaves_no_staging_when_the_cache_holds_its_rows_already(validated_demo):
    # A validate re-run that changes no valid row: DVC then skips the cache stage, which removes the staging.
    params, cache_dir = PrepareParams(image_size=[20, 24]), validated_demo / "cache"
    cache(params, validated_demo / "manifest.csv", validated_demo / "extracted", cache_dir, in_process,
          staged_run(validated_demo, params))  # fmt: skip
    for prepare, left in ((params, False), (PrepareParams(image_size=16), True)):
        staging = Staging(prepare, staging_dir(cache_dir), cache_dir)
        validate(ValidateParams(), validated_demo / "extracted", validated_demo / "manifest.csv", in_process, staging)
        assert staging.folder.exists() == left


def test_rows_staged_by_validate_give_the_bytes_of_a_cold_decode_and_are_then_removed(validated_demo, monkeypatch):
    params = PrepareParams(image_size=[20, 24])
    monkeypatch.setattr(tasks.validate, "SHARD_FILES", 16)  # several shards: worker processes decode them
    staged = staged_run(validated_demo, params, process_pool_map)
    staged_file = (staged / "images.npy").stat().st_ino
    manifest, extracted = validated_demo / "manifest.csv", validated_demo / "extracted"
    result = cache(params, manifest, extracted, validated_demo / "cache", in_process, staged)
    assert (result.decoded, result.reused, result.staged) == (0, 0, 2 * PER_CLASS)
    assert (result.path / "images.npy").stat().st_ino == staged_file  # taken as it is, not copied
    assert not staged.exists()
    cold = cache(params, manifest, extracted, validated_demo / "cold", in_process)
    assert cold.decoded == 2 * PER_CLASS
    assert read_bytes(result.path) == read_bytes(cold.path)


def test_a_content_under_two_classes_leaves_a_staging_that_is_exactly_the_cache(validated_demo):
    # Rejected as conflicting_labels, its row goes from the staging too: else the staging matched no cache,
    # and one DVC skips (the manifest unchanged) stayed on disk beside it.
    extracted = validated_demo / "extracted"
    shutil.copy(sorted((extracted / "Parasitized").glob("*.png"))[3], extracted / "Uninfected" / "also.png")
    params = PrepareParams(image_size=16)
    staged = staged_run(validated_demo, params)
    manifest = validated_demo / "manifest.csv"
    assert sum(row["reason"] == "conflicting_labels" for row in csv.DictReader(open(manifest, newline=""))) == 2
    result = cache(params, manifest, extracted, validated_demo / "cache", in_process, staged)
    assert (result.decoded, result.reused, result.staged) == (0, 0, 2 * PER_CLASS - 1)
    cold = cache(params, manifest, extracted, validated_demo / "cold", in_process)
    assert read_bytes(result.path) == read_bytes(cold.path)
    # Validated again, nothing changed: the cache holds its rows already, and no staging is left.
    staging = Staging(params, staging_dir(result.path), result.path)
    validate(ValidateParams(), extracted, manifest, in_process, staging)
    assert not staging.folder.exists()


def test_tampered_staged_rows_are_decoded_again(validated_demo, caplog):
    params = PrepareParams(image_size=16)
    staged = staged_run(validated_demo, params)
    index = {row["path"]: int(row["row"]) for row in csv.DictReader(open(staged / "index.csv", newline=""))}
    images = np.load(staged / "images.npy", mmap_mode="r+")
    tampered = sorted(index.values())[:3]
    images[tampered[:2]] = 0
    images[tampered[2], 5, 5, 0] ^= 1
    images.flush()
    del images
    manifest, extracted = validated_demo / "manifest.csv", validated_demo / "extracted"
    with caplog.at_level("INFO", logger="imgclf"):
        result = cache(params, manifest, extracted, validated_demo / "cache", in_process, staged)
    assert (result.decoded, result.staged) == (3, 2 * PER_CLASS - 3)
    assert "3 rows of the staging validate left no longer match their pixels_sha256" in caplog.text
    cold = cache(params, manifest, extracted, validated_demo / "cold", in_process)
    assert read_bytes(result.path) == read_bytes(cold.path)


@pytest.mark.parametrize("stale", ["other image size", "other decoder", "other file content"])
def test_stale_staged_rows_are_not_used(validated_demo, stale):
    params = PrepareParams(image_size=16)
    manifest, extracted = validated_demo / "manifest.csv", validated_demo / "extracted"
    staged = staged_run(validated_demo, PrepareParams(image_size=18) if stale == "other image size" else params)
    if stale == "other decoder":  # staged by another checkout's code or libraries
        meta = json.loads((staged / "meta.json").read_text())
        (staged / "meta.json").write_text(json.dumps(meta | {"decoder": "0" * 64}))
    changed = 0
    if stale == "other file content":  # files edited after that validate: the next one judges them again
        for path in sorted((extracted / "Uninfected").glob("*.png"))[:4]:
            pixels = cv2.imread(str(path))
            cv2.imwrite(str(path), 255 - pixels)
            changed += 1
        validate(ValidateParams(), extracted, manifest, in_process)
    result = cache(params, manifest, extracted, validated_demo / "cache", in_process, staged)
    expected_decoded = changed if stale == "other file content" else 2 * PER_CLASS
    assert (result.decoded, result.staged) == (expected_decoded, 2 * PER_CLASS - expected_decoded)
    cold = cache(params, manifest, extracted, validated_demo / "cold", in_process)
    assert read_bytes(result.path) == read_bytes(cold.path)


@pytest.mark.parametrize("change", ["cut short", "another valid image"])
def test_a_file_changed_since_validate_stops_the_stage_naming_it(validated_demo, change):
    manifest, extracted = validated_demo / "manifest.csv", validated_demo / "extracted"
    path = sorted((extracted / "Uninfected").glob("*.png"))[0]
    # Cut after validate judged it whole; or replaced by an image that decodes, whose pixels would
    # be cached, and later reused, under the sha256 of the bytes validate judged.
    path.write_bytes(path.read_bytes()[:200] if change == "cut short" else encode(Image.fromarray(noise(20, 20)), "PNG"))
    with pytest.raises(CacheError, match=f"^{re.escape(str(path.resolve()))}: its bytes are not the ones validate "
                                         "judged .*run validate again$"):  # fmt: skip
        cache(PrepareParams(image_size=16), manifest, extracted, validated_demo / "cache", in_process)
    assert not (validated_demo / "cache").exists()


def test_a_full_disk_names_the_output_it_was_writing(tmp_path):
    from tasks.files import atomic_file

    target = tmp_path / "models" / "model.json"
    with pytest.raises(OSError) as raised:
        with atomic_file(target) as handle, open("/dev/full", "wb") as full:  # each write: "No space left on device"
            handle.write("{}")
            full.write(b"a row")
            full.flush()
    assert str(raised.value) == f"[Errno 28] No space left on device: '{target}'"
    assert list(target.parent.iterdir()) == []  # nor a half file, under any name
    with pytest.raises(ConnectionResetError) as raised:  # a network error inside the block stays its own
        with atomic_file(target):
            raise ConnectionResetError(104, "Connection reset by peer")
    assert str(raised.value) == "[Errno 104] Connection reset by peer"


def test_the_training_set_reads_each_row_by_its_number_not_its_line(validated_demo):
    from tasks.dataset import DatasetError, load_cached_set

    cache_dir = cache(PrepareParams(image_size=16), validated_demo / "manifest.csv", validated_demo / "extracted",
                      validated_demo / "cache", in_process).path  # fmt: skip
    split_csv = validated_demo / "split.csv"
    entries = list(csv.DictReader(open(cache_dir / "index.csv", newline="")))
    split_csv.write_text("path,label,split\n" + "".join(f"{e['path']},{e['label']},train\n" for e in entries))
    lines = (cache_dir / "index.csv").read_text().splitlines()
    (cache_dir / "index.csv").write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")  # the same rows, other order
    data = load_cached_set(cache_dir, split_csv)
    assert [data.paths[int(e["row"])] for e in entries] == [e["path"] for e in entries]
    assert [data.classes[data.labels[int(e["row"])]] for e in entries] == [e["label"] for e in entries]
    (cache_dir / "index.csv").write_text("\n".join(lines[:-1]) + "\n")  # a row missing
    with pytest.raises(DatasetError, match="index.csv does not list images.npy's .* rows once each"):
        load_cached_set(cache_dir, split_csv)
