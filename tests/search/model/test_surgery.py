import pytest
import torch

from search.errors import SearchError
from search.model.architectures import architecture_of
from search.model.surgery import (
    KV_CACHE_TOLERANCE,
    KV_CACHE_TOLERANCE_REDUCED,
    SkippedAttention,
    SkippedMLP,
    _renumber,
    block_param_counts,
    blocks_skipped,
    decoder_layers,
    kv_cache_divergence,
    layer_param_counts,
    layers_removed,
    removal_applied,
    remove_layers,
    restore_layers,
    skip_blocks,
    total_param_count,
)
from tests.conftest import FAMILIES, VOCAB, tiny_model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _smaller_copy(family: str, model, kept: list[int]):
    """A model built from scratch with len(kept) layers, holding the kept layers' weights."""
    fresh = tiny_model(family, layers=len(kept), seed=1)
    state = model.state_dict()
    prefix = "transformer.h." if family == "gpt2" else "model.layers."
    remapped = {}
    for key, value in state.items():
        if key.startswith(prefix):
            index, rest = key[len(prefix) :].split(".", 1)
            if int(index) in kept:
                remapped[f"{prefix}{kept.index(int(index))}.{rest}"] = value
        else:
            remapped[key] = value
    fresh.load_state_dict(remapped)
    return fresh.eval()


@pytest.mark.parametrize("removed", [[0], [2, 3], [1, 4, 5]])
def test_pruned_model_equals_model_built_smaller(family, removed):
    model = tiny_model(family)
    ids = torch.randint(0, VOCAB, (2, 12))
    kept = [i for i in range(6) if i not in removed]
    expected = _logits(_smaller_copy(family, model, kept), ids)
    with layers_removed(model, removed):
        assert len(decoder_layers(model)) == len(kept)
        assert model.config.num_hidden_layers == len(kept)
        torch.testing.assert_close(_logits(model, ids), expected)


def test_restore_round_trip(family):
    model = tiny_model(family)
    ids = torch.randint(0, VOCAB, (1, 10))
    before = _logits(model, ids)
    layers_before = list(decoder_layers(model))
    saved = remove_layers(model, [1, 3])
    restore_layers(model, saved)
    assert list(decoder_layers(model)) == layers_before
    assert model.config.num_hidden_layers == 6
    indices = [m.layer_idx for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    assert sorted(set(indices)) == list(range(6))
    torch.testing.assert_close(_logits(model, ids), before)


def test_restore_happens_even_on_error(family):
    model = tiny_model(family)
    with pytest.raises(RuntimeError):
        with layers_removed(model, [2]):
            raise RuntimeError("boom")
    assert len(decoder_layers(model)) == 6


def test_kv_cache_generation_after_removal(family):
    model = tiny_model(family)
    ids = torch.randint(0, VOCAB, (1, 6))
    with layers_removed(model, [1, 4]):
        cached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
        assert torch.equal(cached, uncached)
        # And step-by-step cached logits equal a full recompute.
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
            step = model(input_ids=cached[:, 6:7], past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
            full = model(input_ids=cached[:, :7], use_cache=False).logits[:, -1]
        torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-4)


def test_per_layer_config_lists_shrink():
    model = tiny_model("qwen2")
    types = list(model.config.layer_types)
    assert len(types) == 6 and len(set(types)) == 2  # sliding and full attention interleave
    with layers_removed(model, [0, 5]):
        assert model.config.layer_types == types[1:5]
        ids = torch.randint(0, VOCAB, (1, 5))
        cached = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0)
        assert torch.equal(cached, uncached)
    assert model.config.layer_types == types


def test_bad_removals_are_refused(family):
    model = tiny_model(family)
    with pytest.raises(SearchError, match="out of range"):
        remove_layers(model, [6])
    with pytest.raises(SearchError, match="every decoder layer"):
        remove_layers(model, range(6))
    assert len(decoder_layers(model)) == 6


def test_parameter_counts(family):
    model = tiny_model(family)
    per_layer = layer_param_counts(model)
    assert len(per_layer) == 6 and len(set(per_layer)) == 1
    total = total_param_count(model)
    with layers_removed(model, [0, 1]):
        assert total_param_count(model) == total - per_layer[0] - per_layer[1]


def test_unknown_architecture_names_supported_ones():
    from torch import nn

    class Odd(nn.Module):
        class config:  # noqa: N801 - mimics a transformers config object
            model_type = "mamba"

    with pytest.raises(SearchError, match=r"supported: .*gpt2, llama.*search/model/architectures"):
        decoder_layers(Odd())


