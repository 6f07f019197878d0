"""Stage download: the archive at `data.url` -> `data/raw/<name>`, verified, written atomically.

Bytes stream into `<name>.part`; an interrupted HTTP or S3 transfer resumes from there
with a Range request. Only a complete (and, when `data.sha256` is set, verified) file is renamed to
its final name. A `<name>.source.json` beside it records where it came from, so a re-run
with the same URL fetches nothing.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import unquote, urlparse
from urllib.request import Request, url2pathname, urlopen

from tasks.errors import StageError
from tasks.files import CHUNK, Progress, atomic_file, retrying, sha256_file
from tasks.params import DataParams, S3Params
from tasks.s3 import S3Transient, S3Uri, client, explain_error, parse_uri

log = logging.getLogger("imgclf")

# Worth another try: the server or the network may recover.
TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}
S3_PART = 8 << 20  # bytes per ranged GET: the unit of resuming


class DownloadError(StageError, RuntimeError):
    """The archive could not be fetched or verified; the message names the URL."""


class _Transient(Exception):
    pass


def _scheme(url: str) -> str:
    scheme = urlparse(url).scheme.lower()
    # A Windows drive letter ("C:\\data.zip") parses as a one-letter scheme.
    return "" if len(scheme) == 1 else scheme


def archive_path(data: DataParams, raw_dir: Path) -> Path:
    """Returns where the archive named by `data.url` lands: `raw_dir/<last path segment>`."""
    url_path = urlparse(data.url).path if _scheme(data.url) else data.url
    name = Path(unquote(url_path)).name
    return raw_dir / (name or "archive")


def download(data: DataParams, raw_dir: Path, s3: S3Params = S3Params()) -> Path:
    """Returns the path of the verified archive, fetching it unless it is already there."""
    target = archive_path(data, raw_dir)
    record = target.with_name(target.name + ".source.json")
    if _already_there(data, target, record):
        log.info("download: %s already there, nothing fetched", target)
        return target
    fetch = FETCHERS.get(_scheme(data.url))
    if fetch is None:
        supported = ", ".join(f"{s}://" for s in FETCHERS if s) + ", or a local path"
        raise DownloadError(f"{data.url}: unsupported scheme (supported: {supported})")
    part = target.with_name(target.name + ".part")
    raw_dir.mkdir(parents=True, exist_ok=True)
    fetch(data, part, s3)
    digest = sha256_file(part)
    if data.sha256 and digest != data.sha256:
        part.unlink()
        raise DownloadError(
            f"{data.url}: sha256 mismatch: expected {data.sha256} (data.sha256), got {digest}; "
            "the download was discarded"
        )
    os.replace(part, target)
    with atomic_file(record) as handle:
        json.dump({"url": data.url, "sha256": digest, "bytes": target.stat().st_size}, handle, indent=2)
    log.info("download: %s (%d bytes, sha256 %s)", target, target.stat().st_size, digest)
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
    return source.get("url") == data.url and source.get("bytes") == target.stat().st_size


def _local_source(url: str) -> Path:
    if _scheme(url) == "file":
        return Path(url2pathname(urlparse(url).path))
    return Path(url)


def _fetch_local(data: DataParams, part: Path, s3: S3Params) -> None:
    source = _local_source(data.url)
    if not source.is_file():
        raise DownloadError(f"{data.url}: no such file ({source})")
    progress = Progress(source.stat().st_size, f"copy {source.name}", "B", unit_scale=True)
    with open(source, "rb") as reader, open(part, "wb") as writer:
        while chunk := reader.read(CHUNK):
            writer.write(chunk)
            progress.update(len(chunk))
    progress.close()


def _retrying(data: DataParams, transfer: Callable[[], None]) -> None:
    attempts = data.retries + 1
    try:
        retrying(transfer, attempts, data.retry_backoff, _Transient, f"download: {data.url}")
    except _Transient as exc:
        raise DownloadError(f"{data.url}: gave up after {attempts} attempts: {exc}") from None


def _fetch_http(data: DataParams, part: Path, s3: S3Params) -> None:
    _retrying(data, lambda: _http_transfer(data.url, part, data.timeout))


def _fetch_s3(data: DataParams, part: Path, s3: S3Params) -> None:
    _retrying(data, lambda: _s3_transfer(parse_uri(data.url), part, s3))


def _s3_transfer(uri: S3Uri, part: Path, s3: S3Params) -> None:
    # Ranged GETs of S3_PART bytes appended to the .part file: a broken run resumes where it
    # stopped. GET, not HEAD, learns the size: a HEAD error has no code to explain it by.
    from botocore.exceptions import ClientError

    try:
        s3_client = client(s3)
        have = part.stat().st_size if part.exists() else 0
        size = None
        progress = None
        with open(part, "ab") as writer:
            while size is None or have < size:
                try:
                    reply = s3_client.get_object(Bucket=uri.bucket, Key=uri.key, Range=f"bytes={have}-{have + S3_PART - 1}")
                except ClientError as exc:
                    if have and exc.response.get("Error", {}).get("Code") == "InvalidRange":
                        # Past the end: the part is complete, unless the object changed.
                        total = _s3_size(s3_client, uri)
                        if total == have:
                            return
                        part.unlink()
                        raise _Transient(f"{uri}: the object changed since the partial download; starting over") from None
                    raise
                size = int(reply["ContentRange"].rsplit("/", 1)[1])
                if progress is None:
                    progress = Progress(size, f"download {uri.key.rsplit('/', 1)[-1]}", "B", unit_scale=True)
                    progress.update(have)
                for chunk in reply["Body"].iter_chunks(CHUNK):
                    writer.write(chunk)
                    progress.update(len(chunk))
                writer.flush()
                have = part.stat().st_size
        if progress is not None:
            progress.close()
    except (_Transient, DownloadError):
        raise
    except Exception as exc:
        explained = explain_error(uri, exc)
        if isinstance(explained, S3Transient):
            raise _Transient(str(explained)) from None
        raise DownloadError(str(explained)) from None


def _s3_size(s3_client, uri: S3Uri) -> int:
    return int(s3_client.get_object(Bucket=uri.bucket, Key=uri.key, Range="bytes=0-0")["ContentRange"].rsplit("/", 1)[1])


def _http_transfer(url: str, part: Path, timeout: float) -> None:
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "imgclf"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urlopen(Request(url, headers=headers), timeout=timeout)
    except HTTPError as exc:
        if exc.code == 416 and have:
            _check_part_complete(exc, have, part)
            return
        if exc.code in TRANSIENT_HTTP:
            raise _Transient(f"HTTP {exc.code} {exc.reason}") from None
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (URLError, OSError) as exc:
        raise _Transient(str(getattr(exc, "reason", exc))) from None
    with response:
        resumed = have > 0 and response.status == 206 and _range_start(response) == have
        if not resumed:
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        progress = Progress(total, f"download {part.name.removesuffix('.part')}", "B", unit_scale=True)
        progress.update(have)
        try:
            with open(part, "ab" if resumed else "wb") as writer:
                while chunk := response.read(CHUNK):
                    writer.write(chunk)
                    progress.update(len(chunk))
        except (OSError, http.client.HTTPException) as exc:
            raise _Transient(f"connection broke after {part.stat().st_size} bytes ({exc!r})") from None
        finally:
            progress.close()
    if total is not None and part.stat().st_size < total:
        raise _Transient(f"connection closed after {part.stat().st_size} of {total} bytes")


def _range_start(response: http.client.HTTPResponse) -> int | None:
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _check_part_complete(exc: HTTPError, have: int, part: Path) -> None:
    # 416 on a resume: the part already holds every byte, unless the remote file shrank.
    match = re.match(r"bytes \*/(\d+)", exc.headers.get("Content-Range", "") if exc.headers else "")
    if match and int(match.group(1)) == have:
        return
    part.unlink()
    raise _Transient("the remote file changed since the partial download; starting over")


FETCHERS: dict[str, Callable[[DataParams, Path, S3Params], None]] = {
    "http": _fetch_http,
    "https": _fetch_http,
    "s3": _fetch_s3,
    "file": _fetch_local,
    "": _fetch_local,
}
