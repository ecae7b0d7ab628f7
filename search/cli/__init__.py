"""`python -m search run|method|front|studies|show|export|heal|evaluate`: flags over the library; errors are one line.

parser.py holds the flags and help (choices come from the registries); commands.py what each
subcommand does; `main` turns every failure into one `error:` line and an exit status.
"""

from __future__ import annotations

import logging
import sys

from search.cli import commands
from search.cli.parser import build_parser
from search.errors import SearchError, first_line, redact
from search.failures import interrupted

COMMANDS = {
    "run": commands.run,
    "method": commands.method,
    "baseline": commands.method,  # the old name of `method`
    "front": commands.front,
    "studies": commands.studies,
    "show": commands.show,
    "export": commands.export,
    "heal": commands.heal,
    "evaluate": commands.evaluate,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    commands.configure_logging(args.debug)
    try:
        COMMANDS[args.command](args)
    except SearchError as exc:
        if args.debug and exc.__cause__ is not None:  # a translated failure: show what lies beneath
            raise
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _interrupted()
    except Exception as exc:
        if interrupted(exc):  # a failure while the interrupt unwound: the store is as a killed worker leaves it
            logging.getLogger("search").debug("while interrupted: %s: %s", type(exc).__name__, first_line(exc))
            return _interrupted()
        if args.debug:
            raise
        from search.failures import out_of_space

        known = out_of_space(exc)
        if known is not None:
            print(f"error: {redact(str(known))}", file=sys.stderr)
            return 1
        print(
            f"error: {type(exc).__name__}: {redact(first_line(exc))} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
    return 0


def _interrupted() -> int:
    print("interrupted: finished trials are saved; run the same command again to resume", file=sys.stderr)
    return 130


__all__ = ["build_parser", "main"]
