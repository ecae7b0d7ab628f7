"""What a candidate removes from a model: whole decoder layers, and attention or MLP blocks of layers
that stay.

A decoder layer is two residual blocks, attention then MLP; either can go on its own (BlockPruner,
EvoPress, FinerCut). One value carries that through the engine (search space, budget, caches,
healing, records, export), so no module re-interprets a bare tuple of indices. Indices are always
0-based layers of the original model. A layer that loses both blocks is a whole-layer removal:
the value is normalised so one model has one `Removal`.

Its text form (`key`) is the sorted parts joined by commas: `"14,17"` for whole layers (what
stores written before sub-layer removal hold), `"14,a6,a7,m12"` with an attention block of
layers 6 and 7 and the MLP block of layer 12 removed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Kind = Literal["attn", "mlp"]
KINDS: tuple[Kind, ...] = ("attn", "mlp")
_PREFIX = {"attn": "a", "mlp": "m"}


@dataclass(frozen=True, order=True)
class Removal:
    layers: tuple[int, ...] = ()  # removed whole
    attention: tuple[int, ...] = ()  # layers that keep their MLP block only
    mlp: tuple[int, ...] = ()  # layers that keep their attention block only

    def __post_init__(self) -> None:
        whole = set(self.layers) | (set(self.attention) & set(self.mlp))
        object.__setattr__(self, "layers", tuple(sorted(whole)))
        object.__setattr__(self, "attention", tuple(sorted(set(self.attention) - whole)))
        object.__setattr__(self, "mlp", tuple(sorted(set(self.mlp) - whole)))

    @classmethod
    def of(cls, layers: Iterable[int] = (), attention: Iterable[int] = (), mlp: Iterable[int] = ()) -> Removal:
        return cls(tuple(layers), tuple(attention), tuple(mlp))

    @classmethod
    def from_blocks(cls, blocks: Iterable[tuple[int, Kind]]) -> Removal:
        chosen = list(blocks)
        return cls.of(attention=[i for i, k in chosen if k == "attn"], mlp=[i for i, k in chosen if k == "mlp"])

    @classmethod
    def parse(cls, key: str) -> Removal:
        """The inverse of `key`; one ValueError line for anything else."""
        layers: list[int] = []
        attention: list[int] = []
        mlp: list[int] = []
        for part in filter(None, (p.strip() for p in key.replace(" ", ",").split(","))):
            into = {"a": attention, "m": mlp}.get(part[0], layers)
            digits = part[1:] if part[0] in "am" else part
            if not digits.isdigit():
                raise ValueError(f"{part!r} is not a layer (7), an attention block (a7) or an MLP block (m7)")
            into.append(int(digits))
        return cls.of(layers, attention, mlp)

    @property
    def key(self) -> str:
        """The text form: stable, sorted, and for whole layers the same as stores written before blocks."""
        parts = [str(i) for i in self.layers]
        parts += [f"a{i}" for i in self.attention] + [f"m{i}" for i in self.mlp]
        return ",".join(parts)

    def __str__(self) -> str:
        return self.key or "nothing"

    def describe(self) -> str:
        """For logs and tables: `[14, 17]` for whole layers, else each part named."""
        if self.whole_layers_only:
            return str(list(self.layers))
        named = [("layers", self.layers), ("attention", self.attention), ("MLP", self.mlp)]
        return ", ".join(f"{name} {list(parts)}" for name, parts in named if parts)

    def __bool__(self) -> bool:
        return bool(self.layers or self.attention or self.mlp)

    @property
    def whole_layers_only(self) -> bool:
        return not (self.attention or self.mlp)

    def blocks(self) -> frozenset[tuple[int, Kind]]:
        """Every removed block, a whole layer counting as both of its blocks."""
        found = {(i, kind) for i in self.layers for kind in KINDS}
        found |= {(i, "attn") for i in self.attention} | {(i, "mlp") for i in self.mlp}
        return frozenset(found)

    @property
    def changed_layers(self) -> tuple[int, ...]:
        """Layers that lose anything: a pruned model computes what the unpruned one does before the first."""
        return tuple(sorted({*self.layers, *self.attention, *self.mlp}))

    @property
    def without_attention(self) -> tuple[int, ...]:
        """Layers without an attention block (removed whole or not): what the KV cache loses."""
        return tuple(sorted({*self.layers, *self.attention}))

    @property
    def without_mlp(self) -> tuple[int, ...]:
        return tuple(sorted({*self.layers, *self.mlp}))

    def __or__(self, other: Removal) -> Removal:
        return Removal.from_blocks(self.blocks() | other.blocks())

    def __sub__(self, other: Removal) -> Removal:
        return Removal.from_blocks(self.blocks() - other.blocks())

    def covers(self, other: Removal) -> bool:
        """Every block `other` removes, this removes too."""
        return other.blocks() <= self.blocks()

    def parts(self) -> Iterator[Removal]:
        """One removal per whole layer and per lone block: the units a greedy step adds or drops."""
        yield from (Removal.of([i]) for i in self.layers)
        yield from (Removal.of(attention=[i]) for i in self.attention)
        yield from (Removal.of(mlp=[i]) for i in self.mlp)

    def params(self, layer_params: Sequence[int], block_params: Sequence[tuple[int, int]]) -> int:
        """Parameters removed: whole layers at their full count, lone blocks at theirs."""
        whole = sum(layer_params[i] for i in self.layers)
        return whole + sum(block_params[i][0] for i in self.attention) + sum(block_params[i][1] for i in self.mlp)

    def json(self) -> dict[str, list[int]]:
        """How records, the front and exports write it: `removed_layers` keeps meaning whole layers."""
        return {
            "removed_layers": list(self.layers),
            "removed_attention": list(self.attention),
            "removed_mlp": list(self.mlp),
        }

    @classmethod
    def from_json(cls, stored: Mapping[str, object]) -> Removal:
        """From `json()`, or a record written before blocks (`removed_layers` only)."""

        def listed(name: str) -> list[int]:
            value = stored.get(name) or []
            return [int(i) for i in value] if isinstance(value, (list, tuple)) else []

        return cls.of(listed("removed_layers"), listed("removed_attention"), listed("removed_mlp"))

    def shifted(self, step: int, n_layers: int) -> Removal | None:
        """The same parts `step` layers up or down a stack of `n_layers`; None where one falls off it."""
        moved = {i: i + step for i in self.changed_layers}
        return self.remap(moved) if all(0 <= j < n_layers for j in moved.values()) else None

    def remap(self, mapping: Mapping[int, int]) -> Removal:
        """The same removal on another stack (`mapping`: old layer -> new), parts outside it dropped."""

        def moved(indices: tuple[int, ...]) -> list[int]:
            return [mapping[i] for i in indices if i in mapping]

        return Removal.of(moved(self.layers), moved(self.attention), moved(self.mlp))
