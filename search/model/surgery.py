"""Layer surgery: remove a set of decoder layers, or skip a layer's attention or MLP block, in
memory, and put them back.

Removal must leave a model that behaves exactly like one built with fewer layers, or
generation with the KV cache breaks: the cache is indexed by each attention module's
`layer_idx` and sized from `config.num_hidden_layers` / `config.layer_types`.

A skipped block keeps its layer (the layer's own forward still runs, adding zero for that block),
so the stack, its indices and the config stay as they are and skipping composes with removal.
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
from search.model.removal import Removal


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


def block_param_counts(model: nn.Module) -> list[tuple[int, int]]:
    """(attention block, MLP block) parameters per layer of the current stack.

    A layer's parameters outside both blocks (GPT-2's cross-attention, where a model has one) are in
    neither count; for every supported causal LM the two add up to the layer's count.
    """
    arch = architecture_of(model)
    count = arch.count_parameters
    return [
        (
            sum(count(_submodule(layer, name)) for name in arch.attention_block),
            sum(count(_submodule(layer, name)) for name in arch.mlp_block),
        )
        for layer in decoder_layers(model)
    ]


def total_param_count(model: nn.Module) -> int:
    # parameters() yields tied tensors (embedding / LM head) once, which is what disk and memory hold.
    return sum(p.numel() for p in model.parameters())


def _submodule(layer: nn.Module, path: str) -> nn.Module:
    owner, attr = _parent_and_attr(layer, path)
    module = getattr(owner, attr, None)
    if not isinstance(module, nn.Module):
        raise SearchError(f"{type(layer).__name__} has no submodule {path!r}: this transformers version differs")
    return module


class SkippedAttention(nn.Module):
    """Stands in for a skipped attention module: the layer adds zeros to its residual stream.

    Returns `(output, attention weights)`, the pair every supported decoder layer unpacks. It still
    writes a one-element-per-token placeholder into its KV-cache slot: the model sizes the attention
    mask and positions of a cached step from the lengths of particular slots (layer 0, the first
    full and first sliding layer), and a slot left empty gives every layer a mask shorter than its
    keys, unnoticed only where SDPA builds no mask (an unpadded causal batch).
    """

    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx  # renumbered by layer removal like the module it replaces

    def forward(
        self, hidden_states: torch.Tensor, *args: Any, cache: Any = None, **kwargs: Any
    ) -> tuple[torch.Tensor, None]:
        cache = cache if cache is not None else kwargs.get("past_key_values")
        if cache is not None:
            cache = getattr(cache, "self_attention_cache", cache)  # GPT-2 wraps it when it has cross-attention
            placeholder = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[-2], 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class SkippedMLP(nn.Module):
    """Stands in for a skipped MLP: the layer adds zeros to its residual stream."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


@dataclass
class _SkippedBlocks:
    originals: list[tuple[nn.Module, str, nn.Module]]  # (owner, attribute, module), in the order replaced


def skip_blocks(model: nn.Module, attention: Iterable[int] = (), mlp: Iterable[int] = ()) -> _SkippedBlocks:
    """Stop computing the attention blocks of layers `attention` and the MLP blocks of layers `mlp`
    (indices into the current stack); returns what restores them.

    Each block's computing module becomes a zero-returning stub and its norms and dropouts identities,
    so no weight of the block runs and the stubs hold none (`model.parameters()` lists only kept weights).
    """
    layers = decoder_layers(model)
    attention, mlp = sorted(set(attention)), sorted(set(mlp))
    n = len(layers)
    if any(i < 0 or i >= n for i in attention + mlp):
        raise SearchError(f"block indices attention={attention} mlp={mlp} out of range for a {n}-layer model")
    if len(set(attention) & set(mlp)) == n:
        raise SearchError("cannot skip every block of every decoder layer")
    arch = architecture_of(model)
    planned: list[tuple[nn.Module, str, nn.Module]] = []
    for indices, block, computing in (
        (attention, arch.attention_block, arch.attention_module),
        (mlp, arch.mlp_block, arch.mlp_module),
    ):
        for i in indices:
            for name in block:
                original = _submodule(layers[i], name)
                if name != computing:
                    stub: nn.Module = nn.Identity()
                elif block is arch.mlp_block:
                    stub = SkippedMLP()
                elif isinstance(index := getattr(original, "layer_idx", None), int):
                    stub = SkippedAttention(index)
                else:
                    raise SearchError(f"{type(original).__name__} has no layer_idx: its KV-cache slot is unknown")
                owner, attr = _parent_and_attr(layers[i], name)
                planned.append((owner, attr, stub))
    # Every check passes before anything is replaced, so a refused request leaves the model untouched.
    saved = _SkippedBlocks([])
    for owner, attr, stub in planned:
        saved.originals.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, stub)
    return saved


