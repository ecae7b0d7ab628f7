"""Per-layer sensitivity: how much perplexity rises when one more layer is removed.

This is the removal-perplexity criterion (Shortened LLaMA's PPL score, SLEB's re-scored greedy
step): direct, model-agnostic, and measured on calibration windows only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from evaluators.perplexity import perplexity
from search.surgery import layers_removed


def removal_sensitivity(
    model: nn.Module,
    windows: torch.Tensor,
    base_ppl: float,
    candidates: Iterable[int],
    already_removed: Sequence[int] = (),
    bos_id: int | None = None,
    batch_size: int = 4,
    desc: str | None = None,
) -> dict[int, float]:
    """Perplexity ratio to `base_ppl` for removing each candidate on top of `already_removed`.

    All indices refer to the unpruned model.
    """
    candidates = list(candidates)
    scores: dict[int, float] = {}
    for layer in tqdm(candidates, desc=desc, leave=False, disable=desc is None):
        with layers_removed(model, [*already_removed, layer]):
            scores[layer] = perplexity(model, windows, bos_id, batch_size) / base_ppl
    return scores
