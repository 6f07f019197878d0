"""The HTML run report: built from a small demo-like run, then opened in headless Chromium as a person would."""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tasks.cache import cache
from tasks.extract import extract
from tasks.params import (
    DataParams,
    EvaluateParams,
    GateParams,
    Params,
    PrepareParams,
    PublishParams,
    S3Params,
    SplitParams,
    TrainParams,
)
from tasks.report import REPORT_HTML, SHOWN_PARAMS, report
from tasks.near_duplicates import near_duplicates
from tasks.split import split
from tasks.stages import Layout
from tasks.validate import validate
from tests.conftest import REPO, in_process
from tests.conftest import s3c

pytest.importorskip("tensorflow")

from tasks.audit import LABEL_ISSUE_COLUMNS, audit  # noqa: E402
from tasks.evaluate import evaluate  # noqa: E402
from tasks.publish import publish  # noqa: E402
from tasks.train import train  # noqa: E402

SECTIONS = ("archive", "validate", "split", "audit", "training", "test", "mistakes", "release", "model")
MAX_PAGE_BYTES = 5 << 20


def demo_params(archive: Path, champion: Path) -> Params:
    """The demo's params, small: 32 px, two epochs, 200 bootstrap resamples, a threshold for Parasitized."""
    return Params(
        data=DataParams(url=str(archive)),
        prepare=PrepareParams(image_size=32),
        split=SplitParams(val=0.2, test=0.2, seed=0, group_pattern=r"^(C\d+P\d+)"),
        train=TrainParams(epochs=2, batch_size=16, patience=0),
        evaluate=EvaluateParams(positive_class="Parasitized", target_recall=0.9, bootstrap=200),
        gate=GateParams(bootstrap=200),
        publish={"local_dir": str(champion)},
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, demo_zip) -> tuple[Params, Layout]:
    """A demo-like run through every stage the report reads, publish (to a local champion folder) included."""
    layout = Layout(tmp_path_factory.mktemp("run"))
    archive = layout.raw_dir / demo_zip.name
    params = demo_params(archive, layout.root / "champion")
    archive.parent.mkdir(parents=True)
    shutil.copy(demo_zip, archive)
    extract(params.data, archive, layout.extracted_dir, layout.extract_skipped_csv)
    validate(params.validate, layout.extracted_dir, layout.manifest_csv, in_process)
    cache(params.prepare, layout.manifest_csv, layout.extracted_dir, layout.cache_dir, in_process)
    near_duplicates(params.validate, layout.cache_dir, layout.near_duplicates_csv, layout.metrics_dir / "near_duplicates.json")
    split(params.split, layout.manifest_csv, layout.split_csv, layout.near_duplicates_csv)
    audit(params.audit, params.train, params.augment, layout.cache_dir, layout.split_csv, layout.oof_csv,
          layout.label_issues_csv, layout.metrics_dir / "audit.json")  # off: audit.folds is 0
    train(params.train, params.augment, layout.cache_dir, layout.split_csv, layout.model_dir, layout.metrics_dir)
    evaluate(layout.model_dir / "model.keras", layout.cache_dir, layout.split_csv, layout.metrics_dir / "train.json",
             layout.metrics_dir, layout.plots_dir, params.evaluate)  # fmt: skip
    publish(params.publish, params.gate, params.s3, layout, layout.metrics_dir / "publish.json")
    report(params, layout, archive, layout.root / REPORT_HTML)
    return params, layout


def test_report_tells_the_run_s_story_in_every_section_and_is_published_beside_the_run(demo_run):
    _, layout = demo_run
    page = (layout.root / REPORT_HTML).read_text()
    for section in SECTIONS:
        assert f'<section id="{section}">' in page
    assert "Not run" not in page
    assert len(page.encode()) < MAX_PAGE_BYTES
    for reason in ("empty", "truncated", "not_an_image", "duplicate"):  # the demo's junk, each with its strip
        assert f"<h3>{reason} " in page
    assert "Promoted" in page and "groups on two sides: 0" in page
    assert "0 near-duplicate clusters" in page and "The audit is off" in page
    assert 0 < page.count('<figure class="explained">') <= 16  # mistakes, then the closest calls, each with its map
    published = json.loads((layout.metrics_dir / "publish.json").read_text())
    copy = Path(published["uri"]) / "report" / "index.html"
    assert copy.read_text() == page
    assert not re.search(r"""(?:src|href)=["'](?:https?:)?//""", page), "the page must not fetch anything"


