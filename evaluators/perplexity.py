"""Perplexity of a causal LM over fixed token windows: the quality objective.

Windows are evaluated in fixed batches, in order, and each batch's summed NLL is yielded on its
own: the prefix cache replays the same batches, and early rejection stops between them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from evaluators.forward import batch_nll, on_host, prepare


def window_batches(
    windows: torch.Tensor, bos_id: int | None, batch_size: int, device: torch.device
) -> Iterator[torch.Tensor]:
    """Model inputs, batch by batch: with `bos_id`, BOS is prepended as context (never a target).
    The token ids go to the device in one copy up front: a copy from pageable host memory waits for
    the device, which per batch would undo `on_host`'s one-batch lag."""
    windows = windows.to(device)
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
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
    batches = window_batches(windows, bos_id, batch_size, device)
    yield from on_host((batch_nll(model, inputs) for inputs in batches), device)


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


class Rejected(Exception):
    """A candidate stopped part-way: its perplexity provably cannot reach the front (or the cap)."""

    def __init__(self, reason: str, lower_bound: float, windows: int):
        super().__init__(reason)
        self.reason, self.lower_bound, self.windows = reason, lower_bound, windows


def check_cap(ratio: float, cap: float | None, windows: int) -> None:
    if cap is not None and ratio > cap:
        raise Rejected(f"ppl x{ratio:.3f} > --max-ppl-ratio", ratio, windows)


def bounded_perplexity(
    batches: Iterable[tuple[float, int]],
    base_batches: Iterable[tuple[float, int]],
    base_ppl: float,
    total_targets: int,
    windows: int,
    batch_size: int,
    ceiling: float | None = None,
    cap: float | None = None,
) -> float:
    """Perplexity of a batch stream that stops early: raises Rejected once the ratio to `base_ppl`
    provably exceeds `ceiling`, or exceeds `cap` over the windows seen so far. The final ratio is
    the caller's to check (`check_cap`), so a finished evaluation can be recorded first.

    The proof: NLL is never negative, so the batches still to come can only add to the sum, and
    exp(sum so far / all targets) is a lower bound. `base_batches` are the unpruned model's
    batches, for the ratio over the windows seen so far. `windows` and `batch_size` only name how
    much was seen in the reason.
    """
    nll, seen, base_nll, batches_seen = 0.0, 0, 0.0, 0
    for (nll_sum, count), (base_batch, _) in zip(batches, base_batches):
        nll, seen, base_nll, batches_seen = nll + nll_sum, seen + count, base_nll + base_batch, batches_seen + 1
        if seen == total_targets:
            break
        lower = math.exp(nll / total_targets) / base_ppl
        done = min(windows, batches_seen * batch_size)
        if ceiling is not None and lower > ceiling:
            raise Rejected(f"proven above ppl x{ceiling:.3f} after {done} windows", lower, done)
        partial = math.exp((nll - base_nll) / seen)  # ratio over the windows seen so far
        if cap is not None and partial > cap:
            raise Rejected(f"ppl x{partial:.3f} over the first {done} windows > --max-ppl-ratio", lower, done)
    return math.exp(nll / seen)
