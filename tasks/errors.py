"""The base of every expected failure: its message is one line naming the file, key or URL, and why; and the
flag that stops a long stage early."""

import threading


class StageError(Exception):
    """Bad input or a refused request; the command line prints the message alone, no traceback."""


class Interrupted(StageError):
    """The run was stopped (Ctrl-C, a cancelled run) and the stage with it, at a safe point."""


# Set by the flow when its run is interrupted. Ctrl-C reaches only the main thread, and a stage running in a
# task runner's thread would otherwise go on to its end (hours of training) with the run already given up;
# long loops check it at their safe points. (`imgclf stage` runs in the main thread: Ctrl-C stops it directly.)
stop_requested = threading.Event()
