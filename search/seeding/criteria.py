"""What staged greedy ranks layers by (`--criterion`): one scoring function per criterion.

Every criterion scores candidate layers on the model with some layers already removed; lower
means safer to remove. Adding one is a function here plus its `CRITERIA.register` line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from evaluators.sensitivity import removal_sensitivity, similarity
from search.model.removal import Removal
from search.registry import Registry


@dataclass
class Scoring:
    """The model and windows criteria score on; `store` answers perplexities measured before."""

    model: nn.Module
    windows: torch.Tensor
    bos_id: int | None
    batch_size: int
    store: Any = None  # an EvalCache for exactly these windows, or anything with its get/put

    def similarity(self, removed: Removal = Removal(), max_block: int = 1):
        return similarity(self.model, self.windows, removed, self.bos_id, self.batch_size, max_block=max_block)


# (scoring, already removed, candidates (layers or blocks), progress label) -> score per candidate
ScoreFn = Callable[[Scoring, Removal, list[Removal], str | None], dict[Removal, float]]


@dataclass(frozen=True)
class Criterion:
    score: ScoreFn
    one_pass: bool  # one forward pass scores every layer (else one pass per candidate, plus the base)
    blocks: bool = False  # scores attention and MLP blocks (a sub-layer space), not only whole layers

    def passes(self, candidates: int) -> int:
        return 1 if self.one_pass else candidates + 1


CRITERIA: Registry[Criterion] = Registry("criterion")


def _removal_ppl(s: Scoring, removed: Removal, candidates: list[Removal], desc: str | None) -> dict[Removal, float]:
    return removal_sensitivity(
        s.model, s.windows, candidates, removed, s.bos_id, s.batch_size, desc=desc, store=s.store
    )


def _angular(s: Scoring, removed: Removal, candidates: list[Removal], desc: str | None) -> dict[Removal, float]:
    scores = s.similarity(removed).angular[1]
    return {unit: scores[unit.layers[0]] for unit in candidates}


def _block_influence(s: Scoring, removed: Removal, candidates: list[Removal], desc: str | None) -> dict[Removal, float]:
    scores = s.similarity(removed).bi
    return {unit: scores[unit.layers[0]] for unit in candidates}


CRITERIA.add(
    "ppl", Criterion(_removal_ppl, one_pass=False, blocks=True), "removal perplexity ratio (Shortened LLaMA, SLEB)"
)
CRITERIA.add("angular", Criterion(_angular, one_pass=True), "angular distance to the next layer (Gromov et al.)")
CRITERIA.add("bi", Criterion(_block_influence, one_pass=True), "Block Influence, 1 - cos(in, out) (ShortGPT)")
