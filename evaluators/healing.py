"""Linear healing: replace each removed run of layers by one linear map, folded into a kept weight.

For a maximal run of removed layers i..j, the kept layer p = i-1 ends by adding its MLP output M
to the residual stream. Healing fits A so that the pruned model's residual after layer p,
out_p + M·A, matches what the unpruned model carried after layer j, and folds the map into the
MLP's output projection: M·(I + A) is that projection with its weight multiplied by (I + A). The
healed model keeps its architecture and parameter count, so stock `transformers` loads it (the
idea of ReplaceMe, Shopkhoev et al. 2025).

The fit is least squares with a ridge on A: it shrinks towards leaving the model unhealed (A = 0),
never towards deleting the MLP. Windows: the fitting windows (`FitData`) are their own tokens, taken
from the corpus beside the calibration windows and never from the held-out ones. Runs are fitted
in order; with `sequential`, each later run is fitted on the activations of the model already
pruned and healed before it (the errors it must correct), else on the unpruned model's.

A run that starts at layer 0 has no preceding MLP and stays unhealed (reported, never faked). A
family whose MLP output passes through a norm before the residual add cannot fold a map exactly:
`fold_reason` names it and the caller refuses.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from evaluators.forward import numerics, prepare
from evaluators.perplexity import window_batches
from search.model.architectures import architecture_of
from search.model.surgery import decoder_layers, layers_removed

DEFAULT_RIDGE = 1e-2  # relative to the mean diagonal of M^T M


def runs(removed: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive removed layers, as (first, last)."""
    found: list[tuple[int, int]] = []
    for layer in sorted(set(removed)):
        if found and found[-1][1] == layer - 1:
            found[-1] = (found[-1][0], layer)
        else:
            found.append((layer, layer))
    return found


