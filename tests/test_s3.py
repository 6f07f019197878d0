"""S3 against moto's standalone server on 127.0.0.1: download, publish, DVC remote, errors, no leaked secrets."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import yaml

from tasks.download import DownloadError, download
from tasks.layout import Layout
from tasks.params import DataParams, PublishParams, S3Params
from tasks.publish import publish
from tasks.s3 import S3Error
from tests.conftest import REPO, free_port, sh

ACCESS_KEY = "AKIAIMGCLFTESTKEY01"
SECRET = "imgclf-test-secret-4f9c1e7ab2d84c"
REGION = "us-east-1"


def start_moto(env: dict) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, endpoint
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise AssertionError("moto server did not start")


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    """moto's S3 server on loopback; the test credentials in the environment, nothing else of AWS."""
    home = tmp_path_factory.mktemp("aws")
    env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": REGION,
           "AWS_CONFIG_FILE": str(home / "config"), "AWS_SHARED_CREDENTIALS_FILE": str(home / "credentials")}  # fmt: skip
    server, endpoint = start_moto(os.environ | env)
    saved = {key: os.environ.get(key) for key in [*env, "AWS_ENDPOINT_URL"]}
    os.environ.update(env | {"AWS_ENDPOINT_URL": endpoint})
    try:
        yield endpoint
    finally:
        server.terminate()
        server.wait()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def bucket(moto, request) -> str:
    name = "imgclf-" + request.node.name.replace("_", "-")[:40].lower().strip("-")
    boto3.client("s3", endpoint_url=moto, region_name=REGION).create_bucket(Bucket=name)
    return name


def s3c(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name=REGION)


def quick(url: str, **more) -> DataParams:
    return DataParams(url=url, retries=2, retry_backoff=0.01, **more)


def test_download_from_s3_verifies_the_checksum(moto, bucket, demo_zip, tmp_path):
    s3c(moto).upload_file(str(demo_zip), bucket, "sets/cells.zip")
    import hashlib

    digest = hashlib.sha256(demo_zip.read_bytes()).hexdigest()
    got = download(quick(f"s3://{bucket}/sets/cells.zip", sha256=digest), tmp_path / "raw", S3Params(endpoint_url=moto))
    assert got == tmp_path / "raw" / "cells.zip" and got.read_bytes() == demo_zip.read_bytes()
    assert not (tmp_path / "raw" / "cells.zip.part").exists()


def test_s3_download_resumes_from_the_part_file(moto, bucket, tmp_path):
    payload = os.urandom(300_000)
    s3c(moto).put_object(Bucket=bucket, Key="a.zip", Body=payload)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.zip.part").write_bytes(payload[:123_457])
    assert download(quick(f"s3://{bucket}/a.zip"), raw).read_bytes() == payload
    # The bytes already there are kept, not fetched again: a wrong prefix shows in the checksum.
    (raw / "a.zip").unlink()
    (raw / "a.zip.part").write_bytes(b"\0" * 1000)
    import hashlib

    with pytest.raises(DownloadError, match="sha256 mismatch"):
        download(quick(f"s3://{bucket}/a.zip", sha256=hashlib.sha256(payload).hexdigest()), raw)


def test_missing_bucket_and_key_are_one_line_each(moto, bucket, tmp_path):
    with pytest.raises(DownloadError) as no_bucket:
        download(quick("s3://imgclf-no-such-bucket/x.zip"), tmp_path)
    assert str(no_bucket.value) == "s3://imgclf-no-such-bucket/x.zip: no such bucket"
    with pytest.raises(DownloadError) as no_key:
        download(quick(f"s3://{bucket}/missing.zip"), tmp_path)
    assert str(no_key.value) == f"s3://{bucket}/missing.zip: no such key"


