"""Known failure classes, each turned into one line that says what happened and what to do next.

A user who meets a full disk, a missing GPU, a pickle checkpoint or an impossible window should
read the cause and the fix, not a traceback. Checks that can run before any work do (device,
weights, window length); failures that can only happen mid-study (the store's disk filling up,
its server going away) are recognised on the way out. `--debug` still shows everything.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from search.errors import SearchError, first_line, redact

# Words the SQLite, PostgreSQL and SQLAlchemy drivers use for the two store failures a user can act on.
_FULL = re.compile(r"database or disk is full|no space left on device|could not extend file|disk full", re.I)
_GONE = re.compile(
    r"server closed the connection|connection (is |was )?(closed|lost|refused|reset)|terminating connection|"
    r"could not connect|connection invalidated|the database system is (shutting down|starting up)|"
    r"unable to open database file|disk i/o error",
    re.I,
)
_SAFE_WEIGHTS = ("*.safetensors", "*.safetensors.index.json")
_PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def check_device(device: str, flag: str = "--device") -> None:
    """Refuse a device this torch build cannot use, naming the ones it can."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise SearchError(f"{flag} {device!r} is not a torch device name (e.g. cpu, cuda, cuda:1)") from None
    if parsed.type == "cpu":
        return
    usable = available_devices()
    backend = getattr(torch, parsed.type, None)
    if parsed.type == "cuda" and torch.version.cuda is None:
        raise SearchError(
            f"{flag} {device}: this torch build ({torch.__version__}) has no CUDA; usable here: {', '.join(usable)}. "
            "For a GPU, install a CUDA build of torch 2.13 (pip's CUDA wheel), or pass --device cpu"
        )
    if backend is None or not backend.is_available():
        raise SearchError(
            f"{flag} {device}: torch {torch.__version__} sees no {parsed.type} device here (no driver, or none "
            f"visible to this process); usable here: {', '.join(usable)}"
        )
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if parsed.index is not None and parsed.index >= count:
        raise SearchError(f"{flag} {device}: only {count} {parsed.type} device(s) here; usable: {', '.join(usable)}")


def available_devices() -> list[str]:
    devices = ["cpu"]
    for kind in ("cuda", "xpu", "mps"):
        backend = getattr(torch, kind, None)
        if backend is not None and backend.is_available():
            count = backend.device_count() if hasattr(backend, "device_count") else 1
            devices += [f"{kind}:{i}" for i in range(count)] if count > 1 else [kind]
    return devices


def check_safe_weights(directory: Path, spec: str) -> None:
    """A model directory with pickle weights only: say why it is not loaded and how to convert it once."""
    if any(next(directory.glob(p), None) for p in _SAFE_WEIGHTS):
        return
    pickles = sorted(p.name for pattern in _PICKLE_WEIGHTS for p in directory.glob(pattern))
    if not pickles:
        return
    convert = (
        'python -c "import sys, transformers as t; d, o = sys.argv[1:]; '
        "t.AutoModelForCausalLM.from_pretrained(d, use_safetensors=False).save_pretrained(o); "
        f't.AutoTokenizer.from_pretrained(d).save_pretrained(o)" {spec} {spec.rstrip("/")}-safetensors'
    )
    raise SearchError(
        f"--model {spec} holds only pickle weights ({', '.join(pickles[:3])}); loading a pickle can run any code "
        f"it carries, so only safetensors are loaded. If you trust the files, convert them once: {convert}"
    )


def check_window(config, seq_len: int, bos: bool, latency_tokens: int | None = None) -> None:
    """Windows longer than the model's positions fail deep inside attention; say so before loading data."""
    limit = next(
        (getattr(config, k) for k in ("max_position_embeddings", "n_positions") if getattr(config, k, None)), None
    )
    if limit is None:
        return
    needed = seq_len + (1 if bos else 0)
    if needed > limit:
        extra = " plus the BOS token prepended to each window" if bos else ""
        raise SearchError(
            f"--seq-len {seq_len}{extra} exceeds this model's {limit} positions; pass --seq-len {limit - int(bos)} "
            "or less"
        )
    if latency_tokens is not None and latency_tokens > limit:
        raise SearchError(
            f"--latency-tokens {latency_tokens} exceeds this model's {limit} positions; pass {limit} or less"
        )


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def interrupted(exc: BaseException) -> bool:
    """Whether `exc` was raised while a Ctrl-C was being handled: a library's own cleanup can fail under the
    interrupt (Optuna's trial loop does when the signal lands while it records a result), and then the
    interrupt, not that failure, is what happened."""
    return any(isinstance(link, KeyboardInterrupt) for link in _chain(exc))


