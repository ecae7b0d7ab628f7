"""Every registered family: remove a set, forward, KV-cache generation, export and reload, config lists."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from search.export import write_model
from search.model.architectures import REGISTRY, architecture_of
from search.model.surgery import decoder_layers, layers_removed, remove_layers
from tests.conftest import FAMILIES, VOCAB, tiny_model, tiny_tokenizer


def test_every_family_is_registered():
    assert {a.name for a in REGISTRY.values()} == {"gpt2", "llama", "mistral", "qwen", "gemma3", "phi3"}


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip(family, tmp_path):
    model = tiny_model(family)
    assert architecture_of(model).name in family
    ids = torch.randint(3, VOCAB, (1, 10))
    with torch.no_grad():
        whole = model(input_ids=ids).logits
    types = list(getattr(model.config, "layer_types", None) or [])
    removed = [1, 2]

    with layers_removed(model, removed), torch.no_grad():
        assert len(decoder_layers(model)) == model.config.num_hidden_layers == 4
        pruned = model(input_ids=ids).logits
        assert not torch.allclose(pruned, whole)
        cached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
        assert torch.equal(cached, uncached)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, whole)  # restored

    remove_layers(model, removed)
    write_model(model, tiny_tokenizer(), tmp_path / "out", {"removed_layers": removed})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.num_hidden_layers == 4
    if types:
        assert reloaded.config.layer_types == [t for i, t in enumerate(types) if i not in removed]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, pruned)
        again = reloaded.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(again, cached)
