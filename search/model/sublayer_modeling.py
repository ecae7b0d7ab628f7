"""Modeling code for a causal LM whose decoder layers may each lack their attention or MLP block.

The depth-pruning engine (`search`) copies this file, unchanged, into every export that removes single
blocks, as `modeling_sublayer.py`; `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`
loads it through `auto_map` in config.json. It imports only torch and transformers: each class
subclasses the family's stock transformers class and changes only what a removed block needs.

config.json says which blocks are gone, by layer of the exported stack (whole removed layers are
simply absent, as in a stock checkpoint with fewer layers):
- `removed_attention`: layers without their attention block, `removed_mlp`: layers without their MLP;
- `sublayer_export`: `base_model_type` (the stock family) and the modules forming each residual block
  (`attention_block`, `mlp_block`, in the order the stock layer applies them; `attention_module`
  is the one called with the attention arguments).

A removed block's modules are never built, hold no weights and compute nothing: the layer adds only
its kept branch to the residual stream. A layer without attention holds no KV-cache entry: its
cache slot is a transformers `DummyLayer`, which the mask code already skips when it sizes a cached
step from "the first attention layer"; the slot answers the cache's length question (asked of layer 0
whatever it is, since transformers 5.25) with that first attention layer's count.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

from torch import nn

MARKER = "sublayer_export"
FORMAT = 1

# config.model_type of the stock family: (transformers.models submodule, config, base model, causal LM, decoder layer,
# the base model's attribute holding the decoder layers)
FAMILIES: dict[str, tuple[str, str, str, str, str, str]] = {
    "llama": ("llama", "LlamaConfig", "LlamaModel", "LlamaForCausalLM", "LlamaDecoderLayer", "layers"),
    "mistral": ("mistral", "MistralConfig", "MistralModel", "MistralForCausalLM", "MistralDecoderLayer", "layers"),
    "qwen2": ("qwen2", "Qwen2Config", "Qwen2Model", "Qwen2ForCausalLM", "Qwen2DecoderLayer", "layers"),
    "qwen3": ("qwen3", "Qwen3Config", "Qwen3Model", "Qwen3ForCausalLM", "Qwen3DecoderLayer", "layers"),
    "gemma3_text": (
        "gemma3",
        "Gemma3TextConfig",
        "Gemma3TextModel",
        "Gemma3ForCausalLM",
        "Gemma3DecoderLayer",
        "layers",
    ),
    "phi3": ("phi3", "Phi3Config", "Phi3Model", "Phi3ForCausalLM", "Phi3DecoderLayer", "layers"),
    "gpt2": ("gpt2", "GPT2Config", "GPT2Model", "GPT2LMHeadModel", "GPT2Block", "h"),
}


def class_names(model_type: str) -> dict[str, str]:
    """The auto class each of this file's classes for `model_type` (the stock family) stands for."""
    _, config, model, causal_lm, _, _ = FAMILIES[model_type]
    return {
        "AutoConfig": f"Sublayer{config}",
        "AutoModel": f"Sublayer{model}",
        "AutoModelForCausalLM": f"Sublayer{causal_lm}",
    }


class _Blocks:
    """What a decoder layer keeps; mixed into the family's stock decoder layer."""

    keeps_attention: bool
    keeps_mlp: bool
    attention_block: list[str]
    attention_module: str
    mlp_block: list[str]

    def _drop_removed_blocks(self, config: Any, layer_idx: int) -> None:
        blocks = getattr(config, MARKER)
        self.keeps_attention = layer_idx not in (config.removed_attention or [])
        self.keeps_mlp = layer_idx not in (config.removed_mlp or [])
        self.attention_block = list(blocks["attention_block"]) if self.keeps_attention else []
        self.attention_module = blocks["attention_module"]
        self.mlp_block = list(blocks["mlp_block"]) if self.keeps_mlp else []
        for name in [*blocks["attention_block"], *blocks["mlp_block"]]:
            if name not in self.attention_block and name not in self.mlp_block:
                delattr(self, name)

    def _branch(self, names: list[str], hidden_states: Any, attention_kwargs: dict[str, Any]) -> Any:
        for name in names:
            module = getattr(self, name)
            hidden_states = (
                module(hidden_states, **attention_kwargs)[0] if name == self.attention_module else module(hidden_states)
            )
        return hidden_states

    def _kept_blocks(self, hidden_states: Any, attention_kwargs: dict[str, Any]) -> Any:
        if self.keeps_attention:
            hidden_states = hidden_states + self._branch(self.attention_block, hidden_states, attention_kwargs)
        if self.keeps_mlp:
            hidden_states = hidden_states + self._branch(self.mlp_block, hidden_states, {})
        return hidden_states


