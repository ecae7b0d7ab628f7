"""Confirmation: a close call on the calibration tokens is decided on more of them (`--confirm-tokens`).

4096 calibration tokens cannot separate two sets whose perplexities differ by a percent or two:
held-out data orders such pairs the other way about as often as not (docs/benchmarks.md, "The
fitness"). So a candidate whose fitness comes within `margin` of the best set at least as fast
(the best of its size among them) is measured again on the calibration windows plus `more` of
them, and the study ranks it by that figure: the trial's objective is the confirmed one. A
candidate further than `margin` above such a set is rejected: a judgement, not the proof plain
early rejection is (a set beyond the noise of a faster one is taken to stay behind it), so every
finished trial of a confirming study carries a figure on the same tokens, and fronts never
compare figures of different token counts.

The margin is in nats per token, the unit both fitnesses share: a perplexity ratio's logarithm is a
difference of mean NLLs, and a KL divergence is one too. 0.02 is a 2 % perplexity ratio.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from evaluators.perplexity import target_count
from search.model.removal import Removal

if TYPE_CHECKING:
    from search.caching import CachingEvaluator
    from search.evaluator import Evaluator, Fitness

DEFAULT_FACTOR = 4  # confirmation tokens per calibration token: 4096 -> 16384, the measured point
DEFAULT_MARGIN = 0.02  # nats per token: covers every reversal measured at 4096 tokens between best sets


def default_tokens(calib_tokens: int) -> int:
    return DEFAULT_FACTOR * calib_tokens


def loosened(ceiling: float, margin: float, fitness: str) -> float:
    """`ceiling` raised by the margin: a ratio by exp(margin), a KL by margin."""
    return ceiling * math.exp(margin) if fitness == "ppl" else ceiling + margin


def confirmed_fitness(evaluator: Evaluator | CachingEvaluator, removal: Removal, calib: Fitness) -> Fitness:
    """The fitness over the calibration windows and the `more` ones together, from `calib` (the figure on
    the calibration windows, not measured again) and one evaluation of the `more` windows.

    Exact, not an estimate: both fitnesses are means over target tokens, so the mean over the union
    is the token-weighted mean of the two parts (for a ratio, of their logarithms)."""
    from search.evaluator import Fitness

    splits = evaluator.splits
    n_calib, n_more = target_count(splits.calib, splits.bos_id), target_count(splits.windows("more"), splits.bos_id)
    if evaluator.fitness == "kl":
        found = evaluator.kl(removal, split="more")
        more_ratio, more_value = found.ppl / evaluator.base_ppl["more"], found.kl
    else:
        more_ratio = evaluator.ppl(removal, "more") / evaluator.base_ppl["more"]
        more_value = more_ratio
    log_ratio = (n_calib * math.log(calib.ppl_ratio) + n_more * math.log(more_ratio)) / (n_calib + n_more)
    if evaluator.fitness == "kl":
        value = (n_calib * calib.value + n_more * more_value) / (n_calib + n_more)
        return Fitness(value, math.exp(log_ratio))
    return Fitness(math.exp(log_ratio), math.exp(log_ratio))
