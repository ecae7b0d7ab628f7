"""The search space: which decoder layers (or, in a sub-layer space, which attention and MLP blocks)
are removed, and what the budget allows.

A removal (search/model/removal.py) is encoded as one boolean Optuna parameter per removable part:
`drop_07 = True` in a whole-layer study, `drop_attn_07` / `drop_mlp_07` in a sub-layer study (both
true: layer 7 goes whole). Every sampler sees a plain, readable space and the dashboard shows the
set directly. Indices are always 0-based in the original model.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import optuna

from search.errors import SearchError
from search.model.removal import KINDS, Kind, Removal


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


GRANULARITIES = ("layer", "sublayer")


def param_name(layer: int, kind: Kind | None = None) -> str:
    """`drop_07` (a whole layer, in layer studies); `drop_attn_07` / `drop_mlp_07` (sub-layer studies)."""
    return f"drop_{layer:02d}" if kind is None else f"drop_{kind}_{layer:02d}"


def param_names(n_layers: int, granularity: str = "layer") -> list[str]:
    if granularity == "layer":
        return [param_name(i) for i in range(n_layers)]
    return [param_name(i, kind) for i in range(n_layers) for kind in KINDS]


def encode(removal: Removal, n_layers: int, granularity: str = "layer") -> dict[str, bool]:
    if granularity == "layer":
        if not removal.whole_layers_only:
            raise SearchError(f"removal {removal} removes single blocks: not in a whole-layer study's space")
        return {param_name(i): i in removal.layers for i in range(n_layers)}
    blocks = removal.blocks()
    return {param_name(i, kind): (i, kind) in blocks for i in range(n_layers) for kind in KINDS}


def decode(params: dict[str, object]) -> Removal:
    """A trial's removal from its parameters, in either study's encoding."""
    layers, blocks = [], []
    for name, value in params.items():
        parts = name.split("_")
        if parts[0] != "drop" or not value:
            continue
        if len(parts) == 2:
            layers.append(int(parts[1]))
        elif parts[1] in KINDS:
            blocks.append((int(parts[2]), parts[1]))
    return Removal.of(layers) | Removal.from_blocks(blocks)


def suggest(trial: optuna.Trial, budget: Budget) -> Removal:
    names = param_names(budget.n_layers, budget.granularity)
    return decode({name: trial.suggest_categorical(name, [False, True]) for name in names})


@dataclass(frozen=True)
class Budget:
    """Parameter accounting for one model, and the space it is searched in: what removing a part costs
    against `--budget`. With `block_params` (attention, MLP per layer) the space is sub-layer: each
    layer keeps both blocks, loses one, or goes whole."""

    fraction: float
    total_params: int
    layer_params: Sequence[int]
    block_params: Sequence[tuple[int, int]] | None = None  # None: a whole-layer space

    @property
    def n_layers(self) -> int:
        return len(self.layer_params)

    @property
    def granularity(self) -> str:
        return "layer" if self.block_params is None else "sublayer"

    def params_reduction(self, removal: Removal) -> float:
        if self.block_params is None and not removal.whole_layers_only:
            raise SearchError(f"removal {removal} removes single blocks: not in a whole-layer space")
        return removal.params(self.layer_params, list(self.block_params or [])) / self.total_params

    def allows(self, removal: Removal) -> bool:
        # A model needs at least one layer; the tiny epsilon keeps 12% == 12% feasible.
        if self.block_params is None and not removal.whole_layers_only:
            return False
        within = self.params_reduction(removal) <= self.fraction + 1e-12
        return bool(removal) and len(removal.layers) < self.n_layers and within

    def units(self) -> list[Removal]:
        """What one greedy step adds or one sampler move changes: a layer, or in a sub-layer space a block."""
        if self.block_params is None:
            return [Removal.of([i]) for i in range(self.n_layers)]
        return [Removal.from_blocks([(i, kind)]) for i in range(self.n_layers) for kind in KINDS]

    def unit_params(self, unit: Removal) -> int:
        return unit.params(self.layer_params, list(self.block_params or []))

    def max_layers(self) -> int:
        """The most whole layers any feasible set can remove (taking the smallest layers first)."""
        return self._most(sorted(self.layer_params), self.n_layers - 1)

    def max_units(self) -> int:
        """The most units (`units()`) any feasible set holds: a greedy path's longest."""
        if self.block_params is None:
            return self.max_layers()
        return self._most(sorted(self.unit_params(u) for u in self.units()), 2 * self.n_layers - 1)

    def _most(self, sizes: list[int], cap: int) -> int:
        count, spent = 0, 0
        for size in sizes:
            if (spent + size) / self.total_params > self.fraction + 1e-12 or count + 1 > cap:
                break
            count, spent = count + 1, spent + size
        return count

    def check_removable(self) -> None:
        if self.max_units() == 0:
            smallest = min(self.unit_params(u) for u in self.units()) / self.total_params
            what = "layer" if self.block_params is None else "block"
            raise SearchError(
                f"budget {self.fraction:.1%} is too small to remove even one {what} "
                f"(the smallest {what} is {smallest:.1%} of the parameters)"
            )

    def enumerate_feasible(self, limit: int) -> list[Removal] | None:
        """Every non-empty feasible set, or None when there are more than `limit` of them."""
        units = self.units()
        found: list[Removal] = []
        seen: set[Removal] = set()
        for k in range(1, self.max_units() + 1):
            if math.comb(len(units), k) + len(found) > limit * 4:
                return None  # too many to even scan cheaply
            for combo in itertools.combinations(units, k):
                removal = union(combo)
                if removal not in seen and self.allows(removal):
                    seen.add(removal)
                    found.append(removal)
                    if len(found) > limit:
                        return None
        return found


def union(parts: Iterable[Removal]) -> Removal:
    total = Removal()
    for part in parts:
        total = total | part
    return total
