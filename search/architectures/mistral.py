"""Mistral: Llama layout, optional sliding-window attention."""

from search.architectures import Architecture, register

MISTRAL = register(Architecture("mistral", ("mistral",), "model.layers"))
