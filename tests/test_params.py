"""params.yaml is parsed once into typed objects; bad keys and values fail with their dotted name."""

from __future__ import annotations

import re
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
        ({"split": {"test": 0, "val": 0}}, "split.test: Input should be greater than 0"),
        ({"prepare": {"image_size": 0}}, "prepare.image_size"),
        ({"prepare": {"image_size": [64, 0]}}, "prepare.image_size"),
        ({"prepare": {"resize": "squash"}}, "prepare.resize"),
        ({"prepare": {"channels": 2}}, "prepare.channels"),
        ({"split": {"test": 0.5, "val": 0.5}}, "split: test + val must be below 1"),
        ({"split": {"group_pattern": "C(\\d+"}}, "split.group_pattern: not a valid regex"),
        ({"split": {"group_pattern": "C\\d+"}}, "split.group_pattern: needs a capturing group"),
        ({"split": {"group_pattern": 123}}, "split.group_pattern: a regex in text, not 123"),
        ({"split": {"group_pattern": ["a"]}}, "split.group_pattern: a regex in text, not ['a']"),
        ({"data": {"url": "https:///data.example.org/cells.zip"}}, "data.url: no host in the URL (after https://)"),
        ({"data": {"sha256": "abc"}}, "data.sha256"),
        ({"data": {"max_extract_bytes": -1}}, "data.max_extract_bytes"),
        ({"validate": {"max_pixels": 0}}, "validate.max_pixels"),
        ({"train": {"epochs": 0}}, "train.epochs"),
        ({"train": {"epochs": 100_000_000_000}}, "train.epochs: Input should be less than or equal to 1000"),
        ({"train": {"model": "resnet"}}, "train.model"),
        ({"train": {"cnn": {"filters": []}}}, "train.cnn.filters"),
        ({"augment": {"flip": "sideways"}}, "augment.flip"),
        ({"augment": {"fill_mode": "wrap"}}, "augment.fill_mode"),
        ({"augment": {"interpolation": "bicubic"}}, "augment.interpolation"),
        ({"augment": {"rotation": 1.5}}, "augment.rotation"),
        ({"train": {"recipe": "notebook"}}, "train.recipe"),
        ({"train": {"recipe": "seed", "model": "vgg16"}}, "train: recipe: seed is the seed notebook's CNN"),
        ({"train": {"schedule": "step"}}, "train.schedule"),
        ({"train": {"weight_decay": -0.1}}, "train.weight_decay"),
        ({"train": {"weight_decay": 1}}, "train.weight_decay"),
        ({"train": {"min_steps": -1}}, "train.min_steps"),
        ({"train": {"restore_best": "sometimes"}}, "train.restore_best"),
        ({"prepare": {"image_size": 16}}, "train.cnn: 3 conv blocks"),
        ({"train": {"model": "vgg16"}, "prepare": {"image_size": 24}}, "train.model: vgg16 needs prepare.image_size"),
        ({"publish": {"s3_uri": "bucket/prefix"}}, "publish.s3_uri"),
        ({"publish": {"s3_uri": "s3://Bad_Bucket!/runs"}}, "publish.s3_uri: invalid bucket name 'Bad_Bucket!'"),
        ({"data": {"url": "s3://Bad_Bucket!/cells.zip"}}, "data.url: invalid bucket name 'Bad_Bucket!'"),
        ({"data": {"url": "s3://u:Pw5ecret@data/cells.zip"}}, "data.url: an s3:// URL holds no credentials"),
        ({"publish": {"s3_uri": "s3://u:Pw5ecret@models/runs"}}, "publish.s3_uri: an s3:// URL holds no credentials"),
        ({"publish": {"s3_uri": "s3://u:Pw5/ecret@models/runs"}}, "publish.s3_uri: an s3:// URL holds no credentials"),
        ({"data": {"url": "s3://u:Pw5/ecret@data/cells.zip"}}, "data.url: an s3:// URL holds no credentials"),
        ({"data": {"url": "s3://bucket/"}}, "data.url: an s3:// URL names an object: s3://bucket/key"),
        ({"data": {"url": "http://u:pw@127.0.0.1:99999/x.zip"}}, "data.url: the URL's port is not a number from 1"),
        ({"data": {"url": "https://u:pw@host/my cells.zip?Pw5ecret"}}, "data.url: a space in the URL's path or query: "
                                                                        "write it as %20"),
        ({"s3": {"endpoint_url": "127.0.0.1:5055"}}, "s3.endpoint_url: must be http(s)://HOST[:PORT]"),
        ({"s3": {"endpoint_url": "http://u:Pw5ecret@127.0.0.1:5055"}}, "s3.endpoint_url: holds credentials"),
        ({"prepare": {"channels": True}}, "prepare.channels: a number, not true or false"),
        ({"train": {"epochs": True}}, "train.epochs: a number, not true or false"),
        ({"train": {"learning_rate": True}}, "train.learning_rate: a number, not true or false"),
        ({"train": {"cnn": {"filters": [True, 2]}}}, "train.cnn.filters: a number, not true or false"),
        ({"orchestration": {"task_runner": "spark"}}, "orchestration.task_runner"),
        ({"orchestration": {"dask_address": "not a url"}}, "orchestration.dask_address: must be a Dask scheduler's"),
        ({"orchestration": {"dask_address": "tcp://host:99999"}}, "orchestration.dask_address: must be a Dask scheduler's"),
        ({"gate": {"bootstrap": 10**8}}, "gate.bootstrap: Input should be less than or equal to 10000"),
        ({"evaluate": {"bootstrap": 10**8}}, "evaluate.bootstrap: Input should be less than or equal to 10000"),
        ({"orchestration": {"dask_address": "http://x:y:z"}}, "orchestration.dask_address: must be a Dask scheduler's"),
    ],
)
def test_bad_params_fail_with_one_line_naming_the_key(tmp_path, tree, dotted):
    with pytest.raises(ParamsError) as caught:
        load_params(write(tmp_path, tree))
    message = str(caught.value)
    assert dotted in message
    assert "\n" not in message and "Pw5ecret" not in message and "u:pw@" not in message  # no password echoed
    assert message.startswith(str(tmp_path / "params.yaml"))


