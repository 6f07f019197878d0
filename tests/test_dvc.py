"""`dvc repro` in a real git + DVC repo: runs every stage, then nothing, then only what a change touches."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import dvc_project, sh


# What a change to train's params re-runs: train and every stage downstream of it.
FROM_TRAIN = ["train", "audit", "evaluate", "export", "publish", "report"]


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


@pytest.fixture
def project(tmp_path, demo_zip, cli_env) -> Path:
    return dvc_project(tmp_path / "project", cli_env, {"data": {"url": str(demo_zip), "sha256": None},
                                                       "prepare": {"image_size": 24}, "train": {"epochs": 1}})  # fmt: skip


def test_repro_runs_all_then_nothing_then_only_what_a_change_touches_and_experiments_see_it(project, cli_env):
    first = sh(["dvc", "repro"], project, cli_env)
    assert ran(first) == ["download", "extract", "validate", "cache", "near_duplicates", "split", *FROM_TRAIN]
    assert (project / "metrics" / "eval.json").exists()

    again = sh(["dvc", "repro"], project, cli_env)
    assert ran(again) == []
    assert "up to date" in sh(["dvc", "status"], project, cli_env)

    # A change runs its stage, then only the stages whose inputs came out different: at distance 3
    # near_duplicates finds the same clusters, so split and all after it stay; the report shows its metrics.
    set_params(project, validate={"near_duplicate_distance": 3})
    assert ran(sh(["dvc", "repro"], project, cli_env)) == ["near_duplicates", "report"]

    assert "up to date" in sh(["dvc", "status"], project, cli_env)
    # A dry run names the stages whose own params changed (those after them follow once train's
    # outputs change, as above): the stages that read train.*, and no earlier one.
    set_params(project, train={"epochs": 2})
    assert ran(sh(["dvc", "repro", "--dry"], project, cli_env)) == ["train", "audit", "report"]
    set_params(project, train={"epochs": 1})  # back to what ran: the experiment below sets it

    shown = sh(["dvc", "metrics", "show", "--json"], project, cli_env)
    assert '"accuracy"' in shown and '"val_accuracy"' in shown

    # Experiments and plots see the model stages; up to evaluate, whose metrics and plots these show.
    sh(["git", "add", "-A"], project, cli_env)
    sh(["git", "commit", "-qm", "baseline"], project, cli_env)
    assert ran(sh(["dvc", "exp", "run", "-S", "train.epochs=2", "evaluate"], project, cli_env)) == ["train", "evaluate"]
    experiments = sh(["dvc", "exp", "show", "--json"], project, cli_env)
    assert '"epochs": 2' in experiments and '"val_accuracy"' in experiments
    html = project / "plots-html"
    sh(["dvc", "plots", "show", "-o", str(html)], project, cli_env)
    page = (html / "index.html").read_text()
    assert "confusion.csv" in page and "roc.csv" in page and "loss.tsv" in page


def set_params(project: Path, **sections: dict) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
