"""The download stage against a real HTTP server on 127.0.0.1: atomic, resumable, retried, verified."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import tasks.download
from tasks.errors import Interrupted, stop_requested
from tasks.download import DownloadError, SourceGone, archive_path, download, source_change
from tasks.params import DataParams
from tests.conftest import free_port, tcp_server, zip_bytes


PAYLOAD = zip_bytes(0, 300_000)
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
OTHER = zip_bytes(1, len(PAYLOAD))  # another file of the same size
LAST_MODIFIED = "Wed, 01 Jan 2025 00:00:00 GMT"


def etag(body: bytes) -> str:
    return f'"{hashlib.sha256(body).hexdigest()[:16]}"'


class _Handler(BaseHTTPRequestHandler):
    """Serves `state.files`; `state.plans[path]` scripts one step per request (the last one repeats):
    "serve" (honours `Range: bytes=N-` with a 206, unless an If-Range names another version; a 416 to
    one that starts at the end),
    "noifrange" (honours Range, ignores If-Range), "misplaced" / "rangeless" (a 206 to a Range
    that starts 1000 bytes early / names no Content-Range), "cut"
    (full Content-Length, then closes after half the body), "norange" (always the whole body with a
    200, as simple servers do), "unsized" / "unsized-cut" (no Content-Length: the whole body or half
    of it, then closes), or an int status code. Each file has an ETag (from its bytes) and a
    Last-Modified; `state.validators[path]` may name fewer: "last-modified" or "none".
    A HEAD answers with the GET's headers (Content-Length the whole size) and no body, unless
    `state.head_plans[path]` scripts an int status code for it (405: a server refusing HEAD).
    Every request is recorded in `state.requests`: method, path, range, if_range, auth, status."""

    def log_message(self, *args) -> None:  # keep the test output quiet
        pass

    def _begin(self, plans: dict[str, list]) -> tuple[dict, str | int, bytes | None]:
        """Records the request; returns it, its scripted step and the file's bytes (None: no such file)."""
        state = self.server.state
        with state.lock:
            request = {"method": self.command, "path": self.path, "range": self.headers.get("Range"),
                       "if_range": self.headers.get("If-Range"), "auth": self.headers.get("Authorization")}  # fmt: skip
            state.requests.append(request)
            plan = plans.get(self.path, ["serve"])
            step = plan.pop(0) if len(plan) > 1 else plan[0]
        body = state.files.get(self.path)
        status = step if isinstance(step, int) else 404 if body is None else None
        if status:
            request["status"] = status
            self.send_error(status)
        return request, step, None if status else body

    def _validators(self, body: bytes) -> dict[str, str]:
        modified = self.server.state.modified.get(self.path, LAST_MODIFIED)
        both = {"ETag": etag(body), "Last-Modified": modified}
        kind = self.server.state.validators.get(self.path, "etag")
        return {"etag": both, "last-modified": {"Last-Modified": modified}, "none": {}}[kind]

    def do_HEAD(self) -> None:
        request, _, body = self._begin(self.server.state.head_plans)
        if body is None:
            return
        request["status"] = 200
        self.send_response(200)
        for name, value in self._validators(body).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()

    def do_GET(self) -> None:
        request, step, body = self._begin(self.server.state.plans)
        if body is None:
            return
        validators = self._validators(body)
        start, end = 0, len(body) - 1
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        same_version = request["if_range"] in (None, *validators.values()) or step == "noifrange"
        if match and int(match.group(1)) >= len(body) and step == "serve" and same_version:
            request["status"] = 416  # nothing past the end: as nginx answers a part that holds every byte
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if match and int(match.group(1)) < len(body) and step != "norange" and same_version:
            start, end = int(match.group(1)), min(int(match.group(2) or end), end)
            start = max(0, start - 1000) if step == "misplaced" else start
            request["status"] = 206
            self.send_response(206)
            if step != "rangeless":
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
        else:
            request["status"] = 200
            self.send_response(200)
        payload = body[start : end + 1]
        self.send_header("Content-Type", "application/octet-stream")
        for name, value in validators.items():
            self.send_header(name, value)
        if step.startswith("unsized"):
            self.end_headers()  # HTTP/1.0: the body ends where the connection closes
            self.wfile.write(payload[: len(payload) // 2] if step == "unsized-cut" else payload)
            return
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if step == "cut":
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(payload)


class _State:
    def __init__(self, port: int) -> None:
        self.port = port
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.files: dict[str, bytes] = {}
        self.plans: dict[str, list] = {}
        self.head_plans: dict[str, list] = {}
        self.validators: dict[str, str] = {}
        self.modified: dict[str, str] = {}  # path -> its Last-Modified, when not LAST_MODIFIED

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
def server(monkeypatch):
    """A real HTTP server on 127.0.0.1 (port 0), in a background thread, stopped after the test."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # 127.0.0.1 must never go through a proxy
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.state = _State(httpd.server_address[1])
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield httpd.state
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def params(url: str, sha256: str | None = None, retries: int = 3) -> DataParams:
    return DataParams(url=url, sha256=sha256, retries=retries, retry_backoff=0.01, timeout=5)


def test_http_download_writes_final_file_and_source_record_and_no_part(server, tmp_path):
    server.files["/cells.zip"] = PAYLOAD
    raw = tmp_path / "raw"
    path = download(params(server.url("/cells.zip")), raw, raw.parent / "source.json")
    assert path == raw / "cells.zip" == archive_path(params(server.url("/cells.zip")), raw)
    assert path.read_bytes() == PAYLOAD
    record = json.loads((tmp_path / "source.json").read_text())
    assert record == {"url": server.url("/cells.zip"), "archive": "cells.zip", "sha256": PAYLOAD_SHA, "bytes": len(PAYLOAD),
                      "etag": etag(PAYLOAD), "last_modified": LAST_MODIFIED, "mtime_ns": None}  # fmt: skip
    assert not (raw / "cells.zip.part").exists()
    assert sorted(p.name for p in raw.iterdir()) == ["cells.zip"]


def killed_run(server, path: str, raw) -> None:
    """Leaves what a download killed halfway leaves: half the file in `<name>.part`."""
    server.plans[path] = ["cut", *server.plans.get(path, ["serve"])]
    with pytest.raises(DownloadError):
        download(params(server.url(path), retries=0), raw, raw.parent / "source.json")
    assert (raw / "cells.zip.part").exists() and not (raw / "cells.zip").exists()


def resumes(server) -> list[tuple]:
    """Returns (Range, If-Range, status) of each request after the first."""
    return [(r["range"], r["if_range"], r["status"]) for r in server.requests[1:]]


def test_a_stopped_run_ends_the_transfer_at_once_and_keeps_no_final_file(server, tmp_path):
    server.files["/cells.zip"] = PAYLOAD
    raw = tmp_path / "raw"
    stop_requested.set()  # what the flow sets on Ctrl-C while this stage runs in a task runner's thread
    try:
        with pytest.raises(Interrupted, match="download cells.zip: interrupted at 0 of"):
            download(params(server.url("/cells.zip")), raw, raw.parent / "source.json")
    finally:
        stop_requested.clear()
    assert not (raw / "cells.zip").exists() and len(server.requests) == 1  # not retried
    assert download(params(server.url("/cells.zip")), raw, raw.parent / "source.json").read_bytes() == PAYLOAD


def test_a_run_stopped_while_waiting_to_retry_ends_at_once(server, tmp_path):
    server.files["/cells.zip"] = PAYLOAD
    server.plans["/cells.zip"] = [503]
    slow = DataParams(url=server.url("/cells.zip"), retries=3, retry_backoff=30, timeout=5)  # waits 30, 60, 120 s
    ended: list[BaseException] = []

    def run() -> None:
        try:
            download(slow, tmp_path / "raw", tmp_path / "source.json")
        except BaseException as exc:  # noqa: BLE001 (what the stage's thread ends with)
            ended.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        while not server.requests:
            time.sleep(0.01)
        time.sleep(0.2)  # in its first wait
        stop_requested.set()  # what the flow sets on Ctrl-C while this stage runs in a task runner's thread
        thread.join(timeout=5)
    finally:
        stop_requested.clear()
    assert not thread.is_alive()
    assert isinstance(ended[0], Interrupted) and "interrupted while waiting to try again" in str(ended[0])
    assert len(server.requests) == 1


def test_interrupted_transfer_resumes_with_range_and_if_range_on_the_etag(server, tmp_path):
    server.files["/cells.zip"] = PAYLOAD
    server.plans["/cells.zip"] = ["cut", "serve"]
    path = download(params(server.url("/cells.zip")), tmp_path / "raw", tmp_path / "source.json")
    assert path.read_bytes() == PAYLOAD
    assert server.requests[0]["range"] is None
    assert resumes(server) == [(f"bytes={len(PAYLOAD) // 2}-", etag(PAYLOAD), 206)]
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["cells.zip"]


def test_part_left_by_a_killed_run_resumes_with_range_and_if_range_on_the_etag(server, tmp_path):
    server.files["/cells.zip"] = PAYLOAD
    raw = tmp_path / "raw"
    killed_run(server, "/cells.zip", raw)
    path = download(params(server.url("/cells.zip"), sha256=PAYLOAD_SHA), raw, raw.parent / "source.json")
    assert path.read_bytes() == PAYLOAD
    assert resumes(server) == [(f"bytes={len(PAYLOAD) // 2}-", etag(PAYLOAD), 206)]
    assert not (raw / "cells.zip.part").exists() and not (raw / "cells.zip.part.json").exists()


def test_without_an_etag_a_resume_is_tied_to_last_modified(server, tmp_path):
    server.files["/cells.zip"] = PAYLOAD
    server.validators["/cells.zip"] = "last-modified"
    killed_run(server, "/cells.zip", tmp_path)
    assert download(params(server.url("/cells.zip")), tmp_path, tmp_path / "source.json").read_bytes() == PAYLOAD
    assert resumes(server) == [(f"bytes={len(PAYLOAD) // 2}-", LAST_MODIFIED, 206)]


def test_part_from_another_url_is_not_resumed(server, tmp_path):
    server.files["/a/cells.zip"] = PAYLOAD
    server.files["/b/cells.zip"] = OTHER
    killed_run(server, "/a/cells.zip", tmp_path)
    assert download(params(server.url("/b/cells.zip")), tmp_path, tmp_path / "source.json").read_bytes() == OTHER
    assert resumes(server) == [(None, None, 200)]


def test_part_of_a_file_changed_since_is_started_over_when_if_range_fails(server, tmp_path):
    server.files["/cells.zip"] = PAYLOAD
    killed_run(server, "/cells.zip", tmp_path)
    server.files["/cells.zip"] = OTHER  # same name and size, new ETag
    assert download(params(server.url("/cells.zip")), tmp_path, tmp_path / "source.json").read_bytes() == OTHER
    assert resumes(server) == [(f"bytes={len(PAYLOAD) // 2}-", etag(PAYLOAD), 200)]


def test_server_ignoring_if_range_cannot_splice_in_a_changed_file(server, tmp_path):
    server.files["/cells.zip"] = PAYLOAD
    server.plans["/cells.zip"] = ["noifrange"]
    killed_run(server, "/cells.zip", tmp_path)
    server.files["/cells.zip"] = OTHER
    assert download(params(server.url("/cells.zip")), tmp_path, tmp_path / "source.json").read_bytes() == OTHER
    assert resumes(server) == [(f"bytes={len(PAYLOAD) // 2}-", etag(PAYLOAD), 206), (None, None, 200)]


def test_server_ignoring_if_range_without_an_etag_cannot_splice_in_a_changed_file(server, tmp_path):
    server.files["/cells.zip"] = PAYLOAD
    server.validators["/cells.zip"] = "last-modified"
    server.plans["/cells.zip"] = ["noifrange"]
    killed_run(server, "/cells.zip", tmp_path)
    server.files["/cells.zip"] = OTHER
    server.modified["/cells.zip"] = "Thu, 02 Jan 2025 00:00:00 GMT"
    assert download(params(server.url("/cells.zip")), tmp_path, tmp_path / "source.json").read_bytes() == OTHER
    assert resumes(server) == [(f"bytes={len(PAYLOAD) // 2}-", LAST_MODIFIED, 206), (None, None, 200)]


def test_server_without_etag_or_last_modified_restarts_from_zero(server, tmp_path):
    # Nothing proves the remote file is the one the part began with, so it is not resumed.
    server.files["/cells.zip"] = PAYLOAD
    server.validators["/cells.zip"] = "none"
    killed_run(server, "/cells.zip", tmp_path)
    server.files["/cells.zip"] = OTHER
    assert download(params(server.url("/cells.zip")), tmp_path, tmp_path / "source.json").read_bytes() == OTHER
    assert resumes(server) == [(None, None, 200)]


def test_server_that_ignores_range_restarts_part_from_zero(server, tmp_path):
    server.files["/cells.zip"] = PAYLOAD
    server.plans["/cells.zip"] = ["norange"]
    killed_run(server, "/cells.zip", tmp_path)
    path = download(params(server.url("/cells.zip")), tmp_path, tmp_path / "source.json")
    assert resumes(server) == [(f"bytes={len(PAYLOAD) // 2}-", etag(PAYLOAD), 200)]
    assert path.read_bytes() == PAYLOAD  # not the first half twice


@pytest.mark.parametrize("step", ["misplaced", "rangeless"])
def test_a_partial_reply_that_does_not_continue_the_part_is_discarded_and_fetched_whole(server, tmp_path, step):
    # Written after the part, or taken as the whole file, it would leave a file with bytes missing or twice.
    server.files["/cells.zip"] = PAYLOAD
    server.plans["/cells.zip"] = ["cut", step, "serve"]
    path = download(params(server.url("/cells.zip")), tmp_path / "raw", tmp_path / "source.json")
    assert path.read_bytes() == PAYLOAD
    assert resumes(server) == [(f"bytes={len(PAYLOAD) // 2}-", etag(PAYLOAD), 206), (None, None, 200)]


def test_a_whole_reply_that_is_no_archive_fails_at_once_saying_what_came(server, tmp_path):
    # An error page served with 200 and its length: recorded as the archive, later runs would find the
    # source unchanged and keep it.
    server.files["/cells.zip"] = b"<!DOCTYPE html><html><body>Quota exceeded</body></html>"
    with pytest.raises(DownloadError) as raised:
        download(params(server.url("/cells.zip")), tmp_path, tmp_path / "source.json")
    assert str(raised.value) == (f"{server.url('/cells.zip')}: every byte the server announced came, and they are no "
                                 "whole archive: not a zip or tar archive: 55 bytes, Content-Type application/octet-stream, "
                                 "starting b'<!DOCTYPE html><html><body>Quota'; it was discarded")  # fmt: skip
    assert len(server.requests) == 1 and list(tmp_path.iterdir()) == []
    # Without a length, a cut archive may look like that too: retried, and what came is said.
    server.plans["/cells.zip"] = ["unsized"]
    with pytest.raises(DownloadError, match="ended after 55 bytes: not a zip or tar archive: 55 bytes, Content-Type "
                                            "application/octet-stream, starting b'<!DOCTYPE"):  # fmt: skip
        download(params(server.url("/cells.zip"), retries=1), tmp_path, tmp_path / "source.json")


@pytest.mark.parametrize("held", ["whole", "cut"])
def test_a_part_holding_every_byte_is_checked_before_it_is_kept(server, tmp_path, held):
    # A run stopped while it checked the archive it had fetched leaves the part; the next one's resume is answered
    # 416 (nothing past its end), and the part is checked all the same: a cut file at the source is not kept.
    body = PAYLOAD if held == "whole" else PAYLOAD[: len(PAYLOAD) // 2]
    server.files["/cells.zip"] = body
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "cells.zip.part").write_bytes(body)
    (raw / "cells.zip.part.json").write_text(json.dumps({"url": server.url("/cells.zip"), "etag": etag(body),
                                                         "last_modified": LAST_MODIFIED, "bytes": len(body)}))  # fmt: skip
    if held == "whole":
        assert download(params(server.url("/cells.zip")), raw, raw.parent / "source.json").read_bytes() == body
    else:
        with pytest.raises(DownloadError, match=r"every byte the server announced came, and they are no whole archive"):
            download(params(server.url("/cells.zip")), raw, raw.parent / "source.json")
        assert list(raw.iterdir()) == []
    assert [request["status"] for request in server.requests if request["method"] == "GET"] == [416]


def test_a_whole_reply_that_is_a_cut_archive_fails_at_once(server, tmp_path):
    # The file at the source is cut short, its length announced truly: retrying fetches the same bytes.
    server.files["/cells.zip"] = PAYLOAD[: len(PAYLOAD) // 2]
    with pytest.raises(DownloadError, match=r"cells.zip: every byte the server announced came, and they are no whole archive: (damaged or )?truncated"):
        download(params(server.url("/cells.zip")), tmp_path, tmp_path / "source.json")
    assert len(server.requests) == 1 and list(tmp_path.iterdir()) == []


def test_short_body_without_content_length_is_retried_then_fails_with_no_final_file(server, tmp_path):
    server.files["/cells.zip"] = zip_bytes()
    server.plans["/cells.zip"] = ["unsized-cut"]
    with pytest.raises(DownloadError) as raised:
        download(params(server.url("/cells.zip"), retries=2), tmp_path, tmp_path / "source.json")
    message = str(raised.value)
    assert message.startswith(server.url("/cells.zip") + ": gave up after 3 attempts")
    assert "truncated" in message and "\n" not in message
    assert [r["range"] for r in server.requests] == [None, None, None]  # each retry from scratch
    assert list(tmp_path.iterdir()) == []


def test_body_without_content_length_is_kept_once_the_archive_is_whole(server, tmp_path):
    server.files["/cells.zip"] = zip_bytes()
    server.plans["/cells.zip"] = ["unsized-cut", "unsized"]
    assert download(params(server.url("/cells.zip")), tmp_path, tmp_path / "source.json").read_bytes() == zip_bytes()
    assert len(server.requests) == 2


def test_without_sha256_the_log_recommends_setting_it_to_the_digest(server, tmp_path, caplog):
    server.files["/cells.zip"] = PAYLOAD
    with caplog.at_level(logging.INFO, logger="imgclf"):
        download(params(server.url("/cells.zip")), tmp_path, tmp_path / "source.json")
    assert any("data.sha256" in r.getMessage() and PAYLOAD_SHA in r.getMessage() for r in caplog.records)


def test_archive_left_without_its_record_is_not_taken_for_the_previous_url(server, tmp_path, monkeypatch):
    server.files["/a/cells.zip"] = PAYLOAD
    server.files["/b/cells.zip"] = OTHER
    download(params(server.url("/a/cells.zip")), tmp_path, tmp_path / "source.json")
    real_write_json = tasks.download.write_json

    def killed_before_the_record(path, *args, **kwargs):
        if path.name == "source.json":
            raise KeyboardInterrupt  # the run dies between the rename and writing the record
        return real_write_json(path, *args, **kwargs)

    monkeypatch.setattr(tasks.download, "write_json", killed_before_the_record)
    with pytest.raises(KeyboardInterrupt):
        download(params(server.url("/b/cells.zip")), tmp_path, tmp_path / "source.json")
    monkeypatch.undo()
    assert download(params(server.url("/a/cells.zip")), tmp_path, tmp_path / "source.json").read_bytes() == PAYLOAD


def test_server_errors_are_retried_until_success(server, tmp_path):
    server.files["/cells.zip"] = PAYLOAD
    server.plans["/cells.zip"] = [503, 503, "serve"]
    path = download(params(server.url("/cells.zip"), retries=3), tmp_path / "raw", tmp_path / "source.json")
    assert path.read_bytes() == PAYLOAD
    assert len(server.requests) == 3


def test_permanent_404_fails_at_once_naming_url_and_status(server, tmp_path):
    url = server.url("/missing.zip")
    with pytest.raises(DownloadError) as raised:
        download(params(url, retries=3), tmp_path / "raw", tmp_path / "source.json")
    assert url in str(raised.value)
    assert "404" in str(raised.value)
    assert len(server.requests) == 1
    assert not (tmp_path / "raw" / "missing.zip").exists()


def test_a_tls_failure_fails_at_once_and_is_not_a_source_gone(server, tmp_path):
    # https:// to a plain-HTTP server: the handshake fails, as a wrong certificate or a TLS-breaking proxy makes it.
    # Retried it stays broken, and taken for a source that is gone the flow would go on with an earlier archive.
    url = server.url("/cells.zip").replace("http://", "https://")
    with pytest.raises(DownloadError) as raised:
        download(params(url, retries=3), tmp_path / "raw", tmp_path / "source.json")
    assert not isinstance(raised.value, SourceGone)
    assert str(raised.value).startswith(f"{url}: TLS: ") and "gave up" not in str(raised.value)


def test_a_tls_handshake_cut_short_is_retried_as_passing_trouble(tmp_path):
    accepted = []

    def hang_up(connection) -> None:  # as an overloaded balancer: the connection closes before the handshake ends
        accepted.append(1)
        connection.close()

    with tcp_server(hang_up) as port:
        # EOF, or a reset when the ClientHello arrived before the close (unread data: the kernel sends RST).
        with pytest.raises(SourceGone, match=r"gave up after 2 attempts: .*(EOF|Connection reset)"):
            download(params(f"https://127.0.0.1:{port}/cells.zip", retries=1), tmp_path / "raw", tmp_path / "source.json")
    assert len(accepted) == 2


def test_checksum_mismatch_raises_and_leaves_no_final_file(server, tmp_path):
    server.files["/cells.zip"] = PAYLOAD
    raw = tmp_path / "raw"
    with pytest.raises(DownloadError, match="sha256"):
        download(params(server.url("/cells.zip"), sha256="0" * 64), raw, raw.parent / "source.json")
    assert not (raw / "cells.zip").exists()
    assert not (raw / "cells.zip.part").exists()
    assert not (tmp_path / "source.json").exists()


def test_an_archive_matching_data_sha256_is_kept_without_asking_the_source(server, tmp_path):
    server.files["/cells.zip"] = PAYLOAD
    data = params(server.url("/cells.zip"), sha256=PAYLOAD_SHA)
    download(data, tmp_path / "raw", tmp_path / "source.json")
    assert len(server.requests) == 1
    server.requests.clear()
    server.files["/cells.zip"] = OTHER  # the content is pinned: a new file at the URL is not wanted
    path = download(data, tmp_path / "raw", tmp_path / "source.json")
    assert server.requests == []
    assert path.read_bytes() == PAYLOAD


def test_a_pinned_archive_without_its_record_gets_one_the_legacy_record_moved_over(server, tmp_path):
    # DVC refuses to record download without data/source.json: a project from before the record left
    # data/raw, or a run killed between the archive and its record, must not fail every run after.
    server.files["/cells.zip"] = PAYLOAD
    data, raw, record = params(server.url("/cells.zip"), sha256=PAYLOAD_SHA), tmp_path / "raw", tmp_path / "source.json"
    download(data, raw, record)
    written = json.loads(record.read_text())
    record.rename(raw / "cells.zip.source.json")  # where earlier versions kept it
    server.requests.clear()
    download(data, raw, record)
    assert server.requests == [] and json.loads(record.read_text()) == written
    assert not (raw / "cells.zip.source.json").exists()
    record.unlink()
    download(data, raw, record)
    assert json.loads(record.read_text()) == written | {"etag": None, "last_modified": None, "mtime_ns": None}


def seen(server) -> list[tuple]:
    """Returns (method, Range, status) of each request the server saw, and forgets them."""
    requests = [(r["method"], r["range"], r["status"]) for r in server.requests]
    server.requests.clear()
    return requests


def messages(caplog) -> str:
    return "\n".join(record.getMessage() for record in caplog.records)


def test_unchanged_source_is_asked_with_a_head_only_and_nothing_fetched(server, tmp_path, caplog):
    server.files["/cells.zip"] = PAYLOAD
    data = params(server.url("/cells.zip"))
    download(data, tmp_path, tmp_path / "source.json")
    assert seen(server) == [("GET", None, 200)]
    with caplog.at_level(logging.INFO, logger="imgclf"):
        assert download(data, tmp_path, tmp_path / "source.json").read_bytes() == PAYLOAD
    assert seen(server) == [("HEAD", None, 200)]
    proof = f"ETag {etag(PAYLOAD)}, Last-Modified {LAST_MODIFIED}, size 300000"
    assert f"cells.zip: source unchanged ({proof}), nothing fetched" in messages(caplog)
    assert source_change(data, tmp_path, tmp_path / "source.json") is None


def test_changed_etag_at_the_same_url_is_fetched_again_and_the_log_says_why(server, tmp_path, caplog):
    server.files["/cells.zip"] = PAYLOAD
    data = params(server.url("/cells.zip"))
    download(data, tmp_path, tmp_path / "source.json")
    server.files["/cells.zip"] = OTHER  # same URL, same size, same Last-Modified: only the ETag tells
    assert source_change(data, tmp_path, tmp_path / "source.json") == "ETag changed"
    seen(server)
    with caplog.at_level(logging.INFO, logger="imgclf"):
        assert download(data, tmp_path, tmp_path / "source.json").read_bytes() == OTHER
    assert seen(server) == [("HEAD", None, 200), ("GET", None, 200)]
    assert "cells.zip: ETag changed; fetching" in messages(caplog)
    assert json.loads((tmp_path / "source.json").read_text())["etag"] == etag(OTHER)


def test_the_head_carries_the_urls_credentials_as_basic_auth(server, tmp_path):
    server.files["/cells.zip"] = PAYLOAD
    data = params(server.url("/cells.zip").replace("://", "://reader:s%40cret@"))
    download(data, tmp_path, tmp_path / "source.json")
    server.requests.clear()
    assert source_change(data, tmp_path, tmp_path / "source.json") is None
    basic = "Basic " + base64.b64encode(b"reader:s@cret").decode()
    assert [(r["method"], r["auth"]) for r in server.requests] == [("HEAD", basic)]


@pytest.mark.parametrize("refusal", [405, 403], ids=["head_not_allowed", "presigned_url_signing_get_only"])
def test_server_refusing_head_is_asked_with_a_one_byte_ranged_get(server, tmp_path, refusal):
    server.files["/cells.zip"] = PAYLOAD
    server.head_plans["/cells.zip"] = [refusal] * 2
    data = params(server.url("/cells.zip"))
    download(data, tmp_path, tmp_path / "source.json")
    seen(server)
    assert download(data, tmp_path, tmp_path / "source.json").read_bytes() == PAYLOAD
    assert seen(server) == [("HEAD", None, refusal), ("GET", "bytes=0-0", 206)]
    server.files["/cells.zip"] = OTHER
    assert download(data, tmp_path, tmp_path / "source.json").read_bytes() == OTHER
    assert seen(server) == [("HEAD", None, refusal), ("GET", "bytes=0-0", 206), ("GET", None, 200)]


def test_without_validators_a_new_size_is_fetched_again_and_said(server, tmp_path, caplog):
    server.files["/cells.zip"] = PAYLOAD
    server.validators["/cells.zip"] = "none"
    data = params(server.url("/cells.zip"))
    download(data, tmp_path, tmp_path / "source.json")
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        assert source_change(data, tmp_path, tmp_path / "source.json") is None  # the same size: taken as the same
    assert "gives no ETag or Last-Modified, only a size: new data of the same size would go unseen" in caplog.text
    server.files["/cells.zip"] = PAYLOAD + b"more"
    assert source_change(data, tmp_path, tmp_path / "source.json") == "size changed: 300000 -> 300004 bytes"
    assert download(data, tmp_path, tmp_path / "source.json").read_bytes() == PAYLOAD + b"more"


def test_asking_the_source_retries_transient_errors(server, tmp_path):
    server.files["/cells.zip"] = PAYLOAD
    data = params(server.url("/cells.zip"))
    download(data, tmp_path, tmp_path / "source.json")
    server.head_plans["/cells.zip"] = [503, "serve"]
    seen(server)
    assert source_change(data, tmp_path, tmp_path / "source.json") is None
    assert seen(server) == [("HEAD", None, 503), ("HEAD", None, 200)]


def test_source_gone_raises_one_line_naming_the_url_and_keeps_the_archive(server, tmp_path):
    server.files["/cells.zip?token=secret"] = PAYLOAD
    data = params(server.url("/cells.zip?token=secret"))
    download(data, tmp_path, tmp_path / "source.json")
    del server.files["/cells.zip?token=secret"]
    with pytest.raises(DownloadError) as raised:
        download(data, tmp_path, tmp_path / "source.json")
    assert str(raised.value) == f"{server.url('/cells.zip')}?***: HTTP 404 Not Found"
    assert (tmp_path / "cells.zip").read_bytes() == PAYLOAD


def test_a_source_gone_is_told_apart_from_one_refusing_the_credentials(server, tmp_path):
    # The flow carries on without the first (offline, moved), and stops on the second (keys revoked).
    server.files["/cells.zip"] = PAYLOAD
    data = params(server.url("/cells.zip"), retries=1)
    download(data, tmp_path, tmp_path / "source.json")
    server.head_plans["/cells.zip"] = [401]
    with pytest.raises(DownloadError, match="HTTP 401") as refused:
        source_change(data, tmp_path, tmp_path / "source.json")
    assert not isinstance(refused.value, SourceGone)
    del server.files["/cells.zip"]
    del server.head_plans["/cells.zip"]
    with pytest.raises(SourceGone, match="HTTP 404"):
        source_change(data, tmp_path, tmp_path / "source.json")
    closed = params(f"http://127.0.0.1:{free_port()}/cells.zip", retries=1)
    (tmp_path / "source.json").write_text(json.dumps({"url": closed.url, "archive": "cells.zip", "bytes": len(PAYLOAD)}))
    with pytest.raises(SourceGone, match="gave up after 2 attempts"):
        source_change(closed, tmp_path, tmp_path / "source.json")


def test_first_download_reports_no_archive_yet(server, tmp_path):
    assert source_change(params(server.url("/cells.zip")), tmp_path, tmp_path / "source.json") == "no archive downloaded yet"
    assert server.requests == []


def test_retries_exhausted_raises_gave_up_after_retries_plus_one_requests(server, tmp_path):
    server.plans["/cells.zip"] = [500]
    with pytest.raises(DownloadError, match="gave up") as raised:
        download(params(server.url("/cells.zip"), retries=3), tmp_path / "raw", tmp_path / "source.json")
    assert server.url("/cells.zip") in str(raised.value)
    assert len(server.requests) == 4
    assert not (tmp_path / "raw" / "cells.zip").exists()


def test_file_url_copies_the_file(tmp_path):
    source = tmp_path / "src" / "cells.zip"
    source.parent.mkdir()
    source.write_bytes(PAYLOAD)
    path = download(params(source.as_uri()), tmp_path / "raw", tmp_path / "source.json")
    assert path == tmp_path / "raw" / "cells.zip"
    assert path.read_bytes() == PAYLOAD
    assert not (tmp_path / "raw" / "cells.zip.part").exists()


def test_local_file_rewritten_with_the_same_size_is_copied_again(tmp_path):
    source = tmp_path / "src" / "cells.zip"
    source.parent.mkdir()
    source.write_bytes(PAYLOAD)
    data = params(str(source))
    download(data, tmp_path / "raw", tmp_path / "source.json")
    assert source_change(data, tmp_path / "raw", tmp_path / "source.json") is None
    source.write_bytes(OTHER)
    before = source.stat().st_mtime_ns
    os.utime(source, ns=(before, before + 1_000_000_000))  # a coarse clock could give the same mtime twice
    assert source_change(data, tmp_path / "raw", tmp_path / "source.json") == "mtime changed"
    assert download(data, tmp_path / "raw", tmp_path / "source.json").read_bytes() == OTHER


def test_plain_local_path_copies_the_file(tmp_path):
    source = tmp_path / "src" / "cells.zip"
    source.parent.mkdir()
    source.write_bytes(PAYLOAD)
    path = download(params(str(source), sha256=PAYLOAD_SHA), tmp_path / "raw", tmp_path / "source.json")
    assert path == tmp_path / "raw" / "cells.zip"
    assert path.read_bytes() == PAYLOAD
    assert source.read_bytes() == PAYLOAD  # copied, not moved


def test_a_local_archive_cut_short_at_its_source_is_refused_and_nothing_kept(tmp_path):
    # It was copied whole and recorded as the stage's output; only extract said it was cut.
    source = tmp_path / "src" / "cells.zip"
    source.parent.mkdir()
    source.write_bytes(PAYLOAD[: len(PAYLOAD) // 2])
    with pytest.raises(DownloadError, match=rf"^{re.escape(str(source))}: (damaged or )?truncated archive.*; nothing was kept$"):
        download(params(str(source)), tmp_path / "raw", tmp_path / "source.json")
    assert list((tmp_path / "raw").iterdir()) == [] and not (tmp_path / "source.json").exists()


def test_a_local_folder_is_refused_as_not_an_archive_saying_how_to_make_one(tmp_path):
    (tmp_path / "set" / "cats").mkdir(parents=True)
    with pytest.raises(DownloadError, match=r"set: a folder, not an archive: .* zip -r ../set.zip"):
        download(params(str(tmp_path / "set")), tmp_path / "raw", tmp_path / "source.json")


def test_a_local_source_that_is_the_downloaded_archive_itself_is_refused(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "cells.zip").write_bytes(PAYLOAD)
    with pytest.raises(DownloadError, match="is where download puts the archive it fetches: keep the source elsewhere"):
        download(params(str(tmp_path / "raw" / "cells.zip")), tmp_path / "raw", tmp_path / "source.json")
    assert (tmp_path / "raw" / "cells.zip").read_bytes() == PAYLOAD


def test_missing_local_file_raises_naming_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "cells.zip"
    with pytest.raises(DownloadError, match=re.escape(str(missing))):
        download(params(str(missing)), tmp_path / "raw", tmp_path / "source.json")
    assert not (tmp_path / "raw" / "cells.zip").exists()


def test_unsupported_scheme_raises_naming_supported_schemes(tmp_path):
    # params.yaml refuses the scheme at load; the stage still guards params built without validation.
    unchecked = DataParams.model_construct(**{**params("https://x/cells.zip").model_dump(), "url": "ftp://127.0.0.1/cells.zip"})
    with pytest.raises(DownloadError, match="unsupported scheme") as raised:
        download(unchecked, tmp_path / "raw", tmp_path / "source.json")
    message = str(raised.value)
    assert "ftp://127.0.0.1/cells.zip" in message
    for scheme in ("http://", "https://", "file://"):
        assert scheme in message
