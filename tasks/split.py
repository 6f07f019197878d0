"""Stage split: the manifest's valid images -> `data/split.csv` (path, label, split, [group], block).

Stratified by label and seeded: per class, each split holds its fraction of the images
within one image. With `split.group_pattern` (a regex whose first group is read from the
file name, e.g. the malaria patient id), whole groups go to one split, so no patient's cells
sit on both sides; stratification is then best-effort and the achieved fractions are logged.
Near-duplicate clusters (`data/near_duplicates.csv`) are kept whole the same way: a block is
the images joined by a group or a cluster (the union of both), and each block goes to one
split, so the split is leak-free by construction. `block` names it in split.csv (the audit's
folds keep blocks whole too); clusters whose images carry two labels are logged.
An archive that brings its own split (the manifest's `archive_split`) keeps it when
`split.archive_split` is `keep`: a val or test split it lacks is carved from its train images.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from tasks.errors import StageError
from tasks.files import read_csv, write_csv
from tasks.manifest import read_valid_rows
from tasks.near_duplicates import clusters
from tasks.params import SplitParams

log = logging.getLogger("imgclf")

SPLITS = ("train", "val", "test")


class SplitError(StageError, ValueError):
    """The data cannot be split as asked; the message names the class or group."""


def _fractions(params: SplitParams) -> dict[str, float]:
    return {"train": 1 - params.val - params.test, "val": params.val, "test": params.test}


def allocate(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """Returns split sizes summing to n, each within one of n * fraction (largest remainders)."""
    exact = {name: n * fraction for name, fraction in fractions.items()}
    sizes = {name: math.floor(value) for name, value in exact.items()}
    # Ties (to float noise) go to a split that would otherwise stay empty.
    by_remainder = sorted(
        exact, key=lambda name: (-round(exact[name] - sizes[name], 9), sizes[name] > 0, SPLITS.index(name))
    )
    for name in by_remainder[: n - sum(sizes.values())]:
        sizes[name] += 1
    return sizes


def _fits(n: int, fractions: dict[str, float]) -> bool:
    return all(size > 0 for name, size in allocate(n, fractions).items() if fractions[name] > 0)


def _stratified(params: SplitParams, rows: list[dict], fractions: dict[str, float]) -> list[str]:
    rng = np.random.default_rng(params.seed)
    by_label: dict[str, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        by_label[row["label"]].append(index)
    assigned = [""] * len(rows)
    for label in sorted(by_label):
        members = by_label[label]
        order = [members[i] for i in rng.permutation(len(members))]
        start = 0
        for name, size in allocate(len(members), fractions).items():
            for index in order[start : start + size]:
                assigned[index] = name
            start += size
    return assigned


def _grouped(params: SplitParams, rows: list[dict], groups: list[str], fractions: dict[str, float]) -> list[str]:
    labels = sorted({row["label"] for row in rows})
    members: dict[str, list[int]] = defaultdict(list)
    for index, group in enumerate(groups):
        members[group].append(index)
    names = sorted(members)
    if len(names) < sum(1 for f in fractions.values() if f > 0):
        raise SplitError(f"split: only {len(names)} group(s) of images that stay together (split.group_pattern, "
                         "near-duplicate clusters); too few for train/val/test")  # fmt: skip
    counts = {g: np.array([sum(rows[i]["label"] == lab for i in members[g]) for lab in labels]) for g in names}
    totals = sum(counts.values())
    targets = {name: fraction * totals for name, fraction in fractions.items()}
    filled = {name: np.zeros(len(labels)) for name in SPLITS}
    # Biggest groups first (hardest to place); ties in a seeded random order.
    rng = np.random.default_rng(params.seed)
    shuffled = [names[i] for i in rng.permutation(len(names))]
    ordered = sorted(shuffled, key=lambda g: -counts[g].sum())
    assigned = [""] * len(rows)
    for group in ordered:
        # The split whose per-label squared shortfall this group reduces most.
        def cost(name: str) -> float:
            after = filled[name] + counts[group] - targets[name]
            before = filled[name] - targets[name]
            return float((after**2).sum() - (before**2).sum())

        best = min((name for name in SPLITS if targets[name].sum() > 0), key=cost)
        filled[best] += counts[group]
        for index in members[group]:
            assigned[index] = best
    empty = [name for name in SPLITS if fractions[name] > 0 and not filled[name].sum()]
    if empty:  # every group fit better elsewhere: later stages would fail on the missing split, blaming its fraction
        largest = max(len(indices) for indices in members.values())
        raise SplitError(f"split: no images left for {' and '.join(empty)}: {len(rows)} images in {len(names)} "
                         f"groups that stay together (split.group_pattern, near-duplicate clusters), the largest "
                         f"{largest} images; lower validate.near_duplicate_distance (0: off) or use finer "
                         "groups")  # fmt: skip
    return assigned


def group_of(pattern: re.Pattern[str], path: str) -> str:
    """Returns the pattern's first group in the file name, or the whole path when it does not match."""
    match = pattern.search(path.rsplit("/", 1)[-1])
    return match.group(1) if match and match.group(1) else path  # an optional group that took nothing: no group


