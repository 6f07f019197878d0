"""Where each stage's outputs live, below the project root: the paths dvc.yaml names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    """Where each stage's outputs live, below the project root."""

    root: Path

    @property
    def raw_dir(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def extracted_dir(self) -> Path:
        return self.root / "data" / "extracted"

    @property
    def extract_skipped_csv(self) -> Path:
        return self.root / "data" / "extract_skipped.csv"

    @property
    def manifest_csv(self) -> Path:
        return self.root / "data" / "manifest.csv"

    @property
    def cache_dir(self) -> Path:
        return self.root / "data" / "cache"

    @property
    def split_csv(self) -> Path:
        return self.root / "data" / "split.csv"

    @property
    def model_dir(self) -> Path:
        return self.root / "models"

    @property
    def metrics_dir(self) -> Path:
        return self.root / "metrics"

    @property
    def plots_dir(self) -> Path:
        return self.root / "plots"
