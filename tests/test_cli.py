"""`imgclf` as a person runs it: one line per failure, no secret anywhere, nothing left running after a kill."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import re
import shlex
import signal
import stat
import subprocess
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import dvc_project, encode, free_port, in_venv, noise

QUICK = ["--set", "prepare.image_size=24", "--set", "train.epochs=1", "--set", "train.batch_size=16"]


def imgclf(args: list[str], cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(in_venv(["imgclf", *args]), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def tiny_model(folder: Path, side: int) -> Path:
    """Saves a one-layer model of side x side RGB input beside its model.json; returns the model path."""
    import json

    import keras

    folder.mkdir(parents=True, exist_ok=True)
    model = keras.Sequential([keras.Input((side, side, 3)), keras.layers.Flatten(), keras.layers.Dense(1, activation="sigmoid")])
    model.save(folder / "model.keras")
    (folder / "model.json").write_text(json.dumps({"classes": ["a", "b"], "image_size": [side, side], "channels": 3,
                                                    "resize": "stretch"}))  # fmt: skip
    return folder / "model.keras"


def _garbage_model(root: Path) -> list[str]:
    tiny_model(root / "models", 8)
    (root / "models" / "model.keras").write_bytes(b"not a keras file")
    return ["predict", "--model", "models/model.keras", "x.png"]


def _garbage_labels(root: Path) -> list[str]:
    tiny_model(root / "models", 8)
    (root / "models" / "model.json").write_text("{")
    return ["predict", "--model", "models/model.keras", "x.png"]


def _labels_of_another_size(root: Path) -> list[str]:
    tiny_model(root / "models", 8)
    (root / "models" / "model.json").write_text('{"classes": ["a", "b"], "image_size": [16, 16], "channels": 3, "resize": "stretch"}')
    return ["predict", "--model", "models/model.keras", "x.png"]


def _empty_archive(root: Path) -> list[str]:
    zipfile.ZipFile(root / "empty.zip", "w").close()
    return ["run", "--set", "data.url=empty.zip"]


def _group_pattern_matching_nothing(root: Path, demo_zip: Path) -> list[str]:
    return ["run", "--set", f"data.url={demo_zip}", "--set", "data.sha256=", "--set", r"split.group_pattern=^(ZZZ\d+)", *QUICK]


def _not_a_project(root: Path) -> list[str]:
    (root / "dvc.yaml").unlink()
    return ["run", "--set", "data.url=missing.zip"]


def _empty_folder(root: Path) -> list[str]:
    for name in ("dvc.yaml", "params.yaml"):
        (root / name).unlink()
    return ["run"]


def _bad_schedule(root: Path) -> list[str]:
    (root / "params.yaml").write_text(yaml.safe_dump({"orchestration": {"schedule": "every monday"}}))
    return ["serve"]


# (arguments, or a function of the project folder that prepares it and returns them), exit code, the name the line must hold
FAILURES = {
    "malformed_yaml_override": (["run", "--set", "train.epochs=[1,"], 2, "train.epochs"),
    "negative_split_seed": (["run", "--set", "split.seed=-1"], 2, "--set split.seed: split.seed: Input should be"),
    "unknown_key_override": (["run", "--set", "tarin.epochs=3"], 2, "--set tarin.epochs: tarin: unknown key"),
    "train_seed_past_32_bits": (["run", "--set", f"train.seed={2**32}"], 2, "train.seed"),
    "infinite_timeout": (["run", "--set", "data.timeout=.inf"], 2, "data.timeout"),
    "infinite_learning_rate": (["run", "--set", "train.learning_rate=.inf"], 2, "train.learning_rate"),
    "bad_schedule": (_bad_schedule, 2, "orchestration.schedule"),
    "mistyped_params_file": (["--params", "typo.yaml", "run"], 2, "typo.yaml"),
    "gs_url": (["run", "--set", "data.url=gs://bucket/cells.zip"], 2, "data.url"),
    "missing_archive": (["run", "--set", "data.url=missing.zip"], 1, "missing.zip"),
    "not_a_project": (_not_a_project, 1, "imgclf init"),
    "empty_folder": (_empty_folder, 1, "imgclf init"),
    "serve_without_a_server": (["serve"], 1, "imgclf serve: no Prefect server to schedule runs on"),
    "url_ending_in_dot_dot": (["run", "--set", f"data.url=http://127.0.0.1:{free_port()}/x/%2e%2e", "--set", "data.retries=0"],
                              1, "/x/%2e%2e"),  # fmt: skip
    "empty_archive": (_empty_archive, 1, "empty.zip"),
    "group_pattern_matching_nothing": (_group_pattern_matching_nothing, 1, "split.group_pattern"),
    "missing_model": (["predict", "--model", "nope/model.keras", "x.png"], 1, "nope/model.keras: no such model file"),
    "model_folder": (["predict", "--model", ".", "x.png"], 1, ".: a folder, not a Keras model file (predict takes "
                                                              "models/model.keras)"),  # fmt: skip
    "garbage_model": (_garbage_model, 1, "model.keras"),
    "garbage_model_description": (_garbage_labels, 1, "model.json"),
    "model_description_of_another_size": (_labels_of_another_size, 1, "model.json"),
}


@pytest.mark.parametrize(("args", "said"), [
    (["{tmp}"], "is a folder: name the file to write in it"), (["{tmp}/d.tar.gz"], "the demo archive is a zip"),
    (["{tmp}/d.zip", "--per-class", "0"], "--per-class: 0: a whole number, 4 or more"),
])  # fmt: skip
def test_demo_data_arguments_are_checked_as_arguments(tmp_path, cli_env, args, said):
    shown = imgclf(["demo-data", *(arg.format(tmp=tmp_path) for arg in args)], tmp_path, cli_env)
    assert shown.returncode == 2 and said in shown.stderr and "Traceback" not in shown.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_stage_run_before_the_stages_it_reads_from_says_to_run_them(tmp_path, monkeypatch, capsys):
    from flows.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("{}\n")
    assert main(["stage", "near_duplicates"]) == 1
    said = capsys.readouterr().err.strip().splitlines()
    assert said == ["imgclf: error: data/cache/index.csv: missing: run the stages before near_duplicates first "
                    "(`imgclf run near_duplicates` or `dvc repro near_duplicates`)"]  # fmt: skip


@pytest.mark.parametrize("verbose", [False, True])
def test_an_unexpected_error_says_its_first_line_with_words(monkeypatch, capsys, verbose):
    # matplotlib's TeX parser, say: its message starts on a new line, below it a caret under the text.
    import flows.cli

    def broken(args):
        raise ValueError("\ntier_$1_to_$5\n     ^\nParseSyntaxException: Expected end of text")

    monkeypatch.setattr(flows.cli, "_command", broken)
    assert flows.cli.main([*(["--verbose"] if verbose else []), "stage", "evaluate"]) == 1
    said = capsys.readouterr().err.strip().splitlines()
    hint = "" if verbose else " (--verbose shows the traceback)"
    assert said[-1] == f"imgclf: error: ValueError: tier_$1_to_$5{hint}"
    assert ("Traceback (most recent call last):" in said) == verbose


def test_predict_out_naming_a_folder_is_refused_as_an_argument_before_any_work(tmp_path, capsys):
    from flows.cli import main

    with pytest.raises(SystemExit) as exited:  # argparse's exit, with its usage line
        main(["predict", "--out", str(tmp_path), "--model", "nope/model.keras", "x.png"])
    assert exited.value.code == 2
    assert f"{tmp_path} is a folder: name the file to write in it, e.g. {tmp_path / 'predictions.csv'}" in capsys.readouterr().err


def test_serve_with_the_prefect_server_down_names_its_address(tmp_path, cli_env):
    root = dvc_project(tmp_path / "project", cli_env, {})
    api = f"http://127.0.0.1:{free_port()}/api"
    shown = imgclf(["serve"], root, cli_env | {"PREFECT_API_URL": api}, timeout=120)
    assert shown.returncode == 1 and "Traceback" not in shown.stderr
    assert shown.stderr.strip().splitlines()[-1].startswith(f"imgclf: error: imgclf serve: cannot reach the Prefect "
                                                            f"server at {api}")  # fmt: skip


def test_version_is_the_installed_packages(tmp_path, cli_env):
    from importlib.metadata import version

    shown = imgclf(["--version"], tmp_path, cli_env)
    assert (shown.returncode, shown.stdout) == (0, f"imgclf {version('imgclf')}\n")


@pytest.mark.parametrize("case", FAILURES)
def test_each_failure_is_one_last_line_naming_its_cause_without_a_traceback(case, tmp_path, cli_env, demo_zip):
    args, code, named = FAILURES[case]
    root = dvc_project(tmp_path / "project", cli_env, {})
    if callable(args):
        args = args(root, demo_zip) if case == "group_pattern_matching_nothing" else args(root)
    result = imgclf(args, root, cli_env, timeout=180)
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == code, lines[-5:]
    assert lines[-1].startswith("imgclf: error:") and named in lines[-1], lines[-5:]
    assert len(lines) < 20, "\n".join(lines)
    assert "Traceback" not in result.stdout + result.stderr


class _AuthServer(BaseHTTPRequestHandler):
    """Serves one archive to a client that sends the right basic-auth credentials; 401 otherwise."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.server.seen.append(self.headers.get("Authorization"))
        if self.headers.get("Authorization") != "Basic " + base64.b64encode(self.server.credentials.encode()).decode():
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="cells"')
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()
        self.wfile.write(self.server.body)