def _decoder_layer(stock: type, name: str) -> type:
    class Layer(_Blocks, stock):
        def __init__(self, config: Any, layer_idx: int) -> None:
            super().__init__(config, layer_idx)
            self._drop_removed_blocks(config, layer_idx)

        def forward(self, hidden_states: Any, **kwargs: Any) -> Any:
            if self.keeps_attention and self.keeps_mlp:
                return super().forward(hidden_states, **kwargs)
            return self._kept_blocks(hidden_states, kwargs)  # every argument is the attention module's

    class GPT2Layer(_Blocks, stock):
        """GPT-2 passes its layers positional arguments, and encoder states its attention does not take."""

        def __init__(self, config: Any, layer_idx: int) -> None:
            if config.add_cross_attention:
                raise ValueError("sub-layer GPT-2 models have no cross-attention")
            super().__init__(config, layer_idx)
            self._drop_removed_blocks(config, layer_idx)

        def forward(
            self,
            hidden_states: Any,
            cache: Any = None,
            attention_mask: Any = None,
            encoder_hidden_states: Any = None,
            encoder_attention_mask: Any = None,
            use_cache: bool | None = False,
            **kwargs: Any,
        ) -> Any:
            if self.keeps_attention and self.keeps_mlp:
                return super().forward(
                    hidden_states,
                    cache,
                    attention_mask,
                    encoder_hidden_states,
                    encoder_attention_mask=encoder_attention_mask,
                    use_cache=use_cache,
                    **kwargs,
                )
            attention = {"cache": cache, "attention_mask": attention_mask, "use_cache": use_cache, **kwargs}
            return self._kept_blocks(hidden_states, attention)

    chosen = GPT2Layer if stock.__name__ == "GPT2Block" else Layer
    chosen.__name__ = chosen.__qualname__ = name
    return chosen


@functools.cache
def _no_attention_slot() -> type:
    """The cache slot of a layer without attention, made once (transformers is imported only when a model is built)."""
    from transformers.cache_utils import DummyLayer

    class NoAttentionSlot(DummyLayer):
        """Holds nothing; the tokens the cache has seen are the first attention layer's (none: 0)."""

        def __init__(self, cache: Any) -> None:
            super().__init__()
            self.cache = cache

        def get_seq_length(self) -> int:
            kept = (slot for slot in self.cache.layers if not isinstance(slot, DummyLayer))
            first = next(kept, None)
            return 0 if first is None else first.get_seq_length()

    return NoAttentionSlot


def _without_attention_slots(cache: Any, config: Any) -> None:
    """Turn the cache slots of layers without attention into empty slots (nothing ever writes them).

    Any cache a caller hands in is built for every layer (from the config, or grown as layers write);
    a cached step is sized from the first attention layer, which an empty `DynamicLayer` would pretend to be.
    """
    from transformers.cache_utils import DummyLayer

    cache = getattr(cache, "self_attention_cache", cache)  # an EncoderDecoderCache's decoder side
    slots = getattr(cache, "layers", None)
    if slots is None:
        return
    if getattr(cache, "layer_class_to_replicate", None) is not None:  # grown lazily: give it every layer now
        while len(slots) < config.num_hidden_layers:
            slots.append(cache.layer_class_to_replicate())
    for index in config.removed_attention or []:
        if index < len(slots) and not isinstance(slots[index], DummyLayer):
            slots[index] = _no_attention_slot()(cache)


def _family(model_type: str) -> dict[str, type]:
    submodule, config_name, model_name, causal_name, layer_name, layers_attr = FAMILIES[model_type]
    stock = importlib.import_module(f"transformers.models.{submodule}.modeling_{submodule}")
    names = class_names(model_type)
    layer = _decoder_layer(getattr(stock, layer_name), f"Sublayer{layer_name}")

    class Config(getattr(stock, config_name)):  # type: ignore[misc]
        model_type = f"{getattr(stock, config_name).model_type}_sublayer"

    class Model(getattr(stock, model_name)):  # type: ignore[misc]
        config_class = Config
        _no_split_modules = [layer.__name__]

        def __init__(self, config: Any) -> None:
            # The stock __init__ builds stock layers first: free on the meta device `from_pretrained` builds on.
            super().__init__(config)
            setattr(self, layers_attr, nn.ModuleList(layer(config, i) for i in range(config.num_hidden_layers)))
            self.post_init()

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            from transformers.cache_utils import DynamicCache

            cache = kwargs.pop("cache", None)
            cache = kwargs.pop("past_key_values", None) if cache is None else cache
            use_cache = kwargs.get("use_cache")
            use_cache = self.config.use_cache if use_cache is None else use_cache
            if cache is None and use_cache and not (self.gradient_checkpointing and self.training):
                cache = DynamicCache(config=self.config)  # what the stock forward would build, made here to fix it
            if cache is not None:
                _without_attention_slots(cache, self.config)
            return super().forward(*args, cache=cache, **kwargs)

    class CausalLM(getattr(stock, causal_name)):  # type: ignore[misc]
        config_class = Config
        _no_split_modules = [layer.__name__]

        def __init__(self, config: Any) -> None:
            super().__init__(config)
            setattr(self, self.base_model_prefix, Model(config))
            self.post_init()

    classes: dict[str, type] = {}
    for cls, auto in ((Config, "AutoConfig"), (Model, "AutoModel"), (CausalLM, "AutoModelForCausalLM")):
        cls.__name__ = cls.__qualname__ = names[auto]
        classes[names[auto]] = cls
    return {**classes, layer.__name__: layer}


def __getattr__(name: str) -> type:
    """A family's classes are built when first asked for (transformers looks them up by name), so
    importing this file for its constants imports no model code."""
    for model_type in FAMILIES:
        if name in class_names(model_type).values() or name == f"Sublayer{FAMILIES[model_type][4]}":
            globals().update(_family(model_type))
            return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
