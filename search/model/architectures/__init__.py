"""Model families: where each keeps its decoder stack, what must change when layers go, and which
modules make up each of a layer's two residual blocks.

One small module per family, each registering an `Architecture` for the `config.model_type`
values it covers. To add a family: copy `llama.py`, set its model types and stack path, and add
its name to the import line at the bottom of this file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from search.errors import SearchError


def count_parameters(layer: nn.Module) -> int:
    return sum(p.numel() for p in layer.parameters())


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]
    layers_path: str  # dotted attribute path from the *ForCausalLM model to its nn.ModuleList
    # Config fields holding one entry per layer; they shrink with the stack (num_hidden_layers always does).
    per_layer_lists: tuple[str, ...] = ("layer_types",)
    # Module attributes holding a layer's position in the stack (the KV cache is keyed by them).
    index_attrs: tuple[str, ...] = ("layer_idx",)
    count_parameters: Callable[[nn.Module], int] = count_parameters
    # Linear healing folds a map into the projection whose output is added to the residual stream
    # (paths inside one decoder layer: the MLP's, and attention's for runs that follow an attention
    # block); None, with the reason, when no such exact fold exists.
    mlp_output: str | None = "mlp.down_proj"
    attention_output: str | None = "self_attn.o_proj"
    no_fold: str = ""
    # A decoder layer's two residual blocks (paths inside one layer). Each block is its `*_module`, which
    # computes the branch added to the residual stream, plus the norms and dropouts applied in series on
    # that branch only: skipping a block must run none of them, and its parameters are theirs together.
    attention_block: tuple[str, ...] = ("input_layernorm", "self_attn")
    attention_module: str = "self_attn"
    mlp_block: tuple[str, ...] = ("post_attention_layernorm", "mlp")
    mlp_module: str = "mlp"

    def __post_init__(self) -> None:
        if self.attention_module not in self.attention_block or self.mlp_module not in self.mlp_block:
            raise ValueError(f"{self.name}: a block's computing module must be one of the block's modules")
        if set(self.attention_block) & set(self.mlp_block):
            raise ValueError(f"{self.name}: a module cannot belong to both blocks")


REGISTRY: dict[str, Architecture] = {}


def register(architecture: Architecture) -> Architecture:
    for model_type in architecture.model_types:
        REGISTRY[model_type] = architecture
    return architecture


def architecture_of(model: nn.Module) -> Architecture:
    """The family of `model`; an export reloaded through its own sub-layer modeling file is its stock family's."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    marker = getattr(config, "sublayer_export", None)
    if model_type not in REGISTRY and isinstance(marker, dict):
        model_type = marker.get("base_model_type", model_type)
    if model_type not in REGISTRY:
        supported = ", ".join(sorted(REGISTRY))
        raise SearchError(
            f"no decoder-layer stack known for model_type {model_type!r} (supported: {supported}); "
            "to add one, copy search/model/architectures/llama.py and register the new module in its __init__.py"
        )
    return REGISTRY[model_type]


from search.model.architectures import gemma3, gpt2, llama, mistral, phi3, qwen  # noqa: E402, F401  (the registry)
