"""Everything a study stores about itself and its trials, as typed records.

Optuna keeps free-form user attributes; this module is the only place that names them, so a key
means one thing in the code, the CLI, the JSON and the database. Reading is lenient in one
direction: a store written by an older version (fields missing) reads with the defaults below,
so existing studies open, resume and export unchanged.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any

import optuna
from optuna.trial import TrialState

from evaluators.accuracy import TaskResult
from evaluators.data import Splits, make_splits
from evaluators.latency import PROTOCOL
from search.errors import SearchError
from search.model.removal import Removal

COMPLETE = (TrialState.COMPLETE,)


# --- study ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What must not change across resumes: it defines what the stored numbers mean."""

    model: str
    budget: float
    dataset: str | None
    calib_tokens: int
    test_tokens: int
    sensitivity_tokens: int
    seq_len: int
    dtype: str
    heal: str = "none"  # search/healing.py; a study written before healing existed measured unhealed models
    heal_tokens: int | None = None  # healing's fitting windows (None when unhealed)
    heal_fit: str | None = None  # "sequential" or "parallel" (None when unhealed)
    eval_dataset: str | None = None  # a second corpus every front point is also measured on
    eval_tokens: int | None = None
    granularity: str = "layer"  # search/space.py: whole layers, or attention and MLP blocks ("sublayer")
    data_seed: int = 0  # which calibration windows (evaluators/data.py); 0: the corpus's first, as before seeds
    fitness: str = "ppl"  # what trials minimise: the perplexity ratio, or "kl" (older stores: ppl)
    confirm_tokens: int = 0  # search/confirmation.py: 0, no confirmation (older stores)
    confirm_margin: float | None = None  # nats per token (None without confirmation)

    def differences(self, stored: Settings) -> list[str]:
        mine, theirs = asdict(self), asdict(stored)
        return [f"{k}: stored {theirs[k]!r}, now {v!r}" for k, v in mine.items() if theirs[k] != v]


@dataclass(frozen=True)
class Baseline:
    """The unpruned model, measured once when the study is seeded."""

    layers: int
    params: int
    calib_ppl: float
    test_ppl: float
    latency_ms: float
    eval_ppl: float | None = None  # on --eval-dataset, when the study has one


@dataclass(frozen=True)
class LatencyEntry:
    """One pruned shape's latency, timed against the unpruned model in the same run."""

    ratio: float
    ms: float
    baseline_ms: float
    measured_ms: float | None = None  # with an additive fit, ms above is the fit and these the raw figures
    measured_baseline_ms: float | None = None
    # How: "together" (every reachable shape in one round-robin, at seeding), "alone" (a trial's new
    # shape against the baseline only), "front" (search/retime.py). Older stores: None.
    timed: str | None = None

    def timed_alone(self, seeding_baseline_ms: float) -> bool:
        """Timed by a trial against the baseline only, not in the seeding table nor with the front
        (older entries: the seeding table's all carry the baseline figure the study recorded)."""
        if self.timed is not None:
            return self.timed == "alone"
        return self.baseline_ms != seeding_baseline_ms


@dataclass(frozen=True)
class Retiming:
    """The front's shapes timed again side by side at the end of a run (search/retime.py): each
    retimed set's latency ratio by its removal key, the timed rounds, how many finished trials the
    study had then, and held-out figures of sets that came onto a front only with the new figures
    (a trial measures held-out when it finishes on a front, and a finished trial cannot be changed),
    and the protocol it was timed with (evaluators/latency.py; stores retimed before pairing: "medians")."""

    rounds: int
    ratios: dict[str, float]
    trials: int = 0
    held_out: dict[str, dict[str, float]] = field(default_factory=dict)
    protocol: str = "medians"

    def ratio(self, trial: optuna.trial.FrozenTrial) -> float:
        """The trial's latency ratio: the retimed figure of its set, else what the trial recorded."""
        return self.ratios.get(removal_key(TrialRecord.of(trial).removal), trial.values[1])


