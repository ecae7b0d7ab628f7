"""Per-layer sensitivity: how much a layer matters, by three criteria.

- `ppl`: the perplexity ratio after removing the layer (Shortened LLaMA's PPL criterion; SLEB's
  re-scored greedy step). Direct and model-agnostic, one evaluation per candidate layer.
- `bi`: Block Influence (ShortGPT), 1 - cos(layer input, layer output), averaged over tokens.
- `angular`: angular distance arccos(cos)/pi between the input of layer l and the input of layer
  l+n (Gromov et al. 2024); with n = 1 it ranks single layers, larger n scores contiguous blocks.

`bi` and `angular` come from one forward pass for every layer at once; `block_similarity` scores
every attention and MLP block the same way (LLM-Drop) for sub-layer studies. The raw output of the last
layer is captured with a hook, because `output_hidden_states`' last entry is after the final norm.
Token position 0 (BOS, or the first token: an attention sink with outsized norms) is left out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from evaluators.perplexity import window_batches
from evaluators.prefix import build_prefix_cache
from search.model.architectures import architecture_of
from search.model.removal import KINDS, Removal
from search.model.surgery import decoder_layers, removal_applied


def removal_sensitivity(
    model: nn.Module,
    windows: torch.Tensor,
    candidates: Iterable[Removal],
    already_removed: Removal = Removal(),
    bos_id: int | None = None,
    batch_size: int = 4,
    desc: str | None = None,
    store=None,
) -> dict[Removal, float]:
    """Perplexity ratio, to the model with `already_removed`, of removing each candidate (a layer, or a
    block) as well.

    All indices refer to the unpruned model. One prefix-cache pass over the already pruned model
    gives its perplexity and lets each candidate run only from its own layer onwards. With a
    `store` (an EvalCache for these windows), perplexities measured before are read, not measured.
    """
    cache = None

    def measure(removal: Removal) -> float:
        nonlocal cache
        found = store.get(removal) if store is not None else None
        if found is not None:
            return found
        if cache is None:
            cache = build_prefix_cache(model, windows, bos_id, batch_size, base=already_removed)
            if store is not None:
                store.put(already_removed, cache.base_ppl)
        value = cache.base_ppl if removal == already_removed else cache.perplexity(removal)
        if store is not None:
            store.put(removal, value)
        return value

    base_ppl = measure(already_removed)
    candidates = list(candidates)
    scores: dict[Removal, float] = {}
    for unit in tqdm(candidates, desc=desc, leave=False, disable=desc is None):
        scores[unit] = measure(already_removed | unit) / base_ppl
    return scores


@dataclass(frozen=True)
class Similarity:
    """One-pass criteria of a (possibly already pruned) model, keyed by unpruned layer index."""

    bi: dict[int, float]  # layer -> Block Influence
    angular: dict[int, dict[int, float]]  # block length n -> first layer of the block -> angular distance


@torch.inference_mode()
def similarity(
    model: nn.Module,
    windows: torch.Tensor,
    already_removed: Removal = Removal(),
    bos_id: int | None = None,
    batch_size: int = 4,
    max_block: int = 1,
) -> Similarity:
    """Block Influence and angular distances (blocks of 1..`max_block` layers) from one forward pass."""
    n_layers = len(decoder_layers(model))
    kept = [i for i in range(n_layers) if i not in set(already_removed.layers)]
    m = len(kept)
    max_block = max(1, min(max_block, m))
    cos_sum = {(a, n): 0.0 for n in range(1, max_block + 1) for a in range(m - n + 1)}
    ang_sum = dict.fromkeys(cos_sum, 0.0)
    tokens = 0
    device = next(model.parameters()).device
    with removal_applied(model, already_removed):
        layers = decoder_layers(model)
        boundaries: list[torch.Tensor | None] = [None] * (m + 1)  # input of each layer, then the last output

        def take_input(index):
            def hook(module, args, kwargs):
                boundaries[index] = args[0] if args else kwargs["hidden_states"]

            return hook

        def take_output(module, args, kwargs, output):
            boundaries[m] = output[0] if isinstance(output, tuple) else output

        handles = [layer.register_forward_pre_hook(take_input(i), with_kwargs=True) for i, layer in enumerate(layers)]
        handles.append(layers[-1].register_forward_hook(take_output, with_kwargs=True))
        try:
            for inputs in window_batches(windows, bos_id, batch_size, device):
                model(input_ids=inputs, use_cache=False)
                filled = cast("list[torch.Tensor]", boundaries)  # the forward pass set every boundary
                states = [F.normalize(h[:, 1:].float(), dim=-1) for h in filled]  # drop position 0
                tokens += states[0].shape[0] * states[0].shape[1]
                for a, n in cos_sum:
                    cos = (states[a] * states[a + n]).sum(-1).clamp(-1.0, 1.0)
                    cos_sum[a, n] += cos.sum().item()
                    ang_sum[a, n] += (torch.arccos(cos) / math.pi).sum().item()
        finally:
            for handle in handles:
                handle.remove()
    bi = {kept[a]: 1.0 - cos_sum[a, 1] / tokens for a in range(m)}
    angular = {n: {kept[a]: ang_sum[a, n] / tokens for a in range(m - n + 1)} for n in range(1, max_block + 1)}
    return Similarity(bi, angular)


@torch.inference_mode()
def block_similarity(
    model: nn.Module, windows: torch.Tensor, bos_id: int | None = None, batch_size: int = 4
) -> dict[Removal, float]:
    """1 - cos(block input, block output) of every attention and every MLP block, from one forward pass
    ("What Matters in Transformers? Not All Attention Is Needed", LLM-Drop: a block whose output is
    nearly its input adds little to the residual stream). Keyed by the block's unit removal.

    An attention block's output is its layer's residual stream after the attention add, which is the
    input of the MLP block's first module (its norm) in every supported family; an MLP block's output
    is the layer's output.
    """
    arch = architecture_of(model)
    layers = decoder_layers(model)
    sums = {Removal.from_blocks([(i, kind)]): 0.0 for i in range(len(layers)) for kind in KINDS}
    previous: list[torch.Tensor] = []  # the residual stream at the last boundary passed, normalised

    def boundary(index: int, ends: str | None, output: bool = False):
        def hook(module, args, kwargs, *result):
            if output:
                value = result[0][0] if isinstance(result[0], tuple) else result[0]
            else:
                value = args[0] if args else kwargs["hidden_states"]
            state = F.normalize(value[:, 1:].float(), dim=-1)  # position 0: an attention sink
            if ends is not None:
                cos = (previous[0] * state).sum(-1).clamp(-1.0, 1.0)
                sums[Removal.from_blocks([(index, ends)])] += cos.sum().item()
            previous[:] = [state]

        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(boundary(i, None), with_kwargs=True))
        norm = layer.get_submodule(arch.mlp_block[0])
        handles.append(norm.register_forward_pre_hook(boundary(i, "attn"), with_kwargs=True))
        handles.append(layer.register_forward_hook(boundary(i, "mlp", output=True), with_kwargs=True))
    tokens = 0
    device = next(model.parameters()).device
    try:
        for inputs in window_batches(windows, bos_id, batch_size, device):
            model(input_ids=inputs, use_cache=False)
            tokens += inputs.shape[0] * (inputs.shape[1] - 1)
    finally:
        for handle in handles:
            handle.remove()
    return {unit: 1.0 - total / tokens for unit, total in sums.items()}
