"""The gate in publish: this run's model against the champion, on this run's test split and on the champion's
reference set; in S3 (moto's server on loopback) and in a local champion folder alike; one promotion at a time."""

from __future__ import annotations

import contextlib
import html
import json
import re
import tempfile
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import numpy as np
import pytest
import yaml
from sklearn.metrics import f1_score, recall_score

import tasks.publish
from tasks.champion import LATEST, open_store
from tasks.gate import GateError, _resample_weights, compare, scores
from tasks.layout import Layout
from tasks.params import GateParams, PublishParams, S3Params
from tasks.publish import publish
from tests.conftest import REPO
from tests.gate_runs import PER_CLASS, make_run
from tests.conftest import REGION

Where = tuple[PublishParams, S3Params]


@pytest.fixture(params=["s3", "local"])
def where(request, tmp_path) -> Where:
    """The champion store: a fresh bucket on moto's server, or a local folder."""
    if request.param == "local":
        return PublishParams(local_dir=str(tmp_path / "champion")), S3Params()
    endpoint = request.getfixturevalue("moto")
    bucket = f"imgclf-gate-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name=REGION).create_bucket(Bucket=bucket)
    return PublishParams(s3_uri=f"s3://{bucket}/models"), S3Params(endpoint_url=endpoint)


@pytest.fixture
def local(tmp_path) -> Where:
    return PublishParams(local_dir=str(tmp_path / "champion")), S3Params()


def published(where: Where, layout: Layout, **gate) -> dict:
    """Publishes the run and returns its metrics/publish.json."""
    params, s3 = where
    record = publish(params, GateParams(bootstrap=200, **gate), s3, layout, layout.metrics_dir / "publish.json")
    return json.loads(record.read_text())


def published_against_an_unreadable_champion(where: Where, layout: Layout) -> dict:
    """Publishes the run, which fails (so that the stage runs again once the store is mended); returns its record."""
    with pytest.raises(tasks.publish.PublishError, match=r"^publish: not promoted: .* cannot be read.*; mend the store "
                                                         r"and run again \(the stage re-runs\)"):  # fmt: skip
        published(where, layout)
    return json.loads((layout.metrics_dir / "publish.json").read_text())


def latest_bytes(where: Where, tmp_path: Path) -> bytes:
    return open_store(*where, tmp_path).read(LATEST)[0]


def test_the_first_run_is_promoted_and_its_test_split_becomes_the_reference_set(where, tmp_path):
    run = make_run(tmp_path / "first")
    record = published(where, run)
    assert record["promoted"] and record["gate"]["reason"].startswith("first run: no champion yet")
    pointer = json.loads(latest_bytes(where, tmp_path))
    assert pointer["run_id"] == record["run_id"] and pointer["reference"]["images"] == 2 * PER_CLASS
    store, run_dir = open_store(*where, tmp_path), f"runs/{record['run_id']}"
    labels = store.get(f"{run_dir}/reference/labels.csv", tmp_path / "fetched").read_text().splitlines()
    assert labels == ["path,label"] + [line.removesuffix(",test") for line in run.split_csv.read_text().splitlines()[1:]]
    first = labels[1].split(",")[0]
    fetched = store.get(f"{run_dir}/reference/images/{first}", tmp_path / "fetched")
    assert fetched.read_bytes() == (run.extracted_dir / first).read_bytes()  # the raw file, not a resized copy


ONE_CLASS = {"temperature": 1.0, "positive_class": "dark", "threshold": 1.0}  # no probability reaches it: all bright


def test_a_first_run_that_always_answers_one_class_is_not_promoted_unless_forced(where, tmp_path):
    record = published(where, make_run(tmp_path / "constant", calibration=ONE_CLASS))
    assert not record["promoted"] and "latest" in record
    assert record["gate"]["reason"] == ("not promoted: macro F1 0.3333 on this run's test split is no better than "
                                        "always answering bright (0.3333): the model learned nothing to serve")  # fmt: skip
    assert open_store(*where, tmp_path).read(LATEST) is None
    forced = published(where, make_run(tmp_path / "forced", calibration=ONE_CLASS), force=True)
    assert forced["promoted"] and forced["gate"]["forced"]
    assert json.loads(latest_bytes(where, tmp_path))["run_id"] == forced["run_id"]