@dataclass(frozen=True)
class GreedyStage:
    removed: Removal
    score: float

    def json(self) -> dict[str, Any]:
        attrs = {key: _json(value) for key, value in removal_attrs(self.removed).items() if value is not None}
        return {**attrs, "score": self.score}  # a whole-layer stage: {"removed_layers", "score"}, as before


@dataclass(frozen=True)
class StudyRecord:
    """What seeding writes once: the run's settings, the model and data it measured, the baseline."""

    settings: Settings
    model_source: str  # where the weights came from (hub id, path, or the embedded package)
    model_spec: str | None  # what `export` reloads: None is the embedded default; local paths absolute
    model_fingerprint: str
    data_fingerprint: str
    baseline: Baseline
    layer_params: list[int]
    sensitivity: dict[Removal, float]  # stage-1 scores (or a transferred profile), by layer or block
    criterion: str  # what greedy ranked layers by, or "transfer"
    greedy: list[GreedyStage]
    sensitivity_passes: int | None  # seeding cost in forward passes over --sensitivity-tokens (None: not recorded)
    warm_start_from: str | None = None

    def write(self, study: optuna.Study) -> None:
        attrs: dict[str, Any] = {
            "settings": asdict(self.settings),
            "model_source": self.model_source,
            "model_spec": self.model_spec,
            "model_fingerprint": self.model_fingerprint,
            "data_fingerprint": self.data_fingerprint,
            "baseline": asdict(self.baseline),
            "layer_params": list(self.layer_params),
            "sensitivity": {k.key: v for k, v in sorted(self.sensitivity.items())},
            "criterion": self.criterion,
            "greedy": [g.json() for g in self.greedy],
        }
        if self.sensitivity_passes is not None:
            attrs["sensitivity_passes"] = self.sensitivity_passes
        if self.warm_start_from:
            attrs["warm_start_from"] = self.warm_start_from
        for key, value in attrs.items():
            study.set_user_attr(key, value)

    def splits(self, tokenizer, fit_tokens: int = 0) -> Splits:
        """The study's windows rebuilt from its settings (with `fit_tokens` of fitting windows), checked
        against the fingerprint it recorded: what export, heal and evaluate measure on."""
        s = self.settings
        splits = make_splits(tokenizer, s.dataset, s.calib_tokens, s.test_tokens, s.seq_len, fit_tokens, s.data_seed)
        if self.data_fingerprint not in ("", splits.fingerprint()) or (fit_tokens and splits.fit is None):
            raise SearchError("the windows differ from the study's (dataset or tokenizer changed)")
        return splits

    @classmethod
    def read(cls, study: optuna.Study) -> StudyRecord:
        """The seeded study's record; one error line for a study this engine did not create."""
        attrs = study.user_attrs
        settings, baseline = read_settings(study), read_baseline(study)
        if settings is None or baseline is None:
            raise SearchError(f"study {study.study_name!r} was not created by this engine or was never seeded")
        return cls(
            settings=settings,
            model_source=attrs.get("model_source", settings.model),
            model_spec=attrs.get("model_spec"),
            model_fingerprint=attrs.get("model_fingerprint", ""),
            data_fingerprint=attrs.get("data_fingerprint", ""),
            baseline=baseline,
            layer_params=list(attrs.get("layer_params", [])),
            sensitivity={Removal.parse(k): v for k, v in attrs.get("sensitivity", {}).items()},
            criterion=attrs.get("criterion", "ppl"),
            # Stores written before the criterion was configurable called the score `ppl_ratio`.
            greedy=[
                GreedyStage(Removal.from_json(g), g.get("score", g.get("ppl_ratio"))) for g in attrs.get("greedy", [])
            ],
            sensitivity_passes=attrs.get("sensitivity_passes"),
            warm_start_from=attrs.get("warm_start_from"),
        )


def read_settings(study: optuna.Study) -> Settings | None:
    stored = study.user_attrs.get("settings")
    if stored is None:
        return None
    return Settings(
        **{f.name: stored.get(f.name, None if f.default is MISSING else f.default) for f in fields(Settings)}
    )