@pytest.mark.parametrize("dtype", ["float32", "bf16-mixed"])
def test_kv_cache_divergence_is_tiny_after_removal_in_every_family(dtype):
    from search.model.numerics import apply_numerics
    from tests.conftest import FAMILIES

    for family in FAMILIES:
        model = apply_numerics(tiny_model(family), dtype)
        remove_layers(model, [1, 4])
        divergence = kv_cache_divergence(model, torch.randint(3, 90, (1, 10)), new_tokens=12)
        # bf16 products round the cached and the uncached paths differently; float32 is exact to ~1e-6.
        assert divergence <= (KV_CACHE_TOLERANCE if dtype == "float32" else KV_CACHE_TOLERANCE_REDUCED), family


def test_kv_cache_divergence_catches_a_cache_wired_to_the_wrong_layers(family):
    model = tiny_model(family)
    remove_layers(model, [1, 4])
    for layer in decoder_layers(model):  # every layer writes and reads cache slot 0
        _renumber(layer, 0, architecture_of(model).index_attrs)
    assert kv_cache_divergence(model, torch.randint(3, 90, (1, 10)), new_tokens=8) > KV_CACHE_TOLERANCE_REDUCED


# Sub-layer blocks: (whole layers removed, attention blocks, MLP blocks), indices into the stack as it
# is when the blocks are skipped; the last case also names them in the original stack for the reference.
BLOCK_CASES = {
    "attention": ((), [1], []),
    "mlp": ((), [], [2]),
    "both-of-0": ((), [0], [0]),
    "with-layer-removed": ((2,), [0], [3]),
}


def _computing(model, layer: int, kind: str):
    arch = architecture_of(model)
    return getattr(decoder_layers(model)[layer], arch.attention_module if kind == "attn" else arch.mlp_module)


def _zero_output(module, args, output):
    # The hidden tensor is the whole output (MLP) or the first of the pair (attention).
    if isinstance(output, tuple):
        return (torch.zeros_like(output[0]), *output[1:])
    return torch.zeros_like(output)


def _hooked_logits(model, ids, attention, mlp):
    """The unmodified model with the named blocks' computing modules forced to output zeros."""
    handles = [_computing(model, i, "attn").register_forward_hook(_zero_output) for i in attention]
    handles += [_computing(model, i, "mlp").register_forward_hook(_zero_output) for i in mlp]
    try:
        return _logits(model, ids)
    finally:
        for handle in handles:
            handle.remove()


def _original_indices(removed, attention, mlp):
    kept = [i for i in range(6) if i not in removed]
    # A removed layer is one whose two blocks both add zero.
    return [*removed, *(kept[i] for i in attention)], [*removed, *(kept[i] for i in mlp)]


@pytest.mark.parametrize("case", BLOCK_CASES)
@pytest.mark.parametrize("family", FAMILIES)
def test_skipped_blocks_equal_zeroed_blocks(family, case):
    removed, attention, mlp = BLOCK_CASES[case]
    model = tiny_model(family)
    ids = torch.randint(0, VOCAB, (2, 12))
    # Gemma's post norms act on the zeroed output in the reference and are identities when skipped.
    expected = _hooked_logits(model, ids, *_original_indices(removed, attention, mlp))
    with layers_removed(model, removed), blocks_skipped(model, attention=attention, mlp=mlp):
        skipped = _logits(model, ids)
    torch.testing.assert_close(skipped, expected)
    if case == "both-of-0":
        with layers_removed(model, [0]):
            torch.testing.assert_close(skipped, _logits(model, ids))


def _refuse(module, args, kwargs):
    raise AssertionError(f"{type(module).__name__} of a skipped block ran")


@pytest.mark.parametrize("family", FAMILIES)
def test_nothing_of_a_skipped_block_runs_and_all_comes_back(family):
    model = tiny_model(family)
    arch = architecture_of(model)
    ids = torch.randint(0, VOCAB, (1, 10))
    before = _logits(model, ids)
    modules_before = list(model.named_modules())
    layers = decoder_layers(model)
    blocks = [getattr(layers[1], name) for name in arch.attention_block]
    blocks += [getattr(layers[4], name) for name in arch.mlp_block]
    handles = [
        module.register_forward_pre_hook(_refuse, with_kwargs=True) for block in blocks for module in block.modules()
    ]
    with blocks_skipped(model, attention=[1], mlp=[4]):
        _logits(model, ids)
        model.generate(ids, max_new_tokens=3, do_sample=False, use_cache=True, pad_token_id=0)
        assert isinstance(getattr(layers[1], arch.attention_module), SkippedAttention)
        assert isinstance(getattr(layers[4], arch.mlp_module), SkippedMLP)
    with pytest.raises(AssertionError, match="of a skipped block ran"):  # the hooks do fire once it is back
        _logits(model, ids)
    for handle in handles:
        handle.remove()
    after = list(model.named_modules())
    assert [name for name, _ in after] == [name for name, _ in modules_before]
    assert all(a is b for (_, a), (_, b) in zip(after, modules_before))
    assert torch.equal(_logits(model, ids), before)