def test_a_test_split_of_one_class_is_not_taken_for_a_model_that_learned_nothing(local, tmp_path):
    # A perfect model ties always answering that class there: the split, not the model, is what cannot show more.
    run = make_run(tmp_path / "one-class")
    header, *rows = run.split_csv.read_text().splitlines()
    run.split_csv.write_text("\n".join([header, *(row for row in rows if row.split(",")[1] == "bright")]) + "\n")
    record = published(local, run)
    assert not record["promoted"] and open_store(*local, tmp_path).read(LATEST) is None
    assert record["gate"]["reason"] == ("not promoted: this run's test split holds only bright: it cannot show the model "
                                        "does better than always answering one class (gate.force=true promotes)")  # fmt: skip


def test_a_challenger_always_answering_the_positive_class_is_not_promoted_for_its_full_sensitivity(local, tmp_path):
    usual = {"temperature": 1.0, "positive_class": "dark", "threshold": 0.5}
    published(local, make_run(tmp_path / "champion", calibration=usual))
    before = latest_bytes(local, tmp_path)
    always_dark = {**usual, "threshold": 0.0}
    record = published(local, make_run(tmp_path / "constant", calibration=always_dark), metric="sensitivity")
    # Its sensitivity (1.0) equals the champion's on both sets; answering one class is what stops it.
    assert not record["promoted"] and "no better than always answering dark (0.3333)" in record["gate"]["reason"]
    assert latest_bytes(local, tmp_path) == before


def test_a_run_on_shuffled_labels_is_caught_by_the_reference_set_and_latest_stays(where, tmp_path):
    published(where, make_run(tmp_path / "champion"))
    before = latest_bytes(where, tmp_path)
    record = published(where, make_run(tmp_path / "shuffled", shuffled=True, inverted=True))
    sets, reason = record["gate"]["sets"], record["gate"]["reason"]
    # On its own shuffled test split the broken run scores exactly as the champion does...
    assert sets["test"]["challenger"] == sets["test"]["champion"] == 0.5
    # ...the frozen reference set shows it for what it is.
    assert (sets["reference"]["champion"], sets["reference"]["challenger"]) == (1.0, 0.0)
    assert sets["reference"]["interval"][1] < 0
    assert not record["promoted"] and reason.startswith("not promoted") and "the champion's reference set" in reason
    assert "\n" not in reason and "this run's test split" not in reason
    assert latest_bytes(where, tmp_path) == before
    # Not promoted, still uploaded for inspection, its report saying why.
    store = open_store(*where, tmp_path)
    assert store.read(f"runs/{record['run_id']}/models/model.keras") is not None
    report = store.read(f"runs/{record['run_id']}/report.md")[0].decode()
    # It describes the run folder, not the machine that trained it.
    assert "Saved to `models/model.keras`." in report and str(tmp_path) not in report
    # The verdict once, then why (Markdown, as rendered: the reason's brackets are escaped in the file).
    from markdown_it import MarkdownIt

    page = MarkdownIt("commonmark").enable("table").render(report)
    assert f"<p><strong>Not promoted</strong></p>\n<p>{reason[len('not promoted: '):]}</p>" in page
    assert "not promoted:" not in report
    assert "| reference | 24 | 0.0000 | 1.0000 | -1.0000 |" in report


def test_gate_force_promotes_a_rejected_run_and_records_it_was_forced(where, tmp_path):
    published(where, make_run(tmp_path / "champion"))
    record = published(where, make_run(tmp_path / "shuffled", shuffled=True, inverted=True), force=True)
    assert record["promoted"] and record["gate"]["forced"]
    assert record["gate"]["reason"].startswith("forced by gate.force; the gate said: not promoted")
    pointer = json.loads(latest_bytes(where, tmp_path))
    assert pointer["run_id"] == record["run_id"] and pointer["gate"]["forced"]