def test_unreachable_endpoint_is_retried_then_one_line(tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(DownloadError) as caught:
        download(quick("s3://imgclf-any/x.zip"), tmp_path, S3Params(endpoint_url=closed))
    assert str(caught.value) == "s3://imgclf-any/x.zip: gave up after 3 attempts: s3://imgclf-any/x.zip: cannot reach the S3 endpoint"


def test_denied_access_and_bad_credentials_are_one_line_without_the_secret(tmp_path):
    # A second moto server that checks credentials after the first four (setup) requests.
    server, endpoint = start_moto(os.environ | {"INITIAL_NO_AUTH_ACTION_COUNT": "4"})
    try:
        setup = dict(endpoint_url=endpoint, region_name=REGION, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET)
        boto3.client("s3", **setup).create_bucket(Bucket="imgclf-locked")
        boto3.client("s3", **setup).put_object(Bucket="imgclf-locked", Key="x.zip", Body=b"zip")
        iam = boto3.client("iam", **setup)
        iam.create_user(UserName="reader")
        key = iam.create_access_key(UserName="reader")["AccessKey"]  # no policy: may do nothing
        cases = {
            "access denied (the credentials lack permission)": (key["AccessKeyId"], key["SecretAccessKey"]),
            "bad credentials (unknown access key id)": ("AKIAIMGCLFUNKNOWN001", SECRET),
            "bad credentials (the secret does not match the access key id)": (key["AccessKeyId"], SECRET),
        }
        for meaning, (key_id, secret) in cases.items():
            env = {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret}
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                with pytest.raises(DownloadError) as caught:
                    download(quick("s3://imgclf-locked/x.zip"), tmp_path, S3Params(endpoint_url=endpoint))
            finally:
                os.environ.update({k: v for k, v in saved.items() if v is not None})
            assert str(caught.value) == f"s3://imgclf-locked/x.zip: {meaning}"
            assert secret not in str(caught.value) and key_id not in str(caught.value)
    finally:
        server.terminate()
        server.wait()


def run_dir(root: Path, accuracy: float, model: bytes = b"model-bytes") -> Layout:
    layout = Layout(root)
    for path, body in {
        "models/model.keras": model, "models/labels.json": b"{}", "models/summary.txt": b"summary",
        "metrics/train.json": b"{}", "plots/confusion_matrix.png": b"png", "plots/roc.csv": b"fpr,tpr\n",
    }.items():  # fmt: skip
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(body)
    (root / "metrics" / "eval.json").write_text(json.dumps({"accuracy": accuracy, "macro_f1": accuracy, "n_test": 10}))
    return layout


def latest(endpoint: str, bucket: str, prefix: str) -> dict:
    return json.loads(s3c(endpoint).get_object(Bucket=bucket, Key=f"{prefix}/latest.json")["Body"].read())


def test_publish_uploads_the_run_then_points_latest_at_it(moto, bucket, tmp_path):
    layout = run_dir(tmp_path, 0.9)
    record = publish(PublishParams(s3_uri=f"s3://{bucket}/models"), S3Params(endpoint_url=moto), layout,
                     tmp_path / "metrics" / "publish.json")  # fmt: skip
    pointer = latest(moto, bucket, "models")
    assert pointer["metrics"]["accuracy"] == 0.9
    assert pointer["model"] == f"models/runs/{pointer['run_id']}/models/model.keras"
    keys = {o["Key"] for o in s3c(moto).list_objects_v2(Bucket=bucket, Prefix="models/runs/")["Contents"]}
    assert keys == set(pointer["objects"].values())
    assert {"models/model.keras", "metrics/eval.json", "plots/roc.csv", "report.md"} <= set(pointer["objects"])
    assert s3c(moto).get_object(Bucket=bucket, Key=pointer["model"])["Body"].read() == b"model-bytes"
    assert json.loads(record.read_text())["run_id"] == pointer["run_id"]


def test_empty_s3_uri_publishes_nothing_and_says_so(tmp_path):
    record = publish(PublishParams(), S3Params(), Layout(tmp_path), tmp_path / "publish.json")
    assert json.loads(record.read_text()) == {"published": False, "reason": "publish.s3_uri is empty"}


def test_an_interrupted_publish_leaves_latest_on_the_previous_run(moto, bucket, tmp_path):
    first = publish(PublishParams(s3_uri=f"s3://{bucket}/m"), S3Params(endpoint_url=moto), run_dir(tmp_path / "a", 0.8),
                    tmp_path / "a.json")  # fmt: skip
    previous = json.loads(first.read_text())["run_id"]
    # A second run with a large model, killed once its first objects have landed.
    big = tmp_path / "b"
    run_dir(big, 0.95, model=os.urandom(96 << 20))
    script = (f"from pathlib import Path; from tasks.layout import Layout; from tasks.params import PublishParams, S3Params; "
              f"from tasks.publish import publish; publish(PublishParams(s3_uri='s3://{bucket}/m'), "
              f"S3Params(endpoint_url='{moto}'), Layout(Path('{big}')), Path('{tmp_path / 'b.json'}'))")  # fmt: skip
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=os.environ.copy())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        listed = s3c(moto).list_objects_v2(Bucket=bucket, Prefix="m/runs/").get("Contents", [])
        if any(not o["Key"].startswith(f"m/runs/{previous}/") for o in listed):
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert latest(moto, bucket, "m")["run_id"] == previous
    assert not (tmp_path / "b.json").exists()


