"""Seeding a new study, once: baseline, latency table, sensitivity, greedy path, seed trials.

Everything here is written to the study before `seeded` is set, so a crash part-way redoes it on
resume, and a resumed run reads it back instead of measuring again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import optuna
from tqdm.auto import tqdm

from evaluators.healing import removed_blocks, runs
from evaluators.perplexity import Rejected
from evaluators.sensitivity import block_similarity
from search import baselines, space
from search.caching import CachingEvaluator
from search.config import RunConfig
from search.model.removal import Removal
from search.objective import latency_entry
from search.records import Baseline, GreedyStage, StudyRecord, enqueue, mark_seeded, write_latency
from search.sampler import removal_set
from search.seeding.criteria import CRITERIA, Scoring
from search.seeding.greedy import ScoreFn, Seeds, Stage, parts, seed_sets, staged_greedy
from search.space import Budget

log = logging.getLogger("search")
OBJECTIVES = ["ppl_ratio", "latency_ratio"]  # --fitness kl: the first is "kl", what it holds


SHORTLIST = 6  # candidates per greedy stage after the first, besides the current set's neighbours
CONFIRMED = 3  # candidates per healed greedy stage measured with the study's fit after the screen


@dataclass(frozen=True)
class LayerSeeds:
    """What a whole-layer study with the same `--heal` seeds, for a sub-layer study to start from (healed,
    less the unhealed whole-layer path: a sub-layer study walks its unhealed path over blocks instead)."""

    path: Seeds  # its greedy path, stage by stage
    rest: Seeds  # then the rest it seeds: one-shot top k, one-pass criteria, one layer short, neighbours


@dataclass(frozen=True)
class Seeding:
    """Where a new study's first trials come from, before they are ordered and cut to the seed slots."""

    stages: list[Stage]  # the greedy path over the budget's units (blocks in a sub-layer space)
    others: Seeds  # other methods' picks: whole-layer one-pass criteria, attention drop, the unhealed path
    passes: int  # forward passes over the sensitivity tokens besides the greedy path's own
    layer: LayerSeeds = field(default_factory=lambda: LayerSeeds([], []))  # sub-layer studies only


def greedy_seeds(evaluator: CachingEvaluator, budget: Budget, config: RunConfig) -> Seeding:
    """Staged greedy removal and the one-pass methods' picks. Unhealed, greedy ranks by `--criterion`
    on the first `--sensitivity-tokens` calibration tokens. Healed, the path is scored on healed
    models on the same tokens (healing changes which layers are safe to remove: it favours runs), and
    the unhealed `--criterion` path adds its sets as seeds. A sub-layer study also walks the
    whole-layer path (with its passes counted: it and block similarity are spent besides the block
    path's own)."""
    windows, store = evaluator.sensitivity(config.sensitivity_tokens)
    scoring = Scoring(evaluator.model, windows, evaluator.splits.bos_id, evaluator.batch_size, store)
    criterion = CRITERIA[config.criterion]
    most = budget.max_units()

    def scorer(path: str, most: int, units: Budget) -> ScoreFn:
        def score(removed: Removal, candidates: list[Removal]) -> dict[Removal, float]:
            stage = len(parts(removed, units)) + 1
            return criterion.score(scoring, removed, candidates, f"{path} stage {stage}/{most} ({config.criterion})")

        return score

    score = scorer("greedy", most, budget)
    extra = 0

    healing = evaluator.heal != "none"
    others: Seeds = []
    if healing:
        stages = staged_greedy(healed_scores(evaluator, most, budget), budget, shortlist=SHORTLIST)
        # The unhealed path seeds too: greedy-then-healed's sets. Healed greedy can walk past one of them
        # (a set safe to remove unhealed may heal better than the healed path's own next step), and a
        # study that never measures them can lose to that baseline (docs/benchmarks.md, "Healing").
        unhealed = staged_greedy(score, budget, shortlist=None if criterion.one_pass else SHORTLIST)
        others += [(stage.removed, f"greedy stage {n} ({config.criterion})") for n, stage in enumerate(unhealed, 1)]
        if not criterion.one_pass:
            extra += 1 + sum(criterion.passes(len(s.scores)) for s in unhealed)
    else:
        stages = staged_greedy(score, budget, shortlist=None if criterion.one_pass else SHORTLIST)
    for n, stage in enumerate(stages, 1):
        how = "healed ratio" if healing else config.criterion
        log.info("greedy stage %d (%s): remove %s (score %.4g)", n, how, stage.removed.describe(), stage.score)
    # The one-pass criteria of the unpruned model seed the study too (one forward pass for all of them).
    most_layers = budget.max_layers()
    found = scoring.similarity(max_block=most_layers)
    sizes = range(1, most_layers + 1)
    picks = [(baselines.lowest(found.bi, k), f"block influence top {k}") for k in sizes]
    picks += [(baselines.angular_block(found.angular[k], k), f"angular block of {k}") for k in found.angular]
    picks += [(baselines.drop_last(budget.n_layers, k), f"last {k} before the final layer") for k in sizes]
    chosen = [(Removal.of(layers), reason) for layers, reason in picks]  # whole layers: in either space
    if budget.block_params is None:
        return Seeding(stages, [*others, *chosen], extra)
    similar = block_similarity(evaluator.model, windows, evaluator.splits.bos_id, evaluator.batch_size)
    # the path a whole-layer study with the same --heal walks: healed when the study heals
    layers = replace(budget, block_params=None)
    layer_score = (
        healed_scores(evaluator, most_layers, layers) if healing else scorer("layer greedy", most_layers, layers)
    )
    layered, layer_stages = layer_seeds(layer_score, budget, chosen)
    extra += 1 + sum(criterion.passes(len(s.scores)) for s in layer_stages)
    return Seeding(stages, [*attention_drop_seeds(similar, budget), *others], extra, layered)


