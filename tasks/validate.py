"""Stage validate: every file under `data/extracted/` -> a row of `data/manifest.csv`.

A file is judged by decoding it, never by its extension. Each row says `valid`, or why not:
`rejected` with a reason (empty, truncated, not_an_image, unsupported_format, too_large,
corrupt, no_label, bad_name, conflicting_labels) or `duplicate` of another valid file under the same
label. The label is the file's top folder; when every top folder is named like a split
(`train/`, `test/`, ...), the label is the class folder inside it and the split is recorded
in `archive_split`. Raw files are only read. Class folders that differ only by case or spaces
stop the stage before any decoding; no valid image at all stops it after the manifest is written.

Judging a file is one strict decode (`tasks.images.read_image`). Given a `Staging` (the
prepare params, as a hint: the manifest does not depend on them), validate also resizes those
pixels into the cache's rows and leaves them in the staging folder, keyed by content hash,
settings and decoder fingerprint, where the cache stage takes them instead of decoding again.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import operator
import os
import shutil
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import imagecodecs
import numpy as np

from tasks.errors import StageError
from tasks.files import Progress, ShardMap, atomic_dir, process_pool_map, shards_of, shown_name, write_csv
from tasks.images import Verdict, judge
from tasks.manifest import MANIFEST_COLUMNS
from tasks.params import PrepareParams, ValidateParams
from tasks.rows import (RowWriter, Staging, crc32, decoder_fingerprint, pixels_sha256, read_row, row_shape,
                        same_rows, settings, shard_largest, write_index, write_meta)  # fmt: skip

log = logging.getLogger("imgclf")

SHARD_FILES = 256  # the smallest shard; a larger set gets larger ones (shards_of)
# Folder names (case-insensitive) of an archive that brings its own split, and the split each means.
ARCHIVE_SPLITS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "test": "test", "testing": "test"}  # fmt: skip


class ValidateError(StageError, ValueError):
    """The extracted files make no usable labelled set; the message names the folder and why."""


def list_files(root: Path) -> list[str]:
    """Returns every regular file under `root` as a sorted relative POSIX path (links not followed)."""
    found: list[str] = []

    def walk(folder: str, prefix: str) -> None:
        with os.scandir(folder) as entries:  # a DirEntry knows its type: no stat call a file
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    walk(entry.path, f"{prefix}{entry.name}/")
                elif entry.is_file(follow_symlinks=False):
                    found.append(prefix + entry.name)

    walk(str(root), "")
    return sorted(found)


def _is_split_layout(paths: list[str]) -> bool:
    """Returns whether every top folder is named like a split (train/, test/, ...) and some hold class folders."""
    tops = {path.split("/")[0] for path in paths if "/" in path}
    return bool(tops) and all(_archive_split(top) for top in tops) and any(path.count("/") > 1 for path in paths)


def _archive_split(folder: str) -> str:
    return ARCHIVE_SPLITS.get(folder.strip().lower(), "")


def _class_of(path: str, split_layout: bool) -> tuple[str, str]:
    """Returns (label, archive split) of a relative path: ("", "") outside a class folder."""
    parts = path.split("/")
    if split_layout:
        return (parts[1], _archive_split(parts[0])) if len(parts) > 2 else ("", "")
    return (parts[0], "") if len(parts) > 1 else ("", "")


@dataclass(frozen=True)
class JudgedShard:
    rows: list[dict]  # manifest rows, in the shard's order
    pixels: np.ndarray | None  # when staging: the cache row of each file valid so far (zeros for others), else None
    digests: list[str]  # pixels_sha256 of each of those rows; "" for the others
    decoder: str  # decoder_fingerprint() where the shard was judged, when staging


def _judge_shard(root: str, max_pixels: int, split_layout: bool, prepare: PrepareParams | None,
                 paths: Sequence[str]) -> JudgedShard:  # fmt: skip
    rows = []
    pixels = None if prepare is None else np.zeros((len(paths), *row_shape(prepare)), dtype=np.uint8)
    digests = [""] * len(paths)
    for index, path in enumerate(paths):
        with open(os.path.join(root, path), "rb") as handle:
            data = handle.read()
        verdict, row = (judge(data, max_pixels), None) if prepare is None else read_row(data, prepare, max_pixels)
        label, archive_split = _class_of(path, split_layout)
        reason = verdict.reason or ("" if label else "no_label")
        if not _utf8(path):
            # A name no UTF-8 file can hold (from an old archive): shown escaped, not used.
            path, label = shown_name(path), shown_name(label)
            reason, verdict = "bad_name", Verdict("bad_name", "file name is not valid UTF-8")
        elif any(unicodedata.category(char) == "Cc" for char in label):
            # A newline or a tab in a class name splits every log line and table that names the class.
            reason, verdict = "bad_name", Verdict("bad_name", f"class folder name {label!r} holds a control character")
        if row is not None and not reason:
            pixels[index], digests[index] = row, pixels_sha256(row)
        rows.append(
            {
                "path": path,
                "label": label,
                "status": "rejected" if reason else "valid",
                "reason": reason,
                "detail": verdict.detail if verdict.reason else ("not inside a class folder" if reason else ""),
                "sha256": hashlib.sha256(data).hexdigest(),
                "bytes": len(data),
                "format": verdict.format,
                "mode": verdict.mode,
                "width": verdict.width,
                "height": verdict.height,
                "archive_split": archive_split,
            }
        )
    return JudgedShard(rows, pixels, digests, "" if prepare is None else decoder_fingerprint())


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _mark_duplicates(rows: list[dict]) -> None:
    by_hash: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row["status"] == "valid":
            by_hash[row["sha256"]].append(row)
    for same in by_hash.values():
        if len(same) < 2:
            continue
        labels = sorted({row["label"] for row in same})
        if len(labels) > 1:
            for row in same:
                row.update(status="rejected", reason="conflicting_labels", detail="same content under " + ", ".join(labels))
            continue
        for row in same[1:]:  # rows are in path order: the first path stays valid
            row.update(status="duplicate", reason="duplicate", detail=f"same content as {same[0]['path']}")


def validate(
    params: ValidateParams,
    extracted_dir: Path,
    manifest_csv: Path,
    map_shards: ShardMap = process_pool_map,
    staging: Staging | None = None,
) -> Path:
    """Returns `manifest_csv`, written with one row per file under `extracted_dir`; with `staging`,
    also the cache rows of the files it could decode, in `staging.folder`."""
    if not extracted_dir.is_dir():
        raise FileNotFoundError(f"{extracted_dir}: no such folder (run the extract stage first)")
    paths = list_files(extracted_dir)
    split_layout = _is_split_layout(paths)
    if split_layout:
        log.info("validate: %s is laid out as split folders: labels are the class folders inside them", extracted_dir)
    _check_class_names(extracted_dir, {_class_of(path, split_layout)[0] for path in paths} - {""})
    if not split_layout:
        _warn_of_classes_one_level_down(paths)
    prepare = staging.params if staging else None
    judge_shard = functools.partial(_judge_shard, str(extracted_dir.resolve()), params.max_pixels, split_layout,
                                    prepare)  # fmt: skip
    shards = shards_of(paths, SHARD_FILES, **({"largest": shard_largest(prepare)} if prepare else {}))
    rows: list[dict] = []
    progress = Progress(len(paths), "validate", "files")
    with _StagedRows(staging, len(paths)) if staging else contextlib.nullcontext() as staged:
        for judged in map_shards(judge_shard, shards):
            if staged:
                staged.add(judged)
            rows.extend(judged.rows)
            progress.update(len(judged.rows))
        _mark_duplicates(rows)
        if staged:
            staged.finish({row["sha256"] for row in rows if row["reason"] == "conflicting_labels"})
    if staged and staged.cached_already:
        shutil.rmtree(staging.folder)
    progress.close()
    write_csv(manifest_csv, MANIFEST_COLUMNS, map(operator.itemgetter(*MANIFEST_COLUMNS), rows))
    log.info("%s", summary(rows))
    if not any(row["status"] == "valid" for row in rows):
        reasons = _counts(row["reason"] for row in rows) or "none"
        raise ValidateError(f"{extracted_dir}: no valid images among {len(rows)} files ({reasons}); see {manifest_csv}")
    labels = {row["label"] for row in rows if row["status"] == "valid"}
    _warn_of_classes_left_empty(rows, labels)
    if len(labels) < 2:
        (label,) = labels
        below = sorted({path.split("/")[-2] for path in (row["path"] for row in rows if row["label"] == label)
                        if path.count("/") >= (3 if split_layout else 2)})  # fmt: skip
        hint = f"; its subfolders ({', '.join(below)}) may be the classes, one level down" if len(below) > 1 else ""
        raise ValidateError(f"{extracted_dir}: every valid image is of one class, {label!r}: a classifier needs two "
                            f"or more class folders{hint}; see {manifest_csv}")  # fmt: skip
    return manifest_csv


def _warn_of_classes_left_empty(rows: list[dict], valid: set[str]) -> None:
    # A folder of HEIC photos, say: every file rejected, and the model would never learn the class exists.
    for label in sorted({row["label"] for row in rows if row["label"]} - valid):
        reasons = _counts(row["reason"] or row["status"] for row in rows if row["label"] == label)
        log.warning("validate: class %r has no valid image (%s): it is left out, and the model will not know it",
                    label, reasons)  # fmt: skip


class _StagedRows(contextlib.ExitStack):
    """The staging folder being written, in place of the last one once all is written. It holds the
    rows of the files valid so far, in path order, a content once: when no later file turns one of
    them into a conflict, exactly the rows of the cache, which then takes the files as they are."""

    def __init__(self, staging: Staging, files: int):
        super().__init__()
        self.staging, self.shape = staging, (files, *row_shape(staging.params))
        self.made_with = settings(staging.params, decoder_fingerprint())
        self.entries: list[tuple[int, str, str, str, str]] = []
        self.held: set[str] = set()
        self.rows_crc32 = 0

    def __enter__(self) -> _StagedRows:
        super().__enter__()
        self.folder = self.enter_context(atomic_dir(self.staging.folder))
        self.images = self.enter_context(RowWriter(self.folder, self.shape))
        return self

    def add(self, judged: JudgedShard) -> None:
        if judged.decoder != self.made_with["decoder"]:
            # Its verdicts too may differ: which shard went where would change the manifest.
            raise ValidateError(f"{self.staging.folder}: a worker judges with other code or library versions than "
                                f"this run (decoder {judged.decoder[:12]}, here {self.made_with['decoder'][:12]}); "
                                "install the same versions on every worker")  # fmt: skip
        taken = []
        for offset, (row, digest) in enumerate(zip(judged.rows, judged.digests, strict=True)):
            if digest and row["sha256"] not in self.held:  # a later copy is a duplicate, or a conflict
                self.held.add(row["sha256"])
                self.entries.append((len(self.entries), row["path"], row["label"], row["sha256"], digest))
                taken.append(offset)
        if taken:
            pixels = judged.pixels if len(taken) == len(judged.rows) else judged.pixels[taken]
            self.images.put(len(self.entries) - len(taken), pixels)
            self.rows_crc32 = imagecodecs.deflate_crc32(pixels, self.rows_crc32)

    def finish(self, conflicting: set[str]) -> None:
        """Writes the index and meta.json, the rows of `conflicting` contents (no class: not in the cache) left out."""
        kept = [entry for entry in self.entries if entry[3] not in conflicting]
        if len(kept) < len(self.entries):  # rare: moved up in place, so that the staging is the cache's rows
            self.rows_crc32 = 0
            for row, entry in enumerate(kept):
                pixels = self.images.get(entry[0])
                self.images.put(row, pixels)
                self.rows_crc32 = imagecodecs.deflate_crc32(pixels, self.rows_crc32)
            self.entries = [(row, *entry[1:]) for row, entry in enumerate(kept)]
        self.images.shrink_to(len(self.entries))
        write_index(self.folder, self.entries)
        shape = (len(self.entries), *self.shape[1:])
        write_meta(self.folder, self.made_with, shape, Counter(entry[2] for entry in self.entries),
                   rows_crc32=self.rows_crc32, index_crc32=crc32(self.folder / "index.csv"))  # fmt: skip
        cache_dir = self.staging.cache_dir
        self.cached_already = cache_dir is not None and same_rows(self.folder, cache_dir, self.made_with)


def _warn_of_classes_one_level_down(paths: list[str]) -> None:
    # Kaggle's dogs-vs-cats: train/{cat,dog}/ beside an unlabelled test1/ would train "train vs test1".
    nested, flat = defaultdict(set), set()
    for parts in (path.split("/") for path in paths):
        if len(parts) > 2:
            nested[parts[0]].add(parts[1])
        elif len(parts) == 2:
            flat.add(parts[0])
    only_folders = sorted(label for label in nested if label not in flat)
    if only_folders and flat - set(nested):
        shown = "; ".join(f"{label} holds {', '.join(sorted(nested[label]))}" for label in only_folders)
        log.warning("validate: class folders that hold only folders (%s) beside ones that hold images (%s): are the "
                    "classes one level down? The labels here are the top folders", shown, ", ".join(sorted(flat)))  # fmt: skip


def _check_class_names(extracted_dir: Path, labels: set[str]) -> None:
    # `Cat` and `cat` (or `cat `, or `Café` as macOS spells it, decomposed) are one class to a
    # person but two to the model.
    by_key: dict[str, list[str]] = defaultdict(list)
    for label in sorted(labels):
        by_key[unicodedata.normalize("NFC", label).strip().casefold()].append(label)
    clashes = [", ".join(map(_shown, names)) for names in by_key.values() if len(names) > 1]
    if clashes:
        raise ValidateError(f"{extracted_dir}: class folders differ only by case, spaces or Unicode form: {'; '.join(clashes)}; "
                            "rename or merge them")  # fmt: skip


def _shown(label: str) -> str:
    return repr(label) if unicodedata.is_normalized("NFC", label) else f"{ascii(label)} (decomposed Unicode)"


def summary(rows: list[dict]) -> str:
    """Returns one line: counts by status (rejections by reason), and valid images by label."""
    statuses = Counter(row["status"] for row in rows)
    reasons = _counts(row["reason"] for row in rows if row["status"] == "rejected")
    shown = ", ".join(f"{status} {n}" + (f" ({reasons})" if status == "rejected" else "") for status, n in sorted(statuses.items()))
    valid = [row for row in rows if row["status"] == "valid"]
    line = f"validate: {len(rows)} files: {shown}; valid by label: {_counts(row['label'] for row in valid)}"
    if any(row["archive_split"] for row in valid):
        line += "; by archive split: " + _counts(row["archive_split"] for row in valid)
    return line


def _counts(values: Iterable[str]) -> str:
    return ", ".join(f"{value} {n}" for value, n in sorted(Counter(values).items()))
