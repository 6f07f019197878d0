"""S3 against moto's standalone server on 127.0.0.1: download, publish, DVC remote, errors, no leaked secrets."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import yaml

from tasks.download import DownloadError, download, source_change
from tasks.layout import Layout
from tasks.params import DataParams, GateParams, PublishParams, S3Params
from tasks.publish import PublishError, publish, run_files
from tests.conftest import ACCESS_KEY, REGION, REPO, SECRET, dvc_project, free_port, in_venv, s3c, scratch_dir, sh, start_moto, zip_bytes
from tests.gate_runs import make_run

def quick(url: str, **more) -> DataParams:
    return DataParams(url=url, retries=2, retry_backoff=0.01, **more)


def test_download_from_s3_verifies_the_checksum(moto, bucket, demo_zip, tmp_path):
    s3c(moto).upload_file(str(demo_zip), bucket, "sets/cells.zip")
    import hashlib

    digest = hashlib.sha256(demo_zip.read_bytes()).hexdigest()
    got = download(quick(f"s3://{bucket}/sets/cells.zip", sha256=digest), tmp_path / "raw", tmp_path / "source.json", S3Params(endpoint_url=moto))
    assert got == tmp_path / "raw" / "cells.zip" and got.read_bytes() == demo_zip.read_bytes()
    assert not (tmp_path / "raw" / "cells.zip.part").exists()


def leave_part(raw: Path, url: str, etag: str, size: int, kept: bytes) -> None:
    """Leaves what a killed S3 download leaves: the first bytes in `.part`, its source in `.part.json`."""
    raw.mkdir(exist_ok=True)
    (raw / "a.zip.part").write_bytes(kept)
    (raw / "a.zip.part.json").write_text(json.dumps({"url": url, "etag": etag, "last_modified": None, "bytes": size}))


def test_s3_download_resumes_from_the_part_file(moto, bucket, tmp_path):
    payload = zip_bytes(0, 300_000)
    etag = s3c(moto).put_object(Bucket=bucket, Key="a.zip", Body=payload)["ETag"]
    raw = tmp_path / "raw"
    url = f"s3://{bucket}/a.zip"
    leave_part(raw, url, etag, len(payload), payload[:123_457])
    assert download(quick(url), raw, raw.parent / "source.json").read_bytes() == payload
    # The bytes already there are kept, not fetched again: a wrong prefix shows in the checksum.
    (raw / "a.zip").unlink()
    leave_part(raw, url, etag, len(payload), b"\0" * 1000)
    import hashlib

    with pytest.raises(DownloadError, match="sha256 mismatch"):
        download(quick(f"s3://{bucket}/a.zip", sha256=hashlib.sha256(payload).hexdigest()), raw, raw.parent / "source.json")


def test_s3_part_of_an_overwritten_object_is_started_over_not_spliced(moto, bucket, tmp_path):
    old, new = zip_bytes(0, 300_000), zip_bytes(1, 300_000)
    url = f"s3://{bucket}/a.zip"
    old_etag = s3c(moto).put_object(Bucket=bucket, Key="a.zip", Body=old)["ETag"]
    leave_part(tmp_path, url, old_etag, len(old), old[:123_457])
    new_etag = s3c(moto).put_object(Bucket=bucket, Key="a.zip", Body=new)["ETag"]
    assert download(quick(url), tmp_path, tmp_path / "source.json").read_bytes() == new
    assert json.loads((tmp_path / "source.json").read_text())["etag"] == new_etag
    assert not (tmp_path / "a.zip.part.json").exists()


def test_s3_object_overwritten_at_the_same_key_is_fetched_again(moto, bucket, tmp_path, caplog):
    old, new = zip_bytes(0, 300_000), zip_bytes(1, 300_000)
    url = f"s3://{bucket}/a.zip"
    s3c(moto).put_object(Bucket=bucket, Key="a.zip", Body=old)
    assert download(quick(url), tmp_path, tmp_path / "source.json").read_bytes() == old
    assert source_change(quick(url), tmp_path, tmp_path / "source.json") is None  # head_object: the same ETag and size
    new_etag = s3c(moto).put_object(Bucket=bucket, Key="a.zip", Body=new)["ETag"]
    assert source_change(quick(url), tmp_path, tmp_path / "source.json") == "ETag changed"
    with caplog.at_level("INFO", logger="imgclf"):
        assert download(quick(url), tmp_path, tmp_path / "source.json").read_bytes() == new
    assert "a.zip: ETag changed; fetching" in caplog.text
    assert json.loads((tmp_path / "source.json").read_text())["etag"] == new_etag


def test_missing_bucket_and_key_are_one_line_each(moto, bucket, tmp_path):
    with pytest.raises(DownloadError) as no_bucket:
        download(quick("s3://imgclf-no-such-bucket/x.zip"), tmp_path, tmp_path / "source.json")
    assert str(no_bucket.value) == "s3://imgclf-no-such-bucket/x.zip: no such bucket"
    with pytest.raises(DownloadError) as no_key:
        download(quick(f"s3://{bucket}/missing.zip"), tmp_path, tmp_path / "source.json")
    assert str(no_key.value) == f"s3://{bucket}/missing.zip: no such key"


def test_unreachable_endpoint_is_retried_then_one_line(tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(DownloadError) as caught:
        download(quick("s3://imgclf-any/x.zip"), tmp_path, tmp_path / "source.json", S3Params(endpoint_url=closed))
    assert str(caught.value) == "s3://imgclf-any/x.zip: gave up after 3 attempts: cannot reach the S3 endpoint"


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
                    download(quick("s3://imgclf-locked/x.zip"), tmp_path, tmp_path / "source.json", S3Params(endpoint_url=endpoint))
            finally:
                os.environ.update({k: v for k, v in saved.items() if v is not None})
            assert str(caught.value) == f"s3://imgclf-locked/x.zip: {meaning}"
            assert secret not in str(caught.value) and key_id not in str(caught.value)
    finally:
        server.terminate()
        server.wait()


def run_dir(root: Path, accuracy: float, padding_units: int = 0) -> Layout:
    """A finished run (tests/gate_runs.py): raw test images, split.csv, a fixed-weight model, metrics, a plot."""
    layout = make_run(root, padding_units=padding_units)
    (root / "metrics" / "eval.json").write_text(json.dumps({"accuracy": accuracy, "macro_f1": accuracy, "n_test": 10}))
    return layout


def run_objects(layout: Layout) -> set[str]:
    """Returns the names, relative to the run's folder, of what publish uploads of a run (the reference set aside)."""
    return {path.relative_to(layout.root).as_posix() for path in run_files(layout)} | {"report.md"}


