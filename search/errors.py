"""The one exception type the CLI turns into a one-line message instead of a traceback."""


class SearchError(Exception):
    """A problem the user can fix: bad input, missing model, incompatible study."""
