import pytest
import torch

from evaluators.lora import LoraSettings, _learning_rate, finetune_lora, target_modules
from evaluators.perplexity import perplexity
from search.model.numerics import apply_numerics
from tests.conftest import FAMILIES, tiny_model


def _windows(n: int, seq: int = 24, seed: int = 0) -> torch.Tensor:
    """Windows of a short repeating pattern: something a random tiny model can learn in a few steps."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randint(3, 40, (8,), generator=generator)
    return base.repeat(n, seq // 8 + 1)[:, :seq]


def test_targets_every_projection_of_the_decoder_layers():
    assert target_modules(tiny_model("llama")) == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    assert target_modules(tiny_model("gpt2")) == ["c_attn", "c_fc", "c_proj"]  # Conv1D


@pytest.mark.parametrize("family", FAMILIES)
def test_fine_tuning_lowers_the_loss_and_merges_into_the_same_architecture(family):
    model = tiny_model(family, layers=3)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    windows = _windows(4)
    ppl_before = perplexity(model, windows, bos_id=1)
    merged, run = finetune_lora(model, windows, 1, LoraSettings(steps=12, rank=4, alpha=8, lr=1e-2), desc=None)
    assert type(merged) is type(model)
    assert {name for name, _ in merged.named_parameters()} == set(before)  # no adapter left behind
    assert not any("lora" in name for name in merged.state_dict())
    changed = [n for n, p in merged.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(".layers." in n or ".h." in n for n in changed)  # only decoder projections moved
    assert not any(p.requires_grad for p in merged.parameters())
    assert len(run.losses) == 12 and run.trainable_parameters > 0
    assert perplexity(merged, windows, bos_id=1) < ppl_before


def test_fine_tuning_runs_under_the_models_autocast():
    model = apply_numerics(tiny_model("llama", layers=3), "bf16-mixed")
    windows = _windows(4)
    ppl_before = perplexity(model, windows, bos_id=None)
    merged, run = finetune_lora(model, windows, None, LoraSettings(steps=8, rank=4, alpha=8, lr=1e-2), desc=None)
    assert all(p.dtype == torch.float32 for p in merged.parameters())  # float32 weights, bf16 products
    assert perplexity(merged, windows, bos_id=None) < ppl_before


def test_learning_rate_warms_up_then_decays():
    settings = LoraSettings(steps=20, lr=1.0, warmup=0.1)
    rates = [_learning_rate(step, settings) for step in range(20)]
    assert rates[0] == 0.5 and rates[1] == 1.0
    assert all(a >= b for a, b in zip(rates[1:], rates[2:])) and rates[-1] < 0.05


def test_no_windows_is_refused():
    with pytest.raises(ValueError, match="at least one"):
        finetune_lora(tiny_model("llama", layers=2), torch.zeros(0, 8, dtype=torch.long), None, desc=None)


def test_several_windows_per_step_cycle_through_the_windows():
    windows = _windows(3)
    merged, run = finetune_lora(
        tiny_model("llama", layers=2), windows, 1, LoraSettings(steps=4, windows_per_step=2), desc=None
    )
    assert len(run.losses) == 4 and all(loss > 0 for loss in run.losses)
