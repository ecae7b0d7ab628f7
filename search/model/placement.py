"""One model over several devices (`--device-map`): contiguous runs of decoder layers per device.

A model too big for one GPU is split by layers, the way pipeline parallelism splits it, but run
one batch at a time: layer i's weights, its prefix-cache entries and its healing statistics live
on layer i's device, and accelerate's hooks move the hidden state from one device to the next.
The split is by layer count (a decoder stack's layers are the same size); the embedding goes
with the first layers and the final norm and LM head with the last (or with the embedding when
the two share their weights). CPU offload is not offered: it moves every weight through the bus
on every batch, which makes a study's thousands of passes too slow to use.

A list of identical devices (`cpu,cpu`) is allowed: it runs the dispatched code path, hooks
included, on one machine, which is how the tests check it; `cuda:0,cpu` splits a model between one
GPU and the CPU (the CPU computing its share, not offloading it), which checks the moves between
devices on a machine with one GPU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from search.errors import SearchError
from search.failures import check_device
from search.model.architectures import architecture_of


def parse_device_map(spec: str) -> list[str]:
    """`auto` (every visible CUDA device) or a comma-separated list of torch devices, in layer order."""
    if spec.strip() == "auto":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise SearchError("--device-map auto spreads a model over CUDA devices, and this torch sees none")
        return [f"cuda:{i}" for i in range(count)]
    devices = [part.strip() for part in spec.split(",") if part.strip()]
    if not devices:
        raise SearchError(f"--device-map {spec!r} names no device; pass auto or a list such as cuda:0,cuda:1")
    for device in devices:
        check_device(device, "--device-map")
    return [str(torch.device(device)) for device in devices]


def split_layers(n_layers: int, devices: list[str]) -> list[str]:
    """Each layer's device: contiguous runs, as even as the count allows (earlier devices take the extra)."""
    if len(devices) > n_layers:
        raise SearchError(f"--device-map names {len(devices)} devices for {n_layers} decoder layers")
    base, extra = divmod(n_layers, len(devices))
    placement = []
    for index, device in enumerate(devices):
        placement += [device] * (base + (1 if index < extra else 0))
    return placement


def device_map(model: nn.Module, devices: list[str]) -> dict[str, str]:
    """accelerate's map: module name -> device. Layers split by `split_layers`; every other module
    with weights of its own goes with the first layer when it comes before the stack (the
    embedding), else with the last layer, or with the embedding when it shares its weights."""
    prefix = architecture_of(model).layers_path  # an attribute path: named_modules spells it the same
    layers: Any = model.get_submodule(prefix)
    placement = split_layers(len(layers), devices)
    mapping = {f"{prefix}.{i}": device for i, device in enumerate(placement)}
    shared = {id(p) for p in _input_embedding_params(model)}
    before = True
    for name, module in model.named_modules():
        if name == prefix:
            before = False
            continue
        if name.startswith(prefix + ".") or not name:
            continue
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if not own:
            continue
        tied = any(id(p) in shared for p in own)
        mapping[name] = placement[0] if before or tied else placement[-1]
    return mapping


def dispatch(model: nn.Module, devices: list[str]) -> nn.Module:
    """Move each module of `device_map` to its device and give it accelerate's hook that moves its
    inputs there. Not `accelerate.dispatch_model`: it treats a `cpu` placement as offloading (weights
    on the meta device, copied in per call), which would leave no weights to count, heal or export."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module  # type: ignore[import-untyped]

    skip = getattr(model, "_skip_keys_device_placement", None)  # the KV cache is not moved
    for name, device in device_map(model, devices).items():
        module = model.get_submodule(name)
        module.to(torch.device(device))
        add_hook_to_module(module, AlignDevicesHook(execution_device=torch.device(device), skip_keys=skip))
    return model


def devices_of(model: nn.Module) -> list[torch.device]:
    """Every device the model's weights are on (one for an undispatched model), first layer's first."""
    seen: dict[torch.device, None] = {}
    for param in model.parameters():
        seen.setdefault(param.device, None)
    return list(seen)


def layer_device(layer: nn.Module, default: torch.device) -> torch.device:
    """Where a decoder layer computes: its weights' device (a weightless stub: `default`)."""
    param = next(layer.parameters(), None)
    return default if param is None else param.device


def _input_embedding_params(model: nn.Module) -> list[torch.Tensor]:
    causal_lm: Any = model  # a transformers model: get_input_embeddings is not on nn.Module
    embedding = causal_lm.get_input_embeddings() if hasattr(causal_lm, "get_input_embeddings") else None
    return [] if embedding is None else list(embedding.parameters())