def test_overrides_apply_by_dotted_key_and_are_validated(tmp_path):
    path = write(tmp_path, {})
    params = load_params(path, dict([parse_override("prepare.image_size=[32, 48]"), parse_override("split.seed=7")]))
    assert params.prepare.image_size == (32, 48)
    assert params.split.seed == 7
    with pytest.raises(ParamsError, match="split.tset: unknown key"):
        load_params(path, {"split.tset": 0.2})


@pytest.mark.parametrize("written", ["0", "1", "'1'"])
def test_a_class_named_by_digits_is_the_folder_name_yaml_would_read_as_a_number(tmp_path, written):
    (tmp_path / "params.yaml").write_text(f"evaluate:\n  positive_class: {written}\n  target_recall: 0.9\n")
    assert load_params(tmp_path / "params.yaml").evaluate.positive_class == written.strip("'")
    assert load_params(tmp_path / "params.yaml", dict([parse_override(f"evaluate.positive_class={written}")])
                       ).evaluate.positive_class == written.strip("'")  # fmt: skip


def test_a_check_across_sections_blames_the_set_that_gave_its_key(tmp_path):
    with pytest.raises(ParamsError) as caught:
        load_params(write(tmp_path, {}), {"gate.metric": "sensitivity"})
    assert str(caught.value) == ("--set gate.metric: gate.metric: sensitivity needs evaluate.positive_class and "
                                 "evaluate.target_recall")  # fmt: skip


def test_a_check_across_a_sections_keys_blames_the_set_of_a_key_it_names_else_the_file(tmp_path):
    with pytest.raises(ParamsError) as caught:
        load_params(write(tmp_path, {}), {"evaluate.seed": 1, "evaluate.positive_class": "a"})
    assert str(caught.value) == ("--set evaluate.positive_class: evaluate: positive_class and target_recall go "
                                 "together: set both, or neither")  # fmt: skip
    path = write(tmp_path, {"evaluate": {"positive_class": "a"}})
    with pytest.raises(ParamsError) as caught:
        load_params(path, {"evaluate.seed": 1})
    assert str(caught.value).startswith(f"{path}: evaluate: positive_class and target_recall go together")
    # Named in the message, but not what broke it: the file did.
    path = write(tmp_path, {"train": {"recipe": "seed", "model": "vgg16"}})
    with pytest.raises(ParamsError, match=f"^{path}: train: recipe: seed is the seed notebook's CNN"):
        load_params(path, {"train.seed": 7})
    # Two checks across sections, both the overrides' doing: the one reported is blamed on its own.
    path = write(tmp_path, {"prepare": {"image_size": [24, 24]}})
    with pytest.raises(ParamsError, match="^--set gate.metric: gate.metric: sensitivity needs"):
        load_params(path, {"gate.metric": "sensitivity", "train.model": "vgg16"})
    # A check across sections, broken by an override of the section it does not name first.
    path = write(tmp_path, {"train": {"model": "vgg16"}})
    with pytest.raises(ParamsError, match="^--set prepare.image_size: train.model: vgg16 needs prepare.image_size of"):
        load_params(path, {"train.seed": 7, "prepare.image_size": 16})


