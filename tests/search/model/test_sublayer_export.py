"""The sub-layer export format on a tiny model of every family: what transformers loads with the written
modeling file, and what `--model DIR` loads without it."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.cache_utils import DummyLayer

import search.model.sublayer_modeling as sublayer_modeling
from search.errors import SearchError
from search.model.architectures import architecture_of
from search.model.loading import load_model
from search.model.removal import Removal
from search.model.sublayer_export import MODELING_FILE, save_sublayer_model, skipped_blocks, sublayer_marker
from search.model.surgery import (
    KV_CACHE_TOLERANCE,
    KV_CACHE_TOLERANCE_REDUCED,
    kv_cache_divergence,
    removal_applied,
    remove_layers,
    skip_blocks,
    total_param_count,
)
from tests.conftest import FAMILIES, tiny_model, tiny_tokenizer

# Original indices of a 6-layer model: layer 1 whole, the attention of 0 (the slot a cached step is sized
# from) and of 4, the MLP of 5. On the 5-layer exported stack: attention of 0 and 3, MLP of 4.
REMOVAL = Removal.of([1], attention=[0, 4], mlp=[5])
STACK = Removal.of(attention=[0, 3], mlp=[4])


def _pruned(family: str):
    """The in-memory pruned model of REMOVAL, as a study measures it (layer removed, blocks skipped)."""
    model = tiny_model(family)
    remove_layers(model, REMOVAL.layers)
    skip_blocks(model, STACK.attention, STACK.mlp)
    return model


def _export(family: str, out):
    model = _pruned(family)
    out.mkdir()
    written = save_sublayer_model(model, out)
    tiny_tokenizer().save_pretrained(out)
    return model, written


def _padded(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = ids.clone(), torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_an_export_reloads_with_its_modeling_file_as_the_pruned_model(family, tmp_path):
    ids = torch.randint(3, 90, (2, 12))
    reference = tiny_model(family)
    with torch.no_grad(), removal_applied(reference, REMOVAL):
        expected = reference(input_ids=ids, use_cache=False).logits
    model, written = _export(family, tmp_path / "out")
    assert written == STACK

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True, dtype=torch.float32)
    exported.eval()
    assert type(exported).__name__.startswith("Sublayer") and "search" not in type(exported).__module__
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids, use_cache=False).logits, expected)
    assert total_param_count(exported) == total_param_count(model)

    # Removed blocks are not built, hold no weights on disk, and compute nothing.
    arch = architecture_of(model)
    layers = exported.get_submodule(arch.layers_path)  # its model type is the format's, not a registered family
    assert len(layers) == 5
    for index, layer in enumerate(layers):
        for names, removed in ((arch.attention_block, STACK.attention), (arch.mlp_block, STACK.mlp)):
            assert all(hasattr(layer, name) != (index in removed) for name in names)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as weights:
        saved = set(weights.keys())
    assert saved <= set(model.state_dict()) and set(model.state_dict()) - saved <= {"lm_head.weight"}  # tied
    prefix = arch.layers_path
    for index in STACK.attention:
        assert not any(k.startswith(f"{prefix}.{index}.{arch.attention_module}.") for k in saved)
    for index in STACK.mlp:
        assert not any(k.startswith(f"{prefix}.{index}.{arch.mlp_module}.") for k in saved)

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["removed_attention"] == [0, 3] and config["removed_mlp"] == [4]
    assert exported.config.num_hidden_layers == 5 and (tmp_path / "out" / MODELING_FILE).is_file()
    assert sublayer_marker(tmp_path / "out")["base_model_type"] == model.config.model_type


@pytest.mark.parametrize("family", FAMILIES)
def test_an_export_generates_the_same_with_and_without_its_kv_cache(family, tmp_path):
    _export(family, tmp_path / "out")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True, dtype=torch.float32)
    exported.eval()
    ids = torch.randint(3, 90, (2, 10))
    with torch.no_grad():
        cached = exported.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = exported.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)
    padded, mask = _padded(ids)
    assert kv_cache_divergence(exported, ids[:1], 12) <= KV_CACHE_TOLERANCE
    assert kv_cache_divergence(exported, padded, 12, pad_token_id=0, attention_mask=mask) <= KV_CACHE_TOLERANCE

    # Only layers that keep attention hold a cache entry.
    with torch.no_grad():
        cache = exported(input_ids=ids, use_cache=True).cache
    slots = getattr(cache, "self_attention_cache", cache).layers
    assert [isinstance(slot, DummyLayer) for slot in slots] == [i in STACK.attention for i in range(5)]
    assert 0 in STACK.attention and cache.get_seq_length() == ids.shape[1]  # layer 0 answers for the attention layers
    assert all(slot.keys is not None for i, slot in enumerate(slots) if i not in STACK.attention)


def test_without_its_dummy_slots_a_padded_batch_would_generate_wrongly(tmp_path, monkeypatch):
    """The cache fix is what makes padded generation right (an unpadded batch builds no mask to get wrong)."""
    model, _ = _export("llama", tmp_path / "out")
    ours = sublayer_modeling.SublayerLlamaForCausalLM.from_pretrained(tmp_path / "out").eval()  # the same file
    padded, mask = _padded(torch.randint(3, 90, (2, 10)))
    assert kv_cache_divergence(ours, padded, 12, pad_token_id=0, attention_mask=mask) <= KV_CACHE_TOLERANCE
    monkeypatch.setattr(sublayer_modeling, "_without_attention_slots", lambda cache, config: None)
    assert kv_cache_divergence(ours, padded, 12, pad_token_id=0, attention_mask=mask) > KV_CACHE_TOLERANCE_REDUCED


@pytest.mark.parametrize("family", FAMILIES)
def test_model_dir_loads_an_export_without_running_its_code(family, tmp_path):
    model, _ = _export(family, tmp_path / "out")
    (tmp_path / "out" / MODELING_FILE).write_text("raise RuntimeError('the modeling file ran')\n")
    loaded = load_model(str(tmp_path / "out"))  # no trust_remote_code
    assert architecture_of(loaded.model) is architecture_of(model)  # the stock family class
    assert skipped_blocks(loaded.model) == STACK
    assert total_param_count(loaded.model) == total_param_count(model)
    ids = torch.randint(3, 90, (2, 12))
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(loaded.model(input_ids=ids, use_cache=False).logits, expected)
    stock = tmp_path / "stock"  # the tokenizer resolves as it would beside the unpruned model
    tiny_model(family).save_pretrained(stock)
    tiny_tokenizer().save_pretrained(stock)
    assert type(loaded.tokenizer) is type(AutoTokenizer.from_pretrained(stock))
    padded, mask = _padded(ids)
    assert kv_cache_divergence(loaded.model, padded, 12, pad_token_id=0, attention_mask=mask) <= KV_CACHE_TOLERANCE


def test_a_second_export_of_a_loaded_export_composes(tmp_path):
    """--model DIR on an export, more blocks skipped, exported again: a layer left with neither block goes."""
    _export("qwen2", tmp_path / "first")
    loaded = load_model(str(tmp_path / "first")).model
    ids = torch.randint(3, 90, (1, 12))
    skip_blocks(loaded, mlp=[0], attention=[2])  # layer 0 had lost its attention: it is empty now
    with torch.no_grad():
        expected = loaded(input_ids=ids, use_cache=False).logits
    (tmp_path / "second").mkdir()
    assert save_sublayer_model(loaded, tmp_path / "second") == Removal.of(attention=[1, 2], mlp=[3])
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "second", trust_remote_code=True).eval()
    assert again.config.num_hidden_layers == 4
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, use_cache=False).logits, expected)


def test_the_tokenizer_loads_without_a_prompt(tmp_path):
    _export("llama", tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert tokenizer.bos_token == "<s>" and len(tokenizer) == len(tiny_tokenizer())


def test_unsupported_models_are_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.delitem(sublayer_modeling.FAMILIES, "phi3")
    model = _pruned("phi3")
    with pytest.raises(SearchError, match="model_type 'phi3' has no class") as refused:
        save_sublayer_model(model, tmp_path)
    assert "\n" not in str(refused.value) and not list(tmp_path.iterdir())

    model = tiny_model("llama", layers=3)
    skip_blocks(model, attention=[0, 1, 2])
    with pytest.raises(SearchError, match="every layer left loses its attention block"):
        save_sublayer_model(model, tmp_path)
