"""Stage report: the run's outputs -> `reports/index.html`, one page a person opens in a browser.

Top to bottom, the run as a story: the archive; what validate found, with thumbnails of the
files it set aside; classes and the split; training; the test scores with their intervals,
plots and operating threshold; the mistakes, most confident first, each with its Grad-CAM
map; the release decision; the model, params and versions. Every image is embedded, so the
page needs no network and no other file: it can be mailed, uploaded and opened offline. A
section whose inputs are missing says "not run". When publish made a run folder, the page is
copied into it as `report/index.html`.

Also the markdown report (`report_markdown`) that Prefect's artifacts and publish's report.md show.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import platform
import re
import subprocess
from collections import Counter
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import cv2
import numpy as np

from tasks.audit import OFF as AUDIT_OFF
from tasks.files import atomic_file, model_json, read_csv, read_json, sha256_file
from tasks.images import read_image
from tasks.layout import Layout
from tasks.params import DataParams, Params
from tasks.redact import redact

log = logging.getLogger("imgclf")

SPLITS = ("train", "val", "test")


def read_rows(path: Path) -> list[dict]:
    return read_csv(path) if path.exists() else []


def score_line(evaluation: dict) -> str:
    """Returns the test scores of eval.json in one line: accuracy, count, macro F1 and ROC AUC (two classes),
    and the classes they say nothing of."""
    auc = f", ROC AUC {evaluation['roc_auc']:.4f}" if "roc_auc" in evaluation else ""
    untested = evaluation.get("untested_classes")
    unseen = f"; no test image of {', '.join(map(repr, untested))}: not tested on it" if untested else ""
    return (f"test accuracy {evaluation['accuracy']:.4f} on {evaluation['n_test']} images "
            f"(macro F1 {evaluation['macro_f1']:.4f}{auc}){unseen}")  # fmt: skip


def gate_line(layout: Layout) -> str:
    """Returns the publish stage's decision in one line (`publish: <why>`), or "" before any gate."""
    gate = read_json(layout.metrics_dir / "publish.json").get("gate")
    return f"publish: {gate['reason']}" if gate else ""


def _why(reason: str) -> str:
    """Returns the gate's reason without the verdict it starts with: shown under the verdict itself."""
    return reason.removeprefix("not promoted: ").removeprefix("promoted: ")