def test_a_key_set_below_a_section_given_whole_is_blamed_and_the_overrides_stay_as_given(tmp_path):
    overrides = {"train.cnn": {"filters": [4]}, "train.cnn.dense_units": -1}
    with pytest.raises(ParamsError, match=r"^--set train.cnn.dense_units: train.cnn.dense_units: Input should be greater"):
        load_params(write(tmp_path, {"train": {"cnn": 5}}), overrides)
    assert overrides == {"train.cnn": {"filters": [4]}, "train.cnn.dense_units": -1}  # not written into


def test_a_section_given_whole_sets_the_keys_it_names_and_keeps_the_rest(tmp_path):
    path = write(tmp_path, {"split": {"test": 0.3, "seed": 1}})
    params = load_params(path, dict([parse_override("split={seed: 7}")]))
    assert (params.split.seed, params.split.test) == (7, 0.3)


def test_empty_override_clears_an_optional_value(tmp_path):
    key, value = parse_override("data.sha256=")
    assert load_params(write(tmp_path, {}), {key: value}).data.sha256 is None


def test_a_local_path_starting_with_a_tilde_is_in_the_users_home_as_a_shell_reads_it(tmp_path, monkeypatch):
    # Neither YAML nor `--set KEY=~/...` expand it: a `~` folder appeared in the project, a champion store unseen.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = write(tmp_path, {"publish": {"local_dir": "~/champion"}, "train": {"weights": "~/vgg16.h5"}})
    params = load_params(path, dict(parse_override(text) for text in ("data.url=~/cells.zip", "train.exclude=~/x.csv")))
    home = tmp_path / "home"
    assert (params.publish.local_dir, params.train.weights) == (f"{home}/champion", f"{home}/vgg16.h5")
    assert (params.data.url, params.train.exclude) == (f"{home}/cells.zip", f"{home}/x.csv")
    assert load_params(path, {"data.url": "https://host/~/cells.zip"}).data.url == "https://host/~/cells.zip"


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


