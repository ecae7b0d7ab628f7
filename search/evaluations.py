"""Evaluation cache: every perplexity measured, kept in the study store beside Optuna's tables.

A removal set's perplexity depends only on the model weights, the token windows and the numerics
(dtype, device kind, batch size), so those key it, not the study: a resumed run, another worker,
or a new study on the same model and data (another budget, more trials) never evaluates a set twice.
Rows are only ever inserted; the first writer of a key wins and a second one is ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa

metadata = sa.MetaData()

evaluations = sa.Table(
    "search_evaluations",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("model_fingerprint", sa.String(128), nullable=False),
    sa.Column("data_fingerprint", sa.String(128), nullable=False),  # the split's token windows
    sa.Column("numerics", sa.String(64), nullable=False),  # dtype, device kind, batch: bfloat16@cpu/b4
    sa.Column("removed_layers", sa.String(1024), nullable=False),  # "3,17"; "" is the unpruned model
    sa.Column("perplexity", sa.Float, nullable=False),
    sa.Column("seconds", sa.Float),  # what the evaluation cost when it was measured
    sa.Column("created", sa.DateTime, server_default=sa.func.now()),
    sa.UniqueConstraint("model_fingerprint", "data_fingerprint", "numerics", "removed_layers", name="search_eval_key"),
)


def create_tables(engine: sa.Engine) -> None:
    metadata.create_all(engine, checkfirst=True)


def _key(removed: Sequence[int]) -> str:
    return ",".join(str(i) for i in sorted(set(removed)))


@dataclass
class EvalCache:
    """The cache for one model, one numeric setting and one split's windows."""

    engine: sa.Engine
    model_fingerprint: str
    data_fingerprint: str
    numerics: str

    def _where(self, removed: Sequence[int]):
        return sa.and_(
            evaluations.c.model_fingerprint == self.model_fingerprint,
            evaluations.c.data_fingerprint == self.data_fingerprint,
            evaluations.c.numerics == self.numerics,
            evaluations.c.removed_layers == _key(removed),
        )

    def get(self, removed: Sequence[int]) -> float | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(evaluations.c.perplexity).where(self._where(removed))).scalar()

    def put(self, removed: Sequence[int], perplexity: float, seconds: float | None = None) -> None:
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
            return conn.execute(query).scalar()
