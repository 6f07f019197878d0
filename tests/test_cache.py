"""The cache stage decodes each valid image once into a memory-mappable uint8 array."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from tasks.cache import cache
from tasks.params import PrepareParams, ValidateParams
from tasks.validate import validate
from tests.conftest import PER_CLASS, in_process


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
