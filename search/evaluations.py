"""Evaluation cache: every perplexity measured, kept in the study store beside Optuna's tables.

A removal set's perplexity depends only on the model weights, the token windows and the numerics
(dtype, device kind, batch size), so those key it, not the study: a resumed run, another worker,
or a new study on the same model and data (another budget, more trials) never evaluates a set twice.
Rows are only ever inserted; the first writer of a key wins and a second one is ignored.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
import torch

metadata = sa.MetaData()

evaluations = sa.Table(
    "search_evaluations",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("model_fingerprint", sa.String(128), nullable=False),
    sa.Column("data_fingerprint", sa.String(128), nullable=False),  # the split's token windows
    sa.Column("numerics", sa.String(96), nullable=False),  # dtype@device model/batch, e.g. bf16-mixed@cpu:AMD EPYC/b4
    sa.Column("removed_layers", sa.String(1024), nullable=False),  # "3,17"; "" is the unpruned model
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
