"""The study store: Optuna's RDB storage (SQLAlchemy), SQLite file by default, any SQLAlchemy URL otherwise.

Everything a resumed study needs lives in the database: trials (Optuna's tables) and the
study-level facts the engine computed once (baseline figures, sensitivity, seeds, fingerprints)
as study user attributes. Nothing else has to travel with a study.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import optuna
import sqlalchemy
from sqlalchemy.engine import make_url

from search.errors import SearchError, first_line, redact
from search.evaluations import create_tables

log = logging.getLogger("search")

STUDIES_DIR = Path("studies")
HEARTBEAT_INTERVAL_S = 60
GRACE_PERIOD_S = 180


def default_study_name(model: str, budget: float, granularity: str = "layer") -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", model).strip("-") or "model"
    space = "" if granularity == "layer" else f"-{granularity}"  # whole-layer studies keep their old names
    return f"{stem}-b{round(budget * 100, 2):g}{space}"


def default_storage(study: str) -> str:
    return f"sqlite:///{STUDIES_DIR / study}.db"


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL; None for other backends. Raises on a malformed URL."""
    try:
        parsed = make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise SearchError(f"--storage {redact(url)!r} is not a valid SQLAlchemy URL") from None
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def open_storage(url: str, create: bool = True) -> optuna.storages.RDBStorage:
    """Open (and for SQLite, create unless `create=False`) the store, turning failures into one line."""
    path = sqlite_path(url)
    if path is not None:
        if not path.exists() and not create:
            raise SearchError(f"no study store at {path}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SearchError(f"cannot create the folder for {path}: {exc.strerror}") from None
    # Opening creates Optuna's tables on first use; two processes doing it at once (a worker and a
    # `front` reader, or two workers) collide on a unique key. An opener that finds the schema
    # incomplete therefore takes the store's schema lock, and a collision with a plain-Optuna
    # opener outside it is retried once. A complete store is opened without any lock.
    for attempt in range(2):
        try:
            with nullcontext() if _schema_complete(url) else exclusive(url, "schema"):
                storage = optuna.storages.RDBStorage(
                    url,
                    heartbeat_interval=HEARTBEAT_INTERVAL_S,
                    grace_period=GRACE_PERIOD_S,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2),
                )
                create_tables(storage.engine, write=create)  # the evaluation cache, beside Optuna's tables
                return storage
        except SearchError:
            raise
        except sqlalchemy.exc.IntegrityError:
            if attempt == 0:
                time.sleep(1.0)
                continue
            raise SearchError(f"cannot open storage {redact(url)}: another process is creating it; retry") from None
        except Exception as exc:  # SQLAlchemy/driver errors of every kind: unreachable, auth, not a DB
            reason = first_line(exc)
            raise SearchError(f"cannot open storage {redact(url)}: {redact(reason)}") from None
    raise AssertionError("unreachable")


def _schema_complete(url: str) -> bool:
    """Whether every table exists already: then opening only reads, and needs no lock."""
    path = sqlite_path(url)
    if path is not None and not path.exists():
        return False
    try:
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        try:
            names = set(sqlalchemy.inspect(engine).get_table_names())
        finally:
            engine.dispose()
    except Exception:
        return False  # let the locked path open it and report what is wrong
    return {"studies", "trials", "alembic_version", "search_evaluations", "search_schema"} <= names


def study_names(storage: optuna.storages.RDBStorage) -> list[str]:
    return [s.study_name for s in storage.get_all_studies()]


def load_study(storage: optuna.storages.RDBStorage, name: str | None) -> optuna.Study:
    """An existing study by name; without a name, the store's only study."""
    names = study_names(storage)
    if name is None:
        if len(names) != 1:
            listing = ", ".join(names) or "none"
            raise SearchError(f"pass --study NAME (studies in this store: {listing})")
        name = names[0]
    if name not in names:
        listing = ", ".join(names) or "none"
        raise SearchError(f"no study named {name!r} in this store (studies: {listing})")
    return optuna.load_study(study_name=name, storage=storage)


def locate_store(study: str | None, storage: str | None) -> str:
    """The storage URL to read: given, or the SQLite file for `study`, or the only one in studies/."""
    if storage:
        return storage
    if study:
        return default_storage(study)
    found = sorted(STUDIES_DIR.glob("*.db"))
    if len(found) == 1:
        return f"sqlite:///{found[0]}"
    listing = ", ".join(p.stem for p in found) or "none"
    raise SearchError(f"pass --study NAME or --storage URL (studies in {STUDIES_DIR}/: {listing})")


def _lock_key(name: str) -> int:
    # A stable signed 64-bit key for pg_advisory_lock.
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


@contextmanager
def exclusive(url: str, name: str, announce: bool = True) -> Iterator[None]:
    """Hold a lock named `name` across every process using the store at `url`.

    Guards what Optuna cannot do concurrently: first-time schema creation, and creating and seeding
    a study exactly once. The lock dies with its holder (a flock for SQLite, a session-level advisory
    lock for PostgreSQL), so a killed worker never leaves it behind. `announce=False` keeps a wait
    that is expected and short (deciding who measures a set) out of the log.
    """
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # One lock file per name: readers creating the schema never wait behind a worker seeding.
        suffix = "" if name.startswith("study:") else "." + re.sub(r"[^A-Za-z0-9._-]+", "_", name)
        with open(f"{path}{suffix}.lock", "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if announce:
                    log.info("waiting for another worker on %s (%s)", path, name)
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    if make_url(url).get_backend_name() != "postgresql":
        yield  # other backends: no cross-process guard; start one worker first
        return
    try:
        # TCP keepalives: if the holder's machine vanishes, the server drops its session (and lock) in ~1 min.
        keepalive = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, connect_args=keepalive)
        connection = engine.connect()
    except Exception as exc:
        reason = first_line(exc)
        raise SearchError(f"cannot open storage {redact(url)}: {redact(reason)}") from None
    try:
        key = _lock_key(name)
        got = connection.execute(sqlalchemy.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar()
        if not got:
            if announce:
                log.info("waiting for another worker on %s (%s)", redact(url), name)
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        connection.commit()
        yield
    finally:
        connection.close()  # closing the session releases the advisory lock
        engine.dispose()
