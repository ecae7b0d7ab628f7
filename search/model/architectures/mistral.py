"""Mistral: Llama layout, optional sliding-window attention."""

from search.model.architectures import Architecture, register

MISTRAL = register(Architecture("mistral", ("mistral",), "model.layers"))