def test_a_champion_at_another_image_size_is_scored_through_its_own_description(local, tmp_path):
    published(local, make_run(tmp_path / "gray16", image_size=16, channels=1))
    # Fed the challenger's 24x24 RGB arrays, the 16x16 gray champion could not predict at all.
    record = published(local, make_run(tmp_path / "rgb24", image_size=24))
    assert record["promoted"]
    assert {(s["challenger"], s["champion"]) for s in record["gate"]["sets"].values()} == {(1.0, 1.0)}


def test_each_model_labels_with_its_own_threshold(local, tmp_path):
    # A threshold no probability reaches: this champion calls every image bright.
    strict = {"temperature": 1.0, "positive_class": "dark", "threshold": 1.0}
    published(local, make_run(tmp_path / "strict", calibration=strict), force=True)  # no better than one class: forced
    record = published(local, make_run(tmp_path / "plain"))
    assert record["promoted"]
    assert record["gate"]["sets"]["reference"]["champion"] == pytest.approx(1 / 3)  # F1 2/3 for bright, 0 for dark
    assert record["gate"]["sets"]["reference"]["challenger"] == 1.0


def test_the_sensitivity_gate_compares_the_positive_class_recall_at_each_models_threshold(local, tmp_path):
    published(local, make_run(tmp_path / "strict", calibration={"temperature": 1.0, "positive_class": "dark", "threshold": 1.0}),
              force=True)  # fmt: skip
    record = published(local, make_run(tmp_path / "usual", calibration={"temperature": 1.0, "positive_class": "dark",
                                                                         "threshold": 0.5}), metric="sensitivity")  # fmt: skip
    assert record["promoted"] and record["gate"]["reason"].startswith("promoted: sensitivity (dark) at least")
    assert {name: (s["challenger"], s["champion"]) for name, s in record["gate"]["sets"].items()} == {
        "test": (1.0, 0.0), "reference": (1.0, 0.0)}  # fmt: skip


def test_a_champion_with_other_classes_is_not_replaced_and_one_line_says_why(local, tmp_path):
    published(local, make_run(tmp_path / "champion"))
    before = latest_bytes(local, tmp_path)
    record = published(local, make_run(tmp_path / "other", classes=("light", "shadow")))
    reason = record["gate"]["reason"]
    assert not record["promoted"] and "\n" not in reason
    assert reason.startswith("not promoted: classes differ: the champion") and "['bright', 'dark']" in reason and "['light', 'shadow']" in reason
    assert latest_bytes(local, tmp_path) == before


@pytest.mark.parametrize("damage", ["not a model", "another model", "latest.json without objects", "latest.json a list"])
def test_an_unreadable_champion_is_not_replaced_and_one_line_says_why(local, tmp_path, damage):
    from tests.gate_runs import fixed_model

    champion = published(local, make_run(tmp_path / "champion"))
    store = tmp_path / "champion"
    model = store / "runs" / champion["run_id"] / "models" / "model.keras"
    if damage == "not a model":
        model.write_bytes(b"not a model")
    elif damage == "another model":  # of the same shape: it would be gated against without a word
        fixed_model(16, 3, inverted=True).save(model)
    else:
        (store / "latest.json").write_text(json.dumps({"run_id": champion["run_id"]} if "without" in damage else []))
    before = latest_bytes(local, tmp_path)
    record = published_against_an_unreadable_champion(local, make_run(tmp_path / "next"))
    reason = record["gate"]["reason"]
    assert not record["promoted"] and "\n" not in reason
    said = ("not a record publish writes (an object with run_id and objects)" if "latest.json" in damage else
            f"its run {champion['run_id']}'s models/model.keras is not the model latest.json records")  # fmt: skip
    assert reason.startswith("not promoted: the champion cannot be read (") and said in reason, reason
    assert latest_bytes(local, tmp_path) == before