def blocks_of(*partitions: list[str]) -> list[int]:
    """Returns each item's block: items that share a value in any partition are one block (numbered
    in order of first item)."""
    n = len(partitions[0])
    first: dict[tuple[int, str], int] = {}
    links = [first.setdefault((which, value), index) for which, values in enumerate(partitions)
             for index, value in enumerate(values)]  # fmt: skip
    return clusters(n, np.column_stack((np.tile(np.arange(n), len(partitions)), links))).tolist()


def _clusters(near_duplicates_csv: Path, rows: list[dict]) -> list[str]:
    """Returns each row's near-duplicate cluster, read from the near_duplicates stage's table."""
    if not near_duplicates_csv.exists():
        raise SplitError(f"split: {near_duplicates_csv} is missing (run the near_duplicates stage first)")
    cluster_of = {entry["path"]: entry["cluster"] for entry in read_csv(near_duplicates_csv)}
    missing = next((row["path"] for row in rows if row["path"] not in cluster_of), None)
    if missing is not None:
        raise SplitError(f"split: {missing} is not in {near_duplicates_csv} (re-run the near_duplicates stage)")
    return [cluster_of[row["path"]] for row in rows]


def _warn_of_absent_classes(rows: list[dict], assigned: list[str], from_archive: set[str]) -> None:
    """Warns of each class without val or test images; `from_archive`: the splits the archive gave as they came."""
    present = {(row["label"], name) for row, name in zip(rows, assigned)}
    for name in ("val", "test"):
        if name not in assigned:
            continue
        absent = sorted({row["label"] for row in rows} - {label for label, where in present if where == name})
        if absent:
            why = ("the archive's own split has none" if name in from_archive else
                   "too few images, or their blocks, each kept whole on one side, went elsewhere: a large near-duplicate "
                   "cluster (data/near_duplicates.csv; validate.near_duplicate_distance) or group")  # fmt: skip
            log.warning("split: class(es) %s have no %s images (%s): their %s scores are undefined",
                        ", ".join(absent), name, why, name)  # fmt: skip


def _log_clusters(rows: list[dict], clusters: list[str]) -> None:
    members: dict[str, list[int]] = defaultdict(list)
    for index, cluster in enumerate(clusters):
        members[cluster].append(index)
    shared = [indices for indices in members.values() if len(indices) > 1]
    if not shared:
        return
    mixed = sum(1 for indices in shared if len({rows[i]["label"] for i in indices}) > 1)
    log.info("split: %d near-duplicate clusters (%d images), %d of them spanning classes (label conflicts: see "
             "data/near_duplicates.csv)", len(shared), sum(map(len, shared)), mixed)  # fmt: skip


def _warn_of_leaks(blocks: list[int], assigned: list[str]) -> None:
    # Only an archive's own split, kept as it came, can put one block on two sides.
    sides: dict[int, set[str]] = defaultdict(set)
    for block, name in zip(blocks, assigned):
        sides[block].add(name)
    spanning = sum(1 for names in sides.values() if len(names) > 1)
    if spanning:
        log.warning("split: %d blocks (groups or near-duplicate clusters) span the archive's own splits: a leak the "
                    "archive brings (split.archive_split: ignore re-splits it)", spanning)  # fmt: skip


def _assign(params: SplitParams, rows: list[dict], groups: list[str], fractions: dict[str, float]) -> list[str]:
    # Grouped or not: one near-duplicate pair makes the split grouped, and must not let a class of two images through.
    for label, count in sorted(Counter(row["label"] for row in rows).items()):
        if not _fits(count, fractions):
            needed = next((f"at least {n}" for n in range(1, 10_000) if _fits(n, fractions)), "over 10,000")
            raise SplitError(f"split: class {label!r} has {count} image(s); split.val={params.val} and "
                             f"split.test={params.test} need {needed} per class")  # fmt: skip
    return _grouped(params, rows, groups, fractions) if groups else _stratified(params, rows, fractions)