def gate_markdown(gate: dict) -> str:
    """Returns the gate's decision (publish.json's `gate`) as markdown: the reason, then each set's scores."""
    verdict = f"**{'Promoted' if gate['promoted'] else 'Not promoted'}**{' (forced)' if gate['forced'] else ''}"
    lines = ["## Gate", "", verdict, "", _markdown_text(_why(gate["reason"])), ""]
    if gate["sets"]:
        lines += ["| set | images | this run | champion | difference | 95% interval (paired bootstrap) |",
                  "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        lines += [f"| {name} | {s['n']} | {_score(s['challenger'])} | {_score(s['champion'])} | {_score(s['difference'], '+')} | "
                  f"[{_score(s['interval'][0], '+')}, {_score(s['interval'][1], '+')}] |"
                  for name, s in gate["sets"].items()]  # fmt: skip
        lines += ["", f"Metric: {gate['metric']}; promoted when the difference is at least minus the tolerance "
                      f"({gate['tolerance']}) on both sets."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _markdown_text(text: str) -> str:
    # Class and file names are the archive's: `<img onerror=...>`, `[x](javascript:...)` and `![](http:...)`
    # must stay text (no tag, link or image starts without `<` or `[`), `**`, `_` and `~~` must not
    # emphasise, `&lt;` must not become `<`, and `|` or a line break must not split a cell or a row.
    # Markdown takes a backslash before any of them as the character itself.
    return re.sub(r"([\\`*_~&\[\]<>|])", r"\\\1", " ".join(text.splitlines()))


def _score(value: float | None, sign: str = "") -> str:
    return "undefined" if value is None else f"{value:{sign}.4f}"  # None: sensitivity on a set without positives


def report_markdown(layout: Layout, outcome: dict[str, str] | None = None, gate: dict | None = None) -> str:
    """Returns the run report: stages (when known), data counts, rejections by reason, split sizes, metrics, model,
    and the gate's decision when given."""
    manifest, split = read_rows(layout.manifest_csv), read_rows(layout.split_csv)
    skipped = read_rows(layout.extract_skipped_csv)
    evaluation, training = read_json(layout.metrics_dir / "eval.json"), read_json(layout.metrics_dir / "train.json")
    lines = ["# imgclf run", ""]
    if outcome:
        lines += ["| stage | this run |", "| --- | --- |"] + [f"| {name} | {what} |" for name, what in outcome.items()]
    statuses = Counter(row["status"] for row in manifest)
    lines += ["", "## Data", "", f"{len(manifest)} files judged: " + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))]
    lines.append(f"{len(skipped)} archive entries skipped at extraction (OS junk, unsafe paths).")
    reasons = Counter(row["reason"] for row in manifest if row["reason"])
    if reasons:
        lines += ["", "| reason | files |", "| --- | --- |"] + [f"| {r} | {n} |" for r, n in sorted(reasons.items())]
    cells = Counter((row["label"], row["split"]) for row in split)
    labels = sorted({label for label, _ in cells})
    lines += ["", "## Split", "", "| label | train | val | test |", "| --- | --- | --- | --- |"]
    lines += [f"| {_markdown_text(label)} | {cells[label, 'train']} | {cells[label, 'val']} | {cells[label, 'test']} |"
              for label in labels]  # fmt: skip
    if evaluation:
        lines += ["", "## Model", "",
                  f"{_sentence(_markdown_text(score_line(evaluation)))}.",  # it names untested classes
                  f"Trained: {training.get('model')} on {training.get('device')}, {training.get('epochs_run')} epochs, "
                  f"{training.get('images_per_second')} images/s.",
                  # Relative: the published copy describes the run folder, not the machine that trained it.
                  f"Saved to `{(layout.model_dir / 'model.keras').relative_to(layout.root).as_posix()}`."]  # fmt: skip
    if gate:
        lines += ["", gate_markdown(gate).rstrip("\n")]
    return "\n".join(lines) + "\n"


# --- The HTML report: the stage -------------------------------------------------------------------

REPORT_HTML = Path("reports") / "index.html"  # below the project root; dvc.yaml's out is its folder
PUBLISHED_AS = "report/index.html"  # below the published run's folder
THUMBS_PER_REASON = 8
MISTAKES_SHOWN = 16
PREDICT_BATCH = 64
THUMB_SIDE = 96
# The params sections the page shows: dvc.yaml's params of this stage (orchestration, s3 and audit
# say how the run ran, not what it made).
SHOWN_PARAMS = ("data", "validate", "prepare", "split", "augment", "train", "evaluate", "gate", "publish")
PACKAGES = ("tensorflow", "keras", "numpy", "scikit-learn", "opencv-python-headless", "pillow", "dvc", "prefect",
            "imgclf")  # fmt: skip


@dataclass(frozen=True)
class Section:
    id: str
    title: str
    body: str


class Html(str):
    """Text that is already HTML: tables and pages put it in as is, and escape anything else."""