def test_reference_names_leading_out_of_the_store_are_refused_and_nothing_is_written_there(where, tmp_path,
                                                                                          monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # publish's scratch: where a fetch would land
    (tmp_path / "tmp").mkdir()
    champion = make_run(tmp_path / "champion_run")
    record = published(where, champion)
    store, reference = open_store(*where, tmp_path), f"runs/{record['run_id']}/reference"
    # Five levels up from images/: the local store's parent folder, or the scratch folder's parent.
    escape = "../" * 5 + "PWNED.png"
    store.put(champion.extracted_dir / "dark/cell_001.png", f"{reference}/images/{escape}")
    labels = tmp_path / "labels.csv"
    labels.write_bytes(store.get(f"{reference}/labels.csv", tmp_path / "fetched").read_bytes() + f"{escape},dark\n".encode())
    store.put(labels, f"{reference}/labels.csv")
    before = latest_bytes(where, tmp_path)
    record = published_against_an_unreadable_champion(where, make_run(tmp_path / "next"))
    assert not record["promoted"] and "not a name inside the store" in record["gate"]["reason"]
    assert not (tmp_path / "tmp" / "PWNED.png").exists()
    assert latest_bytes(where, tmp_path) == before


@pytest.mark.parametrize("damage", ["truncated_image", "no_rows", "a_row_without_its_label"])
def test_a_damaged_reference_set_is_a_champion_that_cannot_be_read(local, tmp_path, damage):
    champion = published(local, make_run(tmp_path / "champion"))
    reference = tmp_path / "champion" / "runs" / champion["run_id"] / "reference"
    if damage == "truncated_image":
        image = reference / "images" / "dark" / "cell_001.png"
        image.write_bytes(image.read_bytes()[:60])
    elif damage == "no_rows":
        (reference / "labels.csv").write_text("path,label\n")
    else:  # read as the label None: "classes this run lacks: [None]", a verdict on a store that is damaged
        (reference / "labels.csv").write_text("path,label\ndark/cell_001.png,dark\nbright/cell_000.png\n")
    before = latest_bytes(local, tmp_path)
    record = published_against_an_unreadable_champion(local, make_run(tmp_path / "next"))
    reason = record["gate"]["reason"]
    assert not record["promoted"] and "\n" not in reason
    assert reason.startswith("not promoted: the champion") and "cannot be read" in reason
    assert {"truncated_image": "cell_001.png", "no_rows": "labels.csv: no rows of path,label",
            "a_row_without_its_label": "labels.csv: row 2 of 2 lacks its path or its label"}[damage] in reason
    assert latest_bytes(local, tmp_path) == before
    assert open_store(*local, tmp_path).read(f"runs/{record['run_id']}/models/model.keras") is not None


@pytest.mark.parametrize("damage", ["a folder for latest.json", "a file for the store's folder",
                                    "a file for its runs folder"])
def test_a_store_that_cannot_be_read_or_written_stops_publish_in_one_line(local, tmp_path, damage):
    from tasks.champion import StoreError

    store = tmp_path / "champion"
    if damage == "a folder for latest.json":
        (store / "latest.json").mkdir(parents=True)
        said = rf"{re.escape(str(store / 'latest.json'))}: cannot be read \(Is a directory\)"
    elif damage == "a file for the store's folder":
        store.write_text("")
        said = rf"{re.escape(str(store / 'latest.json'))}: cannot be read \(Not a directory\)"
    else:
        (store / "runs").parent.mkdir()
        (store / "runs").write_text("")
        said = rf"{re.escape(str(store / 'runs'))}/[^ ]+: cannot be written \([^)]+\)"
    with pytest.raises(StoreError, match=rf"^{said}$"):
        published(local, make_run(tmp_path / "run"))


def test_reference_images_this_run_trained_on_are_left_out_of_the_comparison(local, tmp_path):
    published(local, make_run(tmp_path / "champion"))
    record = published(local, make_run(tmp_path / "partly", train_copies=16))
    assert record["promoted"] and record["gate"]["sets"]["reference"]["n"] == 8
    assert record["gate"]["reason"].endswith("; 16 of the reference set's 24 images are in this run's train or val "
                                             "split, left out")  # fmt: skip
    record = published(local, make_run(tmp_path / "wholly", train_copies=24))
    assert not record["promoted"] and "every image of the champion's" in record["gate"]["reason"]


def test_a_reference_set_without_positives_says_the_sensitivity_is_undefined(local, tmp_path):
    usual = {"temperature": 1.0, "positive_class": "dark", "threshold": 0.5}
    champion = published(local, make_run(tmp_path / "champion", calibration=usual))
    labels = tmp_path / "champion" / "runs" / champion["run_id"] / "reference" / "labels.csv"
    labels.write_text("".join(line for line in labels.read_text().splitlines(True) if not line.startswith("dark/")))
    record = published(local, make_run(tmp_path / "next", calibration=usual), metric="sensitivity")
    assert not record["promoted"] and record["gate"]["reason"].startswith(f"not promoted: the champion "
                                                                          f"({champion['run_id']}) cannot be compared")
    assert "sensitivity (dark) undefined: none of its n=12 images is of the positive class" in record["gate"]["reason"]


def test_the_published_report_keeps_class_names_as_text(local, tmp_path):
    from markdown_it import MarkdownIt  # a CommonMark renderer with tables, as Prefect's UI and GitHub are

    for pair in (("<img src=x onerror=alert(1)>", "a|b"), ("[x](javascript:alert(1))", "![](http:evil.example)"),
                 ("**bold** _em_", "&lt;b&gt; ~~gone~~")):
        run = make_run(tmp_path / str(len(pair[0])), classes=pair)
        evaluation = json.loads((run.metrics_dir / "eval.json").read_text())
        (run.metrics_dir / "eval.json").write_text(json.dumps(evaluation | {"untested_classes": list(pair)}))
        record = published(local, run)
        report = open_store(*local, tmp_path).read(f"runs/{record['run_id']}/report.md")[0].decode()
        page = MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(report)
        for name in pair:
            assert f"<td>{html.escape(name, quote=False)}</td>" in page, name  # each name a cell of plain text
        assert "<img" not in page and "<a " not in page
        assert not any(tag in page for tag in ("<strong>bold", "<em>em", "<s>gone", "<del>gone"))


def test_a_publish_record_of_an_earlier_model_is_not_this_models(local, tmp_path):
    from tasks.report import published_report, this_models_publish
    from tests.gate_runs import fixed_model

    run = make_run(tmp_path / "run")
    record = published(local, run)
    assert this_models_publish(run)["run_id"] == record["run_id"] and published_report(this_models_publish(run))
    fixed_model(16, 3, inverted=True).save(run.model_dir / "model.keras")  # `imgclf run evaluate` retrained it
    assert this_models_publish(run) == {} and published_report(this_models_publish(run)) is None


@pytest.mark.parametrize("part", ["calibration.json", "export.json", "no calibration"])
def test_publish_refuses_parts_made_for_another_model_or_missing(local, tmp_path, part):
    # `imgclf stage publish` after `imgclf run train`: evaluate's and export's files are the last model's.
    from tasks.files import sha256_file

    run = make_run(tmp_path / "run")
    other = {"model_sha256": "0" * 64, "version": 1}
    where = {"export.json": run.metrics_dir, "calibration.json": run.model_dir}
    if part == "no calibration":
        (run.model_dir / "calibration.json").unlink()
        expected = r"missing run files \(run train and evaluate first\): .*calibration.json"
    else:
        path = where[part] / part
        found = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps(found | other))
        expected = rf"publish: .*{part} made for another model than .*model.keras \(trained since\)"
    with pytest.raises(tasks.publish.PublishError, match=expected):
        published(local, run)
    assert not (tmp_path / "champion").exists()
    if part != "no calibration":  # stamped for this model, it goes
        path.write_text(json.dumps(found | other | {"model_sha256": sha256_file(run.model_dir / "model.keras")}))
        assert published(local, run)["promoted"]


