"""dvc.yaml is the one description of the pipeline: each of its stages has a function, and the reverse."""

from __future__ import annotations

from pathlib import Path

import yaml

from tasks.stages import STAGES, Layout

REPO = Path(__file__).resolve().parents[1]


def dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def declared(stage: dict, kinds: tuple[str, ...] = ("outs", "metrics", "plots")) -> set[str]:
    return {next(iter(out)) if isinstance(out, dict) else out for kind in kinds for out in stage.get(kind, [])}


def test_every_dvc_stage_runs_its_function_and_every_function_is_a_dvc_stage():
    stages = dvc_stages()
    assert set(stages) == set(STAGES)
    for name, stage in stages.items():
        assert stage["cmd"] == f"imgclf stage {name}"


def test_every_code_dependency_exists():
    for name, stage in dvc_stages().items():
        for dep in stage["deps"]:
            if dep.startswith("tasks/"):
                assert (REPO / dep).is_file(), f"{name}: {dep}"


def test_layout_paths_are_dvc_outputs():
    layout = Layout(Path("."))
    outs = {out for stage in dvc_stages().values() for out in declared(stage)}
    for path in (layout.raw_dir, layout.extracted_dir, layout.extract_skipped_csv, layout.manifest_csv,
                 layout.cache_dir, layout.split_csv, layout.model_dir / "model.keras"):  # fmt: skip
        assert path.as_posix() in outs


def test_prefect_yaml_deployments_run_the_flow_with_valid_overrides():
    from tasks.params import load_params

    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    assert {d["name"] for d in deployments} == {"weekly-retrain", "cloud-weekly"}
    default_cron = load_params(REPO / "params.yaml").orchestration.schedule
    for deployment in deployments:
        module, function = deployment["entrypoint"].split(":")
        assert (REPO / module).is_file() and f"def {function}(" in (REPO / module).read_text()
        load_params(REPO / "params.yaml", deployment["parameters"]["overrides"])  # raises on a bad key or value
        assert deployment["schedules"][0]["cron"] == default_cron
