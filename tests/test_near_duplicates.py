"""Near-duplicates: re-saved copies cluster with their originals and stay in one split; distinct images do not."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.cache import cache
from tasks.images import resize
from tasks.near_duplicates import close_pairs, near_duplicates, thumbnails
from tasks.params import PrepareParams, SplitParams, ValidateParams
from tasks.split import split
from tasks.validate import validate
from tests.conftest import PER_CLASS, in_process

COPIES = 20  # originals that get three copies each
JUNK = ("_empty", "_truncated", "_notes", "_copy")  # the demo's files that are not valid images


def re_encoded(original: Path) -> dict[str, bytes]:
    """Returns the three copies the issue names, by file name: JPEG quality 70, 3% smaller, PNG saved again."""
    image = Image.open(original).convert("RGB")
    copies = {}
    for name, how in (("q70.jpg", dict(format="JPEG", quality=70)), ("resaved.png", dict(format="PNG", compress_level=1))):
        buffer = io.BytesIO()
        image.save(buffer, **how)
        copies[name] = buffer.getvalue()
    buffer = io.BytesIO()
    image.resize((round(image.width * 0.97), round(image.height * 0.97)), Image.LANCZOS).save(buffer, format="PNG")
    copies["smaller.png"] = buffer.getvalue()
    return copies


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def demo_with_copies(tmp_path_factory, _validated_demo) -> Path:
    """The demo's malaria-like cells (100-200 px) with three copies of COPIES of them, through validate,
    cache (at the default 64x64), near_duplicates and split."""
    import shutil

    data = tmp_path_factory.mktemp("copies") / "data"
    shutil.copytree(_validated_demo / "extracted", data / "extracted")
    valid = [path for path in sorted((data / "extracted").glob("*/*.png")) if not path.stem.endswith(JUNK)]
    originals = valid[:: 2 * PER_CLASS // COPIES]
    for original in originals:
        for suffix, payload in re_encoded(original).items():
            original.with_name(f"{original.stem}.{suffix}").write_bytes(payload)
    validate(ValidateParams(), data / "extracted", data / "manifest.csv", in_process)
    cache(PrepareParams(), data / "manifest.csv", data / "extracted", data / "cache", in_process)
    near_duplicates(ValidateParams(), data / "cache", data / "near_duplicates.csv", data / "near_duplicates.json")
    split(SplitParams(), data / "manifest.csv", data / "split.csv", data / "near_duplicates.csv")
    return data


def family(path: str) -> str:
    """The original a copy was made from: its name up to the first dot."""
    folder, name = path.rsplit("/", 1)
    return f"{folder}/{name.split('.')[0]}"


def test_re_encoded_copies_cluster_with_their_original_and_nothing_else(demo_with_copies):
    rows = read_rows(demo_with_copies / "near_duplicates.csv")
    assert len(rows) == 2 * PER_CLASS + 3 * COPIES
    members = defaultdict(set)
    for row in rows:
        members[row["cluster"]].add(family(row["path"]))
    families = Counter(family(row["path"]) for row in rows)
    copied = {name for name, n in families.items() if n == 4}
    assert len(copied) == COPIES
    # Each cluster holds one original: its copies, if it has any, and no other cell.
    assert all(len(names) == 1 for names in members.values())
    clustered = Counter(row["cluster"] for row in rows)
    assert sorted(clustered.values()) == [1] * (2 * PER_CLASS - COPIES) + [4] * COPIES
    summary = json.loads((demo_with_copies / "near_duplicates.json").read_text())
    assert summary == {"distance": ValidateParams().near_duplicate_distance, "images": 2 * PER_CLASS + 3 * COPIES,
                       "clusters": COPIES, "images_in_clusters": 4 * COPIES, "largest_cluster": 4,
                       "clusters_spanning_classes": 0}  # fmt: skip


def test_copies_never_end_up_in_two_splits(demo_with_copies):
    splits_of = defaultdict(set)
    for row in read_rows(demo_with_copies / "split.csv"):
        splits_of[family(row["path"])].add(row["split"])
    assert all(len(names) == 1 for names in splits_of.values())
    assert {name for names in splits_of.values() for name in names} == {"train", "val", "test"}


def as_cache(folder: Path, images: np.ndarray, labels: list[str]) -> Path:
    """Writes `images` as a cache stage's output (images.npy and index.csv), one row per image."""
    folder.mkdir(parents=True)
    np.save(folder / "images.npy", images)
    with open(folder / "index.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "path", "label"])
        writer.writerows((row, f"{label}/{row:04d}.png", label) for row, label in enumerate(labels))
    return folder


def test_distinct_handwritten_digits_of_a_class_are_not_clustered(tmp_path):
    # A real set of many small, similar images: scikit-learn's 1,797 handwritten digits (8x8),
    # cached at 32x32 as the pipeline would. At the default distance, under 1% may be clustered.
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images * 255 / 16).round().astype(np.uint8)[..., None]
    cached = np.stack([resize(image, (32, 32), "stretch") for image in pixels])
    labels = [str(target) for target in digits.target]
    cache_dir = as_cache(tmp_path / "cache", cached, labels)
    near_duplicates(ValidateParams(), cache_dir, tmp_path / "nd.csv", tmp_path / "nd.json")
    rows = read_rows(tmp_path / "nd.csv")
    clustered = sum(1 for row in rows if int(row["cluster_size"]) > 1)
    assert len(rows) == 1797
    assert clustered / len(rows) < 0.01, clustered


