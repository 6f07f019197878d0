"""params.yaml is parsed once into typed objects; bad keys and values fail with their dotted name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.params import MALARIA_URL, ParamsError, load_params, parse_override

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_repo_params_load_with_malaria_defaults():
    params = load_params(REPO / "params.yaml")
    assert params.data.url == MALARIA_URL
    assert params.data.sha256 == "0a949556b2414159b5100192609805376654c4266d8d187be9b1922fad43c668"
    assert params.prepare.image_size == (64, 64)
    assert params.split.group_pattern is None


def test_image_size_takes_an_int_or_height_width(tmp_path):
    assert load_params(write(tmp_path, {"prepare": {"image_size": 32}})).prepare.image_size == (32, 32)
    assert load_params(write(tmp_path, {"prepare": {"image_size": [48, 96]}})).prepare.image_size == (48, 96)


@pytest.mark.parametrize(
    ("tree", "dotted"),
    [
        ({"prepare": {"imge_size": 64}}, "prepare.imge_size: unknown key"),
        ({"trian": {}}, "trian: unknown key"),
        ({"split": {"test": -0.1}}, "split.test"),
        ({"prepare": {"image_size": 0}}, "prepare.image_size"),
        ({"prepare": {"image_size": [64, 0]}}, "prepare.image_size"),
        ({"prepare": {"resize": "squash"}}, "prepare.resize"),
        ({"prepare": {"channels": 2}}, "prepare.channels"),
        ({"split": {"test": 0.5, "val": 0.5}}, "split: test + val must be below 1"),
        ({"split": {"group_pattern": "C(\\d+"}}, "split.group_pattern: not a valid regex"),
        ({"split": {"group_pattern": "C\\d+"}}, "split.group_pattern: needs a capturing group"),
        ({"data": {"sha256": "abc"}}, "data.sha256"),
        ({"data": {"max_extract_bytes": -1}}, "data.max_extract_bytes"),
        ({"validate": {"max_pixels": 0}}, "validate.max_pixels"),
        ({"train": {"epochs": 0}}, "train.epochs"),
        ({"train": {"model": "resnet"}}, "train.model"),
        ({"train": {"cnn": {"filters": []}}}, "train.cnn.filters"),
        ({"augment": {"flip": "sideways"}}, "augment.flip"),
        ({"prepare": {"image_size": 16}}, "train.cnn: 3 conv blocks"),
        ({"train": {"model": "vgg16"}, "prepare": {"image_size": 24}}, "train.model: vgg16 needs prepare.image_size"),
        ({"publish": {"s3_uri": "bucket/prefix"}}, "publish.s3_uri"),
        ({"orchestration": {"task_runner": "spark"}}, "orchestration.task_runner"),
    ],
)
def test_bad_params_fail_with_one_line_naming_the_key(tmp_path, tree, dotted):
    with pytest.raises(ParamsError) as caught:
        load_params(write(tmp_path, tree))
    message = str(caught.value)
    assert dotted in message
    assert "\n" not in message
    assert message.startswith(str(tmp_path / "params.yaml"))


def test_overrides_apply_by_dotted_key_and_are_validated(tmp_path):
    path = write(tmp_path, {})
    params = load_params(path, dict([parse_override("prepare.image_size=[32, 48]"), parse_override("split.seed=7")]))
    assert params.prepare.image_size == (32, 48)
    assert params.split.seed == 7
    with pytest.raises(ParamsError, match="split.tset: unknown key"):
        load_params(path, {"split.tset": 0.2})


def test_empty_override_clears_an_optional_value(tmp_path):
    key, value = parse_override("data.sha256=")
    assert load_params(write(tmp_path, {}), {key: value}).data.sha256 is None


def test_params_are_frozen():
    params = load_params(REPO / "params.yaml")
    with pytest.raises(Exception):
        params.split.seed = 1  # type: ignore[misc]


def test_cli_stops_on_bad_params_before_any_work(tmp_path, cli_env):
    write(tmp_path, {"split": {"test": 1.5}})
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "stage", "download"], cwd=tmp_path, env=cli_env | {"PYTHONPATH": str(REPO)},
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "split.test" in result.stderr
    assert not (tmp_path / "data").exists()
