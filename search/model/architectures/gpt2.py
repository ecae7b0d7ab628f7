"""GPT-2: blocks at `transformer.h`; `n_layer` is what `num_hidden_layers` maps to."""

from search.model.architectures import Architecture, register

GPT2 = register(Architecture("gpt2", ("gpt2",), "transformer.h"))