def sublayer_seeds(seeding: Seeding, budget: Budget, limit: int) -> Seeds:
    """A sub-layer study's seeds, distinct and feasible, in this order: the whole-layer greedy path
    and the block greedy path, both always whole; then, up to `limit` in all, the rest of what a
    whole-layer study seeds in its order (so the sub-layer study starts where one ends), `others`
    (attention drop; healed, the unhealed block path), and the last block stage less each part.

    Both paths are seeded whole: each is a method the study is measured against (the whole-layer
    study stands on its path; block greedy is BlockPruner's rule), and a path cut short leaves its
    largest sets unmeasured. Block greedy walks many small steps (one attention block is a fraction
    of a layer), so the whole-layer rule of seeding every stage's neighbours would fill a study with
    seeds; `limit` (half of `--trials`) leaves the rest to the sampler, whose moves split and join
    them."""
    stages = seeding.stages
    paths = [*seeding.layer.path, *((stage.removed, f"greedy stage {n}") for n, stage in enumerate(stages, 1))]
    ordered = [*paths, *seeding.layer.rest, *seeding.others]
    if stages:
        last = stages[-1].removed
        ordered += [(last - part, f"greedy stage {len(stages)} less {part}") for part in parts(last, budget)]
    seeds: dict[Removal, str] = {}
    for n, (removal, reason) in enumerate(ordered):
        if n >= len(paths) and len(seeds) >= limit:
            break
        if removal not in seeds and budget.allows(removal):
            seeds[removal] = reason
    return list(seeds.items())


def layer_seeds(score: ScoreFn, budget: Budget, picks: Seeds) -> tuple[LayerSeeds, list[Stage]]:
    """A sub-layer study also starts from the whole-layer greedy path and what a whole-layer study
    seeds around it, in its order (one-shot top k, the one-pass `picks`, sets one layer short,
    neighbours), so it begins where a whole-layer study ends; returns those seeds and the path."""
    layers = replace(budget, block_params=None)
    stages = staged_greedy(score, layers, shortlist=SHORTLIST)
    found = seed_sets(stages, layers, count=2 * len(stages), others=picks)
    seeds = [(removal, f"layer {reason}") for removal, reason in found]
    on_path = {stage.removed for stage in stages}
    path = [(stage.removed, f"layer greedy stage {n}") for n, stage in enumerate(stages, 1)]
    return LayerSeeds(path, [seed for seed in seeds if seed[0] not in on_path]), stages


def attention_drop_seeds(similar: dict[Removal, float], budget: Budget) -> Seeds:
    """The k attention blocks whose output is most like their input (LLM-Drop's attention drop), for
    every k the budget allows."""
    ranked = sorted((u for u in similar if u.attention), key=lambda u: (similar[u], u))
    seeds: Seeds = []
    removal = Removal()
    for k, unit in enumerate(ranked, 1):
        removal = removal | unit
        if not budget.allows(removal):
            break
        seeds.append((removal, f"attention drop top {k}"))
    return seeds


