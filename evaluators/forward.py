"""One batch's next-token NLL: the forward pass every perplexity evaluation runs.

Two savings on top of the model's own forward pass, each exact up to float32 rounding:

- **Fused LM head.** The plain path materialises [batch, seq, vocab] logits (400 MB for SmolLM2 on
  4 x 513 tokens), copies them for the shift and runs log-softmax over all of it: memory-bound work
  that cost about as much as the LM head's matrix product itself. Here the final hidden states go
  through the head a few rows at a time and each chunk's NLL is taken while it is still in cache
  (benchmarks/eval_cost.py measures the saving; docs/benchmarks.md, "Evaluation cost").
  The model's own `forward` may post-process logits (soft-capping, scaling); a model is evaluated
  this way only after a probe shows both paths agree on it, else it keeps the plain path.
- **Compiled decoder layers** (`torch.compile`, opt-in per model with `configure`). Eager mode runs
  the norms, rotary embedding, activation and residual adds as separate memory-bound kernels;
  compiled, they fuse (faster passes for a one-off compile per process; docs/benchmarks.md, "Evaluation cost").
  Each layer is wrapped with `torch.compile`, and Dynamo reuses one compiled graph for every
  layer with the same code and attributes (parameters are inputs; a family with two layer types
  compiles two). Only perplexity passes use it; latency is timed on the
  eager model users deploy. Any compile failure (no C++ compiler, an unsupported layer) falls back
  to eager with one warning.

The plain path (`logits_nll`) stays available: the benchmarks' naive method is defined by it.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.exc import TorchDynamoException

from search.errors import first_line
from search.model.numerics import autocast, mixed_precision
from search.model.surgery import decoder_layers

log = logging.getLogger("search")

HEAD_ROWS = {"cpu": 128, "cuda": 2048}  # rows of logits per chunk: cache-sized on a CPU, big on a GPU
# Config fields with which a family's forward changes logits after the LM head: never fused.
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


@dataclass
class Evaluation:
    """How one model runs perplexity passes; stored on the model by `configure`."""

    compile: bool = False
    fused_head: bool | None = None  # None: not probed yet
    probed_under: torch.dtype | None = None  # the model's mixed precision when fused_head was decided
    compiled: dict[int, Callable[..., Any]] = field(default_factory=dict)  # id(layer) -> its compiled forward


def settings(model: nn.Module) -> Evaluation:
    evaluation = getattr(model, "search_evaluation", None)
    if not isinstance(evaluation, Evaluation):
        evaluation = Evaluation()
        setattr(model, "search_evaluation", evaluation)  # not a tensor or module: nn.Module's stubs refuse it
    return evaluation


def configure(model: nn.Module, **changes) -> nn.Module:
    """Change how this model's perplexity passes run: `compile=True`, or `fused_head=False` to force the plain path."""
    evaluation = settings(model)
    for name, value in changes.items():
        if not hasattr(evaluation, name):
            raise TypeError(f"configure() got an unexpected setting {name!r}")
        setattr(evaluation, name, value)
    if "fused_head" in changes:
        evaluation.probed_under = mixed_precision(model)
    return model


def prepare(model: nn.Module) -> None:
    """Probe the fused head once; call before registering hooks that a probe batch would trip."""
    evaluation = settings(model)
    if evaluation.fused_head is None or evaluation.probed_under != mixed_precision(model):
        evaluation.fused_head = _probe_fused_head(model)  # never probed, or the numerics changed since
        evaluation.probed_under = mixed_precision(model)


def numerics(model: nn.Module):
    """The autocast context the model's evaluation runs under (none for a single dtype)."""
    return autocast(model)


