"""Run one published method alone: choose its k layers on a loaded model, then measure the result.

`python -m search method --method NAME --remove K` and benchmarks/compare_methods.py both come
here, so a baseline is chosen and measured exactly as a study would (same windows, same prefix
cache, same evaluation cache, same latency protocol). Choosing uses the first
`--sensitivity-tokens` calibration tokens, as study seeding does; the figures reported are on the
full calibration split and the held-out split.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from evaluators.sensitivity import block_similarity
from search import baselines, space
from search.caching import CachingEvaluator
from search.errors import SearchError
from search.model.removal import Removal
from search.registry import Registry
from search.seeding.criteria import CRITERIA, Scoring
from search.seeding.greedy import staged_greedy
from search.space import Budget


@dataclass
class Choice:
    method: str
    k: int
    sets: list[Removal]  # one set; several for `random`
    evaluations: int  # forward passes over a split it needed to choose (prefix-cache builds included)


class _Counted:
    """An evaluation cache (or none) that counts the perplexities asked of it: what a method needs
    on its own, whether or not an earlier method already paid for them."""

    def __init__(self, store) -> None:
        self.store, self.needed = store, 0

    def get(self, removed: Removal) -> float | None:
        self.needed += 1
        return self.store.get(removed) if self.store is not None else None

    def put(self, removed: Removal, perplexity: float, seconds: float | None = None) -> None:
        if self.store is not None:
            self.store.put(removed, perplexity, seconds)


@dataclass
class Options:
    """What a method may use besides the scoring windows: `--draws` and `--seed` of `random`."""

    n_layers: int
    draws: int = 5
    seed: int = 0


# A method: (scoring windows, k, options) -> the chosen set(s), and the one-pass evaluations it
# needed (None: count the perplexities it asked the evaluation cache for).
Method = Callable[[Scoring, int, Options], tuple[list[Removal], int | None]]
METHODS: Registry[Method] = Registry("method")


def _ppl_scores(scoring: Scoring, removed: Removal, candidates: list[Removal]) -> dict[Removal, float]:
    return CRITERIA["ppl"].score(scoring, removed, candidates, None)


def _layers(n_layers: int) -> list[Removal]:
    return [Removal.of([i]) for i in range(n_layers)]


def _by_layer(scores: dict[Removal, float]) -> dict[int, float]:
    return {unit.layers[0]: score for unit, score in scores.items()}


@METHODS.register("oneshot_ppl", "the k layers whose single removal costs least perplexity (Shortened LLaMA)")
def _oneshot_ppl(scoring: Scoring, k: int, options: Options) -> tuple[list[Removal], int | None]:
    scores = _by_layer(_ppl_scores(scoring, Removal(), _layers(options.n_layers)))
    return [Removal.of(baselines.lowest(scores, k))], None


@METHODS.register("block_influence", "the k layers of lowest Block Influence (ShortGPT)")
def _block_influence(scoring: Scoring, k: int, options: Options) -> tuple[list[Removal], int | None]:
    return [Removal.of(baselines.lowest(scoring.similarity(max_block=k).bi, k))], 1


@METHODS.register("angular_block", "the contiguous block of k closest in angular distance (Gromov et al.)")
def _angular_block(scoring: Scoring, k: int, options: Options) -> tuple[list[Removal], int | None]:
    return [Removal.of(baselines.angular_block(scoring.similarity(max_block=k).angular[k], k))], 1


@METHODS.register("staged_greedy", "remove the least sensitive layer, re-score, repeat (SLEB)")
def _staged_greedy(scoring: Scoring, k: int, options: Options) -> tuple[list[Removal], int | None]:
    n = options.n_layers
    anything = Budget(1.0, total_params=n, layer_params=[1] * n)
    stages = staged_greedy(lambda removed, candidates: _ppl_scores(scoring, removed, candidates), anything, k)
    return [stages[-1].removed], None


@METHODS.register(
    "block_greedy", "remove the attention or MLP block of least perplexity, re-score, repeat (BlockPruner)"
)
def _block_greedy(scoring: Scoring, k: int, options: Options) -> tuple[list[Removal], int | None]:
    n = options.n_layers
    blocks = Budget(1.0, total_params=2 * n, layer_params=[2] * n, block_params=[(1, 1)] * n)
    stages = staged_greedy(lambda removed, candidates: _ppl_scores(scoring, removed, candidates), blocks, k)
    return [stages[-1].removed], None


@METHODS.register("attention_drop", "the k attention blocks whose output is most like their input (LLM-Drop)")
def _attention_drop(scoring: Scoring, k: int, options: Options) -> tuple[list[Removal], int | None]:
    similar = block_similarity(scoring.model, scoring.windows, scoring.bos_id, scoring.batch_size)
    ranked = sorted((u for u in similar if u.attention), key=lambda u: (similar[u], u))
    return [space.union(ranked[:k])], 1


# Methods that remove attention and MLP blocks: `--remove` counts blocks, shapes are timed by block.
BLOCK_METHODS = ("block_greedy", "attention_drop")

# Published methods that come with a healing: `method` measures them healed whatever --heal says.
HEALED_METHODS = {"replaceme": "linear", "greedy_then_healed": "linear"}


@METHODS.register(
    "replaceme", "the angular_block pick, healed by one linear map per removed run (ReplaceMe; implies --heal linear)"
)
def _replaceme(scoring: Scoring, k: int, options: Options) -> tuple[list[Removal], int | None]:
    return _angular_block(scoring, k, options)


@METHODS.register("greedy_then_healed", "the staged_greedy pick (scored unhealed), then healed (implies --heal linear)")
def _greedy_then_healed(scoring: Scoring, k: int, options: Options) -> tuple[list[Removal], int | None]:
    return _staged_greedy(scoring, k, options)


@METHODS.register("drop_last", "the k layers before the final one")
def _drop_last(scoring: Scoring, k: int, options: Options) -> tuple[list[Removal], int | None]:
    return [Removal.of(baselines.drop_last(options.n_layers, k))], 0


@METHODS.register("random", "uniformly random sets, averaged over --draws")
def _random(scoring: Scoring, k: int, options: Options) -> tuple[list[Removal], int | None]:
    return [Removal.of(s) for s in baselines.random_sets(options.n_layers, k, options.draws, options.seed)], 0


def choose(
    evaluator: CachingEvaluator, method: str, k: int, sensitivity_tokens: int, draws: int = 5, seed: int = 0
) -> Choice:
    """The set(s) `method` removes for k layers, and how many evaluations choosing them cost."""
    chooser = METHODS[method]
    n_layers = evaluator.n_layers
    most = {"block_greedy": 2 * n_layers - 1, "attention_drop": n_layers}.get(method, n_layers - 1)
    what = "blocks" if method in BLOCK_METHODS else "layers"
    if not 1 <= k <= most:
        raise SearchError(f"--remove counts {what} for {method}: between 1 and {most} for this {n_layers}-layer model")
    windows, store = evaluator.sensitivity(sensitivity_tokens)  # store: None without an evaluation cache
    counted = _Counted(store)
    scoring = Scoring(evaluator.model, windows, evaluator.splits.bos_id, evaluator.batch_size, counted)
    sets, evaluations = chooser(scoring, k, Options(n_layers, draws, seed))
    return Choice(method, k, sets, counted.needed if evaluations is None else evaluations)


def measure(evaluator: CachingEvaluator, choices: Sequence[Choice]) -> list[dict]:
    """Calibration and held-out ratios of every chosen set, and latency per pruned shape, timed together."""
    shapes = {evaluator.shape(s): s for choice in choices for s in choice.sets}
    timed = evaluator.latencies(list(shapes.values()))
    latency = {key: t.ratio for key, t in zip(shapes, timed)}
    rows = []
    for choice in choices:
        calib = [evaluator.calib_ratio(s) for s in choice.sets]
        test = [evaluator.test_ratio(s) for s in choice.sets]
        reported = {"heal": evaluator.heal}
        for split in evaluator.splits.measured[2:]:  # the second corpus (--eval-dataset)
            reported[f"{split}_ppl_ratio"] = statistics.fmean(evaluator.ratio(s, split) for s in choice.sets)
        if evaluator.heal != "none":  # the same sets unhealed, beside the healed figures
            for split in evaluator.splits.measured:
                name = "calib_ppl_ratio" if split == "calib" else f"{split}_ppl_ratio"
                reported[f"unhealed_{name}"] = statistics.fmean(
                    evaluator.ratio(s, split, unhealed=True) for s in choice.sets
                )
        rows.append(
            {
                "k": choice.k,
                "method": choice.method,
                **(
                    choice.sets[0].json()
                    if not choice.sets[0].whole_layers_only
                    else {"removed_layers": list(choice.sets[0].layers)}
                ),
                "calib_ppl_ratio": statistics.fmean(calib),
                "test_ppl_ratio": statistics.fmean(test),
                "latency_ratio": statistics.fmean(latency[evaluator.shape(s)] for s in choice.sets),
                "evaluations": choice.evaluations,
                **reported,
                **({"draws": [list(s.layers) for s in choice.sets]} if len(choice.sets) > 1 else {}),
            }
        )
    return rows