def test_a_run_published_to_s3_gets_its_report_beside_it(demo_run, moto, bucket, tmp_path):  # noqa: F811
    params, layout = demo_run
    run = Layout(tmp_path / "run")
    shutil.copytree(layout.root, run.root, ignore=shutil.ignore_patterns("champion", "reports"))
    params = params.model_copy(update={"publish": PublishParams(s3_uri=f"s3://{bucket}/models"),
                                       "s3": S3Params(endpoint_url=moto)})  # fmt: skip
    publish(params.publish, params.gate, params.s3, run, run.metrics_dir / "publish.json")
    page = report(params, run, run.raw_dir / "cell_images_demo.zip", run.root / REPORT_HTML)
    run_id = json.loads((run.metrics_dir / "publish.json").read_text())["run_id"]
    uploaded = s3c(moto).get_object(Bucket=bucket, Key=f"models/runs/{run_id}/report/index.html")
    assert uploaded["Body"].read() == page.read_bytes()
    assert uploaded["ContentType"] == "text/html"  # a browser shows it, rather than downloading it


def test_sections_whose_stage_did_not_run_say_not_run(tmp_path, demo_zip):
    layout = Layout(tmp_path)
    out = report(Params(), layout, layout.raw_dir / demo_zip.name, tmp_path / REPORT_HTML)
    page = out.read_text()
    for section in SECTIONS:
        assert f'<section id="{section}">' in page
    assert page.count("Not run:") == len(SECTIONS)
    assert "<h3>Params</h3>" in page and "<h3>Versions</h3>" in page  # what the run was asked to do, and with what


def test_the_archive_section_shows_the_download_s_record_of_this_archive_only(tmp_path, demo_zip):
    layout = Layout(tmp_path)
    archive = layout.raw_dir / demo_zip.name
    archive.parent.mkdir(parents=True)
    shutil.copy(demo_zip, archive)
    record = {"url": "https://example.org/sets/cells.zip", "archive": archive.name, "sha256": "ab" * 32,
              "etag": '"e-1"', "last_modified": "Tue, 01 Sep 2026 10:00:00 GMT"}  # fmt: skip
    layout.source_json.write_text(json.dumps(record))
    page = report(Params(), layout, archive, tmp_path / REPORT_HTML).read_text()
    assert "https://example.org/sets/cells.zip" in page and "ab" * 32 in page and "Tue, 01 Sep 2026" in page
    layout.source_json.write_text(json.dumps(record | {"archive": "other.zip"}))  # an earlier URL's archive
    page = report(Params(), layout, archive, tmp_path / REPORT_HTML).read_text()
    assert "example.org" not in page and "Tue, 01 Sep 2026" not in page and "ab" * 32 not in page


def test_a_record_cut_short_is_named_in_one_line(tmp_path, demo_zip):
    from tasks.errors import StageError

    layout = Layout(tmp_path)
    layout.source_json.parent.mkdir(parents=True)
    layout.source_json.write_text('{"url": "https://example.org/cells.zip", "arch')  # persist: true, it outlives runs
    with pytest.raises(StageError, match=r"^\S*data/source.json: not readable JSON \(.*line 1.*\); re-run the stage"):
        report(Params(), layout, layout.raw_dir / demo_zip.name, tmp_path / REPORT_HTML)


def test_the_page_shows_the_params_dvc_yaml_gives_the_stage():
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["report"]
    assert tuple(stage["params"]) == SHOWN_PARAMS