def _keep_archive_split(params: SplitParams, rows: list[dict], groups: list[str]) -> list[str]:
    """Returns the archive's own split per row, with a missing val or test carved from its train images."""
    assigned = [row["archive_split"] for row in rows]
    train = [index for index, name in enumerate(assigned) if name == "train"]
    if not train:
        raise SplitError("split: the archive's own split has no train images; set split.archive_split: ignore "
                         "to re-split it")  # fmt: skip
    wanted = {"val": params.val, "test": params.test}
    missing = {name: fraction for name, fraction in wanted.items() if fraction and name not in assigned}
    if missing:
        fractions = {"train": 1 - sum(missing.values()), "val": 0.0, "test": 0.0} | missing
        carved = _assign(params, [rows[i] for i in train], [groups[i] for i in train] if groups else [], fractions)
        for index, name in zip(train, carved):
            assigned[index] = name
    untrained = sorted({row["label"] for row in rows} - {row["label"] for row, name in zip(rows, assigned) if name == "train"})
    if untrained:
        raise SplitError(f"split: class(es) {', '.join(map(repr, untrained))} have no train images in the archive's own "
                         "split: add some, or set split.archive_split: ignore to re-split it")  # fmt: skip
    counts = Counter(assigned)
    carved_note = "".join(f"; {name} carved from its train images by split.{name}={f}" for name, f in missing.items())
    log.info("split: kept the archive's own split (split.archive_split: keep): %s%s",
             ", ".join(f"{name} {counts[name]}" for name in SPLITS), carved_note)  # fmt: skip
    return assigned


def split(params: SplitParams, manifest_csv: Path, split_csv: Path, near_duplicates_csv: Path | None = None) -> Path:
    """Returns `split_csv`, with each valid image of the manifest assigned to train, val or test;
    each group and near-duplicate cluster (when `near_duplicates_csv` is given) in one split."""
    rows = read_valid_rows(manifest_csv)
    if not rows:
        raise SplitError(f"split: {manifest_csv} has no valid images")
    columns = ["path", "label", "split"]
    groups: list[str] = []
    if params.group_pattern:
        pattern = re.compile(params.group_pattern)
        groups = [group_of(pattern, row["path"]) for row in rows]
        unmatched = sum(1 for group, row in zip(groups, rows) if group == row["path"])
        if unmatched == len(rows):
            example = rows[0]["path"].rsplit("/", 1)[-1]
            raise SplitError(f"split.group_pattern {params.group_pattern!r} matches none of the {len(rows)} file names "
                             f"(e.g. {example!r}); fix it, or leave it empty for no groups")  # fmt: skip
        if unmatched:
            log.warning("split: %d file name(s) do not match split.group_pattern; each is its own group", unmatched)
        columns.append("group")
    clusters = _clusters(near_duplicates_csv, rows) if near_duplicates_csv else [row["path"] for row in rows]
    names = groups or [row["path"] for row in rows]
    blocks = blocks_of(names, clusters)
    # A block goes by its first image's group: without near-duplicates, the groups and their split are as
    # they were. Without groups or clusters, each block is one image: the plain stratified split.
    first: dict[int, int] = {}
    together = [names[first.setdefault(block, i)] for i, block in enumerate(blocks)]
    if len(first) == len(rows):
        together = []
    # A manifest written before the archive_split column has none.
    has_archive_split = any(row.get("archive_split") for row in rows)
    kept = has_archive_split and params.archive_split == "keep"
    if kept:
        assigned = _keep_archive_split(params, rows, together)
    else:
        if has_archive_split:
            log.info("split: the archive's own split is ignored (split.archive_split: ignore); all images are re-split")
        assigned = _assign(params, rows, together, _fractions(params))
    write_csv(split_csv, columns + ["block"], ([row["path"], row["label"], assigned[index],
                                               *([groups[index]] if groups else []), blocks[index]]
                                              for index, row in enumerate(rows)))  # fmt: skip
    log.info("%s", summary(rows, assigned))
    _warn_of_absent_classes(rows, assigned, {row["archive_split"] for row in rows} if kept else set())
    _log_clusters(rows, clusters)
    _warn_of_leaks(blocks, assigned)
    return split_csv


def summary(rows: list[dict], assigned: list[str]) -> str:
    """Returns one line: the achieved split sizes and fractions, per label."""
    per_label = Counter(row["label"] for row in rows)
    cells = Counter((row["label"], name) for row, name in zip(rows, assigned))
    labels = []
    for label in sorted(per_label):
        parts = [f"{name} {cells[label, name]} ({cells[label, name] / per_label[label]:.3f})" for name in SPLITS]
        labels.append(f"{label}: " + ", ".join(parts))
    return f"split: {len(rows)} images; " + "; ".join(labels)