def logits_nll(logits: torch.Tensor, inputs: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL of `inputs[:, 1:]` from full logits (the plain path), and the target count.
    The sum stays a 0-d tensor on the logits' device: reading it is `on_host`'s (one sync, when it must)."""
    logits, targets = logits[:, :-1], inputs[:, 1:]
    nll = F.cross_entropy(
        at_least_float32(logits.reshape(-1, logits.shape[-1])), targets.reshape(-1).to(logits.device), reduction="sum"
    )
    return nll, targets.numel()


def head_nll(head: nn.Module, hidden: torch.Tensor, inputs: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The same NLL from the final hidden states, a chunk of rows of logits at a time."""
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = inputs[:, 1:].reshape(-1)
    rows = HEAD_ROWS.get(hidden.device.type, 1024)
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for start in range(0, len(targets), rows):
        logits = at_least_float32(head(hidden[start : start + rows]))  # on the head's device (maybe not hidden's)
        chunk = F.cross_entropy(logits, targets[start : start + rows].to(logits.device), reduction="sum")
        total += chunk.double().to(total.device)
    return total, targets.numel()


def at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are summed in float32; a float64 model's stay float64: a float32 sum of a
    batch's NLLs carries a 1e-7 relative rounding (one ulp of ~400 nats is 3e-5), which made two
    placements of one float64 model differ by that much wherever their last bits did."""
    return logits if logits.dtype == torch.float64 else logits.float()


def on_host(batches: Iterable[tuple], device: torch.device | str) -> Iterator[tuple]:
    """Each batch's figures as Python numbers (0-d tensors read with `.item()`, the rest as they are).

    On CUDA one batch late: the next batch is queued before this one's sum is read, so the host's
    wait never leaves the GPU idle between batches (at worst one batch runs past an early rejection).
    A CPU computes as it is called, so there each batch's figures come at once.
    """
    pending: deque[tuple] = deque()
    lag = 1 if torch.device(device).type == "cuda" else 0
    for figures in batches:
        pending.append(figures)
        if len(pending) > lag:
            yield _read(pending.popleft())
    while pending:
        yield _read(pending.popleft())


def _read(figures: tuple) -> tuple:
    return tuple(value.item() if isinstance(value, torch.Tensor) else value for value in figures)


def _fused_nll(model: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, int]:
    causal_lm: Any = model  # a transformers model: base_model and the output embeddings are not on nn.Module
    with numerics(model):
        hidden = causal_lm.base_model(input_ids=inputs, use_cache=False).last_hidden_state
        return head_nll(causal_lm.get_output_embeddings(), hidden, inputs)


def _plain_nll(model: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, int]:
    with numerics(model):
        return logits_nll(model(input_ids=inputs, use_cache=False).logits, inputs)


@torch.inference_mode()
def _probe_fused_head(model: nn.Module) -> bool:
    """True when the fused head gives this model's own NLL (to float rounding) on a random batch."""
    causal_lm: Any = model  # a transformers model: config, base_model, device, ... are not on nn.Module
    config = causal_lm.config
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in LOGIT_POSTPROCESSING):
        return False
    head = causal_lm.get_output_embeddings()
    if head is None or causal_lm.base_model is model:
        return False
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, config.vocab_size, (2, 16), generator=generator).to(causal_lm.device)
    try:
        fused = _fused_nll(model, inputs)[0].item()
    except (TypeError, AttributeError, ValueError) as exc:  # a base model without `last_hidden_state`, ...
        log.debug("fused LM head unavailable for %s: %s", type(model).__name__, exc)
        return False
    plain = _plain_nll(model, inputs)[0].item()
    exact = mixed_precision(model) is None and head.weight.dtype == torch.float32
    tolerance = 1e-4 if exact else 1e-3  # reduced precision rounds the two paths' products differently
    return math.isclose(fused, plain, rel_tol=tolerance)


@contextmanager
def _compiled(model: nn.Module) -> Iterator[None]:
    """The current stack's layers run their compiled forward inside the block (hooks stay eager)."""
    evaluation = settings(model)
    layers = list(decoder_layers(model))
    if not evaluation.compiled:
        log.info("compiling the decoder layers for perplexity passes (once per process; ~25 s on 2 cores)")
    before = [vars(layer).get("forward") for layer in layers]  # an instance forward someone else set
    try:
        for layer in layers:
            if id(layer) not in evaluation.compiled:
                evaluation.compiled[id(layer)] = torch.compile(layer.forward)
            layer.forward = evaluation.compiled[id(layer)]
        yield
    finally:
        for layer, forward in zip(layers, before):
            if forward is None:
                vars(layer).pop("forward", None)  # the class's eager forward again
            else:
                layer.forward = forward


def batch_nll(model: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL of one batch of `inputs[:, 1:]` (a 0-d tensor, not read yet), and how many targets."""
    prepare(model)
    evaluation = settings(model)
    run = _fused_nll if evaluation.fused_head else _plain_nll
    if not evaluation.compile:
        return run(model, inputs)
    try:
        with _compiled(model):
            return run(model, inputs)
    except TorchDynamoException as exc:  # compiling failed (inductor, backend); any other error is real
        reason = first_line(exc)
        log.warning("compiled decoder layers failed (%s); evaluating eagerly from now on", reason[:200])
        evaluation.compile = False
        return run(model, inputs)
