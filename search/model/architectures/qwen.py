"""Qwen2 and Qwen3: Llama layout; `layer_types` marks which layers use sliding-window attention."""

from search.model.architectures import Architecture, register

QWEN = register(Architecture("qwen", ("qwen2", "qwen3"), "model.layers"))
