"""The one exception type the CLI turns into a one-line message instead of a traceback, and message hygiene."""

import re


class SearchError(Exception):
    """A problem the user can fix: bad input, missing model, incompatible study."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none): enough for a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def redact(text: str) -> str:
    """`text` with the password of any URL in it masked, for every message and log line."""
    return re.sub(r"(//[^:/@\s]+):\S*@", r"\1:***@", text)  # greedy: a raw '@' in the password stays hidden
