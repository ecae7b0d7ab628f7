"""GPT-2: blocks at `transformer.h`; `n_layer` is what `num_hidden_layers` maps to.

Its output projections `mlp.c_proj` and `attn.c_proj` are Conv1D: weight stored [in, out], transposed from nn.Linear.
A block built with `add_cross_attention` has a third residual block (`ln_cross_attn`, `crossattention`)
that belongs to neither block here; causal LM checkpoints do not have it.
"""

from search.model.architectures import Architecture, register

GPT2 = register(
    Architecture(
        "gpt2",
        ("gpt2",),
        "transformer.h",
        mlp_output="mlp.c_proj",
        attention_output="attn.c_proj",
        attention_block=("ln_1", "attn"),
        attention_module="attn",
        mlp_block=("ln_2", "mlp"),
    )
)