def test_the_gate_prepares_images_by_the_projects_validate_max_pixels(local, tmp_path):
    from tasks.params import Params, ValidateParams
    from tasks.stages import run_stage

    run, (publish_params, _) = make_run(tmp_path / "run"), local
    params = Params(publish=publish_params, gate=GateParams(bootstrap=200), validate=ValidateParams(max_pixels=300))
    with pytest.raises(GateError, match="too_large"):  # the cells are 18-40 pixels a side
        run_stage("publish", params, run)  # as both entry points run it: validate.max_pixels handed to the gate


def test_a_difference_of_exactly_the_tolerance_holds_whatever_floats_make_of_it():
    truth = np.zeros(20, dtype=int)
    missed_one = truth.copy()
    missed_one[0] = 1
    comparison = compare(truth, missed_one, truth, 2, GateParams(metric="sensitivity", tolerance=0.05), positive=0)
    assert comparison.difference != -0.05 and comparison.holds(0.05)  # 19/20 - 20/20 in floats
    assert not comparison.holds(0.04)


def test_two_publishes_racing_against_one_champion_move_latest_once(where, tmp_path, monkeypatch):
    published(where, make_run(tmp_path / "champion"))
    runs = [make_run(tmp_path / f"challenger{i}") for i in range(2)]
    both_gated = threading.Barrier(2, timeout=300)
    # moto checks an If-Match and then writes, in two steps; S3 does both at once. Its writes are
    # made to arrive one after the other, as S3 orders them; the local folder's lock is left to do that.
    one_at_a_time = threading.Lock() if where[0].s3_uri else contextlib.nullcontext()
    opened = tasks.publish.open_store

    def racing_store(*args):
        store = opened(*args)
        replace_if = store.replace_if

        def once_both_have_gated(name, body, expected):
            both_gated.wait()  # each has compared against the same champion; neither has moved latest.json
            with one_at_a_time:
                return replace_if(name, body, expected)

        store.replace_if = once_both_have_gated
        return store

    monkeypatch.setattr(tasks.publish, "open_store", racing_store)
    with ThreadPoolExecutor(2) as pool:
        records = list(pool.map(lambda run: published(where, run), runs))
    winners = [record for record in records if record["promoted"]]
    losers = [record for record in records if not record["promoted"]]
    assert len(winners) == 1 and len(losers) == 1
    assert losers[0]["gate"]["reason"] == (f"not promoted: lost the race: latest.json moved to {winners[0]['run_id']} while this run "
                                           f"was gated against {losers[0]['gate']['champion']}; left on {winners[0]['run_id']}")  # fmt: skip
    assert json.loads(latest_bytes(where, tmp_path))["run_id"] == winners[0]["run_id"]


