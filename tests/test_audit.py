"""The audit: grouped folds that keep blocks whole, out-of-fold probabilities, and flipped labels ranked first."""

from __future__ import annotations

import csv
import json
import unicodedata
import warnings
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from tasks.audit import AuditError, audit, fold_of
from tasks.cache import cache
from tasks.params import AugmentParams, AuditParams, CnnParams, PrepareParams, SplitParams, TrainParams, ValidateParams
from tasks.split import split
from tasks.validate import validate
from tests.conftest import in_process

PER_CLASS = 160
FLIPPED = 0.05
PATIENTS = 48


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_folds_keep_every_block_whole_and_hold_every_label():
    rng = np.random.default_rng(0)
    blocks = [f"b{int(b)}" for b in rng.integers(0, 60, 600)]  # blocks of about 10, of mixed labels
    labels = [str(int(v)) for v in rng.integers(0, 3, 600)]
    folds = fold_of(labels, blocks, 4, seed=1)
    folds_of = defaultdict(set)
    for block, fold in zip(blocks, folds):
        folds_of[block].add(int(fold))
    assert all(len(f) == 1 for f in folds_of.values())
    assert set(folds) == {0, 1, 2, 3}
    assert all({labels[i] for i in np.flatnonzero(folds == k)} == {"0", "1", "2"} for k in range(4))
    np.testing.assert_array_equal(folds, fold_of(labels, blocks, 4, seed=1))


def test_more_folds_than_blocks_is_a_clear_error():
    with pytest.raises(AuditError, match="audit.folds=3, but train\\+val hold only 2 block"):
        fold_of(["a", "b", "a", "b"], ["x", "x", "y", "y"], 3, seed=0)


def test_more_folds_than_images_of_any_class_is_a_clear_error():
    labels = ["a"] * 4 + ["b"] * 3
    with pytest.raises(AuditError, match=r"^audit: audit.folds=5, but the largest class in train\+val, 'a', has only 4 "
                                         r"images; lower audit.folds$"):  # fmt: skip
        fold_of(labels, [str(i) for i in range(7)], 5, seed=0)
    with warnings.catch_warnings(record=True) as shown:  # scikit-learn's own of a class below 4 images: the stage says it
        assert sorted(set(fold_of(labels, [str(i) for i in range(7)], 4, seed=0))) == [0, 1, 2, 3]
    assert [str(warning.message) for warning in shown] == []


def test_a_class_with_fewer_images_than_folds_is_said_once_in_the_audits_words(tmp_path, caplog):
    split = tmp_path / "split.csv"
    rows = [(f"{label}/{i}.png", label, "train", f"{label}{i}") for label, n in (("a", 6), ("b", 1), ("c", 1))
            for i in range(n)]  # fmt: skip
    split.write_text("path,label,split,block\n" + "".join(",".join(row) + "\n" for row in rows))
    with caplog.at_level("WARNING", logger="imgclf"), warnings.catch_warnings(record=True) as shown:
        audit(AuditParams(folds=2), TrainParams(), AugmentParams(), tmp_path / "no-cache", split, tmp_path / "oof.csv",
              tmp_path / "issues.csv", tmp_path / "audit.json")  # fmt: skip (a fold without c: off, nothing trained)
    assert [str(warning.message) for warning in shown] == []
    said = [record.getMessage() for record in caplog.records if "fewer train+val" in record.getMessage()]
    assert said == ["audit: fewer train+val images than audit.folds=2 of 'b' (1), 'c' (1): some folds hold none of "
                    "them, and some folds' val splits neither"]  # fmt: skip


def test_audit_off_writes_that_it_is_off(tmp_path):
    out = audit(AuditParams(), TrainParams(), AugmentParams(), tmp_path / "no-cache", tmp_path / "no-split.csv",
                tmp_path / "oof.csv", tmp_path / "issues.csv", tmp_path / "audit.json")  # fmt: skip
    assert json.loads(out.read_text())["enabled"] is False
    assert read_rows(tmp_path / "issues.csv") == [] and read_rows(tmp_path / "oof.csv") == []


