"""Where each stage's outputs live, below the project root: the paths dvc.yaml names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


# Train's resumable state, below the model folder: removed when training ends.
BACKUP_FOLDER = ".backup"


def _below_root(relative: str) -> property:
    return property(lambda layout: layout.root / relative, doc=f"<root>/{relative}")


@dataclass(frozen=True)
class Layout:
    """Where each stage's outputs live, below the project root."""

    root: Path

    raw_dir = _below_root("data/raw")
    source_json = _below_root("data/source.json")
    extracted_dir = _below_root("data/extracted")
    extract_skipped_csv = _below_root("data/extract_skipped.csv")
    manifest_csv = _below_root("data/manifest.csv")
    cache_dir = _below_root("data/cache")
    near_duplicates_csv = _below_root("data/near_duplicates.csv")
    split_csv = _below_root("data/split.csv")
    oof_csv = _below_root("data/oof.csv")
    label_issues_csv = _below_root("data/label_issues.csv")
    model_dir = _below_root("models")
    metrics_dir = _below_root("metrics")
    plots_dir = _below_root("plots")

    def output_folders(self) -> tuple[Path, ...]:
        """Returns every folder a stage writes into: where an interrupted run's temporaries lie."""
        return (self.root / "data", self.raw_dir, self.model_dir, self.metrics_dir, self.plots_dir, self.root / "reports")