def reference_keys(endpoint: str, bucket: str, pointer: dict) -> set[str]:
    """Returns the keys of the reference set latest.json names: its labels.csv and each image listed there."""
    labels = pointer["reference"]["labels"]
    rows = s3c(endpoint).get_object(Bucket=bucket, Key=labels)["Body"].read().decode().splitlines()[1:]
    images = labels.removesuffix("labels.csv") + "images/"
    return {labels} | {images + row.rsplit(",", 1)[0] for row in rows}


def latest(endpoint: str, bucket: str, prefix: str) -> dict:
    return json.loads(s3c(endpoint).get_object(Bucket=bucket, Key=f"{prefix}/latest.json")["Body"].read())


def test_imgclf_remote_refuses_credentials_it_would_write_into_dvc_config(tmp_path, cli_env, monkeypatch, capsys):
    from flows.cli import main
    from flows.versioning import VersioningError, configure_remote

    root = dvc_project(tmp_path / "project", cli_env, {})
    before = (root / ".dvc" / "config").read_bytes()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://AKIAPLANTED:pw-planted@127.0.0.1:9000")
    with pytest.raises(VersioningError) as endpoint:
        configure_remote(Layout(root), "s3://bucket/store", S3Params())
    # As the command prints it: the line is redacted again on its way out, and must stay whole.
    monkeypatch.chdir(root)
    assert main(["remote", "s3://bucket/store"]) == 1
    assert capsys.readouterr().err.startswith("imgclf: error: AWS_ENDPOINT_URL: http://***@127.0.0.1:9000 holds "
                                              "credentials (a user and password before the host")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    with pytest.raises(VersioningError) as uri:
        configure_remote(Layout(root), "s3://bucket/store?X-Amz-Signature=tok-planted", S3Params())
    assert str(endpoint.value).startswith("AWS_ENDPOINT_URL: http://***@127.0.0.1:9000 holds credentials")
    assert str(uri.value).startswith("the remote: s3://bucket/store?*** holds credentials")
    assert "planted" not in str(endpoint.value) + str(uri.value)
    assert (root / ".dvc" / "config").read_bytes() == before


