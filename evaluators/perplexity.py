"""Perplexity of a causal LM over fixed token windows: the quality objective.

Windows are evaluated in fixed batches, in order, and each batch's summed NLL is yielded on its
own: the prefix cache replays the same batches, and early rejection stops between them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from evaluators.forward import batch_nll, prepare


def window_batches(
    windows: torch.Tensor, bos_id: int | None, batch_size: int, device: torch.device
) -> Iterator[torch.Tensor]:
    """Model inputs, batch by batch: with `bos_id`, BOS is prepended as context (never a target)."""
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size].to(device)
        if bos_id is not None:
            batch = torch.cat([torch.full((len(batch), 1), bos_id, device=device), batch], dim=1)
        yield batch


def target_count(windows: torch.Tensor, bos_id: int | None) -> int:
    return windows.shape[0] * (windows.shape[1] - (0 if bos_id is not None else 1))


@torch.inference_mode()
def nll_batches(
    model: nn.Module, windows: torch.Tensor, bos_id: int | None = None, batch_size: int = 4
) -> Iterator[tuple[float, int]]:
    """(summed NLL, target count) per batch of a plain full forward pass."""
    prepare(model)
    device = next(model.parameters()).device
    for inputs in window_batches(windows, bos_id, batch_size, device):
        yield batch_nll(model, inputs)


def perplexity(model: nn.Module, windows: torch.Tensor, bos_id: int | None = None, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over every target token in `windows`.

    With `bos_id`, each window gets BOS prepended as context (never a target), as the model was
    trained; otherwise the first token of each window is context only.
    """
    return from_batches(nll_batches(model, windows, bos_id, batch_size))


def from_batches(batches) -> float:
    total, count = 0.0, 0
    for nll, n in batches:
        total, count = total + nll, count + n
    return math.exp(total / count)
