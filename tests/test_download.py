"""The download stage against a real HTTP server on 127.0.0.1: atomic, resumable, retried, verified."""

from __future__ import annotations

import hashlib
import json
import random
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tasks.download import DownloadError, archive_path, download
from tasks.params import DataParams

PAYLOAD = random.Random(0).randbytes(300_000)
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    """Serves `state.files`; `state.plans[path]` scripts one step per request (the last one repeats):
    "serve" (honours `Range: bytes=N-` with a 206), "cut" (full Content-Length, then closes after
    half the body), "norange" (always the whole body with a 200, as simple servers do), or an int
    status code."""

    def log_message(self, *args) -> None:  # keep the test output quiet
        pass

    def do_GET(self) -> None:
        state = self.server.state
        with state.lock:
            state.requests.append({"path": self.path, "range": self.headers.get("Range")})
            plan = state.plans.get(self.path, ["serve"])
            step = plan.pop(0) if len(plan) > 1 else plan[0]
        body = state.files.get(self.path)
        if isinstance(step, int):
            self.send_error(step)
            return
        if body is None:
            self.send_error(404)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and int(match.group(1)) < len(body) and step != "norange":
            start = int(match.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Type", "application/octet-stream")
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
    assert record == {"url": server.url("/cells.zip"), "sha256": PAYLOAD_SHA, "bytes": len(PAYLOAD)}
    assert not (raw / "cells.zip.part").exists()
    assert sorted(p.name for p in raw.iterdir()) == ["cells.zip", "cells.zip.source.json"]


def test_interrupted_transfer_resumes_with_range_from_bytes_received(server, tmp_path):
    server.files["/cells.zip"] = PAYLOAD
    server.plans["/cells.zip"] = ["cut", "serve"]
    path = download(params(server.url("/cells.zip")), tmp_path / "raw")
    assert path.read_bytes() == PAYLOAD
    assert [r["range"] for r in server.requests] == [None, f"bytes={len(PAYLOAD) // 2}-"]
    assert not (tmp_path / "raw" / "cells.zip.part").exists()


def test_part_file_left_by_a_killed_run_is_resumed(server, tmp_path):
    server.files["/cells.zip"] = PAYLOAD
    raw = tmp_path / "raw"
    raw.mkdir()
    kept = 123_457
    (raw / "cells.zip.part").write_bytes(PAYLOAD[:kept])
    path = download(params(server.url("/cells.zip"), sha256=PAYLOAD_SHA), raw)
    assert path.read_bytes() == PAYLOAD
    assert [r["range"] for r in server.requests] == [f"bytes={kept}-"]
    assert not (raw / "cells.zip.part").exists()


def test_server_that_ignores_range_restarts_part_from_zero(server, tmp_path):
    server.files["/cells.zip"] = PAYLOAD
    server.plans["/cells.zip"] = ["norange"]
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "cells.zip.part").write_bytes(PAYLOAD[:1000])
    path = download(params(server.url("/cells.zip")), raw)
    assert server.requests[0]["range"] == "bytes=1000-"
    assert path.read_bytes() == PAYLOAD  # not the first 1000 bytes twice


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
    with pytest.raises(DownloadError, match="unsupported scheme") as raised:
        download(params("ftp://127.0.0.1/cells.zip"), tmp_path / "raw")
    message = str(raised.value)
    assert "ftp://127.0.0.1/cells.zip" in message
    for scheme in ("http://", "https://", "file://"):
        assert scheme in message
