"""What a run is asked to do (`RunConfig`), and whether a stored study can be resumed with it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import optuna

from search.confirmation import DEFAULT_MARGIN, default_tokens
from search.errors import SearchError
from search.model.loading import model_name
from search.model.numerics import AUTO
from search.records import Settings, read_settings
from search.store import default_storage, default_study_name


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
    device_map: str | None = None  # spread the decoder stack over devices (search/model/placement.py)
    compile: bool = False  # torch.compile the decoder layers for perplexity passes (evaluators/forward.py)
    latency_tokens: int = 128
    latency_repeats: int = 30
    seed: int = 0  # the sampler's seed; each later run joining the study offsets it by one (records.runs_started)
    trust_remote_code: bool = False
    warm_start_from: str | None = None  # another study whose findings seed this one instead of greedy
    warm_start_storage: str | None = None  # where that study lives (default: this run's store)
    criterion: str = "ppl"  # what staged greedy seeding ranks layers by (search/seeding/criteria.py)
    sampler: str = "local"  # search/sampler.py: SAMPLERS
    max_ppl_ratio: float | None = None  # reject a candidate whose ratio exceeds this (on the windows seen so far)
    heal: str = "none"  # search/healing.py: HEALINGS; the objective is the healed model's ratio
    heal_tokens: int = 32768  # healing's fitting windows, after the held-out ones in the corpus
    heal_fit: str = "sequential"  # later runs fitted on the model healed so far, or "parallel": on the unpruned one
    eval_dataset: str | None = None  # a second corpus (another domain) every front point is also measured on
    eval_tokens: int = 8192
    granularity: str = "layer"  # search/space.py: remove whole layers, or attention and MLP blocks ("sublayer")
    data_seed: int = 0  # which windows form the calibration split (evaluators/data.py); held-out never moves
    # The objective on calibration: perplexity ratio, or "kl" (evaluators/divergence.py). None: the default
    # for a new study (kl when healing, ppl otherwise: objective_fitness), the stored value when resuming one.
    fitness: str | None = None
    # search/confirmation.py: near-front candidates ranked on this many calibration tokens (0: off). None: the
    # default for a new study (DEFAULT_FACTOR x calib_tokens), the stored value when resuming one.
    confirm_tokens: int | None = None
    confirm_margin: float | None = None  # nats per token to the best, to be confirmed; None: as confirm_tokens

    @property
    def confirmation_tokens(self) -> int:
        if self.confirm_tokens is not None:
            return self.confirm_tokens
        return default_tokens(max(1, self.calib_tokens // self.seq_len) * self.seq_len)  # whole windows

    @property
    def objective_fitness(self) -> str:
        """Healed candidates are ranked by KL: on them the calibration perplexity ratio orders sets against
        the held-out one, KL with it; unhealed, the two tie and ppl stays (docs/benchmarks.md, "The fitness")."""
        if self.fitness is not None:
            return self.fitness
        return "kl" if self.heal != "none" else "ppl"

    @property
    def confirmation_margin(self) -> float:
        return DEFAULT_MARGIN if self.confirm_margin is None else self.confirm_margin

    @property
    def fit_tokens(self) -> int:
        return self.heal_tokens if self.heal != "none" else 0

    @property
    def study_name(self) -> str:
        return self.study or default_study_name(model_name(self.model), self.budget, self.granularity)

    @property
    def storage_url(self) -> str:
        return self.storage or default_storage(self.study_name)

    def settings(self) -> Settings:
        """What must not change across resumes: it defines what the stored numbers mean."""
        dataset = _absolute(self.dataset)  # export reloads it from anywhere
        return Settings(
            model=model_name(self.model),
            budget=self.budget,
            dataset=dataset,
            calib_tokens=self.calib_tokens,
            test_tokens=self.test_tokens,
            sensitivity_tokens=self.sensitivity_tokens,
            seq_len=self.seq_len,
            dtype=self.dtype,
            heal=self.heal,
            heal_tokens=self.fit_tokens or None,
            heal_fit=self.heal_fit if self.heal != "none" else None,
            eval_dataset=_absolute(self.eval_dataset),
            eval_tokens=self.eval_tokens if self.eval_dataset else None,
            granularity=self.granularity,
            data_seed=self.data_seed,
            fitness=self.objective_fitness,
            confirm_tokens=self.confirmation_tokens,
            confirm_margin=self.confirmation_margin if self.confirmation_tokens else None,
        )

    def model_spec(self) -> str | None:
        """What `export` reloads: None is the embedded default; local paths are made absolute."""
        local = self.model is not None and Path(self.model).expanduser().exists()
        return str(Path(self.model).expanduser().resolve()) if local and self.model else self.model


def _absolute(spec: str | None) -> str | None:
    """A local path made absolute; a hub or packaged name as given."""
    return str(Path(spec).expanduser().resolve()) if spec and Path(spec).expanduser().exists() else spec


def check_compatible(study: optuna.Study, config: RunConfig) -> None:
    stored = read_settings(study)
    if stored is None:
        return
    diff = config.settings().differences(stored)
    if diff:
        raise SearchError(
            f"study {study.study_name!r} was created with other settings ({'; '.join(diff)}); "
            "use another --study NAME, or repeat the original flags to resume it"
        )


def adopt_stored(config: RunConfig, study: optuna.Study) -> RunConfig:
    """A resumed study keeps what a default resolved to when it was created: `--dtype auto` the dtype it
    was measured in, whatever this machine prefers; an unset --confirm-tokens its confirmation (none for
    a study older than confirmation) and an unset --fitness its fitness, whatever today's defaults."""
    stored = read_settings(study)
    if stored is None:
        return config
    if config.dtype == AUTO and stored.dtype:
        config = replace(config, dtype=stored.dtype)
    if config.confirm_tokens is None:
        config = replace(config, confirm_tokens=stored.confirm_tokens)
    if config.fitness is None:  # a store older than --fitness reads as ppl
        config = replace(config, fitness=stored.fitness)
    if config.confirm_margin is None and stored.confirm_margin is not None:
        config = replace(config, confirm_margin=stored.confirm_margin)
    return config