def report(params: Params, layout: Layout, archive: Path, out: Path) -> Path:
    """Returns `out`, written with the run's HTML report; a copy goes beside the published run when publish made one."""
    published = this_models_publish(layout)
    sections = [
        _archive_section(params.data, archive, layout.source_json, layout.extract_skipped_csv),
        _validate_section(layout, params.validate.max_pixels),
        _split_section(layout, params.split.group_pattern),
        _data_audit_section(layout, params.validate.max_pixels),
        _training_section(layout),
        _test_section(layout),
        _mistakes_section(layout),
        _release_section(layout, published),
        _model_section(params, layout),
    ]
    with atomic_file(out, encoding="utf-8") as handle:
        handle.write(_page(sections, read_json(layout.metrics_dir / "eval.json"), published))
    where = published_report(published)
    if where:
        from tasks.champion import open_store  # boto3 loads only when there is a run to publish beside

        open_store(params.publish, params.s3, layout.root).put(out, f"runs/{published['run_id']}/{PUBLISHED_AS}")
    log.info("report: %s (%d KB)%s", out, out.stat().st_size // 1024, f"; published to {where}" if where else "")
    return out


def this_models_publish(layout: Layout) -> dict:
    """Returns metrics/publish.json when it is about the model in models/ now, else {}: a run of some stages
    only (`imgclf run evaluate`) leaves an earlier model's record behind."""
    published = read_json(layout.metrics_dir / "publish.json")
    model = layout.model_dir / "model.keras"
    if not published or not model.is_file() or published.get("model_sha256") != sha256_file(model):
        return {}
    return published


def published_report(published: dict) -> str | None:
    """Returns where the published run's copy of the report is (an s3:// URI or a local path), by this model's
    publish record (`this_models_publish`); None when publish made no run folder for it."""
    uri = published.get("uri") if published.get("run_id") else None
    return f"{uri.rstrip('/')}/{PUBLISHED_AS}" if uri else None


# --- Sections, top to bottom ----------------------------------------------------------------------


def _archive_section(data: DataParams, archive: Path, source_json: Path, skipped_csv: Path) -> Section:
    title = "The archive"
    record = read_json(source_json)  # download's record of the source, unless of another archive
    record = record if record.get("archive") == archive.name else {}
    if not archive.is_file():
        return Section("archive", title, _not_run(f"no archive at {archive} (the download stage)"))
    digest = record.get("sha256") or sha256_file(archive)
    pinned = ("matches data.sha256 (pinned)" if data.sha256 == digest
              else "not pinned: set data.sha256 to this digest to pin it")  # fmt: skip
    rows = [["source", redact(record.get("url") or data.url)], ["file", archive.name],
            ["size", f"{_size(archive.stat().st_size)} ({archive.stat().st_size:,} bytes)"],
            ["sha256", Html(f"<code>{_e(digest)}</code> ({_e(pinned)})")]]  # fmt: skip
    rows += [[name.replace("_", " "), record[name]] for name in ("etag", "last_modified") if record.get(name)]
    skipped = Counter(row.get("reason", "") for row in read_rows(skipped_csv))
    body = _table(["", ""], rows, head=False)
    body += _p(f"Extraction skipped {sum(skipped.values())} archive entries"
               + (f" ({_counts(skipped)}): OS junk and unsafe paths are never written." if skipped else "."))  # fmt: skip
    return Section("archive", title, body)


def _validate_section(layout: Layout, max_pixels: int) -> Section:
    title = "What validate found"
    manifest = read_rows(layout.manifest_csv)
    if not manifest:
        return Section("validate", title, _not_run(f"{layout.manifest_csv} is missing (the validate stage)"))
    statuses = Counter(row["status"] for row in manifest)
    set_aside = [row for row in manifest if row["status"] != "valid"]
    reasons = Counter(row["reason"] for row in set_aside)
    body = _p(f"{len(manifest):,} files judged by decoding each one: " + _counts(statuses) + ".")
    body += _table(["status", "reason", "files"], [[row_status, reason, n] for (row_status, reason), n in
                   sorted(Counter((row["status"], row["reason"]) for row in set_aside).items())])  # fmt: skip
    groups = []
    for reason, count in sorted(reasons.items(), key=lambda item: (-item[1], item[0])):
        rows = [row for row in set_aside if row["reason"] == reason][:THUMBS_PER_REASON]
        tiles = [_tile(layout, row["path"], row["detail"], reason, max_pixels) for row in rows]
        shown = f", the first {len(rows)} shown" if count > len(rows) else ""
        groups.append(f'<div><h3>{_e(reason)} <span class="count">{count} file{"s" * (count != 1)}{shown}</span></h3>'
                      f'{_strip(tiles)}</div>')  # fmt: skip
    body += f'<div class="reasons">{"".join(groups)}</div>'
    if not set_aside:
        body += _p("Every file is a valid, unique image.")
    return Section("validate", title, body)


def _split_section(layout: Layout, group_pattern: str | None) -> Section:
    title = "Classes and the split"
    split_rows = read_rows(layout.split_csv)
    if not split_rows:
        return Section("split", title, _not_run(f"{layout.split_csv} is missing (the split stage)"))
    cells = Counter((row["label"], row["split"]) for row in split_rows)
    totals = Counter(row["label"] for row in split_rows)
    largest = max(totals.values())
    rows = [[label, total, cells[label, "train"], cells[label, "val"], cells[label, "test"],
             Html(f'<span class="bar" style="width:{120 * total // largest}px"></span>')]
            for label, total in sorted(totals.items())]  # fmt: skip
    rows.append(["(all)", len(split_rows), *(sum(cells[label, name] for label in totals) for name in SPLITS), ""])
    body = _table(["class", "images", "train", "val", "test", "balance"], rows)
    if group_pattern and "group" in split_rows[0]:
        groups = {name: {row["group"] for row in split_rows if row["split"] == name} for name in SPLITS}
        shared = set.union(*(groups[a] & groups[b] for a, b in (("train", "val"), ("train", "test"), ("val", "test"))))
        sizes = Counter(row["group"] for row in split_rows)
        where = {row["group"]: row["split"] for row in split_rows}
        body += _p(f"Grouped by <code>{_e(group_pattern)}</code> (split.group_pattern): "
                   + ", ".join(f"{len(groups[name])} groups in {name}" for name in SPLITS)
                   + f"; groups on two sides: {len(shared)}.", raw=True)  # fmt: skip
        body += _table(["largest groups", "images", "split"], [[group, n, where[group]] for group, n in sizes.most_common(10)])
    else:
        body += _p("Split image by image, stratified by class (split.group_pattern is empty).")
    return Section("split", title, body)


def _data_audit_section(layout: Layout, max_pixels: int) -> Section:
    """Near-duplicate clusters (those spanning classes first: a label conflict) and the audit's label issues."""
    title = "Near-duplicates and label issues"
    clusters = read_json(layout.metrics_dir / "near_duplicates.json")
    if not clusters:
        return Section("audit", title, _not_run(f"{layout.metrics_dir / 'near_duplicates.json'} is missing (the near_duplicates stage)"))
    body = _p(f"{clusters.get('clusters', 0)} near-duplicate clusters of two images or more, "
              f"{clusters.get('clusters_spanning_classes', 0)} of them spanning classes (the same picture under two "
              "labels); each cluster is kept in one split.")  # fmt: skip
    members: dict[str, list[dict]] = {}
    for row in read_rows(layout.near_duplicates_csv):
        if int(row["cluster_size"]) > 1:
            members.setdefault(row["cluster"], []).append(row)
    # Clusters spanning classes first, then the largest.
    shown = sorted(members.values(), key=lambda rows: (-len({row["label"] for row in rows}), -len(rows)))[:THUMBS_PER_REASON]
    for rows in shown:
        body += _strip([_tile(layout, row["path"], row["label"], "near-duplicate", max_pixels)
                        for row in rows[:THUMBS_PER_REASON]])
    issues = read_rows(layout.label_issues_csv)
    audit = read_json(layout.metrics_dir / "audit.json")
    if audit.get("folds") and audit.get("folds_answering_one_class"):
        folds = ", ".join(map(str, audit["folds_answering_one_class"]))
        body += _p(f"The models of fold(s) {folds} answered one class for every image they held out: they learned "
                   f"nothing, so the {audit.get('label_issues_left_out', 0)} label issues among those images are "
                   "left out as noise (train longer: train.epochs).")  # fmt: skip
    if audit.get("note") and audit.get("note") != AUDIT_OFF:
        body += _p(f"The audit did not run: {audit['note']}.")
    elif not audit or not audit.get("folds"):
        body += _p("The audit is off (audit.folds below 2): no out-of-fold probabilities, no label-issue ranking.")
    elif not issues:
        body += _p("The audit's out-of-fold probabilities flag no label as doubtful.")
    else:
        body += _p(f"{len(issues)} images whose label the out-of-fold models doubt, most doubtful first "
                   f"(data/label_issues.csv; review them, then list the ones you agree with in train.exclude):")  # fmt: skip
        body += _strip([_tile(layout, row["path"], f"labelled {row['label']}, looks {row['suggested']} "
                              f"(score {float(row['score']):.3f})", "label issue", max_pixels)
                        for row in issues[:MISTAKES_SHOWN]])  # fmt: skip
    return Section("audit", title, body)


def _training_section(layout: Layout) -> Section:
    title = "Training"
    training = read_json(layout.metrics_dir / "train.json")
    if not training:
        return Section("training", title, _not_run(f"{layout.metrics_dir / 'train.json'} is missing (the train stage)"))
    keys = ("recipe", "model", "device", "precision", "n_train", "n_val", "epochs_run", "resumed_from_epoch", "seconds",
            "images_per_second", "val_loss", "val_accuracy", "train_loss", "train_accuracy")  # fmt: skip
    body = _table(["", ""], [[key.replace("_", " "), _number(training[key])] for key in keys if key in training], head=False)
    return Section("training", title, body + _plot(layout.plots_dir / "training_curves.png", "training curves"))


def _test_section(layout: Layout) -> Section:
    title = "Test metrics"
    evaluation = read_json(layout.metrics_dir / "eval.json")
    if not evaluation:
        return Section("test", title, _not_run(f"{layout.metrics_dir / 'eval.json'} is missing (the evaluate stage)"))
    headline = [["accuracy", _number(evaluation.get("accuracy")), _interval(evaluation.get("accuracy_ci95"))],
                ["macro F1", _number(evaluation.get("macro_f1")), ""]]  # fmt: skip
    if "roc_auc" in evaluation:
        headline.append(["ROC AUC", _number(evaluation["roc_auc"]), ""])
    body = _p(f"On the {evaluation.get('n_test', '?')} images of the test split, which training never saw.")
    body += _table(["metric", "value", "95% interval (bootstrap)"], headline)
    per_class = evaluation.get("per_class", {})
    body += _table(["class", "precision", "recall", "F1", "support"],
                   [[name, *(_number(scores.get(key)) for key in ("precision", "recall", "f1", "support"))]
                    for name, scores in per_class.items()])  # fmt: skip
    plots = {"confusion_matrix.png": "confusion matrix", "roc.png": "ROC curve", "reliability.png": "reliability diagram"}
    body += '<div class="plots">' + "".join(_plot(layout.plots_dir / name, alt) for name, alt in plots.items()) + "</div>"
    calibration = evaluation.get("calibration")
    if calibration:
        names = {"fitted_on": "fitted on", "n_val": "val images", "temperature": "temperature",
                 "ece_test_uncalibrated": "ECE on test, uncalibrated", "ece_test_calibrated": "ECE on test, calibrated"}
        body += "<h3>Calibration</h3>" + _table(["", ""], [[name, _number(calibration[key])] for key, name in names.items()
                                                           if key in calibration], head=False)  # fmt: skip
        if calibration.get("val_lacks"):
            body += _p(f"Not calibrated: the val split has no images of {', '.join(map(repr, calibration['val_lacks']))}, "
                       "and a temperature fitted to the classes it has would sharpen every answer.")  # fmt: skip
    body += "<h3>Operating threshold</h3>"
    point = evaluation.get("operating_point")
    if point:
        body += _p(f"Positive class {point.get('positive_class')}: threshold {_number(point.get('threshold'))}, "
                   f"chosen on val for recall {_number(point.get('target_recall'))} "
                   f"(val recall {_number(point.get('val_recall'))}).")  # fmt: skip
        body += _table(["on test", "value", "95% interval (bootstrap)"],
                       [[name, _number(scored.get("value")), _interval(scored.get("ci95"))]
                        for name, scored in point.get("test", {}).items()])  # fmt: skip
    else:
        body += _p("None: evaluate.positive_class is empty, so the likelier class wins.")
    return Section("test", title, body)


def _mistakes_section(layout: Layout) -> Section:
    title = "Mistakes, explained"
    model_path = layout.model_dir / "model.keras"
    needed = [model_path, layout.cache_dir / "images.npy", layout.split_csv]
    missing = [str(path) for path in needed if not path.exists()]
    if missing:
        return Section("mistakes", title, _not_run(f"{', '.join(missing)} missing (the cache, split and train stages)"))
    from tasks.calibration import calibrated_probabilities, predicted_indices
    from tasks.dataset import load_cached_set, make_dataset
    from tasks.gradcam import enlarged, heatmaps, overlay, png_bytes, rgb_of
    from tasks.model import class_probabilities
    from tasks.predict import load_described_model, load_model_calibration

    described, model = load_described_model(model_path)
    calibration = load_model_calibration(model_path, described["classes"])
    data = load_cached_set(layout.cache_dir, layout.split_csv)
    rows = data.rows["test"]
    if not len(rows):
        return Section("mistakes", title, _not_run(f"{layout.split_csv} has no test rows"))
    scores = class_probabilities(model, make_dataset(data, "test", PREDICT_BATCH).map(lambda x, y: x))
    probabilities = calibrated_probabilities(scores, calibration)
    truth, predicted = data.labels[rows], predicted_indices(probabilities, calibration)
    confidence = probabilities[np.arange(len(rows)), predicted]
    wrong, right = np.flatnonzero(truth != predicted), np.flatnonzero(truth == predicted)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")]
    # With few mistakes, the correct answers it was least sure of: where it nearly went wrong.
    close = right[np.argsort(confidence[right], kind="stable")][: max(0, MISTAKES_SHOWN - len(wrong)) // 2]
    shown = np.concatenate([wrong[:MISTAKES_SHOWN], close])
    picked = np.asarray(data.images[rows[shown]])  # only these leave the memory-mapped cache
    images, maps = dict(zip(shown.tolist(), picked)), dict(zip(shown.tolist(), heatmaps(model, picked, predicted[shown])))

    def gallery(indices: np.ndarray) -> str:
        tiles = []
        for i in indices.tolist():
            name = data.paths[rows[i]]
            pictures = (_img(png_bytes(enlarged(rgb_of(images[i]))), name)
                        + _img(png_bytes(overlay(images[i], maps[i])), f"Grad-CAM of {name}"))  # fmt: skip
            caption = (f"<b>true</b> {_e(data.classes[truth[i]])}<br><b>predicted</b> {_e(data.classes[predicted[i]])} "
                       f"({confidence[i]:.3f})<br><span class='path'>{_e(name)}</span>")  # fmt: skip
            if not maps[i].any():
                against = "the other" if len(data.classes) == 2 else "the other classes"
                caption += f"<br>Grad-CAM: no region argues for this class (the evidence was against {against})"
            tiles.append(f'<figure class="explained"><div>{pictures}</div><figcaption>{caption}</figcaption></figure>')
        return _strip(tiles)

    body = _p("Each image is shown beside its Grad-CAM map for the predicted class: red is where the model found "
              "the evidence for it.")  # fmt: skip
    body += _p(f"{len(wrong)} of {len(rows)} test images are misclassified"
               + (f"; the {min(len(wrong), MISTAKES_SHOWN)} the model was surest of, most confident first:"
                  if len(wrong) else "."))  # fmt: skip
    body += gallery(wrong[:MISTAKES_SHOWN])
    if len(close):
        body += "<h3>Closest calls</h3>" + _p("Right, but least sure: the correct answers with the lowest probability.")
        body += gallery(close)
    return Section("mistakes", title, body)


def _release_section(layout: Layout, published: dict) -> Section:
    title = "Release decision"
    if not published:
        return Section("release", title, _not_run(f"{layout.metrics_dir / 'publish.json'} is missing, or about "
                                                  "another model (the publish stage)"))
    gate = published.get("gate") or {}
    if not published.get("published", True) or not gate:
        return Section("release", title, _p(f"Not published: {published.get('reason', 'no gate decision recorded')}."))
    verdict = "Promoted" if gate.get("promoted") else "Not promoted"
    body = (f'<p class="verdict {"good" if gate.get("promoted") else "bad"}">{verdict}'
            f'{" (forced)" if gate.get("forced") else ""}</p>') + _p(_why(str(gate.get("reason", ""))))  # fmt: skip
    sets = gate.get("sets") or {}
    if sets:
        body += _table(["set", "images", "this run", "champion", "difference", "95% interval (paired bootstrap)"],
                       [[name, s.get("n"), _number(s.get("challenger")), _number(s.get("champion")),
                         _number(s.get("difference"), signed=True), _interval(s.get("interval"), signed=True)]
                        for name, s in sets.items()])  # fmt: skip
        body += _p(f"Metric {gate.get('metric')}; promoted when the difference is at least minus the tolerance "
                   f"({gate.get('tolerance')}) on both sets.")  # fmt: skip
    facts = [["run", published.get("run_id", "")], ["champion compared against", gate.get("champion") or "none"],
             ["published to", published.get("uri", "")], ["champion pointer", published.get("latest", "")]]  # fmt: skip
    return Section("release", title, body + _table(["", ""], [row for row in facts if row[1]], head=False))


def _model_section(params: Params, layout: Layout) -> Section:
    title = "Model, params and versions"
    body = ""
    described = read_json(model_json(layout.model_dir))
    if described:
        train = described.get("train", {})
        body += _table(["", ""], [["classes", ", ".join(described.get("classes", []))],
                                  ["input", f"{'x'.join(map(str, described.get('image_size', [])))} px, "
                                            f"{described.get('channels')} channel(s), resize {described.get('resize')}"],
                                  ["model", f"{train.get('model')} (recipe {described.get('recipe')})"
                                            + (f", from {train.get('weights')} weights" if train.get("model") != "cnn" else "")]],
                                  head=False)  # fmt: skip
    else:
        body += _not_run(f"{model_json(layout.model_dir)} is missing (the train stage)")
    summary = layout.model_dir / "summary.txt"
    if summary.is_file():
        body += f"<details><summary>Layers (summary.txt)</summary><pre>{_e(summary.read_text())}</pre></details>"
    dumped = params.model_dump(mode="json")
    body += '<h3>Params</h3><div class="params">' + "".join(
        f"<div><b>{name}</b><pre>{_e(redact(chr(10).join(_settings(dumped[name]))))}</pre></div>" for name in SHOWN_PARAMS
    ) + "</div>"  # fmt: skip
    body += "<h3>Versions</h3>" + _table(["", ""], _versions(layout.root), head=False)
    return Section("model", title, body)


def _settings(section: dict, prefix: str = "") -> list[str]:
    """Returns `key: value` lines, a nested section's keys dotted (cnn.filters: [32, 64, 64])."""
    lines = []
    for key, value in section.items():
        if isinstance(value, dict):
            lines += _settings(value, f"{prefix}{key}.")
        else:
            lines.append(f"{prefix}{key}: {json.dumps(value) if isinstance(value, (list, bool)) or value is None else value}")
    return lines


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    except OSError:  # no git on this machine
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _versions(root: Path) -> list[list]:
    commit = _git(root, "rev-parse", "HEAD")
    changed = commit and _git(root, "status", "--porcelain", "--untracked-files=no")
    code = commit + (" (with uncommitted changes)" if changed else "") if commit else "no git commit (or no git)"
    lock = root / "dvc.lock"
    # As it stood when the report was written: before this stage's own entry.
    rows = [["git commit", code], ["dvc.lock sha256", sha256_file(lock) if lock.is_file() else "no dvc.lock"],
            ["python", platform.python_version()]]  # fmt: skip
    for package in PACKAGES:
        try:
            rows.append([package, metadata.version(package)])
        except metadata.PackageNotFoundError:
            rows.append([package, "not installed"])
    return rows


# --- HTML pieces ----------------------------------------------------------------------------------

STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2430;margin:0;background:#f6f7f9}
header{background:#1d2430;color:#fff;padding:18px 32px}header h1{margin:0 0 4px;font-size:22px}
header p{margin:0;color:#c9d1dc}nav{padding:8px 32px;background:#e9edf2;position:sticky;top:0}
nav a{margin-right:16px;color:#1d4ed8;text-decoration:none}main{padding:8px 32px 48px;max-width:1200px}
section{background:#fff;border:1px solid #dde2e8;border-radius:6px;padding:4px 20px 16px;margin:16px 0}
h2{font-size:19px}h3{font-size:15px;margin:18px 0 6px}.count{font-weight:normal;color:#5b6675}
table{border-collapse:collapse;margin:8px 0}td,th{border-bottom:1px solid #e3e7ec;padding:3px 12px 3px 0;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}.bar{display:inline-block;height:10px;background:#60a5fa}
.strip{display:flex;flex-wrap:wrap;gap:10px}figure{margin:0;width:136px;font-size:12px;overflow-wrap:anywhere}
.reasons{display:flex;flex-wrap:wrap;gap:0 28px}
figure.explained{width:272px}figure img{image-rendering:pixelated;width:128px;margin-right:4px;border:1px solid #ccd}
.noimg{width:128px;height:96px;display:flex;align-items:center;justify-content:center;text-align:center;
background:#eef0f3;color:#7a8494;border:1px dashed #b8c0cc;font-size:11px}.path{color:#5b6675;word-break:break-all}
.plots img{max-width:340px;margin:6px 12px 6px 0;vertical-align:top}.not-run{color:#8a5a00;background:#fff6e0;padding:6px 10px}
.params{display:flex;flex-wrap:wrap;align-items:flex-start;gap:0 14px}.params pre{min-width:180px;margin-top:4px}
.verdict{font-size:18px;font-weight:bold}.good{color:#15803d}.bad{color:#b91c1c}
pre{background:#f3f5f8;padding:8px;overflow:auto;font-size:12px}
"""


def _page(sections: list[Section], evaluation: dict, published: dict) -> str:
    headline = [_sentence(score_line(evaluation)) if evaluation else "Not evaluated yet"]
    if published.get("gate"):
        verdict = "promoted" if published["gate"].get("promoted") else "not promoted"
        headline.append(f"{verdict} (run {published.get('run_id')})")
    nav = "".join(f'<a href="#{section.id}">{_e(section.title)}</a>' for section in sections)
    body = "".join(f'<section id="{section.id}"><h2>{_e(section.title)}</h2>{section.body}</section>' for section in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>imgclf run report</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head><body>'
            f'<header><h1>imgclf run report</h1><p>{_e("; ".join(headline))}</p></header><nav>{nav}</nav>'
            f"<main>{body}</main></body></html>\n")  # fmt: skip


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _p(text: str, raw: bool = False) -> str:
    return f"<p>{text if raw else _e(text)}</p>"


def _not_run(why: str) -> str:
    return f'<p class="not-run">Not run: {_e(why)}.</p>'


def _table(columns: list[str], rows: list[list], head: bool = True) -> str:
    top = "<tr>" + "".join(f"<th>{_e(name)}</th>" for name in columns) + "</tr>" if head else ""
    return f"<table>{top}" + "".join("<tr>" + "".join(map(_cell, row)) + "</tr>" for row in rows) + "</table>"


def _cell(value: object) -> str:
    if isinstance(value, Html):
        return f"<td>{value}</td>"
    numeric = isinstance(value, (int, float)) or re.fullmatch(r"[+-]?[\d,]+(\.\d+)?", str(value))
    return f'<td class="n">{_e(value)}</td>' if numeric else f"<td>{_e(value)}</td>"


def _img(png: bytes, alt: str) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="{_e(alt)}">'


def _plot(path: Path, alt: str) -> str:
    return _img(path.read_bytes(), alt) if path.is_file() else _not_run(f"no {path.name} (the evaluate stage)")


def _thumbnail(path: Path, max_pixels: int) -> bytes | None:
    """Returns a PNG thumbnail of an image file, or None when it is no usable image (validate's own decoding)."""
    from tasks.gradcam import png_bytes

    pixels = read_image(path.read_bytes(), max_pixels, 3, draft_size=THUMB_SIDE)[1] if path.is_file() else None
    if pixels is None:
        return None
    scale = THUMB_SIDE / max(pixels.shape[:2])
    if scale < 1:
        pixels = cv2.resize(pixels, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return png_bytes(pixels)


def _strip(tiles: list[str]) -> str:
    return f'<div class="strip">{"".join(tiles)}</div>'


def _tile(layout: Layout, path: str, detail: str, reason: str, max_pixels: int) -> str:
    """Returns a figure of the extracted file at `path`: its thumbnail (or "no preview") and caption."""
    thumbnail = _thumbnail(layout.extracted_dir / path, max_pixels)
    picture = _img(thumbnail, path) if thumbnail else f'<div class="noimg">no preview<br>({_e(reason)})</div>'
    note = f"<br>{_e(detail[:120])}" if detail else ""
    return f'<figure>{picture}<figcaption><span class="path">{_e(path)}</span>{note}</figcaption></figure>'


def _number(value: object, signed: bool = False) -> str:
    if isinstance(value, float):
        return f"{value:+.4f}" if signed else f"{value:.4f}"
    return "n/a" if value is None else str(value)


def _interval(bounds: object, signed: bool = False) -> str:
    if not isinstance(bounds, (list, tuple)) or len(bounds) != 2 or None in bounds:
        return ""
    return f"[{_number(float(bounds[0]), signed)}, {_number(float(bounds[1]), signed)}]"


def _size(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _counts(counter: Counter) -> str:
    return ", ".join(f"{n} {name}" for name, n in sorted(counter.items()))
