"""The Prefect API a command-line run reports to: `PREFECT_API_URL` when set, else a temporary local server.

The temporary server is Prefect's own app (what its ephemeral mode runs), started by us for
two reasons. Prefect's launcher leaves the server running when the run is killed (~230 MB
each, one per SIGKILL); ours asks the kernel to stop it when the process that started it
dies, whatever the cause, and a clean exit stops it before the command prints its last
line. And ours starts it before the run imports Prefect's client, DVC and the flow,
so the server boots on the second core meanwhile, and the run never imports the server's
own modules (FastAPI, its database models): seconds off every run, most of a no-op one.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

# Runs in the server's process before uvicorn: ask the kernel for SIGTERM when the parent dies
# (Linux), and exit at once if it already has.
_DIE_WITH_PARENT = (
    "import ctypes, os, runpy, signal, sys\n"
    "parent = int(sys.argv.pop(1))\n"
    "if sys.platform == 'linux':\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"  # 1: PR_SET_PDEATHSIG
    "if os.getppid() != parent:\n"
    "    sys.exit(0)\n"
    "sys.argv = ['uvicorn', *sys.argv[1:]]\n"
    "runpy.run_module('uvicorn', run_name='__main__')\n"
)

START_TIMEOUT = 120  # seconds: a loaded machine (a CI run, a training beside it) starts it slowly


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class TemporaryServer:
    """Prefect's API app under uvicorn on a free loopback port, stopped with this process."""

    def __init__(self) -> None:
        import prefect
        from prefect.settings import get_current_settings

        self.port = _free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        # As Prefect's ephemeral mode: no UI, this process's Prefect settings passed on.
        env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
               "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}  # fmt: skip
        command = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()),
                   "--app-dir", str(Path(prefect.__file__).parent.parent), "--factory",
                   "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
                   "--log-level", "error", "--lifespan", "on"]  # fmt: skip
        # A file, not a pipe: nobody reads a pipe while the run goes on, and a full one would block the server.
        self.errors = tempfile.TemporaryFile()
        # Its own session: a terminal's Ctrl-C goes to the whole foreground process group, and the run,
        # interrupted, still reports its end to the server before it stops it.
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=self.errors,
                                        start_new_session=True)  # fmt: skip

    def wait_until_up(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.errors.seek(0)
                detail = self.errors.read().decode(errors="replace").strip().splitlines()
                raise RuntimeError(f"the temporary Prefect server exited with code {self.process.returncode}"
                                   + (f": {detail[-1]}" if detail else ""))  # fmt: skip
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the temporary Prefect server did not answer within {timeout:.0f} s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.errors.close()


def start_server() -> TemporaryServer | None:
    """Starts the temporary server unless `PREFECT_API_URL` names one (set in the environment or the active
    Prefect profile); returns at once, it boots meanwhile."""
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:
        return None
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no phoning home from a pipeline run
    return TemporaryServer()


@contextlib.contextmanager
def prefect_api(server: TemporaryServer | None) -> Iterator[None]:
    """Within the block, Prefect talks to `server` (once it answers), or to `PREFECT_API_URL`."""
    if server is None:
        yield
        return
    from prefect.logging.handlers import APILogHandler
    from prefect.settings import PREFECT_API_URL, temporary_settings

    try:
        server.wait_until_up()
        # The settings context, not the environment: Prefect read that when it was imported.
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            try:
                yield
            finally:
                APILogHandler().flush()  # the run's last log lines reach the server before it stops
    finally:
        server.stop()