def test_infinite_learning_rate_is_refused_at_load_with_its_dotted_key(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  learning_rate: .inf\n")  # YAML's infinity, as a user would type it
    with pytest.raises(ParamsError, match=r"train\.learning_rate: "):
        load_params(path)
    with pytest.raises(ParamsError, match=r"train\.fine_tune_lr: "):
        load_params(write(tmp_path, {}), {"train.fine_tune_lr": float("nan")})


def test_infinite_timeout_is_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  timeout: .inf\n")
    with pytest.raises(ParamsError, match=r"data\.timeout: "):
        load_params(path)
    with pytest.raises(ParamsError, match=r"data\.timeout: "):
        load_params(write(tmp_path, {}), dict([parse_override("data.timeout=.inf")]))


@pytest.mark.parametrize(("key", "value"), [("split.seed", -1), ("train.seed", 2**32)])
def test_seeds_outside_unsigned_32_bits_are_refused(tmp_path, key, value):
    with pytest.raises(ParamsError, match=rf"{key}: "):
        load_params(write(tmp_path, {}), {key: value})
    params = load_params(write(tmp_path, {}), {"split.seed": 0, "train.seed": 2**32 - 1})  # the ends are fine
    assert (params.split.seed, params.train.seed) == (0, 2**32 - 1)


def test_repo_params_are_the_defaults_the_quality_benchmark_chose(tmp_path):
    # params.yaml and the code's defaults agree: a key left out of params.yaml changes nothing.
    repo = load_params(REPO / "params.yaml")
    bare = load_params(write(tmp_path, {}))
    assert repo.train == bare.train and repo.augment == bare.augment
    assert (repo.train.recipe, repo.train.schedule, repo.augment.fill_mode) == ("default", "cosine", "reflect")


def test_seed_recipe_replaces_the_cnn_augmentation_and_loop_with_the_notebooks(tmp_path):
    from tasks.params import NO_AUGMENT, SEED_CNN, recipe_settings

    params = load_params(write(tmp_path, {"train": {"recipe": "seed", "learning_rate": 0.01, "schedule": "cosine",
                                                    "weight_decay": 0.1, "patience": 2, "epochs": 7,
                                                    "cnn": {"filters": [8], "dropout": 0.5}},
                                          "augment": {"rotation": 0.2}}))  # fmt: skip
    train, augment = recipe_settings(params.train, params.augment)
    assert train.cnn == SEED_CNN and augment == NO_AUGMENT
    assert (train.learning_rate, train.batch_size, train.schedule, train.weight_decay) == (1e-3, 64, "constant", 0.0)
    assert (train.patience, train.min_steps, train.restore_best) == (0, 0, False)
    assert (train.epochs, train.seed, train.recipe) == (7, 42, "seed")  # the rest as given
    default = load_params(write(tmp_path, {"augment": {"rotation": 0.2}}))
    assert recipe_settings(default.train, default.augment) == (default.train, default.augment)


def test_seed_recipe_checks_its_own_cnn_against_the_image_size(tmp_path):
    # train.cnn's one 3x3 block fits 8x8 images; the seed's three blocks do not.
    tree = {"prepare": {"image_size": 8}, "train": {"cnn": {"filters": [8]}}}
    load_params(write(tmp_path, tree))
    with pytest.raises(ParamsError, match="train.cnn: 3 conv blocks"):
        load_params(write(tmp_path, tree), {"train.recipe": "seed"})


def test_a_key_written_twice_is_refused_naming_it_and_its_lines(tmp_path):
    # DVC refuses the whole file, naming no key.
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochs: 2\n  epochs: 3\n")
    with pytest.raises(ParamsError) as caught:
        load_params(path)
    assert str(caught.value) == f"{path}: not valid YAML: key 'epochs' given twice in one mapping, again on line 3"
    path.write_text("train:\n  epochs: 2\ntrain:\n  epochs: 3\n")  # a section: its values would read as {}
    with pytest.raises(ParamsError) as caught:
        load_params(path)
    assert str(caught.value) == f"{path}: not valid YAML: key 'train' given twice in one mapping, again on line 3"


def test_params_are_read_as_dvc_reads_them_yaml_1_2(tmp_path):
    # dvc.lock records what DVC's reader makes of params.yaml; the run must use the same values
    # (YAML 1.1 reads 017 as 15 and `yes` as True).
    from dvc.utils.serialize import loads_yaml

    path = tmp_path / "params.yaml"
    text = "split:\n  seed: 017\ntrain:\n  learning_rate: 1e-3\nvalidate:\n  near_duplicate_distance: 0x5\n"
    path.write_text(text)
    params, dvc_reads = load_params(path), loads_yaml(text)
    assert (params.split.seed, params.train.learning_rate, params.validate.near_duplicate_distance) == (
        dvc_reads["split"]["seed"], dvc_reads["train"]["learning_rate"], dvc_reads["validate"]["near_duplicate_distance"])
    assert load_params(path, dict([parse_override("split.seed=017")])).split.seed == 17
    path.write_text("train:\n  jit_compile: yes\n")  # a string in YAML 1.2, not True
    with pytest.raises(ParamsError, match="train.jit_compile"):
        load_params(path)


def test_merge_keys_read_as_yaml_means_them_and_odd_keys_and_repeats_in_a_set_are_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("split: {<<: {test: 0.2, seed: 3}, seed: 5}\n")  # what safe_load and DVC accept
    assert (load_params(path).split.test, load_params(path).split.seed) == (0.2, 5)
    path.write_text("train: {? [a, b] : 1}\n")
    with pytest.raises(ParamsError, match=f"^{re.escape(str(path))}: train.\\('a', 'b'\\): Keys should be strings$"):
        load_params(path)
    # What the YAML reader refuses with an error of its own, not a YAML error: still one line naming the file.
    for text, said in (("train: {? [a, [b]] : 1}\n", "unhashable type: 'list'"),
                       ("%YAML 1.3\n---\ntrain: {epochs: 1}\n", "version minor part")):  # fmt: skip
        path.write_text(text)
        with pytest.raises(ParamsError, match=f"^{re.escape(str(path))}: not valid YAML: cannot be read .*{said}"):
            load_params(path)
    with pytest.raises(ParamsError, match="^--set split: not a valid YAML value: key 'seed' given twice"):
        parse_override("split={seed: 1, seed: 2}")