def read_baseline(study: optuna.Study) -> Baseline | None:
    stored = study.user_attrs.get("baseline")
    if stored is None:
        return None
    missing = [f.name for f in fields(Baseline) if f.name not in stored and f.default is MISSING]
    if missing:
        raise SearchError(f"study {study.study_name!r} has a baseline without {', '.join(missing)}: not this engine's")
    return Baseline(**{f.name: stored[f.name] for f in fields(Baseline) if f.name in stored})


def read_fingerprints(study: optuna.Study) -> dict[str, str | None]:
    return {key: study.user_attrs.get(key) for key in ("model_fingerprint", "data_fingerprint")}


def is_seeded(study: optuna.Study) -> bool:
    return bool(study.user_attrs.get("seeded"))


def mark_seeded(study: optuna.Study) -> None:
    """Written last by seeding: a crash before it redoes seeding on resume."""
    study.set_user_attr("seeded", True)


def feasible_sets(study: optuna.Study) -> int | None:
    """How many feasible removal sets exist, when there are few enough to queue them all."""
    return study.user_attrs.get("feasible_sets")


def set_feasible_sets(study: optuna.Study, count: int) -> None:
    study.set_user_attr("feasible_sets", count)


def runs_started(study: optuna.Study) -> int:
    """How many `run` processes have joined the study: what the sampler seed is offset by."""
    return int(study.user_attrs.get("runs_started", 0))


def joined_workers(study: optuna.Study) -> list[str] | None:
    """Every worker that joined the study, or None when a run too old to record it joined."""
    workers = list(study.user_attrs.get("workers", []))
    return workers if len(workers) == runs_started(study) else None


def count_run_started(study: optuna.Study, worker: str) -> int:
    """Record one more run (`worker`) joining; returns how many joined before it. Call under the study lock."""
    before = runs_started(study)
    study.set_user_attr("workers", [*study.user_attrs.get("workers", []), worker])
    study.set_user_attr("runs_started", before + 1)
    return before


def read_latency(study: optuna.Study, shape: str) -> LatencyEntry | None:
    stored = study.user_attrs.get(f"latency:{shape}")
    return None if stored is None else LatencyEntry(**stored)


def write_latency(study: optuna.Study, shape: str, entry: LatencyEntry) -> None:
    study.set_user_attr(f"latency:{shape}", {k: v for k, v in asdict(entry).items() if v is not None})


def read_retiming(study: optuna.Study) -> Retiming | None:
    stored = study.user_attrs.get("retimed_front")
    return None if stored is None else Retiming(**stored)


def write_retiming(study: optuna.Study, retiming: Retiming) -> None:
    study.set_user_attr("retimed_front", asdict(retiming))


def latency_ratio(trial: optuna.trial.FrozenTrial, retiming: Retiming | None) -> float:
    """A finished trial's latency ratio as the study last measured its set."""
    return trial.values[1] if retiming is None else retiming.ratio(trial)


def measured_record(trial: optuna.trial.FrozenTrial, retiming: Retiming | None) -> TrialRecord:
    """The trial's record, with the held-out figures a retiming measured for it where it had none."""
    record = TrialRecord.of(trial)
    found = retiming.held_out.get(removal_key(record.removal)) if retiming else None
    if not found:
        return record
    test, second = record.test_ppl_ratio, record.eval_ppl_ratio
    return replace(
        record,
        test_ppl_ratio=test if test is not None else found.get("test_ppl_ratio"),
        eval_ppl_ratio=second if second is not None else found.get("eval_ppl_ratio"),
    )


