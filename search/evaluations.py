"""Evaluation cache: every perplexity measured, kept in the study store beside Optuna's tables.

A removal set's perplexity depends only on the model weights, the token windows and the numerics
(dtype, device kind, batch size), so those key it, not the study: a resumed run, another worker,
or a new study on the same model and data (another budget, more trials) never evaluates a set twice.
Rows are only ever inserted; the first writer of a key wins and a second one is ignored.

The table's layout has a version, kept in `search_schema` (one row per table of the engine's own):
a store written before the version existed reads as version 1 and gets its row on first open, and
a store written by a newer layout than this code knows is refused rather than misread.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
import torch

from search.errors import SearchError, redact
from search.model.removal import Removal

metadata = sa.MetaData()

# The layout of `search_evaluations` this code reads and writes. Raise it on any change an older
# version would misread, and teach `create_tables` to upgrade stores from the versions before it.
SCHEMA_VERSION = 1

schema = sa.Table(
    "search_schema",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),  # a table of the engine's own
    sa.Column("version", sa.Integer, nullable=False),
)

evaluations = sa.Table(
    "search_evaluations",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("model_fingerprint", sa.String(128), nullable=False),
    sa.Column("data_fingerprint", sa.String(128), nullable=False),  # the split's token windows
    sa.Column("numerics", sa.String(96), nullable=False),  # dtype@device model/batch, e.g. bf16-mixed@cpu:AMD EPYC/b4
    sa.Column("removed_layers", sa.String(1024), nullable=False),  # Removal.key: "3,17", "3,a6,m12"; "" unpruned
    sa.Column("perplexity", sa.Float, nullable=False),
    sa.Column("seconds", sa.Float),  # what the evaluation cost when it was measured
    sa.Column("created", sa.DateTime, server_default=sa.func.now()),
    sa.UniqueConstraint("model_fingerprint", "data_fingerprint", "numerics", "removed_layers", name="search_eval_key"),
)


def device_label(device: torch.device) -> str:
    """The device kind and model: bf16 results differ between CPUs and GPUs sharing one store."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{device.type}:{name}"[:40]


def stored_schema_version(engine: sa.Engine) -> int | None:
    """The layout version recorded for `search_evaluations`; None where no row says (older code, or a new store)."""
    if not sa.inspect(engine).has_table(schema.name):
        return None
    with engine.connect() as conn:
        query = sa.select(schema.c.version).where(schema.c.name == evaluations.name)
        return conn.execute(query).scalar()


def create_tables(engine: sa.Engine, write: bool = True) -> None:
    """Create the engine's tables where missing and record their layout version; refuse a newer layout.

    A reader (`write=False`) of a store that has the evaluation cache leaves it as it is: a store
    without a version row is version 1, and `front` must work on a read-only file.
    """
    stored = stored_schema_version(engine)
    if stored is not None and stored > SCHEMA_VERSION:
        raise SearchError(
            f"store {redact(engine.url.render_as_string(hide_password=True))} was written by a newer version "
            f"of search (schema {stored}; this one reads {SCHEMA_VERSION}); upgrade search to open it"
        )
    if not write and stored is None and sa.inspect(engine).has_table(evaluations.name):
        return
    try:
        metadata.create_all(engine, checkfirst=True)
    except sa.exc.DBAPIError:
        # Another opener created a table between the check and the CREATE: fine once all exist.
        inspector = sa.inspect(engine)
        if not all(inspector.has_table(table.name) for table in metadata.sorted_tables):
            raise
    if stored is None:  # a new store, or one written before the version was kept: both are version 1
        try:
            with engine.begin() as conn:
                conn.execute(schema.insert().values(name=evaluations.name, version=SCHEMA_VERSION))
        except sa.exc.IntegrityError:
            pass  # recorded meanwhile by another opener


def _key(removal: Removal) -> str:
    return removal.key  # whole layers: "3,17", as before blocks could be removed


@dataclass
class EvalCache:
    """The cache for one model, one numeric setting and one split's windows."""

    engine: sa.Engine
    model_fingerprint: str
    data_fingerprint: str
    numerics: str

    def _where(self, removed: Removal):
        return sa.and_(
            evaluations.c.model_fingerprint == self.model_fingerprint,
            evaluations.c.data_fingerprint == self.data_fingerprint,
            evaluations.c.numerics == self.numerics,
            evaluations.c.removed_layers == _key(removed),
        )

    def get(self, removed: Removal) -> float | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(evaluations.c.perplexity).where(self._where(removed))).scalar()

    def put(self, removed: Removal, perplexity: float, seconds: float | None = None) -> None:
        row = {
            "model_fingerprint": self.model_fingerprint,
            "data_fingerprint": self.data_fingerprint,
            "numerics": self.numerics,
            "removed_layers": _key(removed),
            "perplexity": perplexity,
            "seconds": seconds,
        }
        try:
            with self.engine.begin() as conn:
                conn.execute(evaluations.insert().values(**row))
        except sa.exc.IntegrityError:
            pass  # measured meanwhile by another worker: same key, same figure

    def count(self) -> int:
        with self.engine.connect() as conn:
            query = sa.select(sa.func.count()).select_from(evaluations)
            query = query.where(
                evaluations.c.model_fingerprint == self.model_fingerprint,
                evaluations.c.data_fingerprint == self.data_fingerprint,
                evaluations.c.numerics == self.numerics,
            )
            return conn.execute(query).scalar() or 0
