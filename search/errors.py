"""The one exception type the CLI turns into a one-line message instead of a traceback."""


class SearchError(Exception):
    """A problem the user can fix: bad input, missing model, incompatible study."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none): enough for a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