def needs_retiming(study: optuna.Study) -> bool:
    """Whether trials timed shapes alone since the last retiming (or it was interrupted): read from the
    store only, so a finished study decides without loading the model."""
    baseline = read_baseline(study)
    if baseline is None:
        return False
    alone = any(
        LatencyEntry(**value).timed_alone(baseline.latency_ms)
        for key, value in study.user_attrs.items()
        if key.startswith("latency:")
    )
    if not alone:
        return False
    retiming = read_retiming(study)
    if retiming is None or retiming.protocol != PROTOCOL:  # a retiming of before pairing is redone
        return True
    return retiming.trials < len(study.get_trials(deepcopy=False, states=COMPLETE))


# --- trials --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialRecord:
    """A trial's attributes; every field is optional because they are written as the trial runs."""

    worker: str | None = None  # written first: lets a restart prove the trial was interrupted
    proposed_by: str = "sampler"  # a seed's reason, "exhaustive", or the sampler
    removed_layers: tuple[int, ...] = ()  # whole layers
    removed_attention: tuple[int, ...] = ()  # attention blocks of layers that keep their MLP (sub-layer studies)
    removed_mlp: tuple[int, ...] = ()  # MLP blocks of layers that keep their attention
    layers: int | None = None  # layers kept
    params_reduction: float | None = None
    duplicate_of: int | None = None  # answered from an earlier trial of the same set
    rejected: str | None = None  # stopped part-way: why
    ppl_ratio_lower_bound: float | None = None
    windows_evaluated: int | None = None
    ppl_ratio: float | None = None  # calibration; the objective unless the study's fitness is KL
    kl: float | None = None  # --fitness kl: the objective, mean KL from the unpruned model on calibration tokens
    kl_lower_bound: float | None = None  # --fitness kl, rejected: what the windows seen proved
    # --confirm-tokens: the same on the calibration and confirmation windows together (the objective then)
    confirmed_ppl_ratio: float | None = None
    confirmed_kl: float | None = None
    confirm_s: float | None = None  # what confirming cost (included in eval_s)
    latency_ratio: float | None = None
    latency_ms: float | None = None
    kv_cache_ratio: float | None = None  # sub-layer studies: measured after a prefill of the latency input
    test_ppl_ratio: float | None = (
        None  # measured only for trials on a front (latency or parameters) when they finished
    )
    # With --heal: the ratios above are the healed model's; these are the same set unhealed (front trials).
    eval_ppl_ratio: float | None = None  # --eval-dataset: the second corpus (front trials)
    unhealed_ppl_ratio: float | None = None
    unhealed_test_ppl_ratio: float | None = None
    unhealed_eval_ppl_ratio: float | None = None
    unhealed_runs: tuple[tuple[int, int], ...] = ()  # removed runs healing could not reach (they start at layer 0)
    ppl_from: str | None = None  # "computed", or "store" (the evaluation cache)
    eval_s: float | None = None

    @classmethod
    def of(cls, trial: optuna.trial.FrozenTrial | optuna.Trial) -> TrialRecord:
        return cls.from_attrs(trial.user_attrs)

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> TrialRecord:
        known = {k: v for k, v in attrs.items() if k in _TRIAL_FIELDS}  # others: written by a newer version
        for key in ("removed_layers", "removed_attention", "removed_mlp"):
            if key in known:
                known[key] = tuple(known[key])
        if "unhealed_runs" in known:
            known["unhealed_runs"] = tuple(tuple(run) for run in known["unhealed_runs"])
        return cls(**known)

    @property
    def removal(self) -> Removal:
        return Removal.of(self.removed_layers, self.removed_attention, self.removed_mlp)

    def measurements(self) -> dict[str, Any]:
        """What a duplicate copies from its original: every measured field."""
        skip = ("worker", "proposed_by", "duplicate_of")
        measured = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        return {**measured, **removal_attrs(self.removal)}  # no empty block lists on whole-layer trials


_TRIAL_FIELDS = frozenset(f.name for f in fields(TrialRecord))


def calib_ppl_ratio(trial: optuna.trial.FrozenTrial) -> float | None:
    """A finished trial's calibration perplexity ratio: its objective, unless its study minimised KL."""
    recorded = TrialRecord.of(trial).ppl_ratio
    if recorded is not None:
        return recorded
    return trial.values[0] if trial.values else None


