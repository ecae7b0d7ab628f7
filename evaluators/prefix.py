"""Prefix hidden-state cache: start each pruned model's forward pass at its first changed layer.

A model with layers (or blocks of layers) S removed computes exactly what the unpruned model
computes up to the first layer S changes: same weights, same inputs, same batch shapes. So the
input of every layer is taken once (the baseline pass, which the study needs anyway) and each
candidate runs only the layers from its first changed one onwards, fed the stored input of that
layer. The result is the plain forward
pass's perplexity, not an approximation (the tests compare both on random removal sets).

A cache may also be taken on an already pruned model (`base`): staged greedy re-scores layers on
the model pruned so far, so each stage caches that model once and scores its candidates from there.

Memory: one `[windows, seq, hidden]` tensor per layer boundary. When that exceeds the budget, only
every s-th boundary is kept and a candidate starts from the nearest kept one at or before its first
changed layer (still exact, a few layers dearer); below one boundary's size the cache is off.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evaluators.forward import batch_nll, on_host, prepare
from evaluators.perplexity import from_batches, nll_batches, window_batches
from search.model.placement import devices_of, layer_device
from search.model.removal import Removal
from search.model.surgery import decoder_layers, removal_applied

log = logging.getLogger("search")

MEMORY_FRACTION = 0.25  # of the memory available when the cache is built
# (model, one batch's inputs, the batch's index) -> what an evaluation takes from that batch
Measure = Callable[[nn.Module, torch.Tensor, int], Any]


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30  # unknown: assume a modest machine


@dataclass
class PrefixCache:
    model: nn.Module
    windows: torch.Tensor
    bos_id: int | None
    batch_size: int
    base: Removal  # what is removed in the model the states were taken from
    n_layers: int
    states: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # layer -> its input, per batch
    base_nll: list[tuple[float, int]] = field(default_factory=list)  # the base model's NLL, per batch

    @property
    def base_ppl(self) -> float:
        return from_batches(self.base_nll)

    def start(self, removal: Removal, before: int | None = None) -> int | None:
        """The stored boundary a pruned model with `removal` starts from; None: from the embedding.
        `before`: the first layer whose weights differ from the cached model's (a healed one). A
        removal that changes a layer starts at that layer's input (its attention block runs again
        when only its MLP goes)."""
        if not removal.covers(self.base):
            raise ValueError(f"removal {removal} does not contain the cache's base {self.base}")
        extra = (removal - self.base).changed_layers
        kept = [i for i in range(self.n_layers) if i not in set(removal.layers)]
        # At least one layer must run after the start (the layer hook is where the state goes in).
        limit = min(min(extra, default=self.n_layers), max(kept), self.n_layers if before is None else before)
        return max((b for b in self.states if b <= limit), default=None)

    def layers_run(self, removal: Removal) -> int:
        """Decoder layers the cached evaluation of `removal` runs (the arithmetic it cannot avoid)."""
        start = self.start(removal) or 0
        return sum(1 for i in range(start, self.n_layers) if i not in set(removal.layers))

    def nll_batches(
        self, removal: Removal, before: int | None = None, measure: Measure | None = None
    ) -> Generator[Any, None, None]:
        """Per batch, (summed NLL, target count) of the pruned model, or what `measure` takes from it."""
        start = self.start(removal, before)
        if start is None:
            with removal_applied(self.model, removal):
                if measure is None:
                    yield from nll_batches(self.model, self.windows, self.bos_id, self.batch_size)
                    return
                prepare(self.model)
                device = next(self.model.parameters()).device
                with torch.inference_mode():
                    batches = enumerate(window_batches(self.windows, self.bos_id, self.batch_size, device))
                    yield from on_host((measure(self.model, inputs, index) for index, inputs in batches), device)
            return
        states = self.states[start]
        current: list[torch.Tensor] = []

        def feed(module, args, kwargs):
            state = current[0]
            if args:
                assert args[0].shape == state.shape, "cached state does not fit this batch"
                return (state, *args[1:]), kwargs
            kwargs["hidden_states"] = state
            return args, kwargs

        prepare(self.model)  # before the hook: the fused-head probe runs a batch of its own
        with removal_applied(self.model, Removal.of(range(start)) | removal), torch.inference_mode():
            handle = decoder_layers(self.model)[0].register_forward_pre_hook(feed, with_kwargs=True)
            try:
                device = next(self.model.parameters()).device

                def figures(index: int, inputs: torch.Tensor) -> tuple:
                    current[:] = [states[index]]  # read by `feed` while this batch's forward is queued
                    return batch_nll(self.model, inputs) if measure is None else measure(self.model, inputs, index)

                batches = enumerate(window_batches(self.windows, self.bos_id, self.batch_size, device))
                yield from on_host((figures(index, inputs) for index, inputs in batches), device)
            finally:
                handle.remove()

    def perplexity(self, removal: Removal) -> float:
        return from_batches(self.nll_batches(removal))

    def head(self, n_windows: int) -> PrefixCache | None:
        """The same cache over its first `n_windows` windows, sharing the stored states; None unless they
        are whole batches (a batch's shape is part of what makes the states exact)."""
        if n_windows > len(self.windows) or (n_windows % self.batch_size and n_windows != len(self.windows)):
            return None
        batches = math.ceil(n_windows / self.batch_size)
        states = {boundary: stored[:batches] for boundary, stored in self.states.items()}
        return PrefixCache(
            self.model,
            self.windows[:n_windows],
            self.bos_id,
            self.batch_size,
            self.base,
            self.n_layers,
            states,
            self.base_nll[:batches],
        )


@torch.inference_mode()
def build_prefix_cache(
    model: nn.Module,
    windows: torch.Tensor,
    bos_id: int | None = None,
    batch_size: int = 4,
    base: Removal = Removal(),
    max_bytes: int | None = None,
) -> PrefixCache:
    """One forward pass of the model with `base` removed, keeping every layer's input (memory permitting)."""
    n_layers = len(decoder_layers(model))
    cache = PrefixCache(model, windows, bos_id, batch_size, base, n_layers)
    kept = [i for i in range(n_layers) if i not in set(base.layers)]
    param = next(model.parameters())
    tokens = windows.shape[0] * (windows.shape[1] + (1 if bos_id is not None else 0))
    config: Any = model.config  # a transformers PretrainedConfig (nn.Module has no config)
    per_boundary = tokens * config.hidden_size * param.element_size()
    # Over several devices (--device-map) the boundaries spread as the layers do, so each device holds
    # its share: the tightest device per share bounds the whole (one device: its own free memory).
    devices = devices_of(model)
    available = len(devices) * min(available_bytes(device) for device in devices)
    budget = max_bytes if max_bytes is not None else int(available * MEMORY_FRACTION)
    # The first kept layer's input is the embedding output: nothing to save by storing it.
    candidates = kept[1:]
    fit = budget // per_boundary if per_boundary else 0
    if not candidates or fit == 0:
        if candidates:
            log.info(
                "prefix cache off: one layer boundary needs %.0f MiB, budget %.0f MiB",
                per_boundary / 2**20,
                budget / 2**20,
            )
        stored: list[int] = []
    else:
        stride = math.ceil(len(candidates) / fit)
        stored = candidates[::stride]
        if stride > 1:
            log.info("prefix cache: every %d-th layer boundary fits in %.0f MiB", stride, budget / 2**20)
    prepare(model)  # before the hooks below: the fused-head probe runs a batch of its own
    cache.states = {b: [] for b in stored}
    position = {b: kept.index(b) for b in stored}  # index in the pruned stack
    handles = []
    with removal_applied(model, base):
        layers = decoder_layers(model)
        for boundary, index in position.items():

            def keep(module, args, kwargs, boundary=boundary):
                hidden = args[0] if args else kwargs["hidden_states"]
                # Indexed by batch, not appended: a batch run again (compiled layers falling back to
                # eager part-way, evaluators/forward.py) overwrites its own entry.
                del cache.states[boundary][len(cache.base_nll) :]
                # On the layer's own device (--device-map): where the candidate starting here computes.
                cache.states[boundary].append(hidden.detach().to(layer_device(module, hidden.device), copy=True))

            handles.append(layers[index].register_forward_pre_hook(keep, with_kwargs=True))
        try:
            for inputs in window_batches(windows, bos_id, batch_size, param.device):
                nll, count = batch_nll(model, inputs)
                cache.base_nll.append((nll.item(), count))
        finally:
            for handle in handles:
                handle.remove()
    return cache