def test_blocks_come_back_on_error_and_in_either_nesting_order(family):
    model = tiny_model(family)
    ids = torch.randint(0, VOCAB, (1, 10))
    before = _logits(model, ids)
    modules_before = [m for _, m in model.named_modules()]
    with pytest.raises(RuntimeError):
        with blocks_skipped(model, attention=[0], mlp=[5]):
            raise RuntimeError("boom")
    with blocks_skipped(model, attention=[3]), layers_removed(model, [1]):
        # The stub stands where layer 3 was, now index 2 of the pruned stack, and is numbered so.
        assert [m.layer_idx for m in model.modules() if isinstance(m, SkippedAttention)] == [2]
    assert [m for _, m in model.named_modules()] == modules_before
    indices = [m.layer_idx for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    assert sorted(set(indices)) == list(range(6))
    assert torch.equal(_logits(model, ids), before)


def test_bad_block_skips_are_refused_and_change_nothing(family):
    model = tiny_model(family)
    modules_before = [m for _, m in model.named_modules()]
    with pytest.raises(SearchError, match="out of range"):
        skip_blocks(model, attention=[1], mlp=[6])
    with pytest.raises(SearchError, match="every block"):
        skip_blocks(model, attention=range(6), mlp=range(6))
    assert [m for _, m in model.named_modules()] == modules_before


@pytest.mark.parametrize("family", FAMILIES)
def test_block_parameter_counts(family):
    model = tiny_model(family)
    blocks = block_param_counts(model)
    # In every supported family the two blocks are the whole layer.
    assert [a + m for a, m in blocks] == layer_param_counts(model)
    assert all(a > 0 and m > 0 for a, m in blocks)
    total = total_param_count(model)
    with blocks_skipped(model, attention=[0, 3], mlp=[3, 5]):
        assert sum(p.numel() for p in model.parameters()) == total - blocks[0][0] - sum(blocks[3]) - blocks[5][1]
    with layers_removed(model, [1]), blocks_skipped(model, mlp=[0]):
        assert total_param_count(model) == total - sum(blocks[1]) - blocks[0][1]


def test_stubs_keep_dtype_and_device_and_take_either_call_form():
    hidden = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    out, weights = SkippedAttention(0)(hidden_states=hidden, attention_mask=None)
    assert weights is None and out.dtype == torch.bfloat16 and out.device == hidden.device
    assert torch.equal(out, torch.zeros_like(hidden))
    assert torch.equal(SkippedAttention(0)(hidden)[0], out)
    assert SkippedMLP()(hidden).dtype == torch.bfloat16
    assert not list(SkippedAttention(0).parameters()) and not list(SkippedMLP().parameters())


def _padded_divergence(model, new_tokens: int = 12) -> float:
    """kv_cache_divergence for a left-padded batch."""
    ids = torch.randint(3, 90, (2, 10))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    return kv_cache_divergence(model, ids, new_tokens, pad_token_id=0, attention_mask=mask)


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_generation_with_attention_skipped(family):
    model = tiny_model(family)
    # Layers 0 and 1: the slots the model reads cache lengths from (layer 0, first sliding, first full).
    with blocks_skipped(model, attention=[0, 1], mlp=[2]):
        assert kv_cache_divergence(model, torch.randint(3, 90, (1, 10)), new_tokens=12) <= KV_CACHE_TOLERANCE
        assert _padded_divergence(model) <= KV_CACHE_TOLERANCE
    with blocks_skipped(model, attention=[4]), layers_removed(model, [0, 2]):
        assert _padded_divergence(model) <= KV_CACHE_TOLERANCE


def test_padded_divergence_catches_a_skipped_attention_that_leaves_its_cache_slot_empty(family, monkeypatch):
    model = tiny_model(family)
    monkeypatch.setattr(SkippedAttention, "forward", lambda self, hidden_states, *a, **k: (hidden_states * 0, None))
    with blocks_skipped(model, attention=[0]):
        assert _padded_divergence(model) > KV_CACHE_TOLERANCE_REDUCED


def test_removal_applied_takes_original_indices(family):
    from search.model.removal import Removal

    model = tiny_model(family)
    ids = torch.randint(0, VOCAB, (2, 12))
    removed, attention, mlp = BLOCK_CASES["with-layer-removed"]
    expected = _hooked_logits(model, ids, *_original_indices(removed, attention, mlp))
    with removal_applied(model, Removal.of(removed, attention=[0], mlp=[4])):  # layer 4 is 3 once 2 is gone
        assert len(decoder_layers(model)) == 5
        torch.testing.assert_close(_logits(model, ids), expected)
    assert len(decoder_layers(model)) == 6
