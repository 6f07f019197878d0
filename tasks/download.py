"""Stage download: the archive at `data.url` -> `data/raw/<name>`, verified, written atomically.

Bytes stream into `<name>.part`; `<name>.part.json` records the URL and the validators
(ETag, Last-Modified) the server gave, so an interrupted HTTP or S3 transfer resumes from
there only while the file is provably the same one (If-Range, If-Match), never blindly.
Only a complete (and, when `data.sha256` is set, verified) file is renamed to its final
name. `data/source.json` (an output of its own, outside `data/raw`) records where it came from and
what the source said of it (ETag, Last-Modified, size; a local file's mtime). Each run asks the
source again, cheaply, as `dvc import-url` does, and fetches only when it changed: a scheduled
retrain sees new data published at the same URL, and the same bytes fetched again under new
validators change the record alone, not the folder extract depends on.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import netrc
import os
import re
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.error import HTTPError, URLError
from urllib.parse import unquote, urlparse, urlsplit, urlunsplit
from urllib.request import Request, url2pathname, urlopen

from tasks.archives import NOT_AN_ARCHIVE, completeness_problem
from tasks.errors import StageError
from tasks.files import CHUNK, Progress, retrying, sha256_file, write_json
from tasks.redact import redact
from tasks.params import DataParams, S3Params, url_scheme
from tasks.s3 import MISSING, S3Transient, S3Uri, client, error_code, explain_error, parse_uri

log = logging.getLogger("imgclf")

# Worth another try: the server or the network may recover.
TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}
S3_PART = 8 << 20  # bytes per ranged GET: the unit of resuming
T = TypeVar("T")


class DownloadError(StageError, RuntimeError):
    """The archive could not be fetched or verified; the message names the URL."""


class SourceGone(DownloadError):
    """The source cannot be reached, or no longer holds the file (not: it refuses our credentials)."""


class _Transient(Exception):
    pass


def archive_path(data: DataParams, raw_dir: Path) -> Path:
    """Returns where the archive named by `data.url` lands: `raw_dir/<last path segment>`."""
    url_path = urlparse(data.url).path if url_scheme(data.url) else data.url
    name = Path(unquote(url_path)).name
    # ".." (a URL ending in %2e%2e) would name raw_dir's parent; a name past NAME_MAX cannot be created.
    return raw_dir / (name if name not in ("", ".", "..") and len(name.encode()) <= 200 else "archive")


def download(data: DataParams, raw_dir: Path, record: Path, s3: S3Params = S3Params()) -> Path:
    """Returns the path of the verified archive, fetched unless the source is unchanged since the
    last download, whose source `record` describes."""
    target = archive_path(data, raw_dir)
    fetch = _by_scheme(FETCHERS, data.url)
    if data.sha256 and target.exists():
        if sha256_file(target) == data.sha256:
            # The content is pinned: whatever the source serves now, this is the archive asked for.
            log.info("download: %s matches data.sha256, nothing fetched", target)
            _record_pinned(data, target, record)
            return target
        change = "the archive does not match data.sha256"
    else:
        change, proof = _compare(data, target, record, s3)
        if change is None:
            log.info("download: %s: source unchanged (%s), nothing fetched", target, proof)
            return target
    log.info("download: %s: %s; fetching %s", target, change, redact(data.url))
    part = target.with_name(target.name + ".part")
    raw_dir.mkdir(parents=True, exist_ok=True)
    source = fetch(data, part, s3)
    digest = sha256_file(part)
    if data.sha256 and digest != data.sha256:
        _discard(part)
        raise DownloadError(
            f"{redact(data.url)}: sha256 mismatch: expected {data.sha256} (data.sha256), got {digest}; "
            "the download was discarded (if data.url names another archive than the one pinned, set data.sha256 "
            "to its digest, or empty it to take any)"
        )
    # The old record must not vouch for the new archive if we stop before ours is written.
    record.unlink(missing_ok=True)
    _legacy_record(target).unlink(missing_ok=True)  # a stale one there would vouch for nothing
    os.replace(part, target)
    size = target.stat().st_size
    _write_record(record, data, target, digest, source)
    _part_record(part).unlink(missing_ok=True)
    # Without data.sha256 nothing pins the archive's content: say how to pin it.
    pin = "" if data.sha256 else "; to pin it, set data.sha256 to this digest in params.yaml"
    log.info("download: %s (%d bytes, sha256 %s)%s", target, size, digest, pin)
    return target


def _write_record(record: Path, data: DataParams, target: Path, digest: str, source: dict) -> None:
    write_json(record, {"url": redact(data.url), "archive": target.name, "sha256": digest,
                        "bytes": target.stat().st_size, "etag": source.get("etag"),
                        "last_modified": source.get("last_modified"), "mtime_ns": source.get("mtime_ns")})  # fmt: skip


def _legacy_record(target: Path) -> Path:
    # Where records lay before they left data/raw for data/source.json.
    return target.with_name(target.name + ".source.json")


def _record_pinned(data: DataParams, target: Path, record: Path) -> None:
    """Leaves `record` describing the pinned archive at hand, as DVC expects the stage's output: the record
    an earlier version left in data/raw moves over; without one, a record with what is known here."""
    try:
        kept = json.loads(record.read_text())
    except (OSError, ValueError):
        kept = {}
    if kept.get("sha256") == data.sha256 and kept.get("archive") == target.name and kept.get("url") == redact(data.url):
        return
    legacy = _legacy_record(target)
    try:
        said = json.loads(legacy.read_text())
    except (OSError, ValueError):
        said = {}
    if said.get("url") != redact(data.url) or said.get("bytes") != target.stat().st_size:
        said = {}
    _write_record(record, data, target, data.sha256, said)
    legacy.unlink(missing_ok=True)


def source_change(data: DataParams, raw_dir: Path, record: Path, s3: S3Params = S3Params()) -> str | None:
    """Returns why the source at `data.url` may differ from the archive downloaded from it before
    (one line), or None when it is provably the same one. Asks the source, never for its body:
    HTTP(S) a HEAD (a one-byte GET where HEAD is refused), S3 head_object, a local file its stat.
    Transient failures are retried; a permanent one raises DownloadError."""
    return _compare(data, archive_path(data, raw_dir), record, s3)[0]


# What a source says of itself, as source.json records it, and the names a log gives them.
_VALIDATORS = {"etag": "ETag", "last_modified": "Last-Modified", "mtime_ns": "mtime"}


def _compare(data: DataParams, target: Path, record: Path, s3: S3Params) -> tuple[str | None, str]:
    """Returns (why the source differs from `record`'s, or None; what proved `target` the same)."""
    if not target.exists():
        return "no archive downloaded yet", ""
    try:
        before = json.loads(record.read_text())
    except (OSError, ValueError):
        return "no record of where the archive came from", ""
    if before.get("url") != redact(data.url):
        return "downloaded from another URL", ""
    if before.get("bytes") != target.stat().st_size:
        return f"the archive ({target.stat().st_size} bytes) is not the one recorded ({before.get('bytes')} bytes)", ""
    now = _by_scheme(PROBES, data.url)(data, s3)
    if now["bytes"] is not None and now["bytes"] != before["bytes"]:
        return f"size changed: {before['bytes']} -> {now['bytes']} bytes", ""
    given = [key for key in _VALIDATORS if now.get(key) is not None]
    for key in given:
        if now[key] != before.get(key):
            return f"{_VALIDATORS[key]} changed", ""
    if not given and now["bytes"] is None:
        return "the source gives no ETag, Last-Modified or size: cannot tell; fetched again", ""
    if not given:
        log.warning("download: %s gives no ETag or Last-Modified, only a size: new data of the same size would go "
                    "unseen; set data.sha256 to pin the archive", redact(data.url))  # fmt: skip
    shown = _VALIDATORS | {"bytes": "size"}
    return None, ", ".join(f"{name} {now[key]}" for key, name in shown.items() if now.get(key) is not None)


def _by_scheme(table: dict[str, T], url: str) -> T:
    """Returns `table`'s entry for the scheme of `url`; DownloadError names the schemes it has."""
    if url_scheme(url) not in table:
        supported = ", ".join(f"{s}://" for s in table if s) + ", or a local path"
        raise DownloadError(f"{redact(url)}: unsupported scheme (supported: {supported})")
    return table[url_scheme(url)]


def _local_file(data: DataParams) -> tuple[Path, os.stat_result]:
    """Returns the local source file and its stat; DownloadError when there is none."""
    url = data.url
    source = Path(url2pathname(urlparse(url).path)) if url_scheme(url) == "file" else Path(url)
    if source.is_dir():
        raise DownloadError(f"{redact(url)}: a folder, not an archive: data.url names a zip or tar of the class folders "
                            f"(e.g. `cd {source} && zip -r ../{source.name}.zip .`)")  # fmt: skip
    if not source.is_file():
        where = "" if str(source) == url else f" ({source})"
        raise SourceGone(f"{redact(url)}: no such file{where}")
    return source, source.stat()


def _part_record(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _resumable(part: Path, url: str) -> dict | None:
    """Returns the record of `part`'s source when it may be resumed from `url`: the same URL,
    and a validator (ETag or Last-Modified) that lets the server prove the file is unchanged."""
    try:
        source = json.loads(_part_record(part).read_text())
    except (OSError, ValueError):
        return None
    if part.exists() and source.get("url") == url and (source.get("etag") or source.get("last_modified")):
        return source
    return None


def _restart(part: Path, url: str, etag: str | None, last_modified: str | None, size: int | None) -> dict:
    """Returns the record of a partial download begun afresh: `part` emptied, its source written beside it."""
    part.write_bytes(b"")  # first, so the part never holds bytes its record does not describe
    source = {"url": url, "etag": etag, "last_modified": last_modified, "bytes": size}
    write_json(_part_record(part), source, indent=None)
    return source


def _discard(part: Path) -> None:
    part.unlink(missing_ok=True)
    _part_record(part).unlink(missing_ok=True)


def _fetch_local(data: DataParams, part: Path, s3: S3Params) -> dict:
    # Stat taken before the copy: a file rewritten while we copy it is copied again next run.
    source, stat = _local_file(data)
    if source.resolve() == part.with_name(part.name.removesuffix(".part")).resolve():
        # Copied onto itself, each run would see a new mtime and fetch it again.
        raise DownloadError(f"{redact(data.url)}: is where download puts the archive it fetches: keep the "
                            f"source elsewhere (e.g. data/{source.name}) and point data.url there")  # fmt: skip
    size = stat.st_size
    _restart(part, redact(data.url), None, None, size)  # no validator: a broken copy is never resumed
    progress = Progress(size, f"copy {source.name}", "B", unit_scale=True)
    with open(source, "rb") as reader, open(part, "ab") as writer:
        while chunk := reader.read(CHUNK):
            writer.write(chunk)
            progress.update(len(chunk))
    progress.close()
    _refuse_cut(data, part)
    return {"mtime_ns": stat.st_mtime_ns}


def _refuse_cut(data: DataParams, part: Path) -> None:
    # A copied file or object cut at its source is refused now, not recorded as this stage's output.
    # (An HTTP body is checked as it arrives: whether to try again hangs on it.)
    if problem := completeness_problem(part):
        _discard(part)
        raise DownloadError(f"{redact(data.url)}: {problem}; nothing was kept")


def _probe_local(data: DataParams, s3: S3Params) -> dict:
    stat = _local_file(data)[1]
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _retrying(data: DataParams, transfer: Callable[[], dict]) -> dict:
    attempts = data.retries + 1
    try:
        return retrying(transfer, attempts, data.retry_backoff, _Transient, f"download: {redact(data.url)}")
    except _Transient as exc:
        raise SourceGone(f"{redact(data.url)}: gave up after {attempts} attempts: {exc}") from None


def _fetch_http(data: DataParams, part: Path, s3: S3Params) -> dict:
    return _retrying(data, lambda: _http_transfer(data.url, part, data.timeout))


def _fetch_s3(data: DataParams, part: Path, s3: S3Params) -> dict:
    source = _retrying(data, lambda: _s3_transfer(parse_uri(data.url), part, s3))
    _refuse_cut(data, part)
    return source


def _probe_s3(data: DataParams, s3: S3Params) -> dict:
    uri = parse_uri(data.url)

    def head() -> dict:
        try:
            reply = client(s3).head_object(Bucket=uri.bucket, Key=uri.key)
        except Exception as exc:
            raise _s3_failure(uri, exc) from None
        last_modified = reply["ResponseMetadata"]["HTTPHeaders"].get("last-modified")
        return {"etag": reply["ETag"], "last_modified": last_modified, "bytes": reply["ContentLength"]}

    return _retrying(data, head)


def _s3_failure(uri: S3Uri, exc: Exception) -> Exception:
    """Returns what to raise for a boto3 failure: _Transient (worth another try) or DownloadError."""
    explained = explain_error(uri, exc)
    if isinstance(explained, S3Transient):
        return _Transient(str(explained).removeprefix(f"{uri}: "))  # the log line and the final error name it
    return (SourceGone if error_code(exc) in MISSING else DownloadError)(str(explained))


def _s3_transfer(uri: S3Uri, part: Path, s3: S3Params) -> dict:
    # Ranged GETs of S3_PART bytes appended to the .part file: a broken run resumes where it
    # stopped. If-Match on each GET keeps every range to the object version the part began
    # with. GET, not HEAD, learns the size: a HEAD error has no code to explain it by.
    from botocore.exceptions import ClientError

    try:
        s3_client = client(s3)
        source = _resumable(part, str(uri))
        have = part.stat().st_size if source else 0
        size = progress = None
        while size is None or have < size:
            request = {"Bucket": uri.bucket, "Key": uri.key, "Range": f"bytes={have}-{have + S3_PART - 1}"}
            if source:
                request["IfMatch"] = source["etag"]
            try:
                reply = s3_client.get_object(**request)
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if code in ("PreconditionFailed", "412"):
                    _discard(part)
                    raise _Transient(f"{uri}: the object changed since the partial download; starting over") from None
                if source and code == "InvalidRange":
                    # Past the end of the same version: the part is whole, unless it outgrew the object.
                    if have == source["bytes"]:
                        return source
                    _discard(part)
                    raise _Transient(f"{uri}: the partial download is longer than the object; starting over") from None
                raise
            size = int(reply["ContentRange"].rsplit("/", 1)[1])
            if source is None:
                last_modified = reply["ResponseMetadata"]["HTTPHeaders"].get("last-modified")
                source = _restart(part, str(uri), reply["ETag"], last_modified, size)
            if progress is None:
                progress = Progress(size, f"download {uri.key.rsplit('/', 1)[-1]}", "B", unit_scale=True)
                progress.update(have)
            with open(part, "ab") as writer:
                for chunk in reply["Body"].iter_chunks(CHUNK):
                    writer.write(chunk)
                    progress.update(len(chunk))
            have = part.stat().st_size
        if progress is not None:
            progress.close()
        return source
    except (_Transient, DownloadError):
        raise
    except Exception as exc:
        raise _s3_failure(uri, exc) from None


def _request(url: str, headers: dict[str, str], method: str = "GET") -> Request:
    """Returns the request for `url`, its userinfo (else the netrc entry for its host) sent as basic auth."""
    parts = urlsplit(url)
    user, password = parts.username, parts.password
    if user is None:
        user, password = _netrc_login(parts.hostname or "")
    bare = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    request = Request(bare, headers=headers, method=method)
    if user is not None:
        token = base64.b64encode(f"{unquote(user)}:{unquote(password or '')}".encode()).decode()
        # Unredirected: a redirect to another host must not carry the credentials along.
        request.add_unredirected_header("Authorization", f"Basic {token}")
    return request


def _netrc_login(host: str) -> tuple[str | None, str | None]:
    try:
        found = netrc.netrc(os.environ.get("NETRC")).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return None, None
    return (found[0], found[2]) if found else (None, None)


def _open(url: str, headers: dict, timeout: float, method: str = "GET", passed: tuple = ()) -> http.client.HTTPResponse:
    """Returns the response; an HTTP status in `passed` is raised as HTTPError, other failures
    as _Transient (worth another try) or DownloadError."""
    try:
        return urlopen(_request(url, headers, method), timeout=timeout)
    except HTTPError as exc:
        if exc.code in passed:
            raise
        if exc.code in TRANSIENT_HTTP:
            raise _Transient(f"HTTP {exc.code} {exc.reason}") from None
        failure = SourceGone if exc.code in (404, 410) else DownloadError  # 401, 403: what we sent is refused
        raise failure(f"{redact(url)}: HTTP {exc.code} {exc.reason}") from None
    except (URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        # A certificate or TLS set up wrong: no retry mends it, nor is the source gone. (A handshake cut short,
        # SSLEOFError, is the server's or a balancer's passing trouble: tried again.)
        if isinstance(reason, ssl.SSLError) and not isinstance(reason, ssl.SSLEOFError):
            raise DownloadError(f"{redact(url)}: TLS: {reason}") from None
        raise _Transient(str(reason)) from None


def _probe_http(data: DataParams, s3: S3Params) -> dict:
    return _retrying(data, lambda: _http_head(data.url, data.timeout))


def _http_head(url: str, timeout: float) -> dict:
    """Returns the ETag, Last-Modified and size the server gives for `url`, without its body."""
    headers = {"User-Agent": "imgclf"}
    try:
        # urllib follows a redirect of a HEAD with a GET: its headers serve as well, its body is never read.
        response = _open(url, headers, timeout, "HEAD", passed=(403, 405, 501))
    except HTTPError as refused:
        refused.close()
        # A server that refuses HEAD (a presigned URL signs GET alone: 403): a one-byte GET carries the
        # same headers, or its own refusal.
        response = _open(url, headers | {"Range": "bytes=0-0"}, timeout)
    with response:
        total = re.fullmatch(r"bytes \d+-\d+/(\d+)", response.headers.get("Content-Range", ""))
        # A 206 names the whole size in Content-Range; Content-Length is the size only of a whole (200) reply.
        size = total.group(1) if total else response.headers.get("Content-Length") if response.status == 200 else None
        return {"etag": response.headers.get("ETag"), "last_modified": response.headers.get("Last-Modified"),
                "bytes": int(size) if size else None}  # fmt: skip


def _http_transfer(url: str, part: Path, timeout: float) -> dict:
    shown = redact(url)
    source = _resumable(part, shown)
    have = part.stat().st_size if source else 0
    headers = {"User-Agent": "imgclf"}
    if have:
        # With If-Range the server sends the rest (206) only if the file is still the one the
        # part began with, and the whole new file (200) otherwise.
        headers["Range"] = f"bytes={have}-"
        headers["If-Range"] = source.get("etag") or source["last_modified"]
    try:
        response = _open(url, headers, timeout, passed=(416,) if have else ())
    except HTTPError as exc:  # 416: the part may already hold every byte
        _check_part_complete(exc, have, part)
        _refuse_broken_body(part, shown, have, exc.headers)  # an earlier run may have stopped while checking it
        return source
    with response:
        length = response.headers.get("Content-Length")
        start, whole = _content_range(response) if response.status == 206 else (0, None)
        if response.status == 206 and start != have:
            # A part that does not continue the bytes held (or names no range): it cannot be placed.
            _discard(part)
            raise _Transient(f"the server sent a part from byte {start} (Content-Range "
                             f"{response.headers.get('Content-Range')!r}), not from {have}; starting over")  # fmt: skip
        resumed = have and response.status == 206
        if resumed and any(response.headers.get(header, source.get(key)) != source.get(key)
                           for key, header in (("etag", "ETag"), ("last_modified", "Last-Modified"))):  # fmt: skip
            # A server that ignores If-Range but names another version: the rest is from another file.
            _discard(part)
            raise _Transient("the remote file changed since the partial download; starting over")
        have = have if resumed else 0
        # A 206's Content-Range names the whole size: the part sent may end before it.
        total = whole or (have + int(length) if length is not None else None)
        if not resumed:
            etag, last_modified = response.headers.get("ETag"), response.headers.get("Last-Modified")
            source = _restart(part, shown, etag, last_modified, total)
        progress = Progress(total, f"download {part.name.removesuffix('.part')}", "B", unit_scale=True)
        progress.update(have)
        try:
            with open(part, "ab") as writer:
                while chunk := response.read(CHUNK):
                    writer.write(chunk)
                    progress.update(len(chunk))
        except (OSError, http.client.HTTPException) as exc:
            raise _Transient(f"connection broke after {part.stat().st_size} bytes ({exc!r})") from None
        finally:
            progress.close()
    if total is not None and part.stat().st_size < total:
        raise _Transient(f"connection closed after {part.stat().st_size} of {total} bytes")
    _refuse_broken_body(part, shown, total, response.headers)
    return source


def _refuse_broken_body(part: Path, shown: str, total: int | None, headers) -> None:
    # A length only says the bytes arrived; a server's error page, or a body it compressed unasked,
    # arrives whole too. Without a length, only the archive's own structure tells whole from cut short.
    problem = completeness_problem(part)
    if problem:
        got = part.stat().st_size
        with open(part, "rb") as handle:
            head = handle.read(32)
        _discard(part)
        if problem == NOT_AN_ARCHIVE:  # what the server sent instead, an error page perhaps
            sent = ", ".join(f"{name} {headers[name]}" for name in ("Content-Type", "Content-Encoding")
                             if headers and headers.get(name))  # fmt: skip
            problem = f"{problem}: {got} bytes{', ' if sent else ''}{sent}, starting {head!r}"
        if total is not None:  # every byte announced came: the file at the source is so, and another try fetches it again
            raise DownloadError(f"{shown}: every byte the server announced came, and they are no whole archive: "
                                f"{problem}; it was discarded")  # fmt: skip
        raise _Transient(f"the body (no Content-Length) ended after {got} bytes: {problem}")


def _content_range(response: http.client.HTTPResponse) -> tuple[int | None, int | None]:
    """Returns a 206's first byte and the whole file's size, as its Content-Range names them (None: not named)."""
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", "").strip())
    if not match:
        return None, None
    return int(match.group(1)), int(match.group(2)) if match.group(2) != "*" else None


def _check_part_complete(exc: HTTPError, have: int, part: Path) -> None:
    # 416 on a resume whose If-Range held: the part already holds every byte, unless the remote file shrank.
    match = re.match(r"bytes \*/(\d+)", exc.headers.get("Content-Range", "") if exc.headers else "")
    if match and int(match.group(1)) == have:
        return
    _discard(part)
    raise _Transient("the remote file changed since the partial download; starting over")


FETCHERS: dict[str, Callable[[DataParams, Path, S3Params], dict]] = {
    "http": _fetch_http,
    "https": _fetch_http,
    "s3": _fetch_s3,
    "file": _fetch_local,
    "": _fetch_local,
}
# What each source says of itself now: {"etag", "last_modified", "bytes"} or {"bytes", "mtime_ns"}.
PROBES: dict[str, Callable[[DataParams, S3Params], dict]] = {
    "http": _probe_http,
    "https": _probe_http,
    "s3": _probe_s3,
    "file": _probe_local,
    "": _probe_local,
}
