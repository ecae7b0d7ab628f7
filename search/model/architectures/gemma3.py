"""Gemma 3 (text): interleaved sliding and global attention, one `layer_types` entry per layer.

The model picks each layer's mask and rotary embedding from `config.layer_types[i]`, so the list
must shrink with the stack. Each residual block sits between two norms (the post norm acts on the
branch before the residual add), so both go with their block. Gemma expects BOS at the start of
every window (its tokenizer adds it, which the data pipeline detects).
"""

from search.model.architectures import Architecture, register

GEMMA3 = register(
    Architecture(
        "gemma3",
        ("gemma3_text",),
        "model.layers",
        mlp_output=None,
        attention_output=None,
        no_fold="a norm (post_feedforward_layernorm, post_attention_layernorm) follows each block's output, so no "
        "linear map folds into it exactly",
        attention_block=("input_layernorm", "self_attn", "post_attention_layernorm"),
        mlp_block=("pre_feedforward_layernorm", "mlp", "post_feedforward_layernorm"),
    )
)
