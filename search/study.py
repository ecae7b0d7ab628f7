"""One study from start to resume: load, measure the baseline, seed, search, until `--trials` are done.

`run(RunConfig(...))` is the whole engine; the CLI only parses flags into a RunConfig.
Re-running the same configuration resumes: the baseline, sensitivity and seeds are read back
from the store, and only the missing trials run. A study whose trials are all done returns
without loading the model.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import optuna
from tqdm.auto import tqdm

from evaluators.data import bos_to_prepend, make_splits
from evaluators.forward import configure
from evaluators.latency import latency_input, measure_latencies, measure_latency
from evaluators.sensitivity import removal_sensitivity, similarity
from search import baselines, space
from search.errors import SearchError, redact
from search.evaluations import EvalCache, device_label
from search.failures import check_window
from search.model.loading import LoadedModel, load_model, model_name
from search.model.numerics import AUTO
from search.model.surgery import decoder_layers, layer_param_counts, total_param_count
from search.objective import COMPLETE, Bench, finished, make_objective, store_latency
from search.recovery import recover_interrupted, worker_id
from search.sampler import RemovalSetSampler, removal_set
from search.seeding import Stage, seed_sets, staged_greedy, transferred_seeds
from search.space import Budget
from search.store import (
    default_storage,
    default_study_name,
    exclusive,
    load_study,
    open_storage,
    sqlite_path,
    study_names,
)

log = logging.getLogger("search")

OBJECTIVES = ["ppl_ratio", "latency_ratio"]
# Give up when the sampler keeps proposing only over-budget or empty sets (tiny spaces, converged runs).
MAX_FREE_PROPOSALS = 300


@dataclass
class RunConfig:
    model: str | None = None  # hub id, directory or .gguf; None: the embedded SmolLM2-135M-Instruct
    dataset: str | None = None  # datasets spec, file or folder; None: the embedded English corpus
    budget: float = 0.12
    trials: int = 24
    study: str | None = None
    storage: str | None = None
    calib_tokens: int = 4096
    test_tokens: int = 8192
    sensitivity_tokens: int = 2048
    seq_len: int = 512
    batch_size: int = 4
    dtype: str = "auto"  # measured per machine (search/model/numerics.py); a study keeps what it resolved to
    device: str = "cpu"
    compile: bool = False  # torch.compile the decoder layers for perplexity passes (evaluators/forward.py)
    latency_tokens: int = 128
    latency_repeats: int = 30
    seed: int = 0
    trust_remote_code: bool = False
    warm_start_from: str | None = None  # another study whose findings seed this one instead of greedy
    warm_start_storage: str | None = None  # where that study lives (default: this run's store)
    criterion: str = "ppl"  # what staged greedy seeding ranks layers by: ppl, angular or bi
    sampler: str = "local"  # local: search/sampler.py; tpe: Optuna's multi-objective TPE
    max_ppl_ratio: float | None = None  # reject a candidate whose ratio exceeds this (on the windows seen so far)

    @property
    def study_name(self) -> str:
        return self.study or default_study_name(model_name(self.model), self.budget)

    @property
    def storage_url(self) -> str:
        return self.storage or default_storage(self.study_name)

    def fixed_settings(self) -> dict:
        """What must not change across resumes: it defines what the stored numbers mean."""
        keys = ("budget", "dataset", "calib_tokens", "test_tokens", "sensitivity_tokens", "seq_len", "dtype")
        settings = {"model": model_name(self.model), **{k: asdict(self)[k] for k in keys}}
        if self.dataset and Path(self.dataset).expanduser().exists():
            settings["dataset"] = str(Path(self.dataset).expanduser().resolve())  # export reloads it from anywhere
        return settings


def completed(study: optuna.Study) -> int:
    """Trials that count towards --trials: measured, or rejected part-way (they cost a forward pass)."""
    return sum(finished(t) for t in study.get_trials(deepcopy=False))


def _check_compatible(study: optuna.Study, config: RunConfig) -> None:
    stored = study.user_attrs.get("settings")
    if stored is None:
        return
    wanted = config.fixed_settings()
    diff = [f"{k}: stored {stored.get(k)!r}, now {v!r}" for k, v in wanted.items() if stored.get(k) != v]
    if diff:
        raise SearchError(
            f"study {study.study_name!r} was created with other settings ({'; '.join(diff)}); "
            "use another --study NAME, or repeat the original flags to resume it"
        )


def _adopt_stored_dtype(config: RunConfig, study: optuna.Study) -> RunConfig:
    """`--dtype auto` resumes a study with the dtype it was measured in, whatever this machine prefers."""
    stored = (study.user_attrs.get("settings") or {}).get("dtype")
    return replace(config, dtype=stored) if config.dtype == AUTO and stored else config


def run(config: RunConfig) -> optuna.Study:
    if config.trials <= 0:
        raise SearchError("--trials must be a positive number of trials")
    name, url = config.study_name, config.storage_url
    path = sqlite_path(url)  # also rejects a malformed URL before anything is loaded
    storage, seeded = None, False
    if path is None or path.exists():
        # Fail fast on an unreachable or foreign store; a new SQLite file waits until the model loads.
        storage = open_storage(url)
        if name in study_names(storage):
            study = optuna.load_study(study_name=name, storage=storage)
            config = _adopt_stored_dtype(config, study)
            _check_compatible(study, config)
            seeded = bool(study.user_attrs.get("seeded"))
            if seeded and completed(study) >= min(config.trials, _target(study, config)):
                recover_interrupted(study, requeue=False)  # done: only make sure nothing stays RUNNING
                log.info("study %r already has %d finished trials; nothing to run", name, completed(study))
                return study

    loaded, bench, budget = prepare(config)
    config = replace(config, dtype=loaded.dtype)  # `auto` resolved: the study records what ran
    budget.check_removable()
    splits = bench.splits

    # Checked before any store change; a study seeded already needs no source any more.
    transfer = _transfer(config, budget) if config.warm_start_from and not seeded else None
    storage = storage or open_storage(url)
    attach_store(bench, storage, loaded.fingerprint, config)
    fingerprints = {"model_fingerprint": loaded.fingerprint, "data_fingerprint": splits.fingerprint()}
    # One worker creates and seeds the study; others wait here, then join the seeded study.
    with exclusive(url, f"study:{name}"):
        study = optuna.create_study(
            study_name=name,
            storage=storage,
            directions=["minimize", "minimize"],
            load_if_exists=True,
        )
        _check_compatible(study, config)
        for key, value in fingerprints.items():
            stored = study.user_attrs.get(key)
            if stored is not None and stored != value:
                what = "model weights" if key == "model_fingerprint" else "data windows"
                raise SearchError(f"study {name!r} was measured on other {what}; use another --study NAME")
        if study.user_attrs.get("seeded"):
            baseline = study.user_attrs["baseline"]
            bench.base_calib_ppl, bench.base_test_ppl = baseline["calib_ppl"], baseline["test_ppl"]
            log.info("resuming study %r in %s (%d finished trials)", name, redact(url), completed(study))
        else:
            log.info("new study %r in %s", name, redact(url))
            _seed(study, bench, budget, config, loaded.source, fingerprints, transfer)
        recover_interrupted(study, n_layers=budget.n_layers)
        _queue_whole_space(study, budget, config.trials)

    target = min(config.trials, _target(study, config))
    if target < config.trials:
        log.info("only %d feasible removal sets exist; the study stops there", target)
    missing = target - completed(study)
    if missing > 0:
        # Seed offset by progress, so a resumed run does not replay the proposals it already made.
        # ... and the worker's identity, so workers released together do not propose in lockstep.
        offset = len(study.trials) + int(hashlib.sha256(worker_id().encode()).hexdigest()[:6], 16)
        study.sampler = _sampler(config, budget, config.seed + offset)
        _optimize(study, bench, budget, target)
    return study


def _sampler(config: RunConfig, budget: Budget, seed: int) -> optuna.samplers.BaseSampler:
    """The default local search, or Optuna's multi-objective TPE for comparison (benchmarks/compare_methods.py).

    NSGA-II is not offered: its first generation is random booleans, ~15 of 30 layers removed,
    all far over any useful budget, and enqueued seeds do not stand in for it.
    """
    if config.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed % 2**32, multivariate=True, n_startup_trials=4)
    return RemovalSetSampler(budget, seed=seed)


def prepare(config: RunConfig) -> tuple[LoadedModel, Bench, Budget]:
    """Model, windows and parameter accounting: everything an evaluation needs, no store yet."""
    loaded = load_model(config.model, config.dtype, config.device, config.trust_remote_code)
    model = configure(loaded.model, compile=config.compile)
    check_window(model.config, config.seq_len, bos_to_prepend(loaded.tokenizer) is not None, config.latency_tokens)
    splits = make_splits(loaded.tokenizer, config.dataset, config.calib_tokens, config.test_tokens, config.seq_len)
    budget = Budget(config.budget, total_param_count(model), layer_param_counts(model))
    types = getattr(model.config, "layer_types", None) or [""] * budget.n_layers
    bench = Bench(
        model,
        splits,
        latency_input(splits.calib, config.latency_tokens, model.device),
        batch_size=config.batch_size,
        latency_repeats=config.latency_repeats,
        layer_kinds=[f"{size}{'/' + kind if kind else ''}" for size, kind in zip(budget.layer_params, types)],
        max_ppl_ratio=config.max_ppl_ratio,
    )
    return loaded, bench, budget


def attach_store(bench: Bench, storage: optuna.storages.RDBStorage, model_fingerprint: str, config: RunConfig) -> None:
    """Let the bench read and record perplexities in the store's evaluation cache."""
    numerics = f"{config.dtype}@{device_label(bench.model.device)}/b{config.batch_size}"
    bench.stores = {
        split: EvalCache(storage.engine, model_fingerprint, bench.splits.split_fingerprint(split), numerics)
        for split in ("calib", "test")
    }


