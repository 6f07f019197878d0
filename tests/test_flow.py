"""`imgclf run`: the Prefect flow (local mode, no server configured) over the demo archive.

The flow, `imgclf stage NAME` and the functions the tests call are one implementation: the
flow's outputs must equal, byte for byte, those of the stages run one by one.
"""

from __future__ import annotations

import csv
import subprocess
from collections import Counter
from pathlib import Path

from tasks.demo_data import EXPECTED_DUPLICATES, EXPECTED_REJECTED, EXPECTED_SKIPPED, make_demo_archive
from tasks.stages import STAGES
from tests.conftest import PER_CLASS, dvc_project, in_venv

DATA_STAGES = ["download", "extract", "validate", "cache", "near_duplicates", "split"]
OUTPUTS = ["data/manifest.csv", "data/split.csv", "data/extract_skipped.csv",
           "data/cache/images.npy", "data/cache/index.csv", "data/cache/meta.json"]  # fmt: skip
MODEL_OUTPUTS = ["models/model.keras", "models/model.json", "metrics/train.json", "metrics/eval.json",
                 "plots/confusion_matrix.png", "plots/roc.png", "plots/misclassified.png", "plots/training_curves.png"]  # fmt: skip


def imgclf(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(in_venv(["imgclf", *args]), cwd=cwd, env=env, capture_output=True, text=True)


def test_demo_archive_is_deterministic(tmp_path):
    first = make_demo_archive(tmp_path / "a.zip", per_class=5).read_bytes()
    assert make_demo_archive(tmp_path / "b.zip", per_class=5).read_bytes() == first
    assert make_demo_archive(tmp_path / "c.zip", per_class=5, seed=1).read_bytes() != first


def test_flow_runs_the_demo_with_exact_counts_and_matches_the_stage_commands(tmp_path, demo_zip, cli_env):
    flow_dir, stage_dir = tmp_path / "flow", tmp_path / "stages"
    overrides = ["--set", f"data.url=file://{demo_zip}", "--set", "data.sha256=", "--set", "prepare.image_size=24",
                 "--set", "train.epochs=1"]  # fmt: skip
    dvc_project(flow_dir, cli_env, {})
    result = imgclf(["run", *overrides], flow_dir, cli_env)
    assert result.returncode == 0, result.stderr[-3000:]
    # The command ends with each stage's outcome (dvc.yaml's order), then the test score.
    assert [line.split() for line in result.stdout.splitlines()[-len(STAGES) - 1 : -1]] == [[name, "ran"] for name in STAGES]
    assert "test accuracy" in result.stdout.splitlines()[-1]
    for noise in ("oneDNN", "cuInit", "absl::InitializeLog", "XNNPACK", "Traceback"):  # TensorFlow's start-up chatter is filtered
        assert noise not in result.stdout + result.stderr, noise

    with open(flow_dir / "data/manifest.csv", newline="") as handle:
        manifest = list(csv.DictReader(handle))
    statuses = Counter(row["status"] for row in manifest)
    assert statuses == {"valid": 2 * PER_CLASS, "rejected": sum(EXPECTED_REJECTED.values()), "duplicate": EXPECTED_DUPLICATES}
    assert Counter(row["reason"] for row in manifest if row["status"] == "rejected") == EXPECTED_REJECTED
    with open(flow_dir / "data/extract_skipped.csv", newline="") as handle:
        assert Counter(row["reason"] for row in csv.DictReader(handle)) == EXPECTED_SKIPPED

    stage_dir.mkdir()
    (stage_dir / "params.yaml").write_text(
        f"data:\n  url: file://{demo_zip}\n  sha256:\nprepare:\n  image_size: 24\ntrain:\n  epochs: 1\n"
    )
    for name in DATA_STAGES:
        step = imgclf(["stage", name], stage_dir, cli_env)
        assert step.returncode == 0, step.stderr
    for output in OUTPUTS:
        assert (flow_dir / output).read_bytes() == (stage_dir / output).read_bytes(), output
    for output in MODEL_OUTPUTS:
        assert (flow_dir / output).stat().st_size > 0, output


def test_flow_stops_on_bad_params_with_one_line(tmp_path, cli_env):
    (tmp_path / "params.yaml").write_text("{}\n")
    result = imgclf(["run", "--set", "split.test=-0.2"], tmp_path, cli_env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "split.test" in result.stderr
    assert not (tmp_path / "data").exists()


def test_a_stage_added_to_dvc_yaml_without_a_function_stops_the_run_before_any_stage(tmp_path, cli_env):
    project = dvc_project(tmp_path / "project", cli_env, {})
    with open(project / "dvc.yaml", "a") as handle:
        handle.write("  extra:\n    cmd: echo hi > extra.txt\n    deps: [data/split.csv]\n    outs: [extra.txt]\n")
    result = imgclf(["run"], project, cli_env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"imgclf: error: dvc.yaml: stage 'extra' is none of imgclf's ({', '.join(STAGES)}): "
        "`imgclf run` runs only those; run this pipeline with `dvc repro`")  # fmt: skip
    assert not (project / "data").exists()


def test_run_of_an_unknown_stage_stops_before_anything_starts(tmp_path, cli_env):
    (tmp_path / "params.yaml").write_text("{}\n")
    result = imgclf(["run", "trian"], tmp_path, cli_env)
    assert result.returncode == 2
    assert "no stage 'trian' (choose from download, extract" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
