"""The split stage: stratified, seeded, within one image of each fraction; whole groups with a pattern."""

from __future__ import annotations

import csv
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from tasks.manifest import MANIFEST_COLUMNS
from tasks.params import SplitParams
from tasks.split import SplitError, split


def write_manifest(path: Path, counts: dict[str, int], name=lambda label, i: f"img_{i}.png") -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        for label, n in counts.items():
            for i in range(n):
                writer.writerow({"path": f"{label}/{name(label, i)}", "label": label, "status": "valid",
                                 "sha256": f"{label}{i}"})  # fmt: skip
        writer.writerow({"path": "a/broken.png", "label": "a", "status": "rejected", "reason": "truncated"})
    return path


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
    assert not (tmp_path / "s.csv").exists()


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


def test_too_few_groups_is_a_clear_error(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", {"a": 10, "b": 10}, lambda label, i: f"P1_{i}.png")
    with pytest.raises(SplitError, match="found only 1 group"):
        split(SplitParams(group_pattern=r"^(P\d+)_"), manifest, tmp_path / "s.csv")