def test_a_fold_leaving_a_class_nothing_to_train_on_turns_the_audit_off_saying_why(tmp_path, caplog):
    # Class c is one group: the fold holding it trains without it. The audit is outside the path to
    # publish: the run goes on (no cache is read, no model trained), and the report says why.
    split = tmp_path / "split.csv"
    rows = [(f"{label}/{i}.png", label, "train", f"{label}{i}" if label != "c" else "c") for label in "abc" for i in range(6)]
    split.write_text("path,label,split,block\n" + "".join(",".join(row) + "\n" for row in rows))
    with caplog.at_level("WARNING", logger="imgclf"):
        out = audit(AuditParams(folds=2), TrainParams(), AugmentParams(), tmp_path / "no-cache", split,
                    tmp_path / "oof.csv", tmp_path / "issues.csv", tmp_path / "audit.json")  # fmt: skip
    said = json.loads(out.read_text())
    assert said["enabled"] is False and said["note"].startswith("fold ") and "leaves no images of 'c'" in said["note"]
    assert "audit: not run: fold" in caplog.text
    assert read_rows(tmp_path / "issues.csv") == [] and read_rows(tmp_path / "oof.csv") == []


def stripes(rng: np.random.Generator, horizontal: bool) -> np.ndarray:
    """A 16x16 gray image of stripes at a random period and phase, with noise: separable by orientation."""
    period, phase = rng.uniform(5, 10), rng.uniform(0, 2 * np.pi)
    wave = 127 + 90 * np.sin(2 * np.pi * np.arange(16) / period + phase)
    image = np.tile(wave[:, None], (1, 16)) if horizontal else np.tile(wave[None, :], (16, 1))
    return np.clip(image + rng.normal(0, 20, image.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def audited(tmp_path_factory) -> tuple[Path, set[str]]:
    """A set of horizontal and vertical stripes, 5% of them filed under the other class, split by
    patient and audited in 3 folds with a tiny CNN; returns the data folder and the flipped paths."""
    data = tmp_path_factory.mktemp("audit") / "data"
    rng = np.random.default_rng(7)
    flipped = set()
    for index in range(2 * PER_CLASS):
        truth = ("horizontal", "vertical")[index % 2]
        wrong = rng.random() < FLIPPED
        label = ("vertical", "horizontal")[index % 2] if wrong else truth
        path = f"{label}/P{index % PATIENTS}_{index:04d}.png"
        (data / "extracted" / label).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(data / "extracted" / path), stripes(rng, truth == "horizontal"))
        if wrong:
            flipped.add(path)
    validate(ValidateParams(), data / "extracted", data / "manifest.csv", in_process)
    cache(PrepareParams(image_size=16, channels=1), data / "manifest.csv", data / "extracted", data / "cache", in_process)
    split(SplitParams(group_pattern=r"^(P\d+)_"), data / "manifest.csv", data / "split.csv")
    tiny = TrainParams(epochs=10, batch_size=16, learning_rate=3e-3, patience=0, min_steps=0, precision="float32",
                       cnn=CnnParams(filters=(8, 16), dense_units=16))  # fmt: skip
    audit(AuditParams(folds=3, seed=0), tiny, AugmentParams(flip="none", rotation=0, translation=0), data / "cache",
          data / "split.csv", data / "oof.csv", data / "label_issues.csv", data / "audit.json")  # fmt: skip
    return data, flipped


def test_every_train_and_val_image_gets_an_out_of_fold_probability(audited):
    data, _ = audited
    audited_paths = {row["path"] for row in read_rows(data / "split.csv") if row["split"] != "test"}
    oof = read_rows(data / "oof.csv")
    assert {row["path"] for row in oof} == audited_paths and len(oof) == len(audited_paths)
    for row in oof:
        assert abs(float(row["p_horizontal"]) + float(row["p_vertical"]) - 1) < 1e-4
    report = json.loads((data / "audit.json").read_text())
    assert report["folds"] == 3 and report["images"] == len(audited_paths)
    for metric in ("accuracy", "macro_f1"):
        low, high = report[metric]["ci95"]
        assert len(report[metric]["per_fold"]) == 3 and low <= report[metric]["mean"] <= high
    assert report["accuracy"]["mean"] > 0.85  # 5% of the labels are wrong: no fold can score them


def test_the_audit_folds_never_split_a_patient(audited):
    data, _ = audited
    block_of = {row["path"]: row["block"] for row in read_rows(data / "split.csv")}
    folds_of = defaultdict(set)
    for row in read_rows(data / "oof.csv"):
        folds_of[block_of[row["path"]]].add(row["fold"])
    assert len(folds_of) > 3 and all(len(f) == 1 for f in folds_of.values())


def test_the_top_5_percent_of_label_issues_hold_80_percent_of_the_flipped_labels(audited):
    data, flipped = audited
    oof = read_rows(data / "oof.csv")
    flipped_audited = {row["path"] for row in oof} & flipped
    assert len(flipped_audited) >= 8
    issues = read_rows(data / "label_issues.csv")
    top = {row["path"] for row in issues[: round(0.05 * len(oof))]}
    assert len(top & flipped_audited) >= 0.8 * len(flipped_audited), (len(top & flipped_audited), len(flipped_audited))
    assert all(row["suggested"] != row["label"] for row in issues[: len(top)])


def test_train_exclude_leaves_the_listed_images_out_of_train_and_val_and_records_the_list(audited, tmp_path):
    import hashlib

    from tasks.train import TrainError, train

    data, _ = audited
    issues = data / "label_issues.csv"
    listed = {row["path"] for row in read_rows(issues)}
    rows = read_rows(data / "split.csv")
    trainable = {name: sum(1 for row in rows if row["split"] == name) for name in ("train", "val")}
    dropped = {name: sum(1 for row in rows if row["split"] == name and row["path"] in listed) for name in trainable}
    assert listed and dropped["train"]
    params = TrainParams(epochs=1, batch_size=64, patience=0, min_steps=0, precision="float32", exclude=str(issues),
                         cnn=CnnParams(filters=(4,), dense_units=4))  # fmt: skip
    train(params, AugmentParams(), data / "cache", data / "split.csv", tmp_path / "models", tmp_path / "metrics")
    described = json.loads((tmp_path / "models" / "model.json").read_text())
    assert described["exclude"] == {"file": str(issues), "sha256": hashlib.sha256(issues.read_bytes()).hexdigest(),
                                    "paths": len(listed)}  # fmt: skip
    report = json.loads((tmp_path / "metrics" / "train.json").read_text())
    assert (report["n_train"], report["n_val"]) == (trainable["train"] - dropped["train"], trainable["val"] - dropped["val"])
    # The same list written from the project root: its paths are no image of the set, an error rather than a no-op.
    rooted = tmp_path / "rooted.csv"
    rooted.write_text("path\n" + "".join(f"data/extracted/{path}\n" for path in sorted(listed)))
    with pytest.raises(TrainError, match=rf"train.exclude: .*rooted.csv: {len(listed)} of its {len(listed)} paths are not "
                                         r"images of this data set \(e.g. 'data/extracted/"):  # fmt: skip
        train(params.model_copy(update={"exclude": str(rooted)}), AugmentParams(), data / "cache", data / "split.csv", tmp_path / "m2",
              tmp_path / "m2")  # fmt: skip
    # A list naming every train image of a class: the model would answer a class it never saw.
    label = rows[0]["label"]
    whole = tmp_path / "whole.csv"
    whole.write_text("path\n" + "".join(f"{row['path']}\n" for row in rows if row["label"] == label and row["split"] == "train"))
    with pytest.raises(TrainError, match=rf"train: no train images of '{label}' after train.exclude \(.*whole.csv\); "
                                         "a model would never learn it"):  # fmt: skip
        train(params.model_copy(update={"exclude": str(whole)}), AugmentParams(), data / "cache", data / "split.csv", tmp_path / "m3",
              tmp_path / "m3")  # fmt: skip


def test_an_exclude_list_without_a_path_column_is_a_clear_error(tmp_path):
    from tasks.train import TrainError, read_exclusion

    (tmp_path / "list.csv").write_text("file,label\na/1.png,a\n")
    with pytest.raises(TrainError, match=r"train.exclude: .*list.csv has no `path` column"):
        read_exclusion(str(tmp_path / "list.csv"))
    with pytest.raises(TrainError, match=r"train.exclude: .*missing.csv: cannot read it"):
        read_exclusion(str(tmp_path / "missing.csv"))


def test_fold_models_that_answer_one_class_are_named_in_a_warning_and_the_json(tmp_path, caplog):
    from tasks.audit import _write_outputs

    rows = [{"path": f"{label}/{i}.png", "label": label} for i in range(6) for label in ("a", "b")]
    folds = np.repeat([0, 1], 6)  # each fold holds both labels
    probabilities = np.tile([0.95, 0.05], (12, 1))  # fold 1's model: always a, sure of it
    probabilities[6:] = [[0.9, 0.1] if row["label"] == "a" else [0.2, 0.8] for row in rows[6:]]
    with caplog.at_level("WARNING", logger="imgclf"):
        _write_outputs(AuditParams(folds=2), rows, folds, ["a", "b"], probabilities, tmp_path / "oof.csv",
                       tmp_path / "issues.csv", tmp_path / "audit.json")  # fmt: skip
    audit = json.loads((tmp_path / "audit.json").read_text())
    assert audit["folds_answering_one_class"] == [1]
    assert "the model of fold(s) 1 answered one class for every image it held out" in caplog.text
    # Its doubts (every b it held out) are left out; fold 2's model, which answered right, doubts nothing.
    assert audit["label_issues_left_out"] == 3 and audit["label_issues"] == 0
    assert read_rows(tmp_path / "issues.csv") == []
    assert sorted({row["fold"] for row in read_rows(tmp_path / "oof.csv")}) == ["1", "2"]  # as the warning counts


def test_an_exclude_list_whose_paths_differ_only_in_unicode_form_says_so(tmp_path):
    from tasks.train import Exclusion, TrainError, _load

    data = tmp_path / "data"
    rng = np.random.default_rng(3)
    for label in ("grün", "rot"):
        (data / "extracted" / label).mkdir(parents=True)
        for index in range(8):
            cv2.imwrite(str(data / "extracted" / label / f"{index}.png"), rng.integers(0, 255, (12, 12, 3), dtype=np.uint8))
    validate(ValidateParams(), data / "extracted", data / "manifest.csv", in_process)
    cache(PrepareParams(image_size=8), data / "manifest.csv", data / "extracted", data / "cache", in_process)
    split(SplitParams(val=0.25, test=0.25), data / "manifest.csv", data / "split.csv")
    decomposed = unicodedata.normalize("NFD", "grün/0.png")  # as a list saved on macOS may spell it
    with pytest.raises(TrainError, match=r"1 of its 1 paths are not images of this data set \(e.g. 'gru\\u0308n/0.png'\)"
                                         r".*differ from the set's paths only in Unicode form"):  # fmt: skip
        _load(data / "cache", data / "split.csv", Exclusion("list.csv", "0" * 64, frozenset({decomposed})))


def test_an_exclude_list_among_the_pipelines_outputs_is_refused_before_any_stage_works(tmp_path):
    # audit rewrites data/label_issues.csv after train read it: the model would not be the list's.
    import shutil

    from tasks.layout import Layout
    from tasks.params import Params, ParamsError
    from tasks.stages import run_stage

    shutil.copy(Path(__file__).parents[1] / "dvc.yaml", tmp_path / "dvc.yaml")
    params = Params(data={"url": str(tmp_path / "cells.zip")}, train={"exclude": "data/label_issues.csv"})
    with pytest.raises(ParamsError, match=r"^train.exclude: data/label_issues.csv lies in data/label_issues.csv, an "
                                          r"output of dvc.yaml's stage audit, which the pipeline rewrites"):
        run_stage("download", params, Layout(tmp_path))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["dvc.yaml"]


def test_a_list_edited_in_place_since_training_makes_the_flow_train_again(tmp_path):
    # DVC sees train.exclude's name only; model.json's sha256 says which content the model was trained without.
    from tasks.files import sha256_file
    from tasks.layout import Layout
    from tasks.params import Params
    from tasks.stages import exclusion_edited

    layout = Layout(tmp_path)
    (tmp_path / "review").mkdir()
    (tmp_path / "review" / "ex.csv").write_text("path\nParasitized/1.png\n")
    params = Params(train={"exclude": "review/ex.csv"})
    assert exclusion_edited(params, layout) is None  # no model yet: DVC's say alone
    layout.model_dir.mkdir()
    recorded = {"file": "review/ex.csv", "sha256": sha256_file(tmp_path / "review" / "ex.csv"), "paths": 1}
    (layout.model_dir / "model.json").write_text(json.dumps({"classes": ["a", "b"], "exclude": recorded}))
    assert exclusion_edited(params, layout) is None
    (tmp_path / "review" / "ex.csv").write_text("path\nParasitized/1.png\nUninfected/2.png\n")
    assert exclusion_edited(params, layout) == "train.exclude review/ex.csv edited since the model was trained without it"
    # Another name: the param itself changed, and DVC says so.
    assert exclusion_edited(Params(train={"exclude": "review/other.csv"}), layout) is None


def test_a_fold_too_small_to_carve_val_from_trains_without_one(tmp_path):
    # 14 images, val 2 of them: val's share asks for 7 inner folds, which 7 images a class cannot fill.
    from tasks.audit import _write_fold_split

    rows = [{"path": f"{c}/{i}.png", "label": c, "split": "val" if i == 0 else "train"} for c in "ab" for i in range(7)]
    folds = fold_of([row["label"] for row in rows], [row["path"] for row in rows], 2, 42)
    written = read_rows(_write_fold_split(tmp_path / "fold.csv", rows, folds, 0, 2 / 14, 42))
    assert {row["split"] for row in written} == {"train", "test"}
    assert [row["split"] == "test" for row in written] == list(folds == 0)
