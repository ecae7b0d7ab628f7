"""Perplexity of a causal LM over fixed token windows: the quality objective."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


@torch.inference_mode()
def perplexity(model: nn.Module, windows: torch.Tensor, bos_id: int | None = None, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over every target token in `windows`.

    With `bos_id`, each window gets BOS prepended as context (never a target), as the model was
    trained; otherwise the first token of each window is context only.
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size].to(device)
        inputs = batch
        if bos_id is not None:
            inputs = torch.cat([torch.full((len(batch), 1), bos_id, device=device), batch], dim=1)
        logits = model(input_ids=inputs, use_cache=False).logits[:, :-1]
        targets = inputs[:, 1:]
        total += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum"
        ).item()
        count += targets.numel()
    return math.exp(total / count)
