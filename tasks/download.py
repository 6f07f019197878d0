"""Stage download: the archive at `data.url` -> `data/raw/<name>`, verified, written atomically.

Bytes stream into `<name>.part`; `<name>.part.json` records the URL and the validators
(ETag, Last-Modified) the server gave, so an interrupted HTTP or S3 transfer resumes from
there only while the file is provably the same one (If-Range, If-Match), never blindly.
Only a complete (and, when `data.sha256` is set, verified) file is renamed to its final
name. A `<name>.source.json` beside it records where it came from, so a re-run with the same
URL fetches nothing.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import netrc
import os
import re
from collections.abc import Callable
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import unquote, urlparse, urlsplit, urlunsplit
from urllib.request import Request, url2pathname, urlopen

from tasks.archives import completeness_problem
from tasks.errors import StageError
from tasks.files import CHUNK, Progress, atomic_file, retrying, sha256_file
from tasks.redact import redact
from tasks.params import DataParams, S3Params, url_scheme
from tasks.s3 import S3Transient, S3Uri, client, explain_error, parse_uri

log = logging.getLogger("imgclf")

# Worth another try: the server or the network may recover.
TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}
S3_PART = 8 << 20  # bytes per ranged GET: the unit of resuming


class DownloadError(StageError, RuntimeError):
    """The archive could not be fetched or verified; the message names the URL."""


class _Transient(Exception):
    pass


def archive_path(data: DataParams, raw_dir: Path) -> Path:
    """Returns where the archive named by `data.url` lands: `raw_dir/<last path segment>`."""
    url_path = urlparse(data.url).path if url_scheme(data.url) else data.url
    name = Path(unquote(url_path)).name
    # ".." (a URL ending in %2e%2e) would name raw_dir's parent; a name past NAME_MAX cannot be created.
    return raw_dir / (name if name not in ("", ".", "..") and len(name.encode()) <= 200 else "archive")


def download(data: DataParams, raw_dir: Path, s3: S3Params = S3Params()) -> Path:
    """Returns the path of the verified archive, fetching it unless it is already there."""
    target = archive_path(data, raw_dir)
    record = target.with_name(target.name + ".source.json")
    if _already_there(data, target, record):
        log.info("download: %s already there, nothing fetched", target)
        return target
    fetch = FETCHERS.get(url_scheme(data.url))
    if fetch is None:
        supported = ", ".join(f"{s}://" for s in FETCHERS if s) + ", or a local path"
        raise DownloadError(f"{redact(data.url)}: unsupported scheme (supported: {supported})")
    part = target.with_name(target.name + ".part")
    raw_dir.mkdir(parents=True, exist_ok=True)
    source = fetch(data, part, s3)
    digest = sha256_file(part)
    if data.sha256 and digest != data.sha256:
        _discard(part)
        raise DownloadError(
            f"{redact(data.url)}: sha256 mismatch: expected {data.sha256} (data.sha256), got {digest}; "
            "the download was discarded"
        )
    # A record left from another URL must not vouch for the new archive if we stop before ours is written.
    record.unlink(missing_ok=True)
    os.replace(part, target)
    size = target.stat().st_size
    with atomic_file(record) as handle:
        json.dump({"url": redact(data.url), "sha256": digest, "bytes": size, "etag": source.get("etag"),
                   "last_modified": source.get("last_modified")}, handle, indent=2)  # fmt: skip
    _part_record(part).unlink(missing_ok=True)
    log.info("download: %s (%d bytes, sha256 %s)", target, size, digest)
    if not data.sha256:
        log.info("download: nothing to verify against; to pin this archive, set data.sha256: %s in params.yaml", digest)
    return target


def _already_there(data: DataParams, target: Path, record: Path) -> bool:
    if not target.exists():
        return False
    if data.sha256:
        return sha256_file(target) == data.sha256
    try:
        source = json.loads(record.read_text())
    except (OSError, ValueError):
        return False
    return source.get("url") == redact(data.url) and source.get("bytes") == target.stat().st_size


def _local_source(url: str) -> Path:
    if url_scheme(url) == "file":
        return Path(url2pathname(urlparse(url).path))
    return Path(url)


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
    with atomic_file(_part_record(part)) as handle:
        json.dump(source, handle)
    return source


def _discard(part: Path) -> None:
    part.unlink(missing_ok=True)
    _part_record(part).unlink(missing_ok=True)


def _fetch_local(data: DataParams, part: Path, s3: S3Params) -> dict:
    source = _local_source(data.url)
    if not source.is_file():
        raise DownloadError(f"{redact(data.url)}: no such file ({source})")
    size = source.stat().st_size
    _restart(part, redact(data.url), None, None, size)  # no validator: a broken copy is never resumed
    progress = Progress(size, f"copy {source.name}", "B", unit_scale=True)
    with open(source, "rb") as reader, open(part, "ab") as writer:
        while chunk := reader.read(CHUNK):
            writer.write(chunk)
            progress.update(len(chunk))
    progress.close()
    return {}


def _retrying(data: DataParams, transfer: Callable[[], dict]) -> dict:
    attempts = data.retries + 1
    try:
        return retrying(transfer, attempts, data.retry_backoff, _Transient, f"download: {redact(data.url)}")
    except _Transient as exc:
        raise DownloadError(f"{redact(data.url)}: gave up after {attempts} attempts: {exc}") from None


def _fetch_http(data: DataParams, part: Path, s3: S3Params) -> dict:
    return _retrying(data, lambda: _http_transfer(data.url, part, data.timeout))


def _fetch_s3(data: DataParams, part: Path, s3: S3Params) -> dict:
    return _retrying(data, lambda: _s3_transfer(parse_uri(data.url), part, s3))


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
        explained = explain_error(uri, exc)
        if isinstance(explained, S3Transient):
            raise _Transient(str(explained)) from None
        raise DownloadError(str(explained)) from None


def _request(url: str, headers: dict[str, str]) -> Request:
    """Returns the GET request for `url`, its userinfo (else the netrc entry for its host) sent as basic auth."""
    parts = urlsplit(url)
    user, password = parts.username, parts.password
    if user is None:
        user, password = _netrc_login(parts.hostname or "")
    request = Request(urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])), headers=headers)
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
        response = urlopen(_request(url, headers), timeout=timeout)
    except HTTPError as exc:
        if exc.code == 416 and have:
            _check_part_complete(exc, have, part)
            return source
        if exc.code in TRANSIENT_HTTP:
            raise _Transient(f"HTTP {exc.code} {exc.reason}") from None
        raise DownloadError(f"{shown}: HTTP {exc.code} {exc.reason}") from None
    except (URLError, OSError) as exc:
        raise _Transient(str(getattr(exc, "reason", exc))) from None
    with response:
        length = response.headers.get("Content-Length")
        resumed = have and response.status == 206 and _range_start(response) == have
        if resumed and response.headers.get("ETag", source.get("etag")) != source.get("etag"):
            # A server that ignores If-Range but names another version: the rest is from another file.
            _discard(part)
            raise _Transient("the remote file changed since the partial download; starting over")
        if not resumed:
            have = 0
            etag, last_modified = response.headers.get("ETag"), response.headers.get("Last-Modified")
            source = _restart(part, shown, etag, last_modified, int(length) if length is not None else None)
        total = have + int(length) if length is not None else None
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
    if total is None:
        # No length to check against: only the archive's own structure tells whole from cut short.
        problem = completeness_problem(part)
        if problem:
            got = part.stat().st_size
            _discard(part)
            raise _Transient(f"the body (no Content-Length) ended after {got} bytes: {' '.join(problem.split())}")
    elif part.stat().st_size < total:
        raise _Transient(f"connection closed after {part.stat().st_size} of {total} bytes")
    return source


def _range_start(response: http.client.HTTPResponse) -> int | None:
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


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