def test_password_and_token_in_the_url_download_and_appear_nowhere(tmp_path, cli_env, demo_zip):
    # A raw @ and a space in the password: urllib takes the userinfo up to the host's last @, and sends the
    # space as it is; so must the redaction take them.
    password, token = "pw-0d1f3b9c@planted-5e1a secret-8b3f", "tok-77e2a4c1-planted"
    server = ThreadingHTTPServer(("127.0.0.1", 0), _AuthServer)
    server.credentials, server.body, server.seen = f"reader:{password}", demo_zip.read_bytes(), []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://reader:{password}@127.0.0.1:{server.server_port}/cells.zip?X-Amz-Signature={token}"
    project = dvc_project(tmp_path / "project", cli_env, {"prepare": {"image_size": 24}, "train": {"epochs": 1}})
    try:
        # The whole section at once: its texts are searched for secrets too (one key alone: the test below).
        result = imgclf(["run", "--set", f'data={{url: "{url}", sha256: ""}}'], project, cli_env)
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr[-3000:]
    assert server.seen and server.seen[-1], "the credentials were sent as basic auth"
    assert (project / "data" / "raw" / "cells.zip").read_bytes() == demo_zip.read_bytes()
    written = [path for folder in (project, Path(cli_env["PREFECT_HOME"])) for path in folder.rglob("*")
               if path.is_file() and ".git" not in path.relative_to(folder).parts]  # fmt: skip
    assert any(path.name.endswith(".db") for path in written), "Prefect's database is among the files searched"
    for secret in (*re.split("[@ ]", password), token):
        assert secret not in result.stdout + result.stderr
        leaked = [str(path) for path in written if secret.encode() in path.read_bytes()]
        assert not leaked, f"{secret} found in {leaked}"


