"""Shared fixtures: a small demo archive and its extracted, validated form, built once per session."""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Prefect keeps its database and task results under PREFECT_HOME: one throwaway home per
# session, set before anything imports Prefect.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="imgclf-prefect-home-")
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"

from tasks.demo_data import make_demo_archive
from tasks.extract import extract
from tasks.params import DataParams, ValidateParams
from tasks.validate import validate

REPO = Path(__file__).resolve().parents[1]
PER_CLASS = 30


def noise(height: int, width: int, channels: int = 3, seed: int = 0):
    """Returns random uint8 pixels (height, width[, channels])."""
    import numpy as np

    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def encode(image, fmt: str, **kwargs) -> bytes:
    """Returns a Pillow image saved in `fmt`, as bytes."""
    import io

    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """Returns one PNG chunk: length, kind, payload, CRC."""
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def free_port() -> int:
    """Returns a TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def zip_bytes(seed: int = 0, size: int = 200_000) -> bytes:
    """Returns a zip of `size` bytes in all: one stored member of random bytes, the same for a seed."""

    def holding(content: bytes) -> bytes:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            # A fixed date: two calls give the same bytes whatever the clock says.
            archive.writestr(zipfile.ZipInfo("cells/a.png", date_time=(2020, 1, 1, 0, 0, 0)), content)
        return buffer.getvalue()

    return holding(random.Random(seed).randbytes(size - len(holding(b""))))


@contextlib.contextmanager
def tcp_server(serve: Callable[[socket.socket], None] | None = None) -> Iterator[int]:
    """Yields the port of a TCP server on 127.0.0.1 that hands each connection to `serve`; without one
    it accepts none, and the kernel still completes the connects: a server that never answers."""
    listener = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:  # the listener closed: the test is over
                return
            serve(connection)

    if serve is not None:
        threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


VENV_BIN = Path(sys.executable).parent


def in_venv(command: list[str]) -> list[str]:
    """Returns `command` run as the README runs it: in a shell that activated the venv first."""
    return ["bash", "-c", '. "$0/activate" && exec "$@"', str(VENV_BIN), *command]


def sh(command: list[str], cwd: Path, env: dict) -> str:
    """Runs a command in the activated venv and returns its stdout and stderr; a failure fails the test with both."""
    result = subprocess.run(in_venv(command), cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result.stdout + result.stderr


def in_process(fn, shards):
    """A ShardMap that runs shards one after another in this process (fast for small tests)."""
    return map(fn, shards)


@pytest.fixture(scope="session")
def demo_zip(tmp_path_factory) -> Path:
    return make_demo_archive(tmp_path_factory.mktemp("demo") / "cell_images_demo.zip", per_class=PER_CLASS)


@pytest.fixture(scope="session")
def _validated_demo(tmp_path_factory, demo_zip) -> Path:
    root = tmp_path_factory.mktemp("validated")
    extract(DataParams(url=str(demo_zip)), demo_zip, root / "extracted", root / "extract_skipped.csv")
    validate(ValidateParams(), root / "extracted", root / "manifest.csv", in_process)
    return root


@pytest.fixture
def validated_demo(tmp_path, _validated_demo) -> Path:
    """A fresh copy of data/ after extract and validate of the demo archive: extracted/, manifest.csv."""
    root = tmp_path / "data"
    shutil.copytree(_validated_demo, root)
    return root


@pytest.fixture
def cli_env(tmp_path) -> dict[str, str]:
    """Environment for running `imgclf`, `dvc` and Prefect as subprocesses (through `in_venv`), isolated in tmp_path.

    PATH is the machine's, without the venv: a command that works only with the venv on PATH fails here too.
    """
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if Path(p) != VENV_BIN)
    return os.environ | {
        "PATH": path,
        "TMPDIR": scratch_dir(tmp_path),
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
    }  # fmt: skip


def scratch_dir(tmp_path: Path) -> str:
    """Returns a temporary folder beside tmp_path, for TMPDIR: what a killed process leaves there
    (TensorFlow's autograph files, a publish's scratch folder) goes with pytest's old tmp_paths,
    not into the machine's /tmp, and no test that lists tmp_path sees it."""
    scratch = tmp_path.with_name(tmp_path.name + "-tmp")
    scratch.mkdir(exist_ok=True)
    return str(scratch)


def dvc_project(root: Path, env: dict, updates: dict[str, dict]) -> Path:
    """Returns a git + DVC project at `root`: this repo's dvc.yaml, tasks/ and params.yaml with `updates` per section."""
    import yaml

    root.mkdir(parents=True)
    shutil.copytree(REPO / "tasks", root / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root)
    shutil.copy(REPO / ".gitignore", root)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in updates.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        sh(command, root, env)
    return root


# S3: moto's standalone server on loopback, with test credentials and nothing else of AWS.
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
    import boto3

    name = "imgclf-" + request.node.name.replace("_", "-")[:40].lower().strip("-")
    boto3.client("s3", endpoint_url=moto, region_name=REGION).create_bucket(Bucket=name)
    return name


def s3c(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name=REGION)