def test_an_interrupt_during_the_gate_or_the_uploads_stops_publish_before_the_promotion(local, tmp_path, monkeypatch):
    from tasks.errors import Interrupted, stop_requested

    def interrupted(run: Layout, when: str) -> None:
        try:
            with pytest.raises(Interrupted, match=rf"^publish: interrupted {when}: .*latest.json is unchanged$"):
                published(local, run)
        finally:
            stop_requested.clear()

    put_reference = tasks.publish._put_reference

    def interrupted_meanwhile(*args):
        stop_requested.set()  # Ctrl-C reaches the flow while the stage uploads
        return put_reference(*args)

    monkeypatch.setattr(tasks.publish, "_put_reference", interrupted_meanwhile)
    interrupted(make_run(tmp_path / "first"), r"before the promotion \(.*\)")
    assert open_store(*local, tmp_path).read(LATEST) is None
    assert not (tmp_path / "first" / "metrics" / "publish.json").exists()  # not done: the stage runs again
    runs = list((tmp_path / "champion" / "runs").iterdir())
    monkeypatch.undo()
    stop_requested.set()  # during the gate: nothing is uploaded
    interrupted(make_run(tmp_path / "gated"), "before uploading this run")
    assert [path.name for path in (tmp_path / "champion" / "runs").iterdir()] == [path.name for path in runs]
    assert published(local, make_run(tmp_path / "again"))["promoted"]


def test_bootstrap_scores_count_as_sklearn_does():
    rng = np.random.default_rng(0)
    truth, predicted = rng.integers(0, 3, 300), rng.integers(0, 3, 300)
    predicted[truth == 2] = 2 * (rng.random((truth == 2).sum()) < 0.8)
    every_image_once = np.ones((1, 300))
    assert scores(truth, predicted, every_image_once, 3, "macro_f1", None)[0] == pytest.approx(
        f1_score(truth, predicted, average="macro", zero_division=0))  # fmt: skip
    assert scores(truth, predicted, every_image_once, 3, "sensitivity", 2)[0] == pytest.approx(recall_score(truth == 2, predicted == 2))
    # A resample's weights count each image as often as it was drawn: sklearn on the drawn rows agrees.
    for weights in _resample_weights(300, 4, seed=1):
        drawn = np.repeat(np.arange(300), weights)
        assert scores(truth, predicted, weights[None], 3, "macro_f1", None)[0] == pytest.approx(
            f1_score(truth[drawn], predicted[drawn], average="macro", zero_division=0))  # fmt: skip