def test_publish_uploads_the_run_then_points_latest_at_it(moto, bucket, tmp_path):
    layout = run_dir(tmp_path, 0.9)
    record = publish(PublishParams(s3_uri=f"s3://{bucket}/models"), GateParams(), S3Params(endpoint_url=moto), layout,
                     tmp_path / "metrics" / "publish.json")  # fmt: skip
    pointer = latest(moto, bucket, "models")
    assert pointer["metrics"]["accuracy"] == 0.9
    assert pointer["model"] == f"models/runs/{pointer['run_id']}/models/model.keras"
    keys = {o["Key"] for o in s3c(moto).list_objects_v2(Bucket=bucket, Prefix="models/runs/")["Contents"]}
    # The first run is promoted: its reference set (test images and labels.csv) goes with it.
    assert keys == set(pointer["objects"].values()) | reference_keys(moto, bucket, pointer)
    assert set(pointer["objects"]) == run_objects(layout)
    assert {"models/model.keras", "metrics/eval.json", "plots/roc.csv", "report.md"} <= set(pointer["objects"])
    model = s3c(moto).get_object(Bucket=bucket, Key=pointer["model"])["Body"].read()
    assert model == (layout.model_dir / "model.keras").read_bytes()
    assert json.loads(record.read_text())["run_id"] == pointer["run_id"]


def test_empty_s3_uri_publishes_into_the_local_champion_folder(tmp_path):
    # Before the gate, an empty s3_uri published nothing; now the local folder is the store.
    layout = run_dir(tmp_path, 0.9)
    record = json.loads(publish(PublishParams(), GateParams(), S3Params(), layout, tmp_path / "publish.json").read_text())
    champion = tmp_path / "models" / "champion"
    assert record["promoted"] and record["latest"] == str(champion / "latest.json")
    assert json.loads((champion / "latest.json").read_text())["run_id"] == record["run_id"]
    assert (champion / "runs" / record["run_id"] / "models" / "model.keras").read_bytes() == (
        layout.model_dir / "model.keras").read_bytes()  # fmt: skip


# The publisher in a process of its own, each part of a multipart upload (the model: the largest
# object of the run, sent last of them) held up as on a slow link, so it can be killed mid-upload.
SLOW_PUBLISH = """
import sys, time
from pathlib import Path

import tasks.champion
import tasks.publish
from tasks.layout import Layout
from tasks.params import GateParams, PublishParams, S3Params
from tasks.s3 import client


def slow_client(params):
    s3_client = client(params)
    s3_client.meta.events.register("before-send.s3.UploadPart", lambda **_: time.sleep(60))
    return s3_client


tasks.champion.client = slow_client
uri, endpoint, root, record = sys.argv[1:]
tasks.publish.publish(PublishParams(s3_uri=uri), GateParams(), S3Params(endpoint_url=endpoint), Layout(Path(root)),
                      Path(record))
"""


