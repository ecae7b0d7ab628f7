"""The search space: which decoder layers are removed, and what the budget allows.

A removal set is encoded as one boolean Optuna parameter per layer (`drop_07 = True`), so every
sampler sees a plain, readable space and the dashboard shows the set directly. Indices are always
0-based in the original model.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import optuna

from search.errors import SearchError


def parse_budget(text: str | float) -> float:
    """`12%`, `12 %`, `0.12` -> 0.12: the largest fraction of parameters a pruned model may lose."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise SearchError(f"--budget {text!r} is not a number (use e.g. 12% or 0.12)") from None
    if not math.isfinite(value) or value <= 0 or value >= 1:
        raise SearchError(f"--budget {text!r} must be above 0% and below 100%")
    return value


def param_name(layer: int) -> str:
    return f"drop_{layer:02d}"


def encode(removed: Iterable[int], n_layers: int) -> dict[str, bool]:
    chosen = set(removed)
    return {param_name(i): i in chosen for i in range(n_layers)}


def decode(params: dict[str, object]) -> tuple[int, ...]:
    return tuple(sorted(int(k.split("_")[1]) for k, v in params.items() if k.startswith("drop_") and v))


def suggest(trial: optuna.Trial, n_layers: int) -> tuple[int, ...]:
    return tuple(i for i in range(n_layers) if trial.suggest_categorical(param_name(i), [False, True]))


@dataclass(frozen=True)
class Budget:
    """Parameter accounting for one model: what removing a set costs against `--budget`."""

    fraction: float
    total_params: int
    layer_params: Sequence[int]

    @property
    def n_layers(self) -> int:
        return len(self.layer_params)

    def params_reduction(self, removed: Iterable[int]) -> float:
        return sum(self.layer_params[i] for i in removed) / self.total_params

    def allows(self, removed: Iterable[int]) -> bool:
        removed = tuple(removed)
        # A model needs at least one layer; the tiny epsilon keeps 12% == 12% feasible.
        return 0 < len(removed) < self.n_layers and self.params_reduction(removed) <= self.fraction + 1e-12

    def max_layers(self) -> int:
        """The most layers any feasible set can remove (taking the smallest layers first)."""
        count, spent = 0, 0
        for size in sorted(self.layer_params):
            if (spent + size) / self.total_params > self.fraction + 1e-12 or count + 1 >= self.n_layers:
                break
            count, spent = count + 1, spent + size
        return count

    def check_removable(self) -> None:
        if self.max_layers() == 0:
            smallest = min(self.layer_params) / self.total_params
            raise SearchError(
                f"budget {self.fraction:.1%} is too small to remove even one layer "
                f"(the smallest layer is {smallest:.1%} of the parameters)"
            )

    def enumerate_feasible(self, limit: int) -> list[tuple[int, ...]] | None:
        """Every non-empty feasible set, or None when there are more than `limit` of them."""
        found: list[tuple[int, ...]] = []
        for k in range(1, self.max_layers() + 1):
            if math.comb(self.n_layers, k) + len(found) > limit * 4:
                return None  # too many to even scan cheaply
            for combo in itertools.combinations(range(self.n_layers), k):
                if self.allows(combo):
                    found.append(combo)
                    if len(found) > limit:
                        return None
        return found