def restore_blocks(model: nn.Module, saved: _SkippedBlocks) -> None:
    # By owner, not by stack index: layers removed or restored meanwhile do not move the blocks.
    for owner, attr, original in reversed(saved.originals):
        setattr(owner, attr, original)


@contextmanager
def blocks_skipped(model: nn.Module, attention: Iterable[int] = (), mlp: Iterable[int] = ()) -> Iterator[nn.Module]:
    """`with blocks_skipped(model, attention=[3], mlp=[5]):` runs the block without those blocks, then
    restores them; inside `layers_removed`, indices are into the already pruned stack."""
    saved = skip_blocks(model, attention, mlp)
    try:
        yield model
    finally:
        restore_blocks(model, saved)


@contextmanager
def removal_applied(model: nn.Module, removal: Removal) -> Iterator[nn.Module]:
    """`removal`'s whole layers removed and its lone blocks skipped, for the block.

    Its indices are layers of the stack as it is on entry (the original model wherever the engine
    calls it); the lone blocks are in layers that stay, renumbered onto the pruned stack here.
    """
    kept = [i for i in range(len(decoder_layers(model))) if i not in set(removal.layers)]
    blocks = removal.remap({old: new for new, old in enumerate(kept)})
    with layers_removed(model, removal.layers), blocks_skipped(model, blocks.attention, blocks.mlp):
        yield model


# Bounds on kv_cache_divergence: float32 paths agree almost exactly, while bf16 products round the
# cached and uncached paths differently. A cache wired to the wrong layers misses both by far more.
KV_CACHE_TOLERANCE = 1e-4
KV_CACHE_TOLERANCE_REDUCED = 5e-2


def kv_cache_divergence(
    model: nn.Module,
    prompt: torch.Tensor,
    new_tokens: int = 24,
    pad_token_id: int = 0,
    attention_mask: torch.Tensor | None = None,
) -> float:
    """How far greedy generation with the KV cache strays from recomputing without it.

    Returns the largest gap between each step's cached logits and the logits of one uncached pass
    over the generated sequence, relative to the largest logit. Logits, not tokens, are compared:
    under reduced precision the two paths round differently and greedy decoding flips on a
    near-tie, which says nothing about whether the cache is wired to the right layers. With an
    `attention_mask` (a padded batch) the model builds a real mask, sized from particular cache
    slots, where an unpadded causal batch lets SDPA skip it.
    """
    causal_lm: Any = model  # a transformers model: generate() is not on nn.Module
    with torch.inference_mode():
        out = causal_lm.generate(
            prompt,
            attention_mask=attention_mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=pad_token_id,
        )
        cached = torch.stack(out.logits, dim=1).float()
        if attention_mask is None:
            full = model(input_ids=out.sequences, use_cache=False).logits.float()
        else:
            mask = torch.cat([attention_mask, torch.ones_like(out.sequences[:, prompt.shape[1] :])], dim=1)
            positions = (mask.cumsum(-1) - 1).clamp_min(0)  # as generate derives them (GPT-2's are absolute)
            full = model(input_ids=out.sequences, attention_mask=mask, position_ids=positions, use_cache=False)
            full = full.logits.float()
    full = full[:, prompt.shape[1] - 1 : prompt.shape[1] - 1 + cached.shape[1]]
    return ((cached - full).abs().max() / full.abs().max().clamp_min(1e-12)).item()
