import pytest
import torch

from search.errors import SearchError
from search.model.architectures import architecture_of
from search.model.surgery import (
    KV_CACHE_TOLERANCE,
    KV_CACHE_TOLERANCE_REDUCED,
    _renumber,
    decoder_layers,
    kv_cache_divergence,
    layer_param_counts,
    layers_removed,
    remove_layers,
    restore_layers,
    total_param_count,
)
from tests.conftest import VOCAB, tiny_model


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