def watch_publish(monkeypatch, endpoint: str, bucket: str) -> dict:
    """Has publish's S3 client record each call that succeeds, as (operation, key), and, each time
    latest.json is about to be sent, the objects it names that the bucket does not hold yet."""
    from tasks.s3 import client

    seen: dict = {"calls": [], "missing_when_latest_sent": []}

    def before(params, model, context, **_):
        context["watched_key"] = params.get("Key")
        if model.name == "PutObject" and params.get("Key", "").endswith("/latest.json"):
            stored = {o["Key"]: o["Size"] for o in s3c(endpoint).list_objects_v2(Bucket=bucket).get("Contents", [])}
            body = params["Body"]  # botocore has made it a file object by now
            pointer = json.loads(body.getvalue() if hasattr(body, "getvalue") else body)
            named = [*pointer["objects"].values(), pointer["reference"]["labels"]]
            seen["missing_when_latest_sent"].append(sorted(key for key in named if key not in stored))
            seen["model_size_when_latest_sent"] = stored.get(pointer["model"])

    def after(model, context, http_response, **_):
        if http_response.status_code < 300:
            seen["calls"].append((model.name, context.get("watched_key")))

    def watched_client(params):
        s3_client = client(params)
        s3_client.meta.events.register("before-parameter-build.s3", before)
        s3_client.meta.events.register("after-call.s3", after)
        return s3_client

    monkeypatch.setattr("tasks.champion.client", watched_client)
    return seen


def test_an_interrupted_publish_leaves_latest_on_the_previous_run(moto, bucket, tmp_path, monkeypatch):
    first = publish(PublishParams(s3_uri=f"s3://{bucket}/m"), GateParams(), S3Params(endpoint_url=moto),
                    run_dir(tmp_path / "a", 0.8), tmp_path / "a.json")  # fmt: skip
    previous = json.loads(first.read_text())["run_id"]
    pointer_before = s3c(moto).get_object(Bucket=bucket, Key="m/latest.json")["Body"].read()
    # A second run, as good as the first, whose model (over 8 MiB: a multipart upload) is held up in flight.
    big = run_dir(tmp_path / "b", 0.95, padding_units=3072)
    model_size = (big.model_dir / "model.keras").stat().st_size
    assert model_size > 8 << 20
    args = [f"s3://{bucket}/m", moto, str(big.root), str(tmp_path / "b.json")]
    process = subprocess.Popen([sys.executable, "-c", SLOW_PUBLISH, *args], cwd=REPO,
                               env=os.environ | {"TMPDIR": scratch_dir(tmp_path)})  # fmt: skip
    # The gate (TensorFlow starting, both models scored) comes before any upload.
    deadline, in_flight = time.monotonic() + 180, []
    while time.monotonic() < deadline and process.poll() is None and not in_flight:
        uploads = s3c(moto).list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        in_flight = [u["Key"] for u in uploads if u["Key"].endswith("/models/model.keras")]
        time.sleep(0.02)
    assert in_flight and process.poll() is None, "the publisher never got to the model's upload"
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    # Killed mid-upload: every smaller object of the new run is stored, the model is not (nor the
    # reference set, which follows it), and latest.json is byte for byte the previous run's.
    run_prefix = in_flight[0].removesuffix("models/model.keras")
    assert run_prefix.startswith("m/runs/") and previous not in run_prefix
    listed = s3c(moto).list_objects_v2(Bucket=bucket, Prefix=run_prefix).get("Contents", [])
    assert {o["Key"].removeprefix(run_prefix) for o in listed} == run_objects(big) - {"models/model.keras"}
    assert s3c(moto).get_object(Bucket=bucket, Key="m/latest.json")["Body"].read() == pointer_before
    assert latest(moto, bucket, "m")["run_id"] == previous
    assert not (tmp_path / "b.json").exists()
    # Published again, to the end: latest.json is sent last, once every object it names is stored.
    seen = watch_publish(monkeypatch, moto, bucket)
    record = publish(PublishParams(s3_uri=f"s3://{bucket}/m"), GateParams(), S3Params(endpoint_url=moto), big,
                     tmp_path / "b.json")  # fmt: skip
    pointer = latest(moto, bucket, "m")
    assert pointer["run_id"] == json.loads(record.read_text())["run_id"] != previous
    assert set(pointer["objects"]) == run_objects(big)
    assert seen["missing_when_latest_sent"] == [[]] and seen["model_size_when_latest_sent"] == model_size
    writes = [key for operation, key in seen["calls"] if operation in ("PutObject", "CompleteMultipartUpload")]
    assert writes[-1] == "m/latest.json"
    assert set(writes[:-1]) == set(pointer["objects"].values()) | reference_keys(moto, bucket, pointer)


