"""Where published runs and the champion pointer live: an S3 prefix, or a local folder laid out alike.

    <store>/runs/<run-id>/...    each published run: model, metrics, plots, report (and, for a
                                 promoted run, its reference set)
    <store>/latest.json          the champion: the run the next challenger is gated against

`latest.json` only moves by `replace_if`: a compare-and-swap against the version the gate
read. On S3 that is a conditional PutObject (If-Match on the ETag; If-None-Match: * for the
first champion), decided by S3 itself. In a local folder it is an exclusive `flock` on a lock
file, a re-read of `latest.json` under it, and an atomic rename. Two publishes that gated
against the same champion: exactly one moves the pointer.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mimetypes
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from tasks.errors import StageError
from tasks.files import atomic_file, atomic_path, retrying
from tasks.layout import BACKUP_FOLDER, Layout, output_holding
from tasks.params import PublishParams, S3Params
from tasks.s3 import MISSING_KEY, S3Error, S3Transient, S3Uri, client, error_code, explain_error, parse_uri

LATEST = "latest.json"
ATTEMPTS = 4
# S3 says the condition did not hold. (A 409 ConditionalRequestConflict, another conditional write
# in flight, is retried as transient: the retry then meets that write's ETag, or none.)
_PRECONDITION_FAILED = {"PreconditionFailed", "412"}


class StoreError(StageError):
    """A stored object is missing or unreadable; the message names it."""


def _inside(name: str) -> str:
    # Names come from latest.json and a reference labels.csv, which whoever can write the store wrote.
    if name.startswith("/") or any(part in ("", ".", "..") for part in name.split("/")) or "\0" in name:
        raise StoreError(f"{name!r}: not a name inside the store")
    return name


class Store(Protocol):
    """Published runs and the champion pointer; names are relative to the store's root, `/`-separated."""

    def where(self, name: str) -> str:
        """Returns the full address of `name` (an s3:// URI or a local path), for messages and records."""

    def put(self, path: Path, name: str) -> str:
        """Stores the file at `path` as `name`; returns its key (what latest.json lists)."""

    def get(self, name: str, scratch: Path) -> Path:
        """Returns a local path holding `name`: the stored file itself, or a copy fetched into `scratch`."""

    def read(self, name: str) -> tuple[bytes, str] | None:
        """Returns the bytes of `name` and a tag of that version, or None when there is no such object."""

    def replace_if(self, name: str, body: bytes, expected: str | None) -> bool:
        """Writes `body` as `name` only if its version is still `expected` (None: only if it does not exist
        yet); returns whether it wrote."""


class S3Store:
    """A store under an s3://bucket/prefix; the version tag of an object is its ETag."""

    def __init__(self, base: S3Uri, s3: S3Params):
        self.base = base
        self.client = client(s3)

    def where(self, name: str) -> str:
        return str(self.base.child(name))

    def _call(self, name: str, call):
        uri = self.base.child(name)

        def explained_call():
            try:
                return call(uri)
            except Exception as exc:
                raise explain_error(uri, exc) from None

        try:
            return retrying(explained_call, ATTEMPTS, 0.5, S3Transient, f"publish: {uri}")
        except S3Transient as exc:
            raise S3Error(f"{exc} (gave up after {ATTEMPTS} attempts)") from None

    def put(self, path: Path, name: str) -> str:
        # boto3 stores every upload as binary/octet-stream; a browser then downloads the published
        # report instead of showing it.
        kind = mimetypes.guess_type(name)[0]
        extra = {"ContentType": kind} if kind else None
        self._call(name, lambda uri: self.client.upload_file(str(path), uri.bucket, uri.key, ExtraArgs=extra))
        return self.base.child(name).key

    def get(self, name: str, scratch: Path) -> Path:
        local = scratch / _inside(name)
        local.parent.mkdir(parents=True, exist_ok=True)
        self._call(name, lambda uri: self.client.download_file(uri.bucket, uri.key, str(local)))
        return local

    def read(self, name: str) -> tuple[bytes, str] | None:
        from botocore.exceptions import ClientError

        def get_object(uri: S3Uri):
            try:
                answer = self.client.get_object(Bucket=uri.bucket, Key=uri.key)
            except ClientError as exc:
                if error_code(exc) in MISSING_KEY:
                    return None
                raise
            return answer["Body"].read(), answer["ETag"]

        return self._call(name, get_object)

    def replace_if(self, name: str, body: bytes, expected: str | None) -> bool:
        from botocore.exceptions import ClientError

        condition = {"IfMatch": expected} if expected else {"IfNoneMatch": "*"}

        def put_object(uri: S3Uri) -> bool:
            try:
                self.client.put_object(Bucket=uri.bucket, Key=uri.key, Body=body, ContentType="application/json",
                                       **condition)  # fmt: skip
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code", "")) in _PRECONDITION_FAILED:
                    return False
                raise
            return True

        if self._call(name, put_object):
            return True
        # A retried write whose first attempt landed (the answer lost on the way) fails its own
        # condition: the pointer then already holds these very bytes.
        current = self.read(name)
        return current is not None and current[0] == body