def _database_error(exc: BaseException | None) -> BaseException | None:
    """The driver-level error behind an Optuna/SQLAlchemy wrapper, if the failure came from the store."""
    import sqlalchemy

    for link in _chain(exc):
        if isinstance(link, sqlalchemy.exc.DBAPIError | sqlite3.Error) or type(link).__module__.startswith("psycopg"):
            return link
    return None


def _filesystem(path: Path) -> str:
    """The mount point holding `path` and its free space, e.g. `/data, 12 KiB free`."""
    folder = path.parent.resolve()
    mount = folder
    while mount != mount.parent and mount.parent.stat().st_dev == folder.stat().st_dev:
        mount = mount.parent
    stats = os.statvfs(folder)
    free = stats.f_bavail * stats.f_frsize
    size = (
        f"{free / 2**30:.1f} GiB"
        if free >= 2**30
        else f"{free / 2**20:.1f} MiB"
        if free >= 2**20
        else f"{free // 1024} KiB"
    )
    return f"{mount}, {size} free"


def store_failure(exc: BaseException, url: str, path: Path | None = None) -> SearchError | None:
    """The one-line error for a store (`path`: its SQLite file) that filled up or went away; None for anything else."""
    database = _database_error(exc)
    if database is None:
        return None
    text = " ".join(first_line(link) for link in _chain(exc))
    saved = "every completed trial is saved"
    if _FULL.search(text):
        where = f"{path} (filesystem {_filesystem(path)})" if path is not None else f"at {redact(url)} (its server)"
        return SearchError(
            f"the study store {where} ran out of disk space; {saved}: free space, then run the same command again "
            "to resume"
        )
    if _GONE.search(text):
        return SearchError(
            f"lost the study store {redact(url)} ({redact(first_line(database))}); {saved}: run the same command "
            "again once it is reachable"
        )
    return None


def out_of_space(exc: BaseException) -> SearchError | None:
    """A full disk while writing anything else: a model cache, an export, a plot."""
    for link in _chain(exc):
        if isinstance(link, OSError) and link.errno == errno.ENOSPC:
            where = f" writing {link.filename}" if link.filename else ""
            return SearchError(f"no space left on the device{where}; free space and run the same command again")
    return None


@contextmanager
def store_failures(url: str | None, path: Path | None = None) -> Iterator[None]:
    """Inside it, a full or lost store (and a full disk elsewhere) leaves as a one-line SearchError."""
    try:
        yield
    except SearchError:
        raise
    except Exception as exc:
        known = (store_failure(exc, url, path) if url else None) or out_of_space(exc)
        if known is None:
            raise
        raise known from exc


class _QuietTrialFailures(logging.Filter):
    """Drop Optuna's "Trial N failed ..." lines and their tracebacks.

    No trial failure is caught here (Optuna is given no `catch`), so every one ends the run and the
    CLI reports it in one line; Optuna's own report would repeat it with a traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("optuna") and re.match(r"Trial \d+ failed", record.getMessage()))


def quiet_known_failures() -> None:
    """Without --debug: no Optuna per-trial failure log, and a dying heartbeat thread reports in one line.

    Call after Optuna's logging is configured: the filter goes on the handlers that exist then.
    """
    quiet = _QuietTrialFailures()
    for handler in [*logging.getLogger("optuna").handlers, *logging.getLogger().handlers]:
        handler.addFilter(quiet)

    def one_line(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is not None and _database_error(args.exc_value) is None:
            logging.getLogger("search").warning(
                "background thread %s failed: %s", args.thread.name if args.thread else "?", first_line(args.exc_value)
            )
        # A store failure in Optuna's heartbeat thread is reported by the main thread, which meets it too.

    threading.excepthook = one_line
