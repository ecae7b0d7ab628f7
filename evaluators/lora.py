"""LoRA healing: fine-tune low-rank adapters on a pruned model's fitting windows, then merge them.

Gromov et al. heal a pruned model with (Q)LoRA; this is that step on the CPU-sized scale of this
project. Adapters (`peft`) go on every linear projection inside the decoder layers (attention and
MLP), the base weights stay frozen, the loss is plain next-token cross-entropy on the fitting
windows (taken from the corpus after the held-out ones, never from them), and the adapters are
merged back, so the result is a model of the same architecture that stock `transformers` loads.

Fine-tuning on one corpus also adapts the model to that corpus. That is why the caller fine-tunes
the unpruned model the same way as a reference: the pruned model's ratio to it is what pruning
still costs once both saw the same text.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from evaluators.perplexity import window_batches
from search.model.numerics import mixed_precision
from search.model.surgery import decoder_layers


@dataclass(frozen=True)
class LoraSettings:
    """The `heal` command's surface; the defaults finish in minutes on 2 CPU cores for SmolLM2-135M."""

    steps: int = 60
    rank: int = 8
    alpha: int = 16  # LoRA's scale is alpha / rank
    lr: float = 6e-4  # measured: docs/benchmarks.md, "LoRA on top"
    windows_per_step: int = 1
    warmup: float = 0.1  # fraction of the steps the learning rate ramps up over; cosine decay after
    seed: int = 0


@dataclass
class LoraRun:
    """What one fine-tuning did: losses per step (mean next-token NLL) and wall seconds."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    target_modules: list[str] = field(default_factory=list)
    trainable_parameters: int = 0


def target_modules(model: nn.Module) -> list[str]:
    """The names (last path part) of every linear projection inside the decoder layers: attention
    and MLP, whatever the family calls them (GPT-2's Conv1D included)."""
    names: set[str] = set()
    for layer in decoder_layers(model):
        for name, module in layer.named_modules():
            if name and (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"):
                names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def _learning_rate(step: int, settings: LoraSettings) -> float:
    warmup = max(1, round(settings.warmup * settings.steps))
    if step < warmup:
        return settings.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, settings.steps - warmup)
    return settings.lr * 0.5 * (1 + math.cos(math.pi * progress))


def finetune_lora(
    model: nn.Module,
    windows: torch.Tensor,
    bos_id: int | None,
    settings: LoraSettings = LoraSettings(),
    desc: str | None = "LoRA",
) -> tuple[nn.Module, LoraRun]:
    """Fine-tune LoRA adapters on `windows` (cycled in a seeded shuffled order) and merge them.

    Returns the merged model (the same modules, weights changed; no peft wrapper left) and the run.
    Runs under the model's autocast when it has one (bf16-mixed), else in its weights' dtype.
    """
    from peft import LoraConfig, get_peft_model

    if len(windows) == 0:
        raise ValueError("LoRA healing needs at least one fitting window")
    run = LoraRun(target_modules=target_modules(model))
    conv1d = any(type(m).__name__ == "Conv1D" for m in model.modules())
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=0.0,
        target_modules=run.target_modules,
        bias="none",
        fan_in_fan_out=conv1d,  # Conv1D stores its weight transposed
    )
    autocast = mixed_precision(model)
    device = next(model.parameters()).device
    peft_model = get_peft_model(model, config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    run.trainable_parameters = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=0.0)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(settings.seed))
    started = time.perf_counter()
    peft_model.train()
    bar = tqdm(range(settings.steps), desc=desc, unit="step", disable=desc is None)
    try:
        for step in bar:
            first = step * settings.windows_per_step
            picks = order[[(first + i) % len(order) for i in range(settings.windows_per_step)]]
            (inputs,) = window_batches(windows[picks], bos_id, settings.windows_per_step, device)
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(step, settings)
            context = torch.autocast(device.type, dtype=autocast) if autocast else nullcontext()
            with context:
                logits = peft_model(input_ids=inputs, use_cache=False).logits
            # position 0 (BOS, or the window's first token) is context only, as in every perplexity here
            loss = nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), inputs[:, 1:].flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            run.losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
    finally:
        bar.close()
        peft_model.eval()
    merged = peft_model.merge_and_unload()
    for parameter in merged.parameters():
        parameter.requires_grad_(False)
    run.seconds = time.perf_counter() - started
    return merged, run
