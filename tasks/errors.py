"""The base of every expected failure: its message is one line naming the file, key or URL, and why."""


class StageError(Exception):
    """Bad input or a refused request; the command line prints the message alone, no traceback."""
