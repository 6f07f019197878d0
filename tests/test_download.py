"""The download stage against a real HTTP server on 127.0.0.1: atomic, resumable, retried, verified."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import re
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import tasks.download
from tasks.download import DownloadError, archive_path, download
from tasks.params import DataParams

PAYLOAD = random.Random(0).randbytes(300_000)
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
OTHER = random.Random(1).randbytes(len(PAYLOAD))  # another file of the same size
LAST_MODIFIED = "Wed, 01 Jan 2025 00:00:00 GMT"


def zip_bytes(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        # A fixed date: two calls give the same bytes whatever the clock says.
        archive.writestr(zipfile.ZipInfo("cells/a.png", date_time=(2020, 1, 1, 0, 0, 0)), random.Random(seed).randbytes(200_000))
    return buffer.getvalue()


def etag(body: bytes) -> str:
    return f'"{hashlib.sha256(body).hexdigest()[:16]}"'


class _Handler(BaseHTTPRequestHandler):
    """Serves `state.files`; `state.plans[path]` scripts one step per request (the last one repeats):
    "serve" (honours `Range: bytes=N-` with a 206, unless an If-Range names another version),
    "noifrange" (honours Range, ignores If-Range), "cut"
    (full Content-Length, then closes after half the body), "norange" (always the whole body with a
    200, as simple servers do), "unsized" / "unsized-cut" (no Content-Length: the whole body or half
    of it, then closes), or an int status code. Each file has an ETag (from its bytes) and a
    Last-Modified; `state.validators[path]` may name fewer: "last-modified" or "none"."""

    def log_message(self, *args) -> None:  # keep the test output quiet
        pass

    def do_GET(self) -> None:
        state = self.server.state
        with state.lock:
            request = {"path": self.path, "range": self.headers.get("Range"), "if_range": self.headers.get("If-Range")}
            state.requests.append(request)
            plan = state.plans.get(self.path, ["serve"])
            step = plan.pop(0) if len(plan) > 1 else plan[0]
        body = state.files.get(self.path)
        if isinstance(step, int):
            self.send_error(step)
            return
        if body is None:
            self.send_error(404)
            return
        both = {"ETag": etag(body), "Last-Modified": LAST_MODIFIED}
        kind = state.validators.get(self.path, "etag")
        validators = {"etag": both, "last-modified": {"Last-Modified": LAST_MODIFIED}, "none": {}}[kind]
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        same_version = request["if_range"] in (None, *validators.values()) or step == "noifrange"
        if match and int(match.group(1)) < len(body) and step != "norange" and same_version:
            start = int(match.group(1))
            request["status"] = 206
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            request["status"] = 200
            self.send_response(200)
        payload = body[start:]
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
        self.validators: dict[str, str] = {}

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
    path = download(params(server.url("/cells.zip")), raw)
    assert path == raw / "cells.zip" == archive_path(params(server.url("/cells.zip")), raw)
    assert path.read_bytes() == PAYLOAD
    record = json.loads((raw / "cells.zip.source.json").read_text())
    assert record == {"url": server.url("/cells.zip"), "sha256": PAYLOAD_SHA, "bytes": len(PAYLOAD),
                      "etag": etag(PAYLOAD), "last_modified": LAST_MODIFIED}  # fmt: skip
    assert not (raw / "cells.zip.part").exists()
    assert sorted(p.name for p in raw.iterdir()) == ["cells.zip", "cells.zip.source.json"]


def killed_run(server, path: str, raw) -> None:
    """Leaves what a download killed halfway leaves: half the file in `<name>.part`."""
    server.plans[path] = ["cut", *server.plans.get(path, ["serve"])]
    with pytest.raises(DownloadError):
        download(params(server.url(path), retries=0), raw)
    assert (raw / "cells.zip.part").exists() and not (raw / "cells.zip").exists()


def resumes(server) -> list[tuple]:
    """Returns (Range, If-Range, status) of each request after the first."""
    return [(r["range"], r["if_range"], r["status"]) for r in server.requests[1:]]


def test_interrupted_transfer_resumes_with_range_and_if_range_on_the_etag(server, tmp_path):
    server.files["/cells.zip"] = PAYLOAD
    server.plans["/cells.zip"] = ["cut", "serve"]
    path = download(params(server.url("/cells.zip")), tmp_path / "raw")
    assert path.read_bytes() == PAYLOAD
    assert server.requests[0]["range"] is None
    assert resumes(server) == [(f"bytes={len(PAYLOAD) // 2}-", etag(PAYLOAD), 206)]
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["cells.zip", "cells.zip.source.json"]


def test_part_left_by_a_killed_run_resumes_with_range_and_if_range_on_the_etag(server, tmp_path):
    server.files["/cells.zip"] = PAYLOAD
    raw = tmp_path / "raw"
    killed_run(server, "/cells.zip", raw)
    path = download(params(server.url("/cells.zip"), sha256=PAYLOAD_SHA), raw)
    assert path.read_bytes() == PAYLOAD
    assert resumes(server) == [(f"bytes={len(PAYLOAD) // 2}-", etag(PAYLOAD), 206)]
    assert not (raw / "cells.zip.part").exists() and not (raw / "cells.zip.part.json").exists()


def test_without_an_etag_a_resume_is_tied_to_last_modified(server, tmp_path):
    server.files["/cells.zip"] = PAYLOAD
    server.validators["/cells.zip"] = "last-modified"
    killed_run(server, "/cells.zip", tmp_path)
    assert download(params(server.url("/cells.zip")), tmp_path).read_bytes() == PAYLOAD
    assert resumes(server) == [(f"bytes={len(PAYLOAD) // 2}-", LAST_MODIFIED, 206)]


def test_part_from_another_url_is_not_resumed(server, tmp_path):
    server.files["/a/cells.zip"] = PAYLOAD
    server.files["/b/cells.zip"] = OTHER
    killed_run(server, "/a/cells.zip", tmp_path)
    assert download(params(server.url("/b/cells.zip")), tmp_path).read_bytes() == OTHER
    assert resumes(server) == [(None, None, 200)]


def test_part_of_a_file_changed_since_is_started_over_when_if_range_fails(server, tmp_path):
    server.files["/cells.zip"] = PAYLOAD
    killed_run(server, "/cells.zip", tmp_path)
    server.files["/cells.zip"] = OTHER  # same name and size, new ETag
    assert download(params(server.url("/cells.zip")), tmp_path).read_bytes() == OTHER
    assert resumes(server) == [(f"bytes={len(PAYLOAD) // 2}-", etag(PAYLOAD), 200)]


def test_server_ignoring_if_range_cannot_splice_in_a_changed_file(server, tmp_path):
    server.files["/cells.zip"] = PAYLOAD
    server.plans["/cells.zip"] = ["noifrange"]
    killed_run(server, "/cells.zip", tmp_path)
    server.files["/cells.zip"] = OTHER
    assert download(params(server.url("/cells.zip")), tmp_path).read_bytes() == OTHER
    assert resumes(server) == [(f"bytes={len(PAYLOAD) // 2}-", etag(PAYLOAD), 206), (None, None, 200)]


def test_server_without_etag_or_last_modified_restarts_from_zero(server, tmp_path):
    # Nothing proves the remote file is the one the part began with, so it is not resumed.
    server.files["/cells.zip"] = PAYLOAD
    server.validators["/cells.zip"] = "none"
    killed_run(server, "/cells.zip", tmp_path)
    server.files["/cells.zip"] = OTHER
    assert download(params(server.url("/cells.zip")), tmp_path).read_bytes() == OTHER
    assert resumes(server) == [(None, None, 200)]


def test_server_that_ignores_range_restarts_part_from_zero(server, tmp_path):
    server.files["/cells.zip"] = PAYLOAD
    server.plans["/cells.zip"] = ["norange"]
    killed_run(server, "/cells.zip", tmp_path)
    path = download(params(server.url("/cells.zip")), tmp_path)
    assert resumes(server) == [(f"bytes={len(PAYLOAD) // 2}-", etag(PAYLOAD), 200)]
    assert path.read_bytes() == PAYLOAD  # not the first half twice


def test_short_body_without_content_length_is_retried_then_fails_with_no_final_file(server, tmp_path):
    server.files["/cells.zip"] = zip_bytes()
    server.plans["/cells.zip"] = ["unsized-cut"]
    with pytest.raises(DownloadError) as raised:
        download(params(server.url("/cells.zip"), retries=2), tmp_path)
    message = str(raised.value)
    assert message.startswith(server.url("/cells.zip") + ": gave up after 3 attempts")
    assert "truncated" in message and "\n" not in message
    assert [r["range"] for r in server.requests] == [None, None, None]  # each retry from scratch
    assert list(tmp_path.iterdir()) == []


def test_body_without_content_length_is_kept_once_the_archive_is_whole(server, tmp_path):
    server.files["/cells.zip"] = zip_bytes()
    server.plans["/cells.zip"] = ["unsized-cut", "unsized"]
    assert download(params(server.url("/cells.zip")), tmp_path).read_bytes() == zip_bytes()
    assert len(server.requests) == 2


def test_without_sha256_the_log_recommends_setting_it_to_the_digest(server, tmp_path, caplog):
    server.files["/cells.zip"] = PAYLOAD
    with caplog.at_level(logging.INFO, logger="imgclf"):
        download(params(server.url("/cells.zip")), tmp_path)
    assert any("data.sha256" in r.getMessage() and PAYLOAD_SHA in r.getMessage() for r in caplog.records)


def test_archive_left_without_its_record_is_not_taken_for_the_previous_url(server, tmp_path, monkeypatch):
    server.files["/a/cells.zip"] = PAYLOAD
    server.files["/b/cells.zip"] = OTHER
    download(params(server.url("/a/cells.zip")), tmp_path)
    real_atomic_file = tasks.download.atomic_file

    def killed_before_the_record(path, *args, **kwargs):
        if path.name.endswith(".source.json"):
            raise KeyboardInterrupt  # the run dies between the rename and writing the record
        return real_atomic_file(path, *args, **kwargs)

    monkeypatch.setattr(tasks.download, "atomic_file", killed_before_the_record)
    with pytest.raises(KeyboardInterrupt):
        download(params(server.url("/b/cells.zip")), tmp_path)
    monkeypatch.undo()
    assert download(params(server.url("/a/cells.zip")), tmp_path).read_bytes() == PAYLOAD


def test_server_errors_are_retried_until_success(server, tmp_path):
    server.files["/cells.zip"] = PAYLOAD
    server.plans["/cells.zip"] = [503, 503, "serve"]
    path = download(params(server.url("/cells.zip"), retries=3), tmp_path / "raw")
    assert path.read_bytes() == PAYLOAD
    assert len(server.requests) == 3


def test_permanent_404_fails_at_once_naming_url_and_status(server, tmp_path):
    url = server.url("/missing.zip")
    with pytest.raises(DownloadError) as raised:
        download(params(url, retries=3), tmp_path / "raw")
    assert url in str(raised.value)
    assert "404" in str(raised.value)
    assert len(server.requests) == 1
    assert not (tmp_path / "raw" / "missing.zip").exists()


def test_checksum_mismatch_raises_and_leaves_no_final_file(server, tmp_path):
    server.files["/cells.zip"] = PAYLOAD
    raw = tmp_path / "raw"
    with pytest.raises(DownloadError, match="sha256"):
        download(params(server.url("/cells.zip"), sha256="0" * 64), raw)
    assert not (raw / "cells.zip").exists()
    assert not (raw / "cells.zip.part").exists()
    assert not (raw / "cells.zip.source.json").exists()


# With a checksum the file itself is verified; without one, the source.json record vouches for it.
@pytest.mark.parametrize("sha256", [PAYLOAD_SHA, None])
def test_an_archive_already_there_is_not_fetched_again(server, tmp_path, sha256):
    server.files["/cells.zip"] = PAYLOAD
    data = params(server.url("/cells.zip"), sha256=sha256)
    download(data, tmp_path / "raw")
    assert len(server.requests) == 1
    server.requests.clear()
    path = download(data, tmp_path / "raw")
    assert server.requests == []
    assert path.read_bytes() == PAYLOAD


def test_retries_exhausted_raises_gave_up_after_retries_plus_one_requests(server, tmp_path):
    server.plans["/cells.zip"] = [500]
    with pytest.raises(DownloadError, match="gave up") as raised:
        download(params(server.url("/cells.zip"), retries=3), tmp_path / "raw")
    assert server.url("/cells.zip") in str(raised.value)
    assert len(server.requests) == 4
    assert not (tmp_path / "raw" / "cells.zip").exists()


def test_file_url_copies_the_file(tmp_path):
    source = tmp_path / "src" / "cells.zip"
    source.parent.mkdir()
    source.write_bytes(PAYLOAD)
    path = download(params(source.as_uri()), tmp_path / "raw")
    assert path == tmp_path / "raw" / "cells.zip"
    assert path.read_bytes() == PAYLOAD
    assert not (tmp_path / "raw" / "cells.zip.part").exists()


def test_plain_local_path_copies_the_file(tmp_path):
    source = tmp_path / "src" / "cells.zip"
    source.parent.mkdir()
    source.write_bytes(PAYLOAD)
    path = download(params(str(source), sha256=PAYLOAD_SHA), tmp_path / "raw")
    assert path == tmp_path / "raw" / "cells.zip"
    assert path.read_bytes() == PAYLOAD
    assert source.read_bytes() == PAYLOAD  # copied, not moved


def test_missing_local_file_raises_naming_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "cells.zip"
    with pytest.raises(DownloadError, match=re.escape(str(missing))):
        download(params(str(missing)), tmp_path / "raw")
    assert not (tmp_path / "raw" / "cells.zip").exists()


def test_unsupported_scheme_raises_naming_supported_schemes(tmp_path):
    # params.yaml refuses the scheme at load; the stage still guards params built without validation.
    unchecked = DataParams.model_construct(**{**params("https://x/cells.zip").model_dump(), "url": "ftp://127.0.0.1/cells.zip"})
    with pytest.raises(DownloadError, match="unsupported scheme") as raised:
        download(unchecked, tmp_path / "raw")
    message = str(raised.value)
    assert "ftp://127.0.0.1/cells.zip" in message
    for scheme in ("http://", "https://", "file://"):
        assert scheme in message
