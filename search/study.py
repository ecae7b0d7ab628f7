"""One study from start to resume: open or create it, seed it once, optimise until `--trials`.

`run(RunConfig(...))` is the whole engine; the CLI only parses flags into a RunConfig.
Re-running the same configuration resumes: the baseline, sensitivity and seeds are read back
from the store, and only the missing trials run. A study whose trials are all done returns
without loading the model, unless its front's latency is still to be timed side by side
(search/retime.py: a run ends with that).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import cast

import optuna
import torch
from optuna.trial import TrialState

from evaluators.data import bos_to_prepend, eval_windows, make_splits
from evaluators.forward import configure
from evaluators.latency import block_kinds, latency_input, layer_kinds
from search import space
from search.caching import with_store
from search.config import RunConfig, adopt_stored, check_compatible
from search.errors import SearchError, redact
from search.evaluator import Evaluator
from search.failures import check_window
from search.healing import check_healable
from search.loop import optimize
from search.model.loading import LoadedModel, load_model
from search.model.surgery import block_param_counts, layer_param_counts, total_param_count
from search.records import (
    completed,
    count_run_started,
    enqueue,
    feasible_sets,
    is_seeded,
    needs_retiming,
    read_baseline,
    read_fingerprints,
    set_feasible_sets,
)
from search.recovery import recover_interrupted, worker_id
from search.retime import retime_front
from search.sampler import SAMPLERS, tried_sets
from search.seeding.criteria import CRITERIA
from search.seeding.seed import seed_study
from search.seeding.transfer import seeds_from_study
from search.space import Budget
from search.store import default_storage, exclusive, open_storage, sqlite_path, study_names

__all__ = ["RunConfig", "completed", "prepare", "run"]

log = logging.getLogger("search")
# Seeds of successive runs joining one study are this far apart, so their proposals never coincide.
RUN_SEED_STRIDE = 1_000_003


def run(config: RunConfig) -> optuna.Study:
    if config.trials <= 0:
        raise SearchError("--trials must be a positive number of trials")
    SAMPLERS[config.sampler], CRITERIA[config.criterion]  # an unknown name fails before anything is loaded
    check_space(config)
    name, url = config.study_name, config.storage_url
    path = sqlite_path(url)  # also rejects a malformed URL before anything is loaded
    storage, seeded = None, False
    if path is None or path.exists():
        # Fail fast on an unreachable or foreign store; a new SQLite file waits until the model loads.
        storage = open_storage(url)
        if name in study_names(storage):
            study = optuna.load_study(study_name=name, storage=storage)
            config = adopt_stored(config, study)
            check_compatible(study, config)
            seeded = is_seeded(study)
            if seeded and completed(study) >= min(config.trials, _target(study, config)):
                recover_interrupted(study, requeue=False)  # done: only make sure nothing stays RUNNING
                if not needs_retiming(study):
                    log.info("study %r already has %d finished trials; nothing to run", name, completed(study))
                    return study
                log.info("study %r is finished; its front's latency is still to be timed side by side", name)

    loaded, evaluator, budget = prepare(config)
    config = replace(config, dtype=loaded.dtype)  # `auto` resolved: the study records what ran
    budget.check_removable()

    # Checked before any store change; a study seeded already needs no source any more.
    transfer = None
    if config.warm_start_from and not seeded:
        source_url = config.warm_start_storage or config.storage or default_storage(config.warm_start_from)
        transfer = seeds_from_study(source_url, config.warm_start_from, budget)
    storage = storage or open_storage(url)
    cached = with_store(evaluator, storage, loaded.fingerprint, config.dtype)
    fingerprints = {"model_fingerprint": loaded.fingerprint, "data_fingerprint": evaluator.splits.fingerprint()}
    # One worker creates and seeds the study; others wait here, then join the seeded study.
    with exclusive(url, f"study:{name}"):
        study = optuna.create_study(
            study_name=name, storage=storage, directions=["minimize", "minimize"], load_if_exists=True
        )
        check_compatible(study, config)
        for key, stored in read_fingerprints(study).items():
            if stored is not None and stored != fingerprints[key]:
                what = "model weights" if key == "model_fingerprint" else "data windows"
                raise SearchError(f"study {name!r} was measured on other {what}; use another --study NAME")
        if is_seeded(study):
            baseline = read_baseline(study)
            assert baseline is not None  # seeding writes it before `seeded`
            known = {"calib": baseline.calib_ppl, "test": baseline.test_ppl, "eval": baseline.eval_ppl}
            cached.baseline({split: ppl for split, ppl in known.items() if ppl is not None})
            log.info("resuming study %r in %s (%d finished trials)", name, redact(url), completed(study))
        else:
            log.info("new study %r in %s", name, redact(url))
            seed_study(study, cached, budget, config, loaded.source, fingerprints, transfer)
        recover_interrupted(study, n_layers=budget.n_layers)
        _queue_whole_space(study, budget, config.trials)
        runs_before = count_run_started(study, worker_id())

    target = min(config.trials, _target(study, config))
    if target < config.trials:
        log.info("only %d feasible removal sets exist; the study stops there", target)
    if target > completed(study):
        # The first run of a study samples from --seed; each later run (a resume, another worker)
        # from its own offset, so it does not replay the proposals of the runs before it.
        study.sampler = SAMPLERS[config.sampler](budget, config.seed + RUN_SEED_STRIDE * runs_before)
        optimize(study, cached, budget, target, lambda: exclusive(url, f"claim:{name}", announce=False))
    if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # the last worker to finish
        with exclusive(url, f"retime:{name}"):
            retime_front(study, cached)  # the front's shapes that trials timed one at a time, side by side
    return study


def check_space(config: RunConfig) -> None:
    """What a sub-layer study cannot combine with yet, refused before anything is loaded."""
    if config.granularity not in space.GRANULARITIES:
        raise SearchError(f"--granularity {config.granularity!r}: choose one of {', '.join(space.GRANULARITIES)}")
    if config.granularity == "layer":
        return
    if not CRITERIA[config.criterion].blocks:
        raise SearchError(
            f"--criterion {config.criterion} ranks whole layers only; sub-layer studies need --criterion ppl"
        )
    if config.warm_start_from:
        raise SearchError("--warm-start-from maps whole-layer findings by depth; not with --granularity sublayer")


def prepare(config: RunConfig) -> tuple[LoadedModel, Evaluator, Budget]:
    """Model, windows and parameter accounting: everything an evaluation needs, no store yet."""
    loaded = load_model(config.model, config.dtype, config.device, config.trust_remote_code, config.device_map)
    model = configure(loaded.model, compile=config.compile)
    check_window(model.config, config.seq_len, bos_to_prepend(loaded.tokenizer) is not None, config.latency_tokens)
    check_healable(model, config.heal, blocks=config.granularity == "sublayer")
    splits = make_splits(
        loaded.tokenizer,
        config.dataset,
        config.calib_tokens,
        config.test_tokens,
        config.seq_len,
        config.fit_tokens,
        config.data_seed,
        config.confirmation_tokens,
    )
    if config.eval_dataset:
        if config.eval_dataset == config.dataset:
            raise SearchError("--eval-dataset is the --dataset corpus; pass text from another domain")
        second = eval_windows(loaded.tokenizer, config.eval_dataset, config.eval_tokens, config.seq_len)
        splits = replace(splits, eval=second)
    blocks = block_param_counts(model) if config.granularity == "sublayer" else None
    budget = Budget(config.budget, total_param_count(model), layer_param_counts(model), blocks)
    evaluator = Evaluator(
        model,
        splits,
        latency_input(splits.calib, config.latency_tokens, cast(torch.device, model.device)),
        batch_size=config.batch_size,
        latency_repeats=config.latency_repeats,
        layer_kinds=layer_kinds(model),
        block_kinds=block_kinds(model) if blocks is not None else None,
        max_ppl_ratio=config.max_ppl_ratio,
        heal=config.heal,
        sequential=config.heal_fit == "sequential",
        sensitivity_tokens=config.sensitivity_tokens,
        fitness=config.objective_fitness,
        confirm_margin=config.confirmation_margin,
    )
    return loaded, evaluator, budget


def _target(study: optuna.Study, config: RunConfig) -> int:
    return feasible_sets(study) or config.trials


def _queue_whole_space(study: optuna.Study, budget: Budget, trials: int) -> None:
    """When every feasible set fits in `trials`, queue the ones not tried yet (after the seeds)."""
    everything = budget.enumerate_feasible(limit=trials)
    if everything is None:
        return
    present = tried_sets(study.get_trials(deepcopy=False))
    for removed in everything:
        if removed not in present:
            enqueue(study, space.encode(removed, budget.n_layers, budget.granularity), "exhaustive")
    set_feasible_sets(study, len(everything))