def test_macro_f1_leaves_out_a_class_neither_in_the_test_set_nor_answered():
    # Class 3 has no test image (too few to split) and the model never answers it: no F1 to count, not 0.
    truth, predicted = np.array([0, 0, 1, 1, 2, 2]), np.array([0, 0, 1, 1, 2, 2])
    assert scores(truth, predicted, np.ones((1, 6)), 4, "macro_f1", None)[0] == pytest.approx(1.0)
    # Answering it is a wrong answer: then it counts, with F1 0.
    predicted[0] = 3
    assert scores(truth, predicted, np.ones((1, 6)), 4, "macro_f1", None)[0] == pytest.approx(
        (2 / 3 + 1 + 1 + 0) / 4)  # fmt: skip


def test_every_deployment_runs_one_at_a_time_and_queues_the_next():
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy

    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    assert deployments
    for deployment in deployments:
        limit = deployment["concurrency_limit"]
        assert limit["limit"] == 1, deployment["name"]
        assert ConcurrencyLimitStrategy(limit["collision_strategy"]) is ConcurrencyLimitStrategy.ENQUEUE


@pytest.mark.parametrize(("local_dir", "said"), [
    ("", "is the project's own folder"), ("./", "is the project's own folder"), ("models/..", "is the project's own folder"),
    ("{root}", "is the project's own folder"), ("models/serving", "lies in models/serving, an output of dvc.yaml's stage export"),
    ("data/extracted/champion", "lies in data/extracted, an output of dvc.yaml's stage extract"),
    ("reports", "lies in reports, an output of dvc.yaml's stage report"),
    # the folders the pipeline empties by itself, beside DVC's outputs
    ("data/cache-staging", "lies in data/cache-staging, validate's rows for the cache stage, which empties it"),
    ("models/.backup/champion", "lies in models/.backup, train's backup, removed when training ends"),
    (".dvc/champion", r"lies in a .dvc folder, kept by dvc for itself"),
    ("{root}/../.git/champion", r"lies in a .git folder, kept by git for itself"),  # a repository above the project
])  # fmt: skip
def test_a_champion_folder_dvc_would_delete_or_the_project_root_is_refused_before_any_stage_works(tmp_path, local_dir, said):
    import shutil

    from tasks.champion import StoreError, check_store_folder
    from tasks.params import Params
    from tasks.stages import run_stage

    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    params = Params(data={"url": str(tmp_path / "cells.zip")}, publish={"local_dir": local_dir.format(root=tmp_path)})
    (tmp_path / "cells.zip").write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip: downloading it would copy it
    with pytest.raises(StoreError, match=f"^publish.local_dir: .*{said}"):
        run_stage("download", params, Layout(tmp_path))  # the first stage: nothing is fetched
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cells.zip", "dvc.yaml"]
    check_store_folder(PublishParams(), tmp_path)  # the default, models/champion, beside the model's outputs
    check_store_folder(PublishParams(local_dir=str(tmp_path.parent / "champion")), tmp_path)  # outside the project


def test_a_split_older_than_the_manifest_is_one_line_saying_to_run_split_again(tmp_path):
    from tasks.gate import trained_on

    (tmp_path / "manifest.csv").write_text("path,label,status,reason,sha256\na/1.png,a,valid,,ab\n")
    (tmp_path / "split.csv").write_text("path,label,split\na/1.png,a,train\na/gone.png,a,val\n")
    with pytest.raises(GateError, match=r"split.csv: 1 train/val image\(s\) are not valid rows of .*manifest.csv "
                                        r"\(first: a/gone.png\): the split is older than the manifest; run the split"):
        trained_on(tmp_path / "manifest.csv", tmp_path / "split.csv")