class LocalStore:
    """A store in a local folder; the version tag of a file is its sha256."""

    def __init__(self, root: Path):
        self.root = root

    def where(self, name: str) -> str:
        return str(self.root / name)

    @contextlib.contextmanager
    def _explained(self, name: str, doing: str) -> Iterator[None]:
        # A folder where a file goes, a file where the store's folder goes, no permission, a full disk: one line.
        try:
            yield
        except OSError as exc:
            raise StoreError(f"{self.root / name}: cannot be {doing} ({exc.strerror or exc})") from None

    def put(self, path: Path, name: str) -> str:
        with self._explained(name, "written"), atomic_path(self.root / name) as temp:
            shutil.copyfile(path, temp)
        return name

    def get(self, name: str, scratch: Path) -> Path:
        path = self.root / _inside(name)
        if not path.is_file():
            raise StoreError(f"{path}: no such file")
        return path

    def read(self, name: str) -> tuple[bytes, str] | None:
        with self._explained(name, "read"):
            try:
                body = (self.root / name).read_bytes()
            except FileNotFoundError:
                return None
        return body, hashlib.sha256(body).hexdigest()

    def replace_if(self, name: str, body: bytes, expected: str | None) -> bool:
        with self._explained(name, "written"):
            return self._replace_if(name, body, expected)

    def _replace_if(self, name: str, body: bytes, expected: str | None) -> bool:
        self.root.mkdir(parents=True, exist_ok=True)
        # flock, not a lock file made with O_EXCL: the kernel lets go when a killed run's process
        # dies, so no stale lock ever blocks the next publish. Held for a read and a rename only.
        descriptor = os.open(self.root / f".{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            current = self.read(name)
            if (current[1] if current else None) != expected:
                return False
            with atomic_file(self.root / name, "wb") as handle:
                handle.write(body)
            return True
        finally:
            os.close(descriptor)  # releases the lock


_NAME_ANOTHER = "name a folder of its own (default models/champion)"


def check_store_folder(params: PublishParams, root: Path) -> None:
    """Refuses a `publish.local_dir` (with `publish.s3_uri` empty) that is the project's own folder,
    whose root the store's runs/ and latest.json would share, or lies in an output of dvc.yaml,
    which DVC deletes before its stage re-runs (and the stage replaces whole), or in a folder the
    pipeline empties or the tools keep for themselves: the champion would go with it."""
    from tasks.rows import staging_dir

    if params.s3_uri:
        return
    folder = (root / params.local_dir).resolve()
    if folder == root.resolve():
        raise StoreError(f"publish.local_dir: {params.local_dir or repr('')} is the project's own folder; {_NAME_ANOTHER}")
    if holder := output_holding(root, folder):
        stage, output = holder
        raise StoreError(f"publish.local_dir: {params.local_dir} lies in {output}, an output of dvc.yaml's stage "
                         f"{stage}: DVC deletes it before that stage re-runs, and the champion store with it")  # fmt: skip
    layout = Layout(root)
    for scratch, what in ((staging_dir(layout.cache_dir), "validate's rows for the cache stage, which empties it"),
                          (layout.model_dir / BACKUP_FOLDER, "train's backup, removed when training ends"),
                          (layout.own_dir, "imgclf's own run files")):  # fmt: skip
        if folder.is_relative_to(scratch.resolve()):
            raise StoreError(f"publish.local_dir: {params.local_dir} lies in {scratch.relative_to(root)}, {what}: "
                             f"the champion store would go with it; {_NAME_ANOTHER}")
    # The project's or any repository's above it (a DVC project in a subfolder of a git repository).
    if tool := next((part for part in folder.parts if part in (".git", ".dvc")), None):
        raise StoreError(f"publish.local_dir: {params.local_dir} lies in a {tool} folder, kept by {tool[1:]} for "
                         f"itself; {_NAME_ANOTHER}")


def open_store(params: PublishParams, s3: S3Params, root: Path) -> Store:
    """Returns the store `publish.s3_uri` names, or with it empty the folder `publish.local_dir` (below `root`
    unless absolute)."""
    if params.s3_uri:
        return S3Store(parse_uri(params.s3_uri), s3)
    return LocalStore(root / params.local_dir)