def _target(study: optuna.Study, config: RunConfig) -> int:
    return study.user_attrs.get("feasible_sets") or config.trials


def _seed(
    study, bench: Bench, budget: Budget, config: RunConfig, source: str, fingerprints: dict, transfer: tuple | None
) -> None:
    """Baseline, sensitivity, greedy path and seed trials: computed once, stored in the study."""
    model = bench.model
    n_layers = len(decoder_layers(model))
    started = time.perf_counter()
    bench.baseline()  # builds the prefix caches: the unpruned pass every later evaluation starts from
    # Latency of every shape the budget reaches, timed together round-robin against the baseline.
    shapes = bench.shapes(budget) or {}
    timed = measure_latencies(
        model, list(shapes.values()), bench.latency_input, 1, config.latency_repeats, bench.layer_kinds
    )
    base_latency = timed[0] if timed else measure_latency(model, (), bench.latency_input, 1, config.latency_repeats)
    log.info(
        "baseline: %d layers, %.1fM params, calibration ppl %.3f, held-out ppl %.3f, %.1f ms/forward",
        n_layers,
        budget.total_params / 1e6,
        bench.base_calib_ppl,
        bench.base_test_ppl,
        base_latency.baseline_ms,
    )

    if transfer is not None:
        # Transfer: another study's findings, mapped by relative depth, replace the greedy search.
        stages = []
        seeds, profile = transfer
        log.info("warm start from %r: %d seed sets mapped onto %d layers", config.warm_start_from, len(seeds), n_layers)
    else:
        stages, others = _greedy(bench, budget, config)
        profile = stages[0].scores if stages else {}
        seeds = seed_sets(stages, budget, count=2 * len(stages), others=others)

    study.set_metric_names(OBJECTIVES)
    study.set_user_attr("settings", config.fixed_settings())
    study.set_user_attr("model_source", source)
    # What `export` reloads: None is the embedded default; local paths are made absolute.
    local = config.model is not None and Path(config.model).expanduser().exists()
    study.set_user_attr("model_spec", str(Path(config.model).expanduser().resolve()) if local else config.model)
    for key, value in fingerprints.items():
        study.set_user_attr(key, value)
    study.set_user_attr(
        "baseline",
        {
            "layers": n_layers,
            "params": budget.total_params,
            "calib_ppl": bench.base_calib_ppl,
            "test_ppl": bench.base_test_ppl,
            "latency_ms": base_latency.baseline_ms,
        },
    )
    study.set_user_attr("layer_params", list(budget.layer_params))
    for key, latency in zip(shapes, timed):
        store_latency(study, key, latency)
    study.set_user_attr("sensitivity", {str(k): v for k, v in sorted(profile.items())})
    if config.warm_start_from:
        study.set_user_attr("warm_start_from", config.warm_start_from)
    study.set_user_attr("criterion", config.criterion if transfer is None else "transfer")
    study.set_user_attr("greedy", [{"removed_layers": list(s.removed), "score": s.score} for s in stages])
    # Seeding cost in forward passes over --sensitivity-tokens, for comparisons with warm starts.
    passes = sum(len(s.scores) + 1 if config.criterion == "ppl" else 1 for s in stages)  # + each stage's base
    study.set_user_attr("sensitivity_passes", passes + (1 if transfer is None else 0))
    present = {removal_set(t) for t in study.get_trials(deepcopy=False)}  # a crash mid-seeding left some
    for removed, reason in seeds:
        if removed not in present:
            study.enqueue_trial(space.encode(removed, n_layers), user_attrs={"proposed_by": reason})
    study.set_user_attr("seeded", True)  # last: a crash before this redoes seeding on resume
    log.info("seeded %d trials in %.0f s", len(seeds), time.perf_counter() - started)


