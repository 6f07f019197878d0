"""The stage registry (behind `imgclf stage`, the flow and its caching) and dvc.yaml describe one pipeline."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from tasks.stages import STAGES, Layout

REPO = Path(__file__).resolve().parents[1]


def dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def declared(stage: dict, kinds: tuple[str, ...] = ("outs", "metrics", "plots")) -> set[str]:
    return {next(iter(out)) if isinstance(out, dict) else out for kind in kinds for out in stage.get(kind, [])}


def test_dvc_yaml_lists_the_registry_stages_in_order_with_their_commands():
    stages = dvc_stages()
    assert list(stages) == list(STAGES)
    for name, stage in stages.items():
        assert stage["cmd"] == f"imgclf stage {name}"


def test_dvc_deps_params_and_outs_are_the_registry_s():
    for name, stage in dvc_stages().items():
        spec = STAGES[name]
        assert stage["deps"] == [*spec.inputs, *spec.code], name
        assert stage.get("params", []) == list(spec.params), name
        assert declared(stage) == set(spec.outs), name
        for code in spec.code:
            assert (REPO / code).is_file(), code


# Modules that move files and settings about but shape no output: a change to them re-runs nothing.
PLUMBING = {"tasks/errors.py", "tasks/files.py", "tasks/layout.py", "tasks/params.py"}


def modules_run_by(module: str) -> set[str]:
    """Returns `module` and every tasks/ module it imports, directly or not (lazy imports too)."""
    found, todo = set(), [module]
    while todo:
        path = todo.pop()
        if path in found:
            continue
        found.add(path)
        for node in ast.walk(ast.parse((REPO / path).read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            todo += [name.replace(".", "/") + ".py" for name in names if name.startswith("tasks.")]
    return found


def test_each_stage_s_code_deps_are_every_module_it_runs():
    # The first code dep is the stage's own module; a module it imports and the deps miss
    # would change the outputs without `dvc repro` or the flow noticing.
    for name, spec in STAGES.items():
        assert set(spec.code) == modules_run_by(spec.code[0]) - PLUMBING, name


def test_every_input_is_an_earlier_stage_output():
    produced: set[str] = set()
    for name, spec in STAGES.items():
        for path in spec.inputs:
            assert path in produced, f"{name} reads {path} before any stage writes it"
        produced |= set(spec.outs)


def test_layout_paths_are_registry_outputs():
    layout = Layout(Path("."))
    outs = {out for spec in STAGES.values() for out in spec.outs}
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
