"""Measured latency of a pruned model relative to the unpruned one, in the same process.

Protocol: one fixed input; a warm-up pass of every variant; then rounds that time every variant
once each, in an order rotated and reversed from round to round, with the unpruned model timed
before the first variant and after every one. A variant's ratio is the median over rounds of its
time over the mean of the two baseline timings either side of it. Why paired: on a shared machine
the speed of the whole process drifts within a round (a round of 35 shapes takes seconds), so a
ratio of two medians taken seconds apart carries that drift; a time over the baseline timed next to
it does not. Removing layers or blocks is a pointer swap (`removal_applied`), so switching variants
costs nothing measurable, and a removed block is not computed: what is timed is the smaller model.

Given each layer's kind, the ratios are then smoothed by a least-squares fit of
ratio = 1 - per-layer cost x layers removed, per kind (the arithmetic is additive in layers, and the
unpruned model is exactly 1). On a noisy machine one shape's figure can be off by more than a layer's
cost (more kept layers timed faster than fewer); a mis-ordered table makes the best set of that size
look dominated and drops it from the front. The raw figures are kept beside the fit.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from search.model.placement import devices_of
from search.model.removal import KINDS, Removal
from search.model.surgery import block_param_counts, layer_param_counts, removal_applied

PROTOCOL = "paired"  # how measure_latencies times (before: "medians", a ratio of two medians)


@dataclass(frozen=True)
class Latency:
    baseline_ms: float
    candidate_ms: float
    # With the additive fit, candidate_ms above is the fit and these the raw figure (ratio x baseline).
    measured_ms: float | None = None
    measured_baseline_ms: float | None = None

    @property
    def ratio(self) -> float:
        return self.candidate_ms / self.baseline_ms


def layer_kinds(model: nn.Module) -> list[str]:
    """What each decoder layer costs to run: its parameter count and attention type, e.g. `9280/sliding`."""
    sizes = layer_param_counts(model)
    types = getattr(model.config, "layer_types", None) or [""] * len(sizes)
    return [f"{size}{'/' + kind if kind else ''}" for size, kind in zip(sizes, types)]


# Per layer, the kinds of its attention and MLP blocks (a sub-layer space); None: layers are the unit.
BlockKinds = Sequence[tuple[str, str]] | None


def block_kinds(model: nn.Module) -> list[tuple[str, str]]:
    """What each layer's blocks cost to run: `attn:2360/sliding`, `mlp:6912` (parameters, attention type)."""
    counts = block_param_counts(model)
    types = getattr(model.config, "layer_types", None) or [""] * len(counts)
    return [(f"attn:{attn}{'/' + kind if kind else ''}", f"mlp:{mlp}") for (attn, mlp), kind in zip(counts, types)]


def kept_kinds(kinds: Sequence[str], removal: Removal, blocks: BlockKinds = None) -> Counter[str]:
    """The multiset of kept layer kinds, or with `blocks` of kept block kinds."""
    if blocks is None:
        if not removal.whole_layers_only:
            raise ValueError(f"removal {removal} removes blocks: its shape needs the block kinds")
        gone = set(removal.layers)
        return Counter(kind for i, kind in enumerate(kinds) if i not in gone)
    removed = removal.blocks()
    kept = Counter(kind for i, pair in enumerate(blocks) for kind, part in zip(pair, KINDS) if (i, part) not in removed)
    # Layers still called (a layer with one block skipped still runs its residual adds and a stub).
    kept["layer"] = len(blocks) - len(removal.layers)
    return kept


def shape_key(kinds: Sequence[str], removal: Removal, blocks: BlockKinds = None) -> str:
    """Identical for removals that leave the same multiset of layer kinds (e.g. `9280*26`), or in a
    sub-layer space of block kinds and the number of layers still called (`attn:2360*28 layer*29
    mlp:6912*29`: layer 3 removed whole, and layer 3's attention with layer 5's MLP, differ by one
    layer call).

    Such models do the same arithmetic, so they share one latency measurement: timing each set
    separately would only add noise that lets a set dominate its twin by chance.
    """
    return " ".join(f"{kind}*{count}" for kind, count in sorted(kept_kinds(kinds, removal, blocks).items()))


def _units(kinds: Sequence[str], blocks: BlockKinds) -> list[tuple[Removal, str]]:
    if blocks is None:
        return [(Removal.of([i]), kind) for i, kind in enumerate(kinds)]
    return [
        (Removal.from_blocks([(i, part)]), kind) for i, pair in enumerate(blocks) for kind, part in zip(pair, KINDS)
    ]


def reachable_shapes(
    kinds: Sequence[str], allows: Callable[[Removal], bool], limit: int = 64, blocks: BlockKinds = None
) -> dict[str, Removal] | None:
    """One removal per shape that `allows` admits; None when there are too many to time upfront."""
    by_kind: dict[str, list[Removal]] = defaultdict(list)
    for unit, kind in _units(kinds, blocks):
        by_kind[kind].append(unit)
    names = sorted(by_kind)
    if math.prod(len(by_kind[k]) + 1 for k in names) > 100 * limit:
        return None
    found: dict[str, Removal] = {}
    for counts in itertools.product(*(range(len(by_kind[k]) + 1) for k in names)):
        removal = Removal()
        for k, c in zip(names, counts):
            for unit in by_kind[k][len(by_kind[k]) - c :]:
                removal = removal | unit
        if allows(removal):
            found[shape_key(kinds, removal, blocks)] = removal
            if len(found) > limit:
                return None
    return found


