"""Llama and its many descendants with the same layout (SmolLM2, TinyLlama)."""

from search.model.architectures import Architecture, register

LLAMA = register(Architecture("llama", ("llama",), "model.layers"))