def test_secrets_in_overrides_are_hidden_from_prefect_and_dvc_in_a_whole_section_too():
    from pydantic import SecretStr

    from tasks.redact import hide_secrets, redact_texts, reveal

    url = "https://reader:pw-planted@host/x.zip?X-Amz-Signature=tok-planted"
    spaced = "https://reader:pw planted\tto@host/x.zip?tok-planted"  # a space and a tab in the password
    overrides = {"data.url": url, "data": {"url": url, "sha256": ""}, "train.epochs": 2, "s3.endpoint_url": spaced}
    hidden = hide_secrets(overrides)
    assert all(isinstance(value, SecretStr) for value in (hidden["data.url"], hidden["data"]["url"], hidden["s3.endpoint_url"]))
    written = json.dumps(redact_texts(overrides))  # what the run's params file for DVC holds
    assert "planted" not in written
    assert written.count("https://***@host/x.zip?***") == 3
    assert reveal(hidden) == overrides


def test_a_line_redacted_twice_keeps_its_words():
    # The CLI's error line and the log filter redact what may be redacted already: words up to a later @ stay.
    from tasks.redact import redact

    once = redact("http://u:p@s@host:9000") + " holds it (user:password@ or a token)"  # as the refusals write it
    assert once == "http://***@host:9000 holds it (user:password@ or a token)"
    assert redact(once) == once
    assert redact("https://***@x@h2/a?b") == "https://***@h2/a?***"  # a raw @ after it: still a userinfo to hide