def _sync(devices: list[torch.device]) -> None:
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


@torch.inference_mode()
def time_forward(model: nn.Module, input_ids: torch.Tensor) -> float:
    """Wall-clock milliseconds of one full forward pass (synchronised on every GPU the model uses)."""
    devices = list(dict.fromkeys([input_ids.device, *devices_of(model)]))
    _sync(devices)
    start = time.perf_counter()
    model(input_ids=input_ids, use_cache=False)
    _sync(devices)
    return (time.perf_counter() - start) * 1000


def latency_input(windows: torch.Tensor, tokens: int, device: torch.device) -> torch.Tensor:
    """A fixed 1 x `tokens` input cut from the first calibration window (latency does not depend on content)."""
    flat = windows.reshape(-1)[:tokens]
    return flat.view(1, -1).to(device)


def fit_additive(counts: Sequence[Sequence[int]], ratios: Sequence[float]) -> list[float] | None:
    """Least-squares `ratios` ~ 1 - sum of cost[kind] x (counts[0][kind] - counts[kind]): row 0 is the
    unpruned model (ratio 1, exactly); None when that cannot smooth.

    A kind whose cost comes out negative or zero (a layer call with a block skipped costs next to
    nothing, and noise can put it below zero) is taken to cost nothing and the fit is made again
    without it. Needs more pruned variants than costs, separable kinds, and at least one cost left.
    """
    x = torch.tensor(counts, dtype=torch.float64).reshape(len(counts), -1)
    x = (x[:1] - x)[1:]  # of each kind, how many each variant removes
    y = 1 - torch.tensor(ratios[1:], dtype=torch.float64).unsqueeze(1)
    kept = [k for k in range(x.shape[1]) if bool((x[:, k] != 0).any())]
    while kept:
        xs = x[:, kept]
        if len(xs) <= xs.shape[1] or int(torch.linalg.matrix_rank(xs)) < xs.shape[1]:
            return None
        coef = torch.linalg.lstsq(xs, y).solution.squeeze(1)
        if (coef > 0).all():
            return [1.0, *(1 - xs @ coef).tolist()]
        kept = [k for k, c in zip(kept, coef.tolist()) if c > 0]
    return None


def interleaved_timings(
    baseline: Callable[[], float], variants: Sequence[Callable[[], float]], warmup: int = 1, repeats: int = 5
) -> tuple[float, list[float]]:
    """The baseline's median milliseconds and each variant's ratio to it, paired as the module says:
    each round times the variants in an order rotated (and reversed every other round) with the
    baseline before the first and after each."""
    for _ in range(warmup):
        baseline()
        for variant in variants:
            variant()
    base_times: list[float] = []
    ratios: list[list[float]] = [[] for _ in variants]
    before = baseline()
    base_times.append(before)
    for round_ in range(repeats):
        order = list(range(len(variants)))
        shift = round_ % len(order) if order else 0
        order = order[shift:] + order[:shift]
        if round_ % 2:
            order.reverse()
        for index in order:
            took = variants[index]()
            after = baseline()
            base_times.append(after)
            ratios[index].append(2 * took / (before + after))
            before = after
    return statistics.median(base_times), [statistics.median(r) for r in ratios]


def measure_latencies(
    model: nn.Module,
    removals: Sequence[Removal],
    input_ids: torch.Tensor,
    warmup: int = 1,
    repeats: int = 5,
    layer_kinds: Sequence[str] = (),
    blocks: BlockKinds = None,
) -> list[Latency]:
    """Each pruned variant's forward time against the unpruned model's, paired and interleaved as the
    module says. With `layer_kinds` (one per layer), the ratios are replaced by the additive fit where
    it applies. A variant's milliseconds are its ratio times the baseline's median."""

    def timed(removal: Removal) -> Callable[[], float]:
        def run() -> float:
            with removal_applied(model, removal):
                return time_forward(model, input_ids)

        return run

    base_ms, ratios = interleaved_timings(timed(Removal()), [timed(r) for r in removals], warmup, repeats)
    kept = [kept_kinds(layer_kinds, v, blocks) for v in [Removal(), *removals]] if layer_kinds else []
    kinds = sorted(set().union(*kept)) if kept else []
    counts = [[c[kind] for kind in kinds] for c in kept]
    fitted = fit_additive(counts, [1.0, *ratios]) if kinds else None
    if fitted is None:
        return [Latency(base_ms, base_ms * r) for r in ratios]
    return [Latency(base_ms, base_ms * f, base_ms * r, base_ms) for f, r in zip(fitted[1:], ratios)]


def measure_latency(
    model: nn.Module, removal: Removal, input_ids: torch.Tensor, warmup: int = 1, repeats: int = 5
) -> Latency:
    """The model without `removal` against the unpruned model, paired and interleaved (no fit)."""
    return measure_latencies(model, [removal], input_ids, warmup, repeats)[0]


@torch.inference_mode()
def kv_cache_bytes(model: nn.Module, input_ids: torch.Tensor, removal: Removal = Removal()) -> int:
    """Bytes the KV cache holds after a prefill of `input_ids` on the model without `removal`: measured
    on the cache the model itself fills (a layer without attention keeps only a placeholder of one
    element per token), not counted from the config."""
    with removal_applied(model, removal):
        output = model(input_ids=input_ids, use_cache=True)
    cache = getattr(output, "cache", None) or output.past_key_values  # `cache` since transformers 5.x
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total
