"""S3 access shared by download (s3:// sources) and publish: clients, URIs, and errors in one line.

Credentials come from boto3's standard chain (environment, shared profile, instance or
task role); `s3.endpoint_url` (or AWS_ENDPOINT_URL) points at an S3-compatible store. No
message here ever carries a credential: errors are rebuilt from the AWS error code alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tasks.errors import StageError
from tasks.params import S3Params


class S3Error(StageError):
    """An S3 request failed for a reason retrying will not fix; the message names the URI."""


class S3Transient(Exception):
    """An S3 request failed for a reason that may pass (network, throttling, 5xx)."""


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.key else f"s3://{self.bucket}"

    def child(self, *parts: str) -> S3Uri:
        return S3Uri(self.bucket, "/".join(p.strip("/") for p in (self.key, *parts) if p.strip("/")))


def parse_uri(uri: str) -> S3Uri:
    """Returns bucket and key of `s3://bucket/key` (the key may be empty: a bucket or prefix)."""
    # Not urlparse: S3 keys may hold `#` and `?`, which it would take for a fragment and a query.
    scheme, separator, rest = uri.partition("://")
    bucket, _, key = rest.partition("/")
    if scheme != "s3" or not separator or not bucket:
        raise S3Error(f"{uri}: not an s3://bucket/key URI")
    return S3Uri(bucket, key.lstrip("/"))


def client(params: S3Params):
    """Returns a boto3 S3 client for the configured endpoint, with boto3's credential chain."""
    import boto3
    from botocore.config import Config

    endpoint = params.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    # Retries here are ours (explain_error sorts transient from permanent), so botocore's are few.
    # A pool for publish's parallel transfers of the reference set (botocore keeps 10 by default).
    config = Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=10, read_timeout=60,
                    max_pool_connections=32)  # fmt: skip
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=params.region, config=config)


# The codes S3 (and MinIO, Ceph...) answer for a key, or a bucket, that is not there.
MISSING_KEY = frozenset({"NoSuchKey", "404", "NotFound"})
MISSING = MISSING_KEY | {"NoSuchBucket"}


def error_code(exc: BaseException) -> str:
    """Returns the S3 error code of a botocore ClientError ('' for any other failure)."""
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


# AWS error code -> what it means for the user.
_PERMANENT = {
    "NoSuchBucket": "no such bucket",
    "NoSuchKey": "no such key",
    "404": "no such key",
    "NotFound": "not found",
    "AccessDenied": "access denied (the credentials lack permission)",
    "403": "access denied (the credentials lack permission)",
    "AllAccessDisabled": "access denied",
    "InvalidAccessKeyId": "bad credentials (unknown access key id)",
    "SignatureDoesNotMatch": "bad credentials (the secret does not match the access key id)",
    "InvalidToken": "bad credentials (invalid session token)",
    "ExpiredToken": "bad credentials (expired session token)",
    "InvalidBucketName": "invalid bucket name",
}
# ConditionalRequestConflict (409): another conditional write to the key was in flight; AWS asks for a retry.
_TRANSIENT = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "500", "502", "503", "504", "Throttling",
              "ConditionalRequestConflict"}  # fmt: skip


def explain_error(uri: S3Uri | str, exc: BaseException) -> Exception:
    """Returns the exception to raise for a boto3/botocore failure: S3Error (one line) or S3Transient."""
    from botocore.exceptions import ClientError, EndpointConnectionError, HTTPClientError, IncompleteReadError
    from botocore.exceptions import ConnectionError as BotocoreConnectionError
    from botocore.exceptions import NoCredentialsError, PartialCredentialsError, ProxyConnectionError, SSLError

    if isinstance(exc, ClientError):
        code = error_code(exc)
        if code in _TRANSIENT:
            return S3Transient(f"{uri}: {code}")
        meaning = _PERMANENT.get(code) or f"S3 error {code or 'unknown'}"
        return S3Error(f"{uri}: {meaning}")
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return S3Error(f"{uri}: no AWS credentials found (environment, shared profile or instance/task role)")
    if isinstance(exc, EndpointConnectionError):
        return S3Transient(f"{uri}: cannot reach the S3 endpoint")
    if isinstance(exc, (SSLError, ProxyConnectionError)):  # a certificate or proxy set up wrong: no retry mends it
        return S3Error(f"{uri}: {type(exc).__name__}: {exc}")
    # botocore's own ConnectionError (a connect timeout), HTTPClientError (closed, read timeout, a body
    # cut mid-stream), a body shorter than its length: all may pass.
    broken = (BotocoreConnectionError, HTTPClientError, IncompleteReadError, ConnectionError, TimeoutError)
    if isinstance(exc, broken):
        return S3Transient(f"{uri}: connection broke ({type(exc).__name__})")
    # boto3's transfer errors (S3UploadFailedError) wrap the ClientError that says why.
    wrapped = exc.__cause__ or exc.__context__
    if isinstance(wrapped, ClientError):
        return explain_error(uri, wrapped)
    return S3Error(f"{uri}: {type(exc).__name__}")