def _queue_whole_space(study: optuna.Study, budget: Budget, trials: int) -> None:
    """When every feasible set fits in `trials`, queue the ones not tried yet (after the seeds)."""
    everything = budget.enumerate_feasible(limit=trials)
    if everything is None:
        return
    trials = study.get_trials(deepcopy=False)
    present = {removal_set(t) for t in trials if t.state != optuna.trial.TrialState.PRUNED or finished(t)}
    for removed in everything:
        if removed not in present:
            study.enqueue_trial(space.encode(removed, budget.n_layers), user_attrs={"proposed_by": "exhaustive"})
    study.set_user_attr("feasible_sets", len(everything))


def _greedy(bench: Bench, budget: Budget, config: RunConfig) -> tuple[list[Stage], list[tuple[tuple[int, ...], str]]]:
    """Staged greedy removal by `--criterion`, and the one-pass methods' picks, on the first
    `--sensitivity-tokens` calibration tokens."""
    model, splits = bench.model, bench.splits
    sens_windows, store = bench.sensitivity(config.sensitivity_tokens)
    most = budget.max_layers()

    def score(removed: tuple[int, ...], candidates: list[int]) -> dict[int, float]:
        desc = f"greedy stage {len(removed) + 1}/{most} ({config.criterion})"
        if config.criterion == "ppl":
            return removal_sensitivity(
                model, sens_windows, candidates, removed, splits.bos_id, config.batch_size, desc=desc, store=store
            )
        scores = similarity(model, sens_windows, removed, splits.bos_id, config.batch_size).criterion(config.criterion)
        return {i: scores[i] for i in candidates}

    stages = staged_greedy(score, budget)
    for n, stage in enumerate(stages, 1):
        log.info("greedy stage %d (%s): remove %s (score %.4g)", n, config.criterion, list(stage.removed), stage.score)
    # The one-pass criteria of the unpruned model seed the study too (one forward pass for all of them).
    found = similarity(model, sens_windows, (), splits.bos_id, config.batch_size, max_block=most)
    others = [(baselines.lowest(found.bi, k), f"block influence top {k}") for k in range(1, most + 1)]
    others += [(baselines.angular_block(found.angular[k], k), f"angular block of {k}") for k in found.angular]
    others += [
        (baselines.drop_last(budget.n_layers, k), f"last {k} before the final layer") for k in range(1, most + 1)
    ]
    return stages, others