def calib_value(trial: optuna.trial.FrozenTrial, fitness: str) -> float:
    """A finished trial's fitness on the calibration tokens: its objective, unless its study confirms
    (then the objective is the confirmed figure, on more tokens)."""
    record = TrialRecord.of(trial)
    recorded = record.kl if fitness == "kl" else record.ppl_ratio
    return recorded if recorded is not None else trial.values[0]


def write_trial(trial: optuna.Trial, **values: Any) -> None:
    """Record trial attributes by their TrialRecord names (None values are left unwritten)."""
    for key, value in values.items():
        if key not in _TRIAL_FIELDS:
            raise KeyError(f"{key!r} is not a TrialRecord field")
        if value is not None:
            trial.set_user_attr(key, _json(value))


def removal_attrs(removal: Removal) -> dict[str, Any]:
    """A removal as trial attributes: `removed_layers` always, the block lists only when not empty, so
    a whole-layer study's trials read as they did before blocks could be removed."""
    return {
        "removed_layers": list(removal.layers),
        "removed_attention": removal.attention or None,
        "removed_mlp": removal.mlp or None,
    }


def _json(value: Any) -> Any:
    return [_json(v) for v in value] if isinstance(value, tuple) else value


def enqueue(study: optuna.Study, params: dict[str, bool], proposed_by: str) -> None:
    """Queue a decided set; the trial that runs it records who proposed it."""
    study.enqueue_trial(params, user_attrs={"proposed_by": proposed_by})


def proposer_known(trial: optuna.Trial) -> bool:
    """Whether the queue already named who proposed this trial (else the sampler did)."""
    return "proposed_by" in trial.user_attrs


def counts_towards_trials(trial: optuna.trial.FrozenTrial) -> bool:
    """Measured to the end, or rejected part-way by a proven bound: either way a forward pass ran."""
    return trial.state == TrialState.COMPLETE or (trial.state == TrialState.PRUNED and "rejected" in trial.user_attrs)


def completed(study: optuna.Study) -> int:
    """Trials that count towards --trials."""
    return sum(counts_towards_trials(t) for t in study.get_trials(deepcopy=False))


def find_trial(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    """The trial numbered `number`; one error line when there is none."""
    for trial in study.get_trials(deepcopy=False):
        if trial.number == number:
            return trial
    raise SearchError(f"study {study.study_name!r} has no trial {number} (it has {len(study.trials)} trials)")


# --- accuracy (the `evaluate` command) -----------------------------------------------------------
# Optuna freezes a finished trial's attributes, and accuracy is measured after the search, so each
# result is a study attribute keyed by task, --limit and removal set: one key per result, so two
# `evaluate` processes never overwrite each other's, and every trial of one set shares it.

AccuracyKey = tuple[str, str, int | None]  # (removal_key, task, limit)


def removal_key(removal: Removal) -> str:
    """The unpruned model's key is "baseline"; a pruned model's its `Removal.key`, e.g. "14,16,17,18"."""
    return removal.key or "baseline"


def read_accuracy(study: optuna.Study) -> dict[AccuracyKey, TaskResult]:
    """Every stored accuracy result, by (removal_key, task, limit)."""
    known = {f.name for f in fields(TaskResult)}
    results: dict[AccuracyKey, TaskResult] = {}
    for key, value in study.user_attrs.items():
        if not key.startswith("accuracy:") or not isinstance(value, dict):
            continue
        try:
            result = TaskResult(**{k: v for k, v in value.items() if k in known})
        except TypeError:  # a field this version requires is missing: not a result it can read
            continue
        removed = key.rsplit(":", 1)[1]
        results[(removed, result.task, result.limit)] = result
    return results


def write_accuracy(study: optuna.Study, removed: Removal, result: TaskResult) -> None:
    limit = "all" if result.limit is None else result.limit
    study.set_user_attr(f"accuracy:{result.task}:{limit}:{removal_key(removed)}", asdict(result))
