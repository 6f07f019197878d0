"""The manifest's shape, shared by validate (which writes it) and the stages that read it."""

from __future__ import annotations

from pathlib import Path

from tasks.files import read_csv

# archive_split: train, val or test when the archive came as {train,val,test}/<class>/; empty otherwise.
MANIFEST_COLUMNS = ["path", "label", "status", "reason", "detail", "sha256", "bytes", "format", "mode", "width",
                    "height", "archive_split"]  # fmt: skip


def read_valid_rows(manifest_csv: Path) -> list[dict]:
    """Returns the manifest's valid rows (path, label, sha256, ...) in path order."""
    rows = [row for row in read_csv(manifest_csv) if row["status"] == "valid"]
    return sorted(rows, key=lambda row: row["path"])
