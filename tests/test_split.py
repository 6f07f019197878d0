"""The split stage: stratified, seeded, within one image of each fraction; whole groups with a pattern."""

from __future__ import annotations

import csv
import re
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from PIL import Image

from tasks.extract import extract
from tasks.manifest import MANIFEST_COLUMNS
from tasks.params import DataParams, SplitParams, ValidateParams
from tasks.split import SplitError, split
from tasks.validate import validate
from tests.conftest import encode, in_process, noise


def write_rows(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        writer.writerow({"path": "a/broken.png", "label": "a", "status": "rejected", "reason": "truncated"})
    return path


def write_manifest(path: Path, counts: dict[str, int], name=lambda label, i: f"img_{i}.png") -> Path:
    return write_rows(path, [{"path": f"{label}/{name(label, i)}", "label": label, "status": "valid",
                              "sha256": f"{label}{i}"} for label, n in counts.items() for i in range(n)])  # fmt: skip


def write_archive_manifest(path: Path, counts: dict[tuple[str, str], int]) -> Path:
    """A manifest of an archive laid out as <split>/<label>/: counts by (archive split, label)."""
    return write_rows(path, [{"path": f"{name}/{label}/img_{i}.png", "label": label, "status": "valid",
                              "sha256": f"{name}{label}{i}", "archive_split": name}
                             for (name, label), n in counts.items() for i in range(n)])  # fmt: skip


def read_split(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("counts", [{"a": 10, "b": 10}, {"a": 7, "b": 101, "c": 33}, {"a": 5, "b": 1000}])
@pytest.mark.parametrize(("val", "test"), [(0.15, 0.15), (0.1, 0.2), (0.0, 0.25), (0.33, 0.33)])
def test_each_class_split_is_within_one_image_of_its_fraction(tmp_path, counts, val, test):
    rows = read_split(split(SplitParams(val=val, test=test), write_manifest(tmp_path / "m.csv", counts), tmp_path / "s.csv"))
    assert len(rows) == sum(counts.values())  # rejected rows are not split
    cells = Counter((row["label"], row["split"]) for row in rows)
    for label, n in counts.items():
        for name, fraction in (("train", 1 - val - test), ("val", val), ("test", test)):
            assert abs(cells[label, name] - n * fraction) <= 1, (label, name, cells[label, name], n * fraction)


def test_same_seed_same_split_other_seed_other_split(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", {"a": 50, "b": 50})
    first = split(SplitParams(seed=1), manifest, tmp_path / "1.csv").read_bytes()
    again = split(SplitParams(seed=1), manifest, tmp_path / "2.csv").read_bytes()
    other = split(SplitParams(seed=2), manifest, tmp_path / "3.csv").read_bytes()
    assert first == again
    assert first != other


def test_class_too_small_for_the_split_names_the_class(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", {"big": 50, "tiny": 2})
    with pytest.raises(SplitError, match="class 'tiny' has 2 image"):
        split(SplitParams(val=0.15, test=0.15), manifest, tmp_path / "s.csv")
    # Also when one near-duplicate pair elsewhere makes the split a grouped one.
    clusters = write_clusters(tmp_path / "nd.csv", manifest, [["big/img_0.png", "big/img_1.png"]])
    with pytest.raises(SplitError, match="class 'tiny' has 2 image"):
        split(SplitParams(val=0.15, test=0.15), manifest, tmp_path / "s.csv", clusters)
    assert not (tmp_path / "s.csv").exists()


def test_a_class_swallowed_by_one_near_duplicate_cluster_is_warned_of_naming_the_clusters(tmp_path, caplog):
    manifest = write_manifest(tmp_path / "m.csv", {"flat": 10, "noisy": 40})
    clusters = write_clusters(tmp_path / "nd.csv", manifest, [[f"flat/img_{i}.png" for i in range(10)]])
    with caplog.at_level("WARNING", logger="imgclf"):
        rows = read_split(split(SplitParams(val=0.15, test=0.15), manifest, tmp_path / "s.csv", clusters))
    assert len({row["split"] for row in rows if row["label"] == "flat"}) == 1  # the cluster whole on one side
    assert re.search(r"class\(es\) flat have no (val|test) images \(too few images, or their blocks, each kept whole on "
                     r"one side, went elsewhere: a large near-duplicate cluster \(data/near_duplicates.csv", caplog.text)


def test_group_pattern_keeps_every_group_in_one_split(tmp_path):
    # 40 patients, each with 5-15 cells of both labels, named like the NIH files.
    def name(label, i):
        return f"C{i % 40}P{i % 40}ThinF_cell_{i}.png"

    manifest = write_manifest(tmp_path / "m.csv", {"Parasitized": 400, "Uninfected": 380}, name)
    rows = read_split(split(SplitParams(group_pattern=r"^(C\d+P\d+)"), manifest, tmp_path / "s.csv"))
    splits_of = defaultdict(set)
    for row in rows:
        splits_of[re.match(r"^(C\d+P\d+)", row["path"].split("/")[1]).group(1)].add(row["split"])
        assert row["group"] == re.match(r"^(C\d+P\d+)", row["path"].split("/")[1]).group(1)
    assert len(splits_of) == 40
    assert all(len(s) == 1 for s in splits_of.values())
    sizes = Counter(row["split"] for row in rows)
    # Best-effort stratification still lands near the fractions with 40 similar groups.
    assert abs(sizes["test"] / len(rows) - 0.15) < 0.05
    assert abs(sizes["val"] / len(rows) - 0.15) < 0.05


def test_a_group_pattern_whose_optional_group_takes_nothing_leaves_those_files_ungrouped(tmp_path, caplog):
    # `_y1.png` matches `^(C\d+)?_` with the group empty: no group, not one group "" (nor a crash on None).
    manifest = write_manifest(tmp_path / "m.csv", {"a": 20, "b": 20}, lambda label, i: f"C{i % 10}_{i}.png" if i % 2
                              else f"_{label}{i}.png")  # fmt: skip
    with caplog.at_level("WARNING", logger="imgclf"):
        rows = read_split(split(SplitParams(group_pattern=r"^(C\d+)?_"), manifest, tmp_path / "s.csv"))
    assert {row["group"] for row in rows if "/_" in row["path"]} == {row["path"] for row in rows if "/_" in row["path"]}
    assert "20 file name(s) do not match split.group_pattern; each is its own group" in caplog.text


def test_a_fraction_too_small_for_any_class_says_so_in_one_line(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", {"a": 50, "b": 50})
    with pytest.raises(SplitError, match=r"split.test=1e-05 need over 10,000 per class"):
        split(SplitParams(test=0.00001), manifest, tmp_path / "s.csv")


def test_too_few_groups_is_a_clear_error(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", {"a": 10, "b": 10}, lambda label, i: f"P1_{i}.png")
    with pytest.raises(SplitError, match="only 1 group"):
        split(SplitParams(group_pattern=r"^(P\d+)_"), manifest, tmp_path / "s.csv")


def test_groups_too_big_to_fill_every_split_are_a_clear_error_in_split_not_later(tmp_path):
    # Four groups, enough in number; but one holds 60 of 65 images, and no other fits test without overfilling it.
    def name(label, i):
        return f"P1_{i}.png" if label == "a" else f"Q{i % 3}_{i}.png"

    manifest = write_manifest(tmp_path / "m.csv", {"a": 60, "b": 5}, name)
    with pytest.raises(SplitError, match=r"no images left for test: 65 images in 4 groups .* the largest 60 images"):
        split(SplitParams(group_pattern=r"^([PQ]\d+)_"), manifest, tmp_path / "s.csv")
    assert not (tmp_path / "s.csv").exists()


def test_a_class_whose_groups_all_went_elsewhere_is_named(tmp_path, caplog):
    def name(label, i):
        return f"P{i % 20}_{i}.png" if label == "a" else f"Q{i % 2}_{i}.png"

    manifest = write_manifest(tmp_path / "m.csv", {"a": 100, "b": 6}, name)
    with caplog.at_level("WARNING", logger="imgclf"):
        rows = read_split(split(SplitParams(group_pattern=r"^([PQ]\d+)_"), manifest, tmp_path / "s.csv"))
    absent = [name for name in ("val", "test") if not any(r["label"] == "b" and r["split"] == name for r in rows)]
    assert absent  # b's two groups cannot reach all three splits
    for name in absent:
        assert f"split: class(es) b have no {name} images" in caplog.text


# ---------------------------------------------------------------- an archive with its own split

ARCHIVE = {("train", "cat"): 60, ("train", "dog"): 40, ("val", "cat"): 3, ("val", "dog"): 2, ("test", "cat"): 12,
           ("test", "dog"): 8}  # fmt: skip


def test_archive_split_keep_keeps_the_archive_s_own_split(tmp_path, caplog):
    manifest = write_archive_manifest(tmp_path / "m.csv", ARCHIVE)
    with caplog.at_level("INFO", logger="imgclf"):
        rows = read_split(split(SplitParams(), manifest, tmp_path / "s.csv"))
    assert all(row["split"] == row["path"].split("/")[0] for row in rows)
    assert Counter((row["split"], row["label"]) for row in rows) == ARCHIVE
    assert "kept the archive's own split (split.archive_split: keep): train 100, val 5, test 20" in caplog.text
    assert "span the archive's own splits" not in caplog.text
    # Groups the archive put on two sides (img_1 in train and in test...) are kept so, and said to leak.
    split(SplitParams(group_pattern=r"^(img_\d)"), manifest, tmp_path / "grouped.csv")
    assert "split: 10 blocks (groups or near-duplicate clusters) span the archive's own splits" in caplog.text


def test_archive_without_val_gets_val_carved_from_its_train_images_stratified(tmp_path, caplog):
    counts = {key: n for key, n in ARCHIVE.items() if key[0] != "val"}
    manifest = write_archive_manifest(tmp_path / "m.csv", counts)
    with caplog.at_level("INFO", logger="imgclf"):
        rows = read_split(split(SplitParams(val=0.2), manifest, tmp_path / "s.csv"))
    cells = Counter((row["path"].split("/")[0], row["split"], row["label"]) for row in rows)
    assert cells == {("test", "test", "cat"): 12, ("test", "test", "dog"): 8, ("train", "val", "cat"): 12,
                     ("train", "val", "dog"): 8, ("train", "train", "cat"): 48,
                     ("train", "train", "dog"): 32}  # fmt: skip
    assert "val carved from its train images by split.val=0.2" in caplog.text


def test_a_class_the_archive_s_own_val_lacks_is_said_to_be_the_archive_s_doing(tmp_path, caplog):
    counts = {("train", "cat"): 20, ("train", "dog"): 20, ("val", "cat"): 5, ("test", "cat"): 5, ("test", "dog"): 5}
    with caplog.at_level("WARNING", logger="imgclf"):
        split(SplitParams(), write_archive_manifest(tmp_path / "m.csv", counts), tmp_path / "s.csv")
    assert "class(es) dog have no val images (the archive's own split has none)" in caplog.text


def test_archive_split_ignore_resplits(tmp_path, caplog):
    manifest = write_archive_manifest(tmp_path / "m.csv", ARCHIVE)
    with caplog.at_level("INFO", logger="imgclf"):
        rows = read_split(split(SplitParams(archive_split="ignore"), manifest, tmp_path / "s.csv"))
    plain = read_split(split(SplitParams(), write_manifest(tmp_path / "plain.csv", {"cat": 75, "dog": 50}),
                             tmp_path / "plain_split.csv"))  # fmt: skip
    # The stratified split of the same labels, as if the archive had no split of its own.
    assert Counter((row["label"], row["split"]) for row in rows) == Counter((r["label"], r["split"]) for r in plain)
    assert any(row["split"] != row["path"].split("/")[0] for row in rows)
    assert "archive's own split is ignored" in caplog.text


def test_archive_split_without_train_images_is_a_clear_error(tmp_path):
    manifest = write_archive_manifest(tmp_path / "m.csv", {("test", "cat"): 5, ("test", "dog"): 5})
    with pytest.raises(SplitError, match="archive's own split has no train images; set split.archive_split: ignore"):
        split(SplitParams(), manifest, tmp_path / "s.csv")


def test_archive_split_with_a_class_only_in_test_is_a_clear_error(tmp_path):
    counts = {("train", "cat"): 10, ("train", "dog"): 10, ("test", "cat"): 4, ("test", "dog"): 4, ("test", "bird"): 3}
    manifest = write_archive_manifest(tmp_path / "m.csv", counts)
    with pytest.raises(SplitError, match="class\\(es\\) 'bird' have no train images in the archive's own split"):
        split(SplitParams(val=0), manifest, tmp_path / "s.csv")
    assert not (tmp_path / "s.csv").exists()


def test_train_test_layout_gets_class_labels_and_keeps_its_split(tmp_path):
    # Kaggle's chest X-ray archive, small: chest_xray/{train,test}/<class>/ and no val folder.
    layout = [(name, label, i) for name, n in (("train", 20), ("test", 5)) for label in ("NORMAL", "PNEUMONIA")
              for i in range(n)]  # fmt: skip
    archive = tmp_path / "chest_xray.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for seed, (name, label, i) in enumerate(layout):
            zf.writestr(f"chest_xray/{name}/{label}/{i}.png", encode(Image.fromarray(noise(6, 8, seed=seed)), "PNG"))
    data = tmp_path / "data"
    extract(DataParams(url=str(archive)), archive, data / "extracted", data / "extract_skipped.csv")
    validate(ValidateParams(), data / "extracted", data / "manifest.csv", in_process)
    rows = read_split(split(SplitParams(val=0.1), data / "manifest.csv", data / "split.csv"))
    assert len(rows) == 50
    cells = Counter((row["path"].split("/")[0], row["split"], row["label"]) for row in rows)
    assert cells == {("test", "test", "NORMAL"): 5, ("test", "test", "PNEUMONIA"): 5, ("train", "val", "NORMAL"): 2,
                     ("train", "val", "PNEUMONIA"): 2, ("train", "train", "NORMAL"): 18,
                     ("train", "train", "PNEUMONIA"): 18}  # fmt: skip


# ---------------------------------------------------------------- near-duplicate clusters


def write_clusters(path: Path, manifest: Path, linked: list[list[str]]) -> Path:
    """A near_duplicates.csv for the manifest's valid rows: each list in `linked` one cluster, the rest alone."""
    cluster_of = {member: f"c{number}" for number, members in enumerate(linked) for member in members}
    with open(manifest, newline="") as handle:
        paths = [row["path"] for row in csv.DictReader(handle) if row["status"] == "valid"]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "cluster", "cluster_size"])
        writer.writerows([p, p.split("/")[0], cluster_of.get(p, p), 1] for p in paths)
    return path


def test_groups_joined_by_near_duplicates_go_to_one_split_together(tmp_path, caplog):
    def name(label, i):
        return f"C{i % 40}P{i % 40}ThinF_cell_{i}.png"

    manifest = write_manifest(tmp_path / "m.csv", {"Parasitized": 400, "Uninfected": 380}, name)
    # Patients 1, 2 and 3 are chained by two clusters; patients 5 and 6 by one across the classes.
    linked = [["Parasitized/C1P1ThinF_cell_1.png", "Parasitized/C2P2ThinF_cell_2.png"],
              ["Parasitized/C2P2ThinF_cell_42.png", "Uninfected/C3P3ThinF_cell_3.png"],
              ["Parasitized/C5P5ThinF_cell_5.png", "Uninfected/C6P6ThinF_cell_6.png"]]  # fmt: skip
    clusters = write_clusters(tmp_path / "nd.csv", manifest, linked)
    with caplog.at_level("INFO", logger="imgclf"):
        rows = read_split(split(SplitParams(group_pattern=r"^(C\d+P\d+)"), manifest, tmp_path / "s.csv", clusters))
    splits_of, blocks_of = defaultdict(set), defaultdict(set)
    for row in rows:
        splits_of[row["group"]].add(row["split"])
        blocks_of[row["group"]].add(row["block"])
    assert all(len(s) == 1 for s in splits_of.values()) and all(len(b) == 1 for b in blocks_of.values())
    assert splits_of["C1P1"] == splits_of["C2P2"] == splits_of["C3P3"] and blocks_of["C1P1"] == blocks_of["C3P3"]
    assert splits_of["C5P5"] == splits_of["C6P6"] and blocks_of["C5P5"] == blocks_of["C6P6"]
    assert len({b for bs in blocks_of.values() for b in bs}) == 40 - 3
    assert "3 near-duplicate clusters (6 images), 2 of them spanning classes" in caplog.text


def test_near_duplicates_without_groups_stay_together_and_classes_near_their_fractions(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", {"a": 300, "b": 200})
    linked = [[f"a/img_{3 * k + j}.png" for j in range(3)] for k in range(30)] + [["a/img_100.png", "b/img_100.png"]]
    clusters = write_clusters(tmp_path / "nd.csv", manifest, linked)
    rows = read_split(split(SplitParams(), manifest, tmp_path / "s.csv", clusters))
    split_of = {row["path"]: row["split"] for row in rows}
    assert all(len({split_of[p] for p in members}) == 1 for members in linked)
    cells = Counter((row["label"], row["split"]) for row in rows)
    for label, n in (("a", 300), ("b", 200)):
        for name, fraction in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
            assert abs(cells[label, name] - n * fraction) <= 3, (label, name, cells[label, name])


def test_without_near_duplicates_the_split_is_the_plain_one(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", {"a": 50, "b": 70})
    plain = split(SplitParams(), manifest, tmp_path / "plain.csv").read_bytes()
    alone = split(SplitParams(), manifest, tmp_path / "alone.csv", write_clusters(tmp_path / "nd.csv", manifest, []))
    assert alone.read_bytes() == plain


def test_a_near_duplicates_table_missing_an_image_is_a_clear_error(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", {"a": 10, "b": 10})
    clusters = write_clusters(tmp_path / "nd.csv", manifest, [])
    lines = clusters.read_text().splitlines()
    clusters.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(SplitError, match=r"b/img_9.png is not in .*nd.csv \(re-run the near_duplicates stage\)"):
        split(SplitParams(), manifest, tmp_path / "s.csv", clusters)