def test_distance_zero_turns_it_off(tmp_path):
    same = np.full((3, 16, 16, 1), 100, dtype=np.uint8)  # identical pixels: one cluster at any distance above 0
    cache_dir = as_cache(tmp_path / "cache", same, ["a", "b", "a"])
    near_duplicates(ValidateParams(near_duplicate_distance=0), cache_dir, tmp_path / "off.csv", tmp_path / "off.json")
    assert [row["cluster_size"] for row in read_rows(tmp_path / "off.csv")] == ["1", "1", "1"]
    near_duplicates(ValidateParams(), cache_dir, tmp_path / "on.csv", tmp_path / "on.json")
    assert [row["cluster_size"] for row in read_rows(tmp_path / "on.csv")] == ["3", "3", "3"]
    assert json.loads((tmp_path / "on.json").read_text())["clusters_spanning_classes"] == 1


def test_the_pair_search_finds_exactly_the_pairs_comparing_every_pair_finds():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (600, 32, 32, 3), dtype=np.uint8)
    # Some neighbours at about 2-6 gray levels RMS: pairs on both sides of the distance.
    images[300:400] = np.clip(images[:100] + rng.normal(0, rng.uniform(8, 40, (100, 1, 1, 1)), (100, 32, 32, 3)), 0, 255)
    thumbs = thumbnails(images)
    rms = np.sqrt(((thumbs[:, None] - thumbs[None]) ** 2).mean(axis=2))
    expected = np.argwhere(np.triu(rms <= 4.0, k=1))
    assert 10 < len(expected) < 100
    np.testing.assert_array_equal(close_pairs(thumbs, 4.0), expected)


def test_many_images_with_one_thumbnail_cluster_as_every_pair_would_with_links_in_proportion():
    from tasks.near_duplicates import _linking_pairs, clusters

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (700, 16, 16, 3), dtype=np.uint8)
    images[100:600] = 0  # 500 blank tiles: 124,750 pairs, where 499 links say the same
    images[600:650] = np.clip(images[:50] + rng.normal(0, 10, (50, 16, 16, 3)), 0, 255)  # near, not equal
    images[650] = 1  # one gray level from blank
    thumbs = thumbnails(images)
    every_pair, links = close_pairs(thumbs, 4.0), _linking_pairs(thumbs, 4.0)
    assert len(every_pair) > 124_750 and len(links) < 600
    np.testing.assert_array_equal(clusters(len(thumbs), links), clusters(len(thumbs), every_pair))
