"""The study store: Optuna's RDB storage (SQLAlchemy), SQLite file by default, any SQLAlchemy URL otherwise.

Everything a resumed study needs lives in the database: trials (Optuna's tables) and the
study-level facts the engine computed once (baseline figures, sensitivity, seeds, fingerprints)
as study user attributes. Nothing else has to travel with a study.
"""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import sqlalchemy
from sqlalchemy.engine import make_url

from search.errors import SearchError

STUDIES_DIR = Path("studies")
HEARTBEAT_INTERVAL_S = 60
GRACE_PERIOD_S = 180


def default_study_name(model: str, budget: float) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", model).strip("-") or "model"
    return f"{stem}-b{round(budget * 100, 2):g}"


def default_storage(study: str) -> str:
    return f"sqlite:///{STUDIES_DIR / study}.db"


def redact(text: str) -> str:
    """`text` with the password of any URL in it masked, for every message and log line."""
    return re.sub(r"(//[^:/@\s]+):[^@\s]*@", r"\1:***@", text)


def sqlite_path(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def open_storage(url: str, create: bool = True) -> optuna.storages.RDBStorage:
    """Open (and for SQLite, create unless `create=False`) the store, turning failures into one line."""
    try:
        make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise SearchError(f"--storage {redact(url)!r} is not a valid SQLAlchemy URL") from None
    path = sqlite_path(url)
    if path is not None:
        if not path.exists() and not create:
            raise SearchError(f"no study store at {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=HEARTBEAT_INTERVAL_S,
            grace_period=GRACE_PERIOD_S,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2),
        )
    except Exception as exc:  # SQLAlchemy/driver errors of every kind: unreachable, auth, not a DB
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SearchError(f"cannot open storage {redact(url)}: {redact(reason)}") from None


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
