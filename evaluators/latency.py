"""Measured latency of a pruned model relative to the unpruned one, in the same process.

Protocol: one fixed input; a warm-up pass of every variant; then rounds that time the baseline
and every variant once each, in an order rotated and reversed from round to round, so slow
drift of the machine (thermal, other load) hits all variants alike; ratios of medians are
reported. Removing layers is a pointer swap (`layers_removed`), so switching variants costs
nothing measurable.
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


def measure_latencies(
    model: nn.Module, removal_sets: Sequence[Sequence[int]], input_ids: torch.Tensor, warmup: int = 1, repeats: int = 5
) -> list[Latency]:
    """Median forward time of the unpruned model and of each pruned variant, all timed round-robin.

    Every round times the baseline and every variant once, in an order rotated each round, so
    drift and bursts of load spread over all variants instead of landing on one.
    """
    variants: list[Sequence[int]] = [(), *removal_sets]
    times: list[list[float]] = [[] for _ in variants]

    def timed(index: int) -> float:
        with layers_removed(model, variants[index]):
            return time_forward(model, input_ids)

    for _ in range(warmup):
        for index in range(len(variants)):
            timed(index)
    for round_ in range(repeats):
        order = list(range(len(variants)))
        shift = round_ % len(order)
        order = order[shift:] + order[:shift]
        if round_ % 2:
            order.reverse()
        for index in order:
            times[index].append(timed(index))
    baseline = statistics.median(times[0])
    return [Latency(baseline, statistics.median(t)) for t in times[1:]]


def measure_latency(
    model: nn.Module, removed: Sequence[int], input_ids: torch.Tensor, warmup: int = 1, repeats: int = 5
) -> Latency:
    """Median forward time of the unpruned model and of the model without `removed`, interleaved."""
    return measure_latencies(model, [removed], input_ids, warmup, repeats)[0]
