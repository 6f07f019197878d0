"""The Prefect API a command-line run reports to: `PREFECT_API_URL` when set, else a temporary local server.

Prefect's own temporary server is a separate process that outlives a killed run (~230 MB
each, one per SIGKILL). Ours is the same server, started so that the kernel stops it when
the process that started it dies, whatever the cause; a clean exit stops it too, before
the command prints its last line.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from types import SimpleNamespace
from unittest import mock

from prefect.logging.handlers import APILogHandler
from prefect.server.api import server as server_module
from prefect.server.api.server import SubprocessASGIServer

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


class _DiesWithParent(SubprocessASGIServer):
    def _run_uvicorn_command(self):
        def popen(args, **kwargs):
            # args: [python, -m, uvicorn, ...]: the same command, behind the guard above.
            return subprocess.Popen([args[0], "-c", _DIE_WITH_PARENT, str(os.getpid()), *args[3:]], **kwargs)

        with mock.patch.object(server_module, "subprocess", SimpleNamespace(Popen=popen)):
            return super()._run_uvicorn_command()


@contextlib.contextmanager
def prefect_api() -> Iterator[None]:
    """Within the block, Prefect talks to `PREFECT_API_URL`, or to a temporary server that dies with this process."""
    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no phoning home from a pipeline run
    server = _DiesWithParent()
    server.start(timeout=120)  # a loaded machine (a CI run, a training beside it) starts it slowly
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        yield
    finally:
        APILogHandler().flush()  # the run's last log lines reach the server before it stops
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()