class Browser:
    """Headless Chromium driven over its DevTools protocol (one page, one websocket): open a URL and
    collect its console errors, evaluate JavaScript, take a screenshot."""

    def __init__(self, executable: str, profile: Path):
        self.executable, self.profile = executable, profile
        self.events: list[dict] = []
        self._next_id = 0

    def __enter__(self) -> Browser:
        from websockets.sync.client import connect

        self.profile.mkdir(parents=True, exist_ok=True)
        command = [self.executable, "--headless", "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
                   "--no-first-run", "--no-default-browser-check", "--disable-gpu", "--window-size=1280,1600",
                   *(["--no-sandbox"] if os.geteuid() == 0 else []), "about:blank"]  # fmt: skip
        port_file, deadline = self.profile / "DevToolsActivePort", time.monotonic() + 60
        port_file.unlink(missing_ok=True)  # an earlier browser's, on this profile
        self.log = open(self.profile / "chromium.log", "wb")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        self.socket = None
        try:
            while not (port_file.exists() and port_file.read_text().strip()):
                assert self.process.poll() is None, (self.profile / "chromium.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "chromium did not open its DevTools port in 60 s"
                time.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as reply:
                page = next(target for target in json.load(reply) if target["type"] == "page")
            self.socket = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10)
            for domain in ("Page", "Runtime", "Log"):
                self.call(f"{domain}.enable")
        except BaseException:
            self.__exit__()  # no browser left behind
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.socket is not None:
            self.socket.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()

    def call(self, method: str, **params) -> dict:
        """Returns the result of one DevTools command; the events that arrive meanwhile are kept."""
        self._next_id += 1
        self.socket.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == self._next_id:
                assert "error" not in message, f"{method}: {message['error']}"
                return message["result"]
            self.events.append(message)

    def open(self, url: str) -> list[str]:
        """Loads `url` and returns the errors the page reported while loading: exceptions, console
        errors, and the browser's own error log (a resource that failed to load)."""
        self.events.clear()
        navigated = self.call("Page.navigate", url=url)
        assert "errorText" not in navigated, navigated["errorText"]
        while not any(event.get("method") == "Page.loadEventFired" for event in self.events):
            self.events.append(json.loads(self.socket.recv(timeout=60)))
        self.call("Runtime.evaluate", expression="1")  # events queued behind the load event arrive first
        errors = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                errors.append(details.get("exception", {}).get("description") or details.get("text", "exception"))
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                errors.append(" ".join(str(arg.get("value", arg.get("description", ""))) for arg in params["args"]))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                errors.append(params["entry"]["text"])
        return errors

    def evaluate(self, expression: str):
        """Returns the value of a JavaScript expression in the page."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"]["value"]

    def screenshot(self, path: Path) -> Path:
        """Saves the whole page as a PNG at `path` and returns it."""
        size = self.call("Page.getLayoutMetrics")["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True, clip=clip)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(chromium() is None, reason="no chromium on PATH (Debian: apt-get install chromium; .ci/run does)")
def test_report_renders_in_headless_chromium_with_every_image_loaded(demo_run, tmp_path):
    _, layout = demo_run
    with Browser(chromium(), tmp_path / "profile") as browser:
        errors = browser.open((layout.root / REPORT_HTML).resolve().as_uri())
        found = browser.evaluate("""({
            images: Array.from(document.images).map(i => ({alt: i.alt, loaded: i.complete && i.naturalWidth > 0})),
            sections: Array.from(document.querySelectorAll('section[id]')).map(s => s.id),
            visible: Array.from(document.querySelectorAll('section h2')).every(h => h.getBoundingClientRect().height > 0),
        })""")
        screenshot = browser.screenshot(tmp_path / "report.png")
    assert errors == []
    assert found["sections"] == list(SECTIONS) and found["visible"]
    assert len(found["images"]) == (layout.root / REPORT_HTML).read_text().count("<img ") >= 5
    assert [image["alt"] for image in found["images"] if not image["loaded"]] == []
    assert screenshot.stat().st_size > 10_000


def test_clusters_spanning_classes_and_label_issues_show_with_their_images(demo_run, tmp_path):
    import csv

    params, layout = demo_run
    run = Layout(tmp_path / "run")
    shutil.copytree(layout.root, run.root)
    (run.metrics_dir / "publish.json").unlink()  # a report of a published run would go beside that run
    with open(run.split_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    one_of_each = [next(row for row in rows if row["label"] == label) for label in ("Parasitized", "Uninfected")]
    # The same picture under two labels, as the near_duplicates stage would list it, and the audit's doubt about both.
    with open(run.near_duplicates_csv, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "cluster", "cluster_size"])
        writer.writerows([row["path"], row["label"], 7, 2] for row in one_of_each)
    (run.metrics_dir / "near_duplicates.json").write_text(json.dumps({"clusters": 1, "clusters_spanning_classes": 1}))
    with open(run.label_issues_csv, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(LABEL_ISSUE_COLUMNS)
        writer.writerows([rank, row["path"], row["label"], "Uninfected" if row["label"] == "Parasitized" else "Parasitized",
                          0.01 * rank] for rank, row in enumerate(one_of_each, 1))  # fmt: skip
    (run.metrics_dir / "audit.json").write_text(json.dumps({"folds": 3}))
    archive = run.raw_dir / next(layout.raw_dir.iterdir()).name
    page = report(params, run, archive, run.root / REPORT_HTML).read_text()
    audit_section = page.split('<section id="audit">')[1].split("</section>")[0]
    assert "1 of them spanning classes" in audit_section and "2 images whose label" in audit_section
    for row in one_of_each:  # in the cluster's strip and in the label-issue gallery, each with its thumbnail
        assert audit_section.count(f'<span class="path">{html.escape(row["path"])}</span>') == 2
    assert audit_section.count("<img") == 4
    assert "looks Uninfected" in audit_section and "looks Parasitized" in audit_section
    # Fold models that learned nothing: the issues they raised were left out, the other folds' stand.
    (run.metrics_dir / "audit.json").write_text(json.dumps({"folds": 3, "folds_answering_one_class": [1, 3],
                                                            "label_issues_left_out": 7}))  # fmt: skip
    page = report(params, run, archive, run.root / REPORT_HTML).read_text()
    audit_section = page.split('<section id="audit">')[1].split("</section>")[0]
    assert "fold(s) 1, 3 answered one class" in audit_section and "the 7 label issues among those" in audit_section
    assert "2 images whose label" in audit_section and "review them" in audit_section
    # An audit that could not run says why, not that it is off.
    (run.metrics_dir / "audit.json").write_text(json.dumps({"enabled": False, "folds": 0, "note": "fold 1 of 2 <x>"}))
    page = report(params, run, archive, run.root / REPORT_HTML).read_text()
    audit_section = page.split('<section id="audit">')[1].split("</section>")[0]
    assert "The audit did not run: fold 1 of 2 &lt;x&gt;." in audit_section and "is off" not in audit_section
