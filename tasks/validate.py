"""Stage validate: every file under `data/extracted/` -> a row of `data/manifest.csv`.

A file is judged by decoding it, never by its extension. Each row says `valid`, or why not:
`rejected` with a reason (empty, truncated, not_an_image, unsupported_format, too_large,
corrupt, no_label, bad_name, conflicting_labels) or `duplicate` of another valid file under the same
label. The label is the file's top folder. Raw files are only read.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

from tasks.files import Progress, ShardMap, atomic_file, chunked, process_pool_map
from tasks.images import Verdict, judge
from tasks.manifest import MANIFEST_COLUMNS
from tasks.params import ValidateParams

log = logging.getLogger("imgclf")

SHARD_FILES = 256


def list_files(root: Path) -> list[str]:
    """Returns every regular file under `root` as a sorted relative POSIX path (links not followed)."""
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()
        base = Path(directory).relative_to(root)
        for name in files:
            full = os.path.join(directory, name)
            if os.path.isfile(full) and not os.path.islink(full):
                found.append((base / name).as_posix())
    return sorted(found)


def _judge_shard(root: str, max_pixels: int, paths: Sequence[str]) -> list[dict]:
    rows = []
    for path in paths:
        data = (Path(root) / path).read_bytes()
        verdict = judge(data, max_pixels)
        parts = path.split("/")
        label = parts[0] if len(parts) > 1 else ""
        reason = verdict.reason or ("" if label else "no_label")
        if not _utf8(path):
            # A name no UTF-8 file can hold (from an old archive): shown escaped, not used.
            path = os.fsencode(path).decode("utf-8", "backslashreplace")
            label = label.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            reason, verdict = "bad_name", Verdict("bad_name", "file name is not valid UTF-8")
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
            }
        )
    return rows


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
    params: ValidateParams, extracted_dir: Path, manifest_csv: Path, map_shards: ShardMap = process_pool_map
) -> Path:
    """Returns `manifest_csv`, written with one row per file under `extracted_dir`."""
    if not extracted_dir.is_dir():
        raise FileNotFoundError(f"{extracted_dir}: no such folder (run the extract stage first)")
    paths = list_files(extracted_dir)
    judge_shard = functools.partial(_judge_shard, str(extracted_dir.resolve()), params.max_pixels)
    rows: list[dict] = []
    progress = Progress(len(paths), "validate", "files")
    for shard_rows in map_shards(judge_shard, chunked(paths, SHARD_FILES)):
        rows.extend(shard_rows)
        progress.update(len(shard_rows))
    progress.close()
    _mark_duplicates(rows)
    with atomic_file(manifest_csv, newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    log.info("%s", summary(rows))
    return manifest_csv


def summary(rows: list[dict]) -> str:
    """Returns a short table of counts by status and reason, and valid images by label."""
    lines = [f"validate: {len(rows)} files"]
    for status, count in sorted(Counter(row["status"] for row in rows).items()):
        lines.append(f"  {status:<10} {count:>8}")
    for reason, count in sorted(Counter(row["reason"] for row in rows if row["reason"]).items()):
        lines.append(f"    {reason:<24} {count:>6}")
    labels = Counter(row["label"] for row in rows if row["status"] == "valid")
    lines.append("  valid by label: " + ", ".join(f"{label} {n}" for label, n in sorted(labels.items())))
    return "\n".join(lines)
