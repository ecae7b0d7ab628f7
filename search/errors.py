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


def interrupted(exc: BaseException) -> bool:
    """Whether `exc` was raised while a Ctrl-C was being handled: a library's own cleanup can fail under the
    interrupt (Optuna's trial loop does when the signal lands while it records a result), and then the
    interrupt, not that failure, is what happened."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        if isinstance(link, KeyboardInterrupt):
            return True
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    return False