def unreachable_runs(removed: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Runs no preceding MLP can heal: the one starting at layer 0."""
    return tuple(run for run in runs(removed) if run[0] == 0)


def fold_reason(model: nn.Module) -> str:
    """Why this family cannot be healed by folding ("" when it can)."""
    arch = architecture_of(model)
    return "" if arch.mlp_output else f"{arch.name}: {arch.no_fold}"


def output_projection(model: nn.Module, layer: int) -> nn.Module:
    """The module whose output layer `layer` adds to the residual stream last (its MLP's down projection)."""
    path = architecture_of(model).mlp_output
    if path is None:
        raise ValueError(fold_reason(model))
    module = decoder_layers(model)[layer]
    for name in path.split("."):
        module = getattr(module, name)
    return module


@dataclass(frozen=True)
class Healing:
    """The maps of one removal set: preceding layer -> A, and the runs left unhealed (they start at 0)."""

    maps: dict[int, torch.Tensor]
    unhealed: tuple[tuple[int, int], ...] = ()

    @property
    def first_changed(self) -> int | None:
        """The first layer whose weights healing changes: a prefix must start at or before it."""
        return min(self.maps, default=None)


def _fold(module: nn.Module, mix: torch.Tensor) -> None:
    """Make `module`'s output y become y·mix (mix = I + A, [d, d]) by rewriting its weight and bias."""
    weight: torch.Tensor = module.weight  # type: ignore[assignment]
    mix = mix.to(weight.device, torch.float64)  # products in float64, rounded once to the weight's dtype
    with torch.no_grad():
        if isinstance(module, nn.Linear):  # y = x W^T + b, W [d, in]: W' = mix^T W
            weight.copy_(mix.T @ weight.double())
        else:  # transformers' Conv1D (GPT-2): y = x W + b, W [in, d]: W' = W mix
            weight.copy_(weight.double() @ mix)
        bias = getattr(module, "bias", None)
        if bias is not None:
            bias.copy_(bias.double() @ mix)


@contextmanager
def healed(model: nn.Module, healing: Healing) -> Iterator[nn.Module]:
    """Run the block with the maps folded in (into the unpruned stack's indices); restores the weights."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter, its value before folding)
    try:
        for layer, delta in healing.maps.items():
            module = output_projection(model, layer)
            parameters: list[Any] = [p for p in (module.weight, getattr(module, "bias", None)) if p is not None]
            saved += [(p, p.detach().clone()) for p in parameters]
            _fold(module, _mix(delta))
        yield model
    finally:
        with torch.no_grad():
            for parameter, value in reversed(saved):
                parameter.copy_(value)


def fold_permanently(model: nn.Module, healing: Healing) -> None:
    """Fold the maps for good (export): the weights stay healed."""
    for layer, delta in healing.maps.items():
        _fold(output_projection(model, layer), _mix(delta))


def _mix(delta: torch.Tensor) -> torch.Tensor:
    return torch.eye(delta.shape[0], dtype=delta.dtype, device=delta.device) + delta


class _Stop(Exception):
    """Raised by a hook once the layers a fit needs have run: the rest of the stack is skipped."""


def _output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@dataclass
class FitData:
    """The unpruned model's activations on the fitting windows, per batch: each layer's input
    (`inputs[n]`: the stack's output) and each layer's MLP output. Gram products are memoised."""

    windows: torch.Tensor
    bos_id: int | None
    batch_size: int
    inputs: dict[int, list[torch.Tensor]]
    mlp_out: dict[int, list[torch.Tensor]]
    _products: dict[tuple[str, int, int], torch.Tensor] = field(default_factory=dict, repr=False)

    def product(self, layer: int, boundary: int | None) -> torch.Tensor:
        """M_layer^T M_layer (boundary None) or M_layer^T S_boundary, float64, over the fitted tokens."""
        key = ("mm" if boundary is None else "ms", layer, -1 if boundary is None else boundary)
        if key not in self._products:
            right = self.mlp_out[layer] if boundary is None else self.inputs[boundary]
            total = torch.zeros((), dtype=torch.float64, device=self.mlp_out[layer][0].device)
            for m, s in zip(self.mlp_out[layer], right, strict=True):
                total = total + (_tokens(m).T @ _tokens(s)).double()
            self._products[key] = total
        return self._products[key]


def _tokens(states: torch.Tensor) -> torch.Tensor:
    """[batch, seq, d] -> [tokens, d] without each window's first position (BOS or context-only)."""
    return states[:, 1:].reshape(-1, states.shape[-1]).float()


def _batches(data: FitData, device: torch.device) -> Iterator[torch.Tensor]:
    return window_batches(data.windows, data.bos_id, data.batch_size, device)


@torch.inference_mode()
def collect_fit_data(model: nn.Module, windows: torch.Tensor, bos_id: int | None, batch_size: int) -> FitData:
    """One pass of the unpruned stack over the fitting windows (no LM head), keeping what fits need."""
    prepare(model)  # before the hooks: the fused-head probe runs a batch of its own
    layers = decoder_layers(model)
    n = len(layers)
    data = FitData(windows, bos_id, batch_size, {i: [] for i in range(n + 1)}, {i: [] for i in range(n)})
    handles = []
    for index, layer in enumerate(layers):

        def keep_input(module, args, kwargs, index=index):
            data.inputs[index].append((args[0] if args else kwargs["hidden_states"]).detach().clone())

        def keep_mlp(module, args, output, index=index):
            data.mlp_out[index].append(_output(output).detach().clone())

        handles.append(layer.register_forward_pre_hook(keep_input, with_kwargs=True))
        handles.append(output_projection(model, index).register_forward_hook(keep_mlp))

    def keep_last(module, args, output):
        data.inputs[n].append(_output(output).detach().clone())
        raise _Stop

    handles.append(layers[n - 1].register_forward_hook(keep_last))
    causal_lm: Any = model
    try:
        for inputs in _batches(data, next(model.parameters()).device):
            try:
                with numerics(model):
                    causal_lm.base_model(input_ids=inputs, use_cache=False)
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return data


@torch.inference_mode()
def _pruned_products(
    model: nn.Module, data: FitData, removed: Sequence[int], start: int | None, layer: int, target: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """M^T M and M^T (S_target - out_layer) on the pruned model as it is now (earlier maps folded),
    running only layers start..layer, fed the unpruned input of `start` (None: from the embedding)."""
    device = data.inputs[0][0].device
    mm = torch.zeros((), dtype=torch.float64, device=device)
    my = torch.zeros((), dtype=torch.float64, device=device)
    captured: dict[str, torch.Tensor] = {}
    current: list[torch.Tensor] = []

    def feed(module, args, kwargs):
        if args:
            return (current[0], *args[1:]), kwargs
        kwargs["hidden_states"] = current[0]
        return args, kwargs

    def keep_mlp(module, args, output):
        captured["m"] = _output(output)

    def stop(module, args, output):
        captured["out"] = _output(output)
        raise _Stop

    causal_lm: Any = model
    projection = output_projection(model, layer)
    layer_module = decoder_layers(model)[layer]
    with layers_removed(model, sorted(set(range(start or 0)) | set(removed))):
        handles = [projection.register_forward_hook(keep_mlp), layer_module.register_forward_hook(stop)]
        if start is not None:
            handles.append(decoder_layers(model)[0].register_forward_pre_hook(feed, with_kwargs=True))
        try:
            for index, inputs in enumerate(_batches(data, next(model.parameters()).device)):
                if start is not None:
                    current[:] = [data.inputs[start][index]]
                try:
                    with numerics(model):
                        causal_lm.base_model(input_ids=inputs, use_cache=False)
                except _Stop:
                    pass
                m = _tokens(captured["m"])
                residual = _tokens(data.inputs[target][index]) - _tokens(captured["out"])
                mm = mm + (m.T @ m).double()
                my = my + (m.T @ residual).double()
        finally:
            for handle in handles:
                handle.remove()
    return mm, my


def solve(mm: torch.Tensor, my: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_A |M A - Y|^2 + lam |A|^2, lam = ridge x the mean of diag(M^T M)."""
    lam = ridge * mm.diagonal().mean()
    eye = torch.eye(mm.shape[0], dtype=mm.dtype, device=mm.device)
    return torch.linalg.solve(mm + lam * eye, my)


def fit_healing(
    model: nn.Module,
    data: FitData,
    removed: Sequence[int],
    ridge: float = DEFAULT_RIDGE,
    sequential: bool = True,
) -> Healing:
    """One map per removed run (see the module docstring); the model is left as it was."""
    maps: dict[int, torch.Tensor] = {}
    unhealed: list[tuple[int, int]] = []
    removed = sorted(set(removed))
    for first, last in runs(removed):
        if first == 0:
            unhealed.append((first, last))
            continue
        layer, target = first - 1, last + 1
        earlier = [i for i in removed if i < first]
        if not earlier or not sequential:  # the unpruned activations are this layer's own
            mm = data.product(layer, None)
            my = data.product(layer, target) - data.product(layer, first)
        else:
            start: int | None = min([removed[0], *maps])  # nothing before it changed: its unpruned input holds
            if start in removed:
                start = None  # layer 0 is removed: from the embedding
            with healed(model, Healing(maps)):
                mm, my = _pruned_products(model, data, removed, start, layer, target)
        maps[layer] = solve(mm, my, ridge).to(data.inputs[0][0].device)
    return Healing(maps, tuple(unhealed))
