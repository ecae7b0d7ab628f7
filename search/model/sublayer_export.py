"""The sub-layer export format: a pruned model whose layers may each lack their attention or MLP block.

Written from the model a study measures (a stock model whose removed blocks are the stubs of
`surgery.skip_blocks`): `save_pretrained` stores exactly the kept weights (stubs hold none), then
config.json becomes the format's (a `*_sublayer` model type, `auto_map`, `removed_attention` and
`removed_mlp` by layer of the exported stack, the `sublayer_export` marker) and
`sublayer_modeling.py` is copied in as `modeling_sublayer.py`, so `transformers` loads it with
`trust_remote_code=True` and computes nothing for a removed block.

Read back here (`--model DIR`) without running that file: the stock family model is built from the
same config, the kept weights are loaded, and the removed blocks are skipped with the engine's own
stubs. That is the model the study measured, which surgery, parameter counts and the prefix cache
already understand, and a new study or export on top composes with it (a layer that ends up
skipping both blocks leaves the stack).
"""

from __future__ import annotations

import json
import logging
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from search.errors import SearchError
from search.model import sublayer_modeling
from search.model.architectures import architecture_of
from search.model.numerics import STOCK_KERNELS
from search.model.removal import Removal
from search.model.sublayer_modeling import FAMILIES, FORMAT, MARKER, class_names
from search.model.surgery import SkippedAttention, SkippedMLP, decoder_layers, remove_layers, skip_blocks

MODELING_FILE = "modeling_sublayer.py"
_FORMAT_KEYS = (MARKER, "removed_attention", "removed_mlp", "auto_map", "architectures", "model_type")


def skipped_blocks(model: nn.Module) -> Removal:
    """The blocks `model` skips (stubs), by layer of its current stack; a layer skipping both counts whole."""
    arch = architecture_of(model)
    attention, mlp = [], []
    for index, layer in enumerate(decoder_layers(model)):
        if isinstance(layer.get_submodule(arch.attention_module), SkippedAttention):
            attention.append(index)
        if isinstance(layer.get_submodule(arch.mlp_module), SkippedMLP):
            mlp.append(index)
    return Removal.of(attention=attention, mlp=mlp)


def check_sublayer_exportable(model: nn.Module, blocks: Removal) -> None:
    """One line for a model the format cannot write; `blocks`: what it will skip, by layer of its stack."""
    config: Any = model.config
    model_type = config.model_type
    if model_type not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        raise SearchError(
            f"exporting sub-layer points supports {supported}; model_type {model_type!r} has no class in the "
            "exported modeling file: pick a whole-layer point"
        )
    if getattr(config, "add_cross_attention", False):
        raise SearchError("this GPT-2 config has cross-attention blocks, which sub-layer exports do not write")
    arch = architecture_of(model)
    if any("." in name for name in (*arch.attention_block, *arch.mlp_block)):
        raise SearchError(f"{arch.name}: a block module is not a direct child of its layer; sub-layer export needs one")
    kept = len(decoder_layers(model)) - len(blocks.layers)
    if len(blocks.attention) >= kept:
        raise SearchError(
            "every layer left loses its attention block: the KV cache would have no layer to count positions by"
        )


def save_sublayer_model(model: nn.Module, directory: Path) -> Removal:
    """Write `model`, which skips some blocks, in the format; returns the blocks, by layer of the written stack.
    A layer skipping both of its blocks is removed from `model` first (it is changed in place)."""
    blocks = skipped_blocks(model)
    check_sublayer_exportable(model, blocks)
    if blocks.layers:
        remove_layers(model, blocks.layers)
        blocks = skipped_blocks(model)
    causal_lm: Any = model  # a transformers model: save_pretrained is not on nn.Module
    causal_lm.save_pretrained(directory)  # safetensors of the kept weights; the stubs hold none
    arch = architecture_of(model)
    config = json.loads((directory / "config.json").read_text())
    base = config["model_type"]
    names = class_names(base)
    config.update(
        {
            "model_type": f"{base}_sublayer",
            "architectures": [names["AutoModelForCausalLM"]],
            "auto_map": {auto: f"{Path(MODELING_FILE).stem}.{name}" for auto, name in names.items()},
            "removed_attention": list(blocks.attention),
            "removed_mlp": list(blocks.mlp),
            MARKER: {
                "format": FORMAT,
                "base_model_type": base,
                "attention_block": list(arch.attention_block),
                "attention_module": arch.attention_module,
                "mlp_block": list(arch.mlp_block),
            },
        }
    )
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(Path(sublayer_modeling.__file__), directory / MODELING_FILE)
    return blocks


def sublayer_marker(directory: Path) -> dict | None:
    """The format's marker in `directory`'s config.json (None: not a sub-layer export)."""
    config = directory / "config.json"
    if not config.is_file():
        return None
    try:
        marker = json.loads(config.read_text()).get(MARKER)
    except (json.JSONDecodeError, AttributeError):
        return None
    return marker if isinstance(marker, dict) else None


def load_sublayer_export(directory: Path, **kwargs: Any) -> nn.Module:
    """The export as the stock family model with its removed blocks skipped (see the module docstring);
    `kwargs` go to `from_pretrained` (dtype, ...). Never imports the directory's modeling file."""
    from transformers import AutoConfig, AutoModelForCausalLM

    stored = json.loads((directory / "config.json").read_text())
    marker = stored[MARKER]
    if marker.get("format") != FORMAT or marker.get("base_model_type") not in FAMILIES:
        raise SearchError(
            f"{directory} is a sub-layer export this version does not read (format {marker.get('format')!r}, "
            f"model type {marker.get('base_model_type')!r})"
        )
    stock = {key: value for key, value in stored.items() if key not in _FORMAT_KEYS}
    config = AutoConfig.for_model(marker["base_model_type"], **stock)
    with _quiet_transformers():  # the removed blocks' weights are missing by design; checked below instead
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            directory, config=config, output_loading_info=True, **kwargs, **STOCK_KERNELS
        )
    model, info = loaded
    skip_blocks(model, stored.get("removed_attention") or [], stored.get("removed_mlp") or [])
    kept = set(model.state_dict())
    missing = sorted(key for key in info["missing_keys"] if key in kept)
    if missing or info["unexpected_keys"]:
        extra = sorted(info["unexpected_keys"])
        raise SearchError(
            f"{directory}: the weights do not match its removed blocks (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    return model


@contextmanager
def _quiet_transformers():
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
