"""Measured latency of a pruned model relative to the unpruned one, in the same process.

Protocol: one fixed input; warm-up passes of both variants; then repetitions in A B B A order
(baseline, candidate, candidate, baseline, ...) so slow drift of the machine (thermal, other
load) hits both equally; the ratio of medians is reported. Removing layers is a pointer swap
(`layers_removed`), so switching variants costs nothing measurable.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from search.surgery import layers_removed


@dataclass(frozen=True)
class Latency:
    baseline_ms: float
    candidate_ms: float

    @property
    def ratio(self) -> float:
        return self.candidate_ms / self.baseline_ms


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_forward(model: nn.Module, input_ids: torch.Tensor) -> float:
    """Wall-clock milliseconds of one full forward pass (synchronised on GPU)."""
    device = input_ids.device
    _sync(device)
    start = time.perf_counter()
    model(input_ids=input_ids, use_cache=False)
    _sync(device)
    return (time.perf_counter() - start) * 1000


def latency_input(windows: torch.Tensor, tokens: int, device: torch.device) -> torch.Tensor:
    """A fixed 1 x `tokens` input cut from the first calibration window (latency does not depend on content)."""
    flat = windows.reshape(-1)[:tokens]
    return flat.view(1, -1).to(device)


def measure_latency(
    model: nn.Module, removed: Sequence[int], input_ids: torch.Tensor, warmup: int = 1, repeats: int = 5
) -> Latency:
    """Median forward time of the unpruned model and of the model without `removed`, interleaved."""
    baseline: list[float] = []
    candidate: list[float] = []

    def run(which: str) -> None:
        if which == "A":
            baseline.append(time_forward(model, input_ids))
        else:
            with layers_removed(model, removed):
                candidate.append(time_forward(model, input_ids))

    for _ in range(warmup):
        run("A")
        run("B")
    baseline.clear()
    candidate.clear()
    for rep in range(repeats):
        for which in ("AB" if rep % 2 == 0 else "BA"):
            run(which)
    return Latency(statistics.median(baseline), statistics.median(candidate))
