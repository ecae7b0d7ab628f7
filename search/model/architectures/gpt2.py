"""GPT-2: blocks at `transformer.h`; `n_layer` is what `num_hidden_layers` maps to.

Its MLP output projection `mlp.c_proj` is a Conv1D: weight stored [in, out], transposed from nn.Linear.
"""

from search.model.architectures import Architecture, register

GPT2 = register(Architecture("gpt2", ("gpt2",), "transformer.h", mlp_output="mlp.c_proj"))
