"""Phi-3: Llama layout with fused qkv and gate_up projections."""

from search.model.architectures import Architecture, register

PHI3 = register(Architecture("phi3", ("phi3",), "model.layers"))