def test_publish_with_missing_run_files_names_them(moto, bucket, tmp_path):
    with pytest.raises(PublishError, match="missing run files"):
        publish(PublishParams(s3_uri=f"s3://{bucket}/m"), GateParams(), S3Params(endpoint_url=moto), Layout(tmp_path),
                tmp_path / "p.json")  # fmt: skip


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
    # Up to evaluate (data, model, metrics): export's outputs, and a plain `dvc pull` of a whole pipeline,
    # travel through a local remote in test_orchestration's cloud-deployment test.
    sh(["dvc", "repro", "evaluate"], project, env)
    said = sh(["imgclf", "remote", f"s3://{bucket}/dvcstore"], project, env)
    assert said.count(f"endpointurl {moto}") == 1  # printed, not also logged
    sh(["git", "add", "-A"], project, env)
    sh(["git", "commit", "-qm", "pipeline"], project, env)
    sh(["dvc", "push"], project, env)
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(project), str(clone)], tmp_path, env)
    sh(["dvc", "pull", "--with-deps", "evaluate"], clone, env)
    for folder in ("data", "models"):
        # models/champion/ is the local champion store publish keeps across runs: state, not a DVC output.
        kept = {k: v for k, v in tree_bytes(project / folder).items() if not k.endswith(".part") and not k.startswith("champion/")}
        assert tree_bytes(clone / folder) == kept
    assert (clone / "models" / "model.keras").stat().st_size > 0 and (clone / "data" / "cache" / "images.npy").exists()


def test_no_secret_in_any_log_artifact_or_output_of_a_run(moto, bucket, demo_zip, tmp_path, cli_env):
    s3c(moto).upload_file(str(demo_zip), bucket, "in/cells.zip")
    env = cli_env | {key: os.environ[key] for key in os.environ if key.startswith("AWS_")}
    project = dvc_project(tmp_path / "project", env, {
        "data": {"url": f"s3://{bucket}/in/cells.zip", "sha256": None}, "s3": {"endpoint_url": moto},
        "publish": {"s3_uri": f"s3://{bucket}/out"}, "prepare": {"image_size": 24}, "train": {"epochs": 1},
        "gate": {"force": True},  # one epoch may learn nothing; forced, latest.json and the reference set are scanned too
    })  # fmt: skip
    result = subprocess.run(in_venv(["imgclf", "run"]), cwd=project, env=env, capture_output=True, text=True)
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


def test_a_connection_broken_mid_transfer_is_transient_whichever_botocore_error_says_it():
    from botocore.exceptions import (ConnectTimeoutError, IncompleteReadError, ReadTimeoutError,
                                     ResponseStreamingError)  # fmt: skip

    from tasks.s3 import S3Transient, explain_error

    for error in (ResponseStreamingError(error="cut"), IncompleteReadError(actual_bytes=1, expected_bytes=2),
                  ConnectTimeoutError(endpoint_url="http://127.0.0.1:1"), ReadTimeoutError(endpoint_url="x")):
        assert isinstance(explain_error("s3://b/k.zip", error), S3Transient), type(error).__name__


def test_a_tls_failure_is_said_at_once_not_retried_as_a_broken_connection(moto, tmp_path):
    https = moto.replace("http://", "https://")  # moto speaks plain HTTP: the TLS handshake fails
    with pytest.raises(DownloadError) as caught:
        download(quick("s3://imgclf-any/x.zip"), tmp_path, tmp_path / "source.json", S3Params(endpoint_url=https))
    assert str(caught.value).startswith("s3://imgclf-any/x.zip: SSLError: SSL validation failed")
    assert "gave up" not in str(caught.value)


def test_an_s3_key_keeps_its_hash_and_question_marks():
    from tasks.s3 import S3Uri, parse_uri

    assert parse_uri("s3://cells/runs/run#1.zip?v=2") == S3Uri("cells", "runs/run#1.zip?v=2")
