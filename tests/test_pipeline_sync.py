"""The stage registry (behind `imgclf stage` and the flow) and dvc.yaml describe one pipeline."""

from __future__ import annotations

from pathlib import Path

import yaml

from tasks.stages import STAGES, Layout

REPO = Path(__file__).resolve().parents[1]


def dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def out_paths(stage: dict, kinds: tuple[str, ...] = ("outs",)) -> set[str]:
    return {next(iter(out)) if isinstance(out, dict) else out for kind in kinds for out in stage.get(kind, [])}


def test_dvc_yaml_lists_the_registry_stages_in_order_with_their_commands():
    stages = dvc_stages()
    assert list(stages) == list(STAGES)
    for name, stage in stages.items():
        assert stage["cmd"] == f"imgclf stage {name}"


def test_dvc_outs_are_the_layout_paths_and_each_stage_depends_on_its_code():
    layout = Layout(Path("."))
    expected = {
        "download": {layout.raw_dir},
        "extract": {layout.extracted_dir, layout.extract_skipped_csv},
        "validate": {layout.manifest_csv},
        "cache": {layout.cache_dir},
        "split": {layout.split_csv},
        "train": {layout.model_dir / "model.keras", layout.model_dir / "labels.json", layout.model_dir / "summary.txt"},
        "evaluate": {layout.plots_dir / n for n in ("confusion_matrix.png", "misclassified.png", "training_curves.png")},
    }
    assert set(expected) == set(STAGES)
    for name, stage in dvc_stages().items():
        assert out_paths(stage) == {p.as_posix() for p in expected[name]}, name
        assert f"tasks/{name}.py" in stage["deps"]
        for dep in stage["deps"]:
            produced = (out_paths(s, ("outs", "metrics", "plots")) for s in dvc_stages().values())
            assert (REPO / dep).exists() or any(dep in paths for paths in produced), dep


def test_every_dvc_dependency_on_data_is_an_earlier_stage_output():
    produced: set[str] = set()
    for name, stage in dvc_stages().items():
        for dep in stage["deps"]:
            if not dep.startswith("tasks/"):
                assert dep in produced, f"{name} depends on {dep} before any stage writes it"
        produced |= out_paths(stage, ("outs", "metrics", "plots"))
