import math

import pytest
import torch

from evaluators.perplexity import perplexity
from search.model.loading import load_model
from tests.conftest import VOCAB


def test_bf16_mixed_keeps_float32_weights_and_computes_in_bfloat16(tiny_model_dir):
    exact = load_model(str(tiny_model_dir), "float32").model
    mixed = load_model(str(tiny_model_dir), "bf16-mixed").model
    assert all(p.dtype == torch.float32 for p in mixed.parameters())
    windows = torch.randint(3, VOCAB, (2, 16))
    with torch.no_grad():
        assert mixed(input_ids=windows).logits.dtype == torch.bfloat16  # matrix products under autocast
        assert exact(input_ids=windows).logits.dtype == torch.float32
    assert math.isclose(perplexity(mixed, windows), perplexity(exact, windows), rel_tol=0.02)


def test_models_load_with_stock_kernels(tiny_model_dir, monkeypatch):
    """With `kernels` installed, transformers swaps in kernels fetched from the hub at load and again at
    each train()/eval() switch (LoRA's train() failed offline on a GPU, where the mapping has entries).
    Every load of ours keeps them off: kernelize is never reached, on any device."""
    pytest.importorskip("kernels")
    from transformers import AutoModelForCausalLM
    from transformers.integrations import hub_kernels

    reached: list[str] = []
    monkeypatch.setattr(hub_kernels, "_kernels_kernelize", lambda model, **how: reached.append(str(how["device"])))
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert reached, "a plain load no longer kernelizes: this test no longer tells anything"
    plain.train()
    reached.clear()
    loaded = load_model(str(tiny_model_dir), "float32").model
    loaded.train()
    loaded.eval()
    assert not loaded.use_kernels and not reached