def test_publish_with_missing_run_files_names_them(moto, bucket, tmp_path):
    with pytest.raises(S3Error, match="missing run files"):
        publish(PublishParams(s3_uri=f"s3://{bucket}/m"), S3Params(endpoint_url=moto), Layout(tmp_path), tmp_path / "p.json")


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_dvc_push_then_pull_into_a_fresh_clone_gives_identical_data_and_model(moto, bucket, demo_zip, tmp_path, cli_env):
    env = cli_env | {key: os.environ[key] for key in os.environ if key.startswith("AWS_")}
    project = tmp_path / "project"
    project.mkdir()
    shutil.copytree(REPO / "tasks", project / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, project)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(url=str(demo_zip), sha256=None)
    params["prepare"]["image_size"], params["train"]["epochs"] = 24, 1
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        sh(command, project, env)
    sh(["dvc", "repro"], project, env)
    said = sh(["imgclf", "remote", f"s3://{bucket}/dvcstore"], project, env)
    assert f"endpointurl {moto}" in said
    sh(["git", "add", "-A"], project, env)
    sh(["git", "commit", "-qm", "pipeline"], project, env)
    sh(["dvc", "push"], project, env)
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(project), str(clone)], tmp_path, env)
    sh(["dvc", "pull"], clone, env)
    for folder in ("data", "models"):
        assert tree_bytes(clone / folder) == {k: v for k, v in tree_bytes(project / folder).items() if not k.endswith(".part")}
    assert (clone / "models" / "model.keras").stat().st_size > 0 and (clone / "data" / "cache" / "images.npy").exists()


def test_no_secret_in_any_log_artifact_or_output_of_a_run(moto, bucket, demo_zip, tmp_path, cli_env):
    s3c(moto).upload_file(str(demo_zip), bucket, "in/cells.zip")
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump({
        "data": {"url": f"s3://{bucket}/in/cells.zip", "sha256": None}, "s3": {"endpoint_url": moto},
        "publish": {"s3_uri": f"s3://{bucket}/out"}, "prepare": {"image_size": 24}, "train": {"epochs": 1},
    }))  # fmt: skip
    env = cli_env | {key: os.environ[key] for key in os.environ if key.startswith("AWS_")}
    result = subprocess.run(["imgclf", "run"], cwd=project, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert latest(moto, bucket, "out")["metrics"]["n_test"] > 0
    secrets = [SECRET, ACCESS_KEY]
    for secret in secrets:
        assert secret not in result.stdout + result.stderr
    scanned = 0
    for folder in (project, Path(env["PREFECT_HOME"])):
        for path in folder.rglob("*"):
            if path.is_file():
                scanned += 1
                content = path.read_bytes()
                assert not any(secret.encode() in content for secret in secrets), path
    published = s3c(moto).list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]
    for item in published:
        body = s3c(moto).get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        assert not any(secret.encode() in body for secret in secrets), item["Key"]
    assert scanned > 20 and len(published) > 10
