"""KL divergence of a pruned model's next-token distributions from the unpruned model's.

Perplexity ratio compares two averages over the text; KL(dense ‖ pruned) compares the two models
token by token, so what makes a token hard for both (a rare name, a number) cancels out. EvoPress
ranks candidates by it. It needs the dense model's distribution at every target token, which for a
vocabulary of V words is V floats per token (49,152 for SmolLM2, 128,256 for Llama 3: 0.8 and
2.1 GB over 4096 tokens in float32), so only its `k` most likely tokens are kept, with their ids,
and the log of the mass outside them: k x 8 + 4 bytes per token, whatever the vocabulary.

The divergence is then taken between the two distributions coarsened the same way (the dense
model's top k tokens, and one outcome for all the rest), which never exceeds the full KL (merging
outcomes cannot raise a divergence: the log-sum inequality) and equals it once the rest carries no
mass. benchmarks/fitness.py measures the gap against the full KL to choose k.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from evaluators.forward import HEAD_ROWS, at_least_float32, numerics, prepare, settings
from evaluators.perplexity import Rejected, window_batches

DEFAULT_TOP_K = 64


@dataclass
class DenseReference:
    """The unpruned model's next-token distributions over some windows, batch by batch."""

    k: int
    logp: list[torch.Tensor] = field(default_factory=list)  # [targets, k] float32, most likely first
    ids: list[torch.Tensor] = field(default_factory=list)  # [targets, k] int32
    rest: list[torch.Tensor] = field(default_factory=list)  # [targets] float32: log of the mass outside

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for part in (self.logp, self.ids, self.rest) for t in part)

    def top(self, k: int) -> DenseReference:
        """The same distributions kept to their `k` most likely tokens (k at most this one's)."""
        logp = [t[:, :k] for t in self.logp]
        return DenseReference(k, logp, [t[:, :k] for t in self.ids], [_log_rest(t) for t in logp])


def _log_rest(top: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(top))) per row, kept finite where the top tokens hold (nearly) all the mass."""
    return torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-7))


def logp_chunks(model: nn.Module, inputs: torch.Tensor) -> Iterator[torch.Tensor]:
    """Next-token log-probabilities [rows, V] (float32; a float64 model's float64) for the targets
    `inputs[:, 1:]`, a chunk of rows at a time: through the fused LM head where the model allows it
    (evaluators/forward.py)."""
    prepare(model)
    causal_lm: Any = model
    with numerics(model):
        if settings(model).fused_head:
            hidden = causal_lm.base_model(input_ids=inputs, use_cache=False).last_hidden_state
            hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
            head = causal_lm.get_output_embeddings()
            rows = HEAD_ROWS.get(hidden.device.type, 1024)
            for start in range(0, len(hidden), rows):
                yield F.log_softmax(at_least_float32(head(hidden[start : start + rows])), dim=-1)
        else:
            logits = model(input_ids=inputs, use_cache=False).logits[:, :-1]
            yield F.log_softmax(at_least_float32(logits.reshape(-1, logits.shape[-1])), dim=-1)


@torch.inference_mode()
def dense_reference(
    model: nn.Module, windows: torch.Tensor, bos_id: int | None, batch_size: int, k: int = DEFAULT_TOP_K
) -> DenseReference:
    """The model's top-`k` next-token distributions over `windows` (call it on the unpruned model)."""
    reference = DenseReference(k)
    device = next(model.parameters()).device
    for inputs in window_batches(windows, bos_id, batch_size, device):
        parts = [torch.topk(logp, min(k, logp.shape[-1]), dim=-1) for logp in logp_chunks(model, inputs)]
        top = torch.cat([p.values for p in parts])
        reference.logp.append(top)
        reference.ids.append(torch.cat([p.indices for p in parts]).to(torch.int32))
        reference.rest.append(_log_rest(top))
    return reference


def coarse_kl(reference: DenseReference, batch: int, start: int, logq: torch.Tensor) -> torch.Tensor:
    """Summed KL over rows start.. of one batch, between the dense and the pruned (`logq` [rows, V])
    distributions coarsened to the dense top k and the rest (float64)."""
    rows = slice(start, start + len(logq))
    logp, ids, rest_p = reference.logp[batch][rows], reference.ids[batch][rows].long(), reference.rest[batch][rows]
    top_q = logq.gather(-1, ids)
    rest_q = _log_rest(top_q)
    kl = (logp.exp() * (logp - top_q)).sum(-1) + rest_p.exp() * (rest_p - rest_q)
    return kl.double().sum()


def nll_and_kl(
    reference: DenseReference,
) -> Callable[[nn.Module, torch.Tensor, int], tuple[torch.Tensor, int, torch.Tensor]]:
    """A prefix-cache measure (evaluators/prefix.py): one batch's (summed NLL, targets, summed KL), both
    from the same log-probabilities, so a KL evaluation also gives the perplexity every report shows.
    The sums stay 0-d tensors on the device (read by `on_host`)."""

    def measure(model: nn.Module, inputs: torch.Tensor, index: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        targets = inputs[:, 1:].reshape(-1)
        nll = torch.zeros((), dtype=torch.float64, device=inputs.device)
        kl = torch.zeros((), dtype=torch.float64, device=inputs.device)
        seen = 0
        for logq in logp_chunks(model, inputs):
            # logq is on the LM head's device, which --device-map may put elsewhere than the inputs
            nll -= logq.gather(-1, targets[seen : seen + len(logq), None].to(logq.device)).double().sum().to(nll.device)
            kl += coarse_kl(reference, index, seen, logq).to(kl.device)
            seen += len(logq)
        return nll, seen, kl

    return measure


@dataclass(frozen=True)
class Divergence:
    """A finished KL evaluation: mean KL per target token, and the perplexity of the same pass."""

    kl: float
    ppl: float


def bounded_kl(
    batches: Iterable[tuple[float, int, float]],
    base_batches: Iterable[tuple[float, int]],
    total_targets: int,
    windows: int,
    batch_size: int,
    ceiling: float | None = None,
    cap: float | None = None,
) -> Divergence:
    """Mean KL of a batch stream that stops early, as `bounded_perplexity` does for perplexity: KL is
    never negative per token, so the sum so far over all targets is a lower bound of the mean, and
    once that exceeds `ceiling` the candidate is rejected. `cap` bounds the perplexity ratio over the
    windows seen so far (--max-ppl-ratio), from the same pass."""
    kl, nll, base_nll, seen, batches_seen = 0.0, 0.0, 0.0, 0, 0
    for (nll_sum, count, kl_sum), (base_batch, _) in zip(batches, base_batches):
        kl, nll, base_nll = kl + kl_sum, nll + nll_sum, base_nll + base_batch
        seen, batches_seen = seen + count, batches_seen + 1
        if seen == total_targets:
            break
        done = min(windows, batches_seen * batch_size)
        lower = kl / total_targets
        if ceiling is not None and lower > ceiling:
            raise Rejected(f"proven above KL {ceiling:.4f} after {done} windows", lower, done)
        partial = math.exp((nll - base_nll) / seen)
        if cap is not None and partial > cap:
            raise Rejected(f"ppl x{partial:.3f} over the first {done} windows > --max-ppl-ratio", lower, done)
    return Divergence(kl / seen, math.exp(nll / seen))


def full_kl(dense: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Summed KL(dense ‖ pruned) over rows of full log-probabilities [rows, V] (float64)."""
    return (dense.exp() * (dense - logq)).sum(-1).double().sum()