def _transfer(config: RunConfig, budget: Budget) -> tuple[list, dict[int, float]]:
    """Seeds from another study: its greedy path and its best set of each size, mapped by depth."""
    url = config.warm_start_storage or config.storage or default_storage(config.warm_start_from)
    source = load_study(open_storage(url, create=False), config.warm_start_from)
    attrs = source.user_attrs
    if "baseline" not in attrs or not attrs.get("sensitivity"):
        raise SearchError(f"--warm-start-from {config.warm_start_from!r} has no sensitivity profile to transfer")
    layers = attrs["baseline"]["layers"]
    sets = [(tuple(g["removed_layers"]), "greedy") for g in attrs.get("greedy", [])]
    best: dict[int, tuple[float, tuple[int, ...]]] = {}
    for trial in source.get_trials(deepcopy=False, states=COMPLETE):
        removed = removal_set(trial)
        if trial.values and (len(removed) not in best or trial.values[0] < best[len(removed)][0]):
            best[len(removed)] = (trial.values[0], removed)
    sets += [(removed, "best of its size") for _, removed in sorted(best.values(), key=lambda b: len(b[1]))]
    profile = {int(k): v for k, v in attrs["sensitivity"].items()}
    return transferred_seeds(sets, profile, layers, budget)


def _optimize(study: optuna.Study, bench: Bench, budget: Budget, target: int) -> None:
    done = completed(study)
    bar = tqdm(total=target, initial=done, desc="trials", unit="trial")
    free_streak = 0

    def on_result(trial: optuna.Trial, result: dict) -> None:
        how = f"= trial {result['duplicate_of']}" if "duplicate_of" in result else f"{result.get('eval_s', 0):.1f} s"
        if "rejected" in result:
            outcome = f"rejected: {result['rejected']}"
        else:
            test = f", held-out x{result['test_ppl_ratio']:.3f}" if "test_ppl_ratio" in result else ""
            outcome = f"ppl x{result['ppl_ratio']:.3f}, latency x{result['latency_ratio']:.3f}{test}"
        bar.write(f"trial {trial.number}: remove {list(result['removed'])} -> {outcome} ({how})", file=sys.stderr)

    def progress(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        nonlocal free_streak
        if finished(trial):
            free_streak = 0
            done = completed(study)
            bar.n = min(target, done)
            bar.refresh()
            if done >= target:
                study.stop()
        else:
            free_streak += 1
            if free_streak >= MAX_FREE_PROPOSALS:
                bar.write(
                    f"the sampler proposed {free_streak} infeasible sets in a row; stopping early", file=sys.stderr
                )
                study.stop()

    try:
        while completed(study) < target:
            try:
                study.optimize(
                    make_objective(bench, budget, on_result),
                    callbacks=[progress],
                    gc_after_trial=False,
                    show_progress_bar=False,
                )
                return
            except ValueError as exc:
                # SQLite has no SELECT ... FOR UPDATE: two workers can pop the same queued trial, and
                # the second to finish cannot record it. The first result stands; nothing is lost.
                if not str(exc).startswith("Cannot tell a "):
                    raise
                log.info("another worker recorded the same queued trial first; continuing")
    finally:
        bar.close()
