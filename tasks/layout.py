"""Where each stage's outputs live, below the project root: the paths dvc.yaml names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


# Train's resumable state, below the model folder: removed when training ends.
BACKUP_FOLDER = ".backup"
# imgclf's own files below the project root (the run's lock and params), in no stage's outputs.
OWN_FOLDER = ".imgclf"


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
    own_dir = _below_root(OWN_FOLDER)

    def output_folders(self) -> tuple[Path, ...]:
        """Returns every folder a stage writes into: where an interrupted run's temporaries lie."""
        return (self.root / "data", self.raw_dir, self.model_dir, self.metrics_dir, self.plots_dir, self.root / "reports")


def output_holding(root: Path, path: Path) -> tuple[str, str] | None:
    """Returns (stage, output) of the output of `root`'s dvc.yaml (outs, metrics, plots) that is `path` or
    holds it, which DVC deletes before that stage re-runs; None when there is none."""
    import yaml  # here, not at start-up: `imgclf --help` and predict never read dvc.yaml

    try:
        stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    except (OSError, KeyError, TypeError):
        return None  # no pipeline here (a test, a stage run by hand): no outputs to keep clear of
    where = (root / path).resolve()
    for name, stage in stages.items():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind) or []:
                output = next(iter(entry)) if isinstance(entry, dict) else entry
                if where.is_relative_to((root / output).resolve()):
                    return name, output
    return None
