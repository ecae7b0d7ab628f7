"""Layer surgery: remove a set of decoder layers in memory, and put them back.

Removal must leave a model that behaves exactly like one built with fewer layers, or
generation with the KV cache breaks: the cache is indexed by each attention module's
`layer_idx` and sized from `config.num_hidden_layers` / `config.layer_types`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from search.errors import SearchError
from search.model.architectures import architecture_of


def _parent_and_attr(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    *parents, attr = path.split(".")
    owner = model
    for name in parents:
        owner = getattr(owner, name)
    return owner, attr


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's current decoder stack."""
    owner, attr = _parent_and_attr(model, architecture_of(model).layers_path)
    layers = getattr(owner, attr, None)
    if not isinstance(layers, nn.ModuleList):
        raise SearchError(f"{type(model).__name__} has no decoder-layer list at {attr!r}")
    return layers


def _renumber(layer: nn.Module, index: int, attrs: tuple[str, ...]) -> None:
    # Attention modules (and some decoder layers) carry the index the KV cache is keyed by.
    for module in layer.modules():
        for attr in attrs:
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, index)


@dataclass
class _Saved:
    layers: nn.ModuleList
    num_hidden_layers: int
    lists: dict[str, list]


def remove_layers(model: nn.Module, removed: Iterable[int]) -> _Saved:
    """Drop the layers at `removed` (indices into the current stack); returns what restores it."""
    layers = decoder_layers(model)
    removed = sorted(set(removed))
    n = len(layers)
    if any(i < 0 or i >= n for i in removed):
        raise SearchError(f"layer indices {removed} out of range for a {n}-layer model")
    if len(removed) >= n:
        raise SearchError("cannot remove every decoder layer")
    config: Any = model.config  # a transformers PretrainedConfig: its fields differ by family
    arch = architecture_of(model)
    saved = _Saved(
        layers=layers,
        num_hidden_layers=config.num_hidden_layers,
        lists={k: list(getattr(config, k)) for k in arch.per_layer_lists if getattr(config, k, None)},
    )
    kept = [i for i in range(n) if i not in set(removed)]
    owner, attr = _parent_and_attr(model, arch.layers_path)
    setattr(owner, attr, nn.ModuleList(layers[i] for i in kept))
    for new_index, old_index in enumerate(kept):
        _renumber(layers[old_index], new_index, arch.index_attrs)
    config.num_hidden_layers = len(kept)
    for key, values in saved.lists.items():
        setattr(config, key, [values[i] for i in kept])
    return saved


def restore_layers(model: nn.Module, saved: _Saved) -> None:
    arch = architecture_of(model)
    owner, attr = _parent_and_attr(model, arch.layers_path)
    setattr(owner, attr, saved.layers)
    for index, layer in enumerate(saved.layers):
        _renumber(layer, index, arch.index_attrs)
    config: Any = model.config  # a transformers PretrainedConfig: its fields differ by family
    config.num_hidden_layers = saved.num_hidden_layers
    for key, values in saved.lists.items():
        setattr(config, key, values)


@contextmanager
def layers_removed(model: nn.Module, removed: Iterable[int]) -> Iterator[nn.Module]:
    """`with layers_removed(model, [3, 7]):` runs the block on the pruned model, then restores it."""
    saved = remove_layers(model, removed)
    try:
        yield model
    finally:
        restore_layers(model, saved)


def layer_param_counts(model: nn.Module) -> list[int]:
    count = architecture_of(model).count_parameters
    return [count(layer) for layer in decoder_layers(model)]


def total_param_count(model: nn.Module) -> int:
    # parameters() yields tied tensors (embedding / LM head) once, which is what disk and memory hold.
    return sum(p.numel() for p in model.parameters())


# Bounds on kv_cache_divergence: float32 paths agree almost exactly, while bf16 products round the
# cached and uncached paths differently. A cache wired to the wrong layers misses both by far more.
KV_CACHE_TOLERANCE = 1e-4
KV_CACHE_TOLERANCE_REDUCED = 5e-2


def kv_cache_divergence(model: nn.Module, prompt: torch.Tensor, new_tokens: int = 24, pad_token_id: int = 0) -> float:
    """How far greedy generation with the KV cache strays from recomputing without it.

    Returns the largest gap between each step's cached logits and the logits of one uncached pass
    over the generated sequence, relative to the largest logit. Logits, not tokens, are compared:
    under reduced precision the two paths round differently and greedy decoding flips on a
    near-tie, which says nothing about whether the cache is wired to the right layers.
    """
    causal_lm: Any = model  # a transformers model: generate() is not on nn.Module
    with torch.inference_mode():
        out = causal_lm.generate(
            prompt,
            max_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=pad_token_id,
        )
        cached = torch.stack(out.logits, dim=1).float()
        full = model(input_ids=out.sequences, use_cache=False).logits.float()
    full = full[:, prompt.shape[1] - 1 : prompt.shape[1] - 1 + cached.shape[1]]
    return ((cached - full).abs().max() / full.abs().max().clamp_min(1e-12)).item()
