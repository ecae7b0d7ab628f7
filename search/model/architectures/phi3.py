"""Phi-3: Llama layout with fused qkv and gate_up projections, and a dropout on each branch before
the residual add (part of its block)."""

from search.model.architectures import Architecture, register

PHI3 = register(
    Architecture(
        "phi3",
        ("phi3",),
        "model.layers",
        attention_block=("input_layernorm", "self_attn", "resid_attn_dropout"),
        mlp_block=("post_attention_layernorm", "mlp", "resid_mlp_dropout"),
    )
)
