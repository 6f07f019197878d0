"""Credentials never leave the process: URLs are shown with their userinfo and query string as `***`.

A URL may carry a password (`https://user:pass@host/x.zip`) or a signed query
(`?X-Amz-Signature=...`). Whatever prints, logs, names or records a URL shows `redact(url)`:
log lines, run names, artifacts, source records, error messages.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from pydantic import SecretStr

# scheme://[userinfo@]host/path[?query][#fragment]. The userinfo runs to the authority's last @, as
# urllib splits it for the download: a password may hold a raw @ (`user:p@ss@host`), and spaces,
# which the download sends as they are. In running text that may hide words up to an @ further
# on the line: hiding too much is the safe side. (A space in the path or query: data.url refuses it.)
# A userinfo redacted already (`***@`, no @ after it in the host) stays as it is: a line is redacted
# again on its way out (the CLI's error line, the log filter), and would lose words up to a later @.
_URL = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>\*\*\*@(?![^/?#\s]*@)|[^/?#\r\n]*@)?"
                  r"(?P<rest>[^\s?#'\"]*)(?P<query>\?[^\s#'\"]*)?")  # fmt: skip


def _redacted(match: re.Match) -> str:
    userinfo = "***@" if match["userinfo"] else ""
    query = "?***" if match["query"] else ""
    return f"{match['head']}{userinfo}{match['rest']}{query}"


def redact(text: str) -> str:
    """Returns `text` with the userinfo and query string of every URL in it replaced by `***`."""
    return _URL.sub(_redacted, text)


def has_secret(text: str) -> bool:
    """True when `text` holds a URL with userinfo or a query string."""
    return any(match["userinfo"] or match["query"] for match in _URL.finditer(text))


# Why a URL that would be written down (params.yaml, .dvc/config: files git keeps) is refused.
HOLDS_CREDENTIALS = "holds credentials (a user and password before the host, or a query string)"


class RedactingFilter(logging.Filter):
    """Rewrites each record's message with every URL redacted, before any handler sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if has_secret(message):
            record.msg, record.args = redact(message), ()
        return True


def _each_value(value: Any, change: Callable[[Any], Any]) -> Any:
    # A whole section may be overridden (`--set 'data={url: ...}'`): its texts are inside.
    if isinstance(value, dict):
        return {key: _each_value(item, change) for key, item in value.items()}
    if isinstance(value, list):
        return [_each_value(item, change) for item in value]
    return change(value)


def hide_secrets(overrides: dict[str, Any]) -> dict[str, Any]:
    """Returns the overrides with each secret-bearing text as a SecretStr: Prefect stores and shows it as `****`."""
    return _each_value(overrides, lambda value: SecretStr(value) if isinstance(value, str) and has_secret(value) else value)


def plain_secrets(overrides: dict[str, Any]) -> list[str]:
    """Returns the texts of `overrides` that hold a secret in the clear: not wrapped by hide_secrets,
    as a deployment run's parameters arrive, which Prefect stored as they were sent."""
    found: list[str] = []
    _each_value(overrides, lambda value: found.append(value) if isinstance(value, str) and has_secret(value) else None)
    return found


def reveal(overrides: dict[str, Any]) -> dict[str, Any]:
    """Returns the overrides with every SecretStr unwrapped: what the stages use."""
    return _each_value(overrides, lambda value: value.get_secret_value() if isinstance(value, SecretStr) else value)


def redact_texts(overrides: dict[str, Any]) -> dict[str, Any]:
    """Returns the overrides with every URL in their texts redacted: what may be written down."""
    return _each_value(overrides, lambda value: redact(value) if isinstance(value, str) else value)