def healed_scores(evaluator: CachingEvaluator, most: int, units: Budget) -> ScoreFn:
    """Score a stage's candidates by the healed ratio on the first `--sensitivity-tokens` calibration
    tokens, as unhealed greedy scores. A sequential fit costs a pass over the fitting windows per later
    run, so candidates are screened with every run fitted on the unpruned model (no pass; the study's
    fit itself for a single run) and the `CONFIRMED` best are measured again with the study's fit,
    which picks the stage's set. An evaluation stops once it provably cannot beat the best so far (its
    score is then the proven lower bound, enough to rank it for the next stage's shortlist). Screens and
    confirmations are both stored, each under its own fit's key, so a resumed seeding reads them back."""

    base: list[float] = []  # the unpruned model on these windows (from the evaluation cache on a redo)

    def measure(removal: Removal, best: float | None, screen: bool) -> float:
        if not base:
            base.append(evaluator.ppl(Removal(), "sensitivity"))
        # one run: the screen is the study's fit (and cached)
        parallel = screen and len(runs(removed_blocks(removal))) > 1
        try:
            ppl = evaluator.ppl(removal, "sensitivity", best, sequential=False if parallel else None)
        except Rejected as rejected:
            return max(rejected.lower_bound, best or 0.0)
        return ppl / base[0]

    def score(removed: Removal, candidates: list[Removal]) -> dict[Removal, float]:
        sets = {unit: removed | unit for unit in candidates}
        screened: dict[Removal, float] = {}
        bar = tqdm(candidates, desc=f"healed greedy stage {len(parts(removed, units)) + 1}/{most}", leave=False)
        for unit in bar:
            screened[unit] = measure(sets[unit], min(screened.values(), default=None), screen=True)
        scores = dict(screened)
        best: float | None = None
        for unit in sorted(candidates, key=lambda u: (screened[u], u))[:CONFIRMED]:
            if len(runs(removed_blocks(sets[unit]))) > 1 and evaluator.sequential:
                scores[unit] = measure(sets[unit], best, screen=False)
            best = scores[unit] if best is None else min(best, scores[unit])
        return scores

    return score


def seed_study(
    study: optuna.Study,
    evaluator: CachingEvaluator,
    budget: Budget,
    config: RunConfig,
    source: str,
    fingerprints: dict[str, str],
    transfer: tuple[Seeds, dict[Removal, float]] | None,
) -> None:
    """Baseline, sensitivity, greedy path and seed trials: computed once, stored in the study."""
    started = time.perf_counter()
    base = evaluator.baseline()  # builds the prefix caches: the unpruned pass every later evaluation starts from
    # Latency of every shape the budget reaches, timed together round-robin against the baseline.
    shapes = evaluator.reachable_shapes(budget.allows) or {}
    timed = evaluator.latencies(list(shapes.values())) if shapes else []
    base_ms = timed[0].baseline_ms if timed else evaluator.latency().baseline_ms
    log.info(
        "baseline: %d layers, %.1fM params, calibration ppl %.3f, held-out ppl %.3f, %.1f ms/forward",
        budget.n_layers,
        budget.total_params / 1e6,
        base["calib"],
        base["test"],
        base_ms,
    )
    if "eval" in base:
        log.info("second corpus (%s): baseline ppl %.3f", config.eval_dataset, base["eval"])

    stages: list[Stage] = []
    if transfer is not None:
        # Transfer: another study's findings, mapped by relative depth, replace the greedy search.
        seeds, profile = transfer
        log.info(
            "warm start from %r: %d seed sets mapped onto %d layers",
            config.warm_start_from,
            len(seeds),
            budget.n_layers,
        )
    else:
        seeding = greedy_seeds(evaluator, budget, config)
        stages, extra = seeding.stages, seeding.passes
        profile = stages[0].scores if stages else {}
        if budget.block_params is None:
            seeds = seed_sets(stages, budget, count=2 * len(stages), others=seeding.others)
        else:
            seeds = sublayer_seeds(seeding, budget, limit=config.trials // 2)
            if len(seeds) > config.trials // 2:
                log.warning(
                    "the two greedy paths are %d seed trials, more than half of --trials %d: "
                    "--trials %d leaves the sampler as many trials as the seeds",
                    len(seeds),
                    config.trials,
                    2 * len(seeds),
                )

    # Seeding cost in forward passes over --sensitivity-tokens, for comparisons with warm starts.
    passes = (
        0 if transfer is not None else 1 + extra + sum(CRITERIA[config.criterion].passes(len(s.scores)) for s in stages)
    )
    study.set_metric_names(["kl", OBJECTIVES[1]] if config.objective_fitness == "kl" else OBJECTIVES)
    StudyRecord(
        settings=config.settings(),
        model_source=source,
        model_spec=config.model_spec(),
        model_fingerprint=fingerprints["model_fingerprint"],
        data_fingerprint=fingerprints["data_fingerprint"],
        baseline=Baseline(budget.n_layers, budget.total_params, base["calib"], base["test"], base_ms, base.get("eval")),
        layer_params=list(budget.layer_params),
        sensitivity=profile,
        criterion=config.criterion if transfer is None else "transfer",
        greedy=[GreedyStage(s.removed, s.score) for s in stages],
        sensitivity_passes=passes,
        warm_start_from=config.warm_start_from,
    ).write(study)
    for shape, latency in zip(shapes, timed):
        write_latency(study, shape, latency_entry(latency, "together"))
    present = {removal_set(t) for t in study.get_trials(deepcopy=False)}  # a crash mid-seeding left some
    for removal, reason in seeds:
        if removal not in present:
            enqueue(study, space.encode(removal, budget.n_layers, budget.granularity), reason)
    mark_seeded(study)  # last: a crash before this redoes seeding on resume
    log.info("seeded %d trials in %.0f s", len(seeds), time.perf_counter() - started)