def _run_in_background(project: Path, env: dict, archive: Path) -> subprocess.Popen:
    args = ["run", "--set", f"data.url={archive}", "--set", "data.sha256=", "--set", "prepare.image_size=24",
            "--set", "train.epochs=200", "--set", "train.patience=0"]  # fmt: skip
    return subprocess.Popen(in_venv(["imgclf", *args]), cwd=project, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def _kill_when(process: subprocess.Popen, ready, timeout: float = 180) -> list[psutil.Process]:
    """SIGKILLs the run once `ready()` holds; returns every process of the run as it was just before."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before the moment to kill it"
        time.sleep(0.01)
    run = psutil.Process(process.pid)
    family = [run, *run.children(recursive=True)]
    os.kill(process.pid, signal.SIGKILL)  # the shell exec'd imgclf: this is the run itself
    process.wait()
    return family


@pytest.mark.parametrize("stage", ["validate", "train"])
def test_killed_run_leaves_no_process_and_the_next_run_cleans_up_and_succeeds(stage, tmp_path, cli_env):
    from tasks.demo_data import make_demo_archive

    project = dvc_project(tmp_path / "project", cli_env, {})
    # Enough images that validate (which decodes each image once and stages the cache's rows)
    # takes a moment, on its process pool; training takes its moment with few.
    archive = make_demo_archive(tmp_path / "cells.zip", per_class=1200 if stage == "validate" else 60)
    process = _run_in_background(project, cli_env, archive)
    moment = {"validate": lambda: any(project.glob("data/.cache-staging.tmp-*")), "train": lambda: (project / "models" / ".backup").exists()}
    family = _kill_when(process, moment[stage])
    _, alive = psutil.wait_procs(family, timeout=10)  # each gone, or 10 s
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [" ".join(p.cmdline()[:6]) for p in alive]
    leftovers = [f"data/{p.name}" for p in (project / "data").iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers or stage == "train"
    # The report's page, as a kill while it was written would leave it.
    gone = subprocess.Popen(["true"])  # a pid no process has now
    gone.wait()
    (project / "reports").mkdir(exist_ok=True)
    (project / "reports" / f".index.html.tmp-{gone.pid}.html").write_text("<html>half")
    leftovers.append(f"reports/.index.html.tmp-{gone.pid}.html")
    # Up to the stage killed (and the cache, which takes the rows validate stages): every leftover is
    # cleaned at the run's start, whatever it runs.
    up_to = "cache" if stage == "validate" else stage
    result = imgclf(["run", up_to, "--set", f"data.url={archive}", "--set", "data.sha256=", *QUICK], project, cli_env)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in leftovers:
        assert not (project / name).exists()
        assert f"removed {name}, left by an interrupted run" in result.stderr


def test_ctrl_c_stops_training_at_once_and_the_next_run_resumes_from_its_last_epoch(tmp_path, cli_env):
    from tasks.demo_data import make_demo_archive

    project = dvc_project(tmp_path / "project", cli_env, {})
    archive = make_demo_archive(tmp_path / "cells.zip", per_class=60)
    args = ["run", "--set", f"data.url={archive}", "--set", "data.sha256=", "--set", "prepare.image_size=24",
            "--set", "train.epochs=20", "--set", "train.patience=0"]  # fmt: skip
    # As from a terminal: SIGINT at its default, though a suite started in the background inherits it ignored
    # (and Python then never turns it into KeyboardInterrupt).
    # In a process group of its own, as a terminal's foreground job.
    process = subprocess.Popen(in_venv(["imgclf", *args]), cwd=project, env=cli_env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    backups = project / "models" / ".backup" / "head"
    deadline = time.monotonic() + 240
    while not any(p.name >= "000002" for p in backups.glob("[0-9]*")):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before the moment to stop it"
        time.sleep(0.01)
    # What Ctrl-C sends: SIGINT to the whole group (the Prefect server too); training runs in a thread, not the main one.
    os.killpg(process.pid, signal.SIGINT)
    stderr = process.communicate(timeout=240)[1]
    assert process.returncode == 130 and stderr.strip().splitlines()[-1] == "imgclf: error: interrupted"
    # Stopped at once: the training did not run on to its 20th epoch (3 batches each), and its backup stayed.
    latest = sorted(backups.glob("[0-9]*"))[-1]
    stopped_at = json.loads((latest / "state.json").read_text())["epoch"]
    assert 2 <= stopped_at < 20 and not (project / "models" / "model.keras").exists()
    result = imgclf(["run", "train", *args[1:]], project, cli_env)  # up to train: what resumes
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((project / "metrics" / "train.json").read_text())["resumed_from_epoch"] == stopped_at
    assert f"train: head phase resumed after epoch {stopped_at}, from the backup" in result.stderr  # and says so


def test_ctrl_c_under_dask_ends_the_run_at_once_and_leaves_no_worker(tmp_path, cli_env):
    from tasks.demo_data import make_demo_archive

    project = dvc_project(tmp_path / "project", cli_env, {})
    archive = make_demo_archive(tmp_path / "cells.zip", per_class=600)  # several shards
    log = tmp_path / "run.log"
    args = ["run", "validate", "--set", f"data.url={archive}", "--set", "data.sha256=",
            "--set", "orchestration.task_runner=dask"]  # fmt: skip
    with open(log, "w") as stderr:  # a foreground job's process group, as a terminal starts it
        process = subprocess.Popen(in_venv(["imgclf", *args]), cwd=project, env=cli_env, stdout=subprocess.DEVNULL,
                                   stderr=stderr, start_new_session=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while "dask: shards go to" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGINT)  # the workers too: they hung the run, each dying with a traceback
        assert process.wait(timeout=120) == 130
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    said = log.read_text()
    assert said.strip().splitlines()[-1] == "imgclf: error: interrupted" and "Traceback" not in said
    time.sleep(2)
    left = [p.pid for p in psutil.process_iter() if _session(p.pid) == process.pid and p.status() != psutil.STATUS_ZOMBIE]
    assert not left


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def test_imgclf_run_holds_the_run_lock_from_its_first_check_on(tmp_path, cli_env, monkeypatch):
    # Two runs started a second apart must not both pass the check: the flow takes the lock seconds later.
    import flows.server
    from flows.cli import main

    project = dvc_project(tmp_path / "project", cli_env, {})
    monkeypatch.chdir(project)

    def start_server():
        with open(project / ".imgclf" / "run.lock") as handle, pytest.raises(BlockingIOError):
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        raise KeyboardInterrupt  # seen what it had to: the run stops here

    monkeypatch.setattr(flows.server, "start_server", start_server)
    assert main(["run"]) == 130


def test_predict_gives_a_fifo_an_error_row_instead_of_hanging_and_so_to_all_in_a_folder(tmp_path, cli_env):
    model = tiny_model(tmp_path / "models", 8)
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "in").mkdir()
    os.mkfifo(tmp_path / "in" / "pipe.png")
    (tmp_path / "in" / "broken.png").symlink_to("nowhere.png")
    (tmp_path / "in" / "linked").symlink_to(tmp_path / "models", target_is_directory=True)
    (tmp_path / "in" / "loop.png").symlink_to("loop.png")
    result = imgclf(["predict", "--model", str(model), "pipe.png", "in"], tmp_path, cli_env, timeout=120)
    assert result.returncode == 0, result.stderr
    # A model evaluate has not seen predicts uncalibrated, and says so.
    assert f"{tmp_path / 'models' / 'calibration.json'}: no calibration beside the model" in result.stderr
    assert result.stdout.splitlines()[1:] == ["pipe.png,,,not a regular file", "in/broken.png,,,no such file",
                                              "in/linked,,,not a regular file", "in/loop.png,,,a loop of symbolic links",
                                              "in/pipe.png,,,not a regular file"]  # fmt: skip


def test_predict_takes_what_validate_takes_by_the_projects_max_pixels(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from flows.cli import main

    model = tiny_model(tmp_path / "models", 8)
    (tmp_path / "big.png").write_bytes(encode(Image.fromarray(noise(16, 16)), "PNG"))  # 256 pixels
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "--model", str(model), "big.png"]) == 0
    assert capsys.readouterr().out.splitlines()[1].endswith(",")  # no params.yaml here: the default limit, 50,000,000
    (tmp_path / "params.yaml").write_text("validate:\n  max_pixels: 100\n")
    assert main(["predict", "--model", str(model), "big.png"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("big.png,,,too_large")
    # Another tool's params.yaml (DVC's usual name): predict needs one key of it, and says it used the default.
    (tmp_path / "params.yaml").write_text("train:\n  lr: 0.1\n")
    assert main(["predict", "--model", str(model), "big.png"]) == 0
    said = capsys.readouterr()
    assert said.out.splitlines()[1].endswith(",")
    assert "imgclf: warning: params.yaml: train.lr: unknown key; predict judges files by validate.max_pixels' default " \
           "(50,000,000)" in said.err


def test_predict_refuses_to_write_over_what_it_reads_but_its_own_earlier_csv(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from flows.cli import main

    model = tiny_model(tmp_path / "models", 8)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(encode(Image.fromarray(noise(16, 16)), "PNG"))
    (tmp_path / "alias.csv").symlink_to(tmp_path / "in" / "a.png")
    monkeypatch.chdir(tmp_path)
    before = {path: path.read_bytes() for path in (tmp_path / "in" / "a.png", model, model.parent / "model.json")}
    for out in ("in/a.png", "alias.csv", str(model), str(model.parent / "model.json")):
        assert main(["predict", "--model", str(model), "in", "--out", out]) == 1
        assert capsys.readouterr().err.splitlines() == [f"imgclf: error: --out {out}: predict reads this file (an input, "
                                                        "or the model's); name another to write"]  # fmt: skip
    (tmp_path / "overlays").write_text("a file")
    assert main(["predict", "--model", str(model), "in", "--out", "new.csv", "--explain", "overlays"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == ("imgclf: error: --explain overlays: a file; name a folder to "
                                                        "write the overlays into")  # fmt: skip
    assert not (tmp_path / "new.csv").exists()
    assert {path: path.read_bytes() for path in before} == before
    # Its own CSV of an earlier run, in a folder it reads: the same command again writes it anew, and does not
    # read it as an input.
    for _ in range(2):
        assert main(["predict", "--model", str(model), "in", "--out", "in/predictions.csv"]) == 0
    rows = [line.split(",") for line in (tmp_path / "in" / "predictions.csv").read_text().splitlines()[1:]]
    assert [(row[0], row[-1]) for row in rows] == [("in/a.png", "")]


def test_predict_writes_through_a_link_and_into_a_fifo_as_a_shell_would(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from flows.cli import main

    model = tiny_model(tmp_path / "models", 8)
    (tmp_path / "a.png").write_bytes(encode(Image.fromarray(noise(16, 16)), "PNG"))
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "one.csv").write_text("an earlier run's\n")
    (tmp_path / "latest.csv").symlink_to(tmp_path / "runs" / "one.csv")
    os.mkfifo(tmp_path / "pipe.csv")
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "--model", str(model), "a.png", "--out", "latest.csv"]) == 0
    assert (tmp_path / "latest.csv").is_symlink()  # the link stays; its target has the rows
    assert (tmp_path / "runs" / "one.csv").read_text().splitlines()[1].startswith("a.png,")
    read: list[str] = []
    reader = threading.Thread(target=lambda: read.append((tmp_path / "pipe.csv").read_text()))
    reader.start()
    assert main(["predict", "--model", str(model), "a.png", "--out", "pipe.csv"]) == 0
    reader.join(timeout=60)
    assert read and read[0].splitlines()[1].startswith("a.png,")
    assert stat.S_ISFIFO(os.lstat(tmp_path / "pipe.csv").st_mode)  # still the FIFO, not a file put in its place
    capsys.readouterr()


def test_predict_writes_a_name_that_is_not_utf8_escaped(tmp_path, monkeypatch):
    from PIL import Image

    from flows.cli import main

    model = tiny_model(tmp_path / "models", 8)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / os.fsdecode(b"caf\xe9.png")).write_bytes(encode(Image.fromarray(noise(16, 16)), "PNG"))
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "--model", str(model), "in", "--out", "rows.csv"]) == 0
    rows = (tmp_path / "rows.csv").read_text(encoding="utf-8").splitlines()[1:]
    assert len(rows) == 1 and rows[0].startswith("in/caf\\xe9.png,") and rows[0].endswith(",")


def test_predict_piped_into_a_reader_that_leaves_early_stops_without_an_error(tmp_path, cli_env):
    from PIL import Image

    model = tiny_model(tmp_path / "models", 8)
    images = tmp_path / "images"
    images.mkdir()
    png = encode(Image.fromarray(noise(8, 8)), "PNG")
    for i in range(1500):  # about 150 KB of rows: more than a pipe holds, so writing outlives the reader
        (images / f"{i:04d}_{'long_name_' * 8}.png").write_bytes(png)
    command = shlex.join(in_venv(["imgclf", "predict", "--model", str(model), str(images)]))
    # `head -1` exits after one line; imgclf then writes into a pipe nobody reads.
    result = subprocess.run(["bash", "-c", f"set -o pipefail; {command} | head -1"], cwd=tmp_path, env=cli_env,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.stdout == "path,label,probability,error\n"
    assert "error" not in result.stderr, result.stderr
    assert result.returncode == 141


def test_the_stderr_filter_ends_with_its_block_though_a_child_still_holds_stderr(capfd):
    import sys

    from flows.console import native_noise_filtered

    with native_noise_filtered():
        # As multiprocessing's resource tracker: started in the block, inherits fd 2, outlives it.
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        os.write(2, b"I0000 00:00:1795995284.822632 6843 port.cc:153] oneDNN custom operations are on.\nkept\n")
        os.write(2, b"E0000 00:00:1796051044.131393 15225 node_def_util.cc:682] NodeDef mentions attribute "
                    b"use_unbounded_threadpool which is not in the op definition: Op<name=MapDataset; ...>\n")
    try:
        assert not [thread for thread in threading.enumerate() if thread.name == "stderr-filter"]
    finally:
        child.kill()
        child.wait()
    assert capfd.readouterr().err == "kept\n"
