"""Take a pruned model home: write a directory `transformers` loads, then prove it is the trial's model.

A whole-layer point is plain safetensors plus a config whose layer count and per-layer lists match
the kept layers, so `AutoModelForCausalLM.from_pretrained(DIR)` needs no custom code. A point that
removes single attention or MLP blocks is written in the sub-layer format
(search/model/sublayer_export.py): the kept weights only, and a small modeling file that
`from_pretrained(DIR, trust_remote_code=True)` runs, computing nothing for a removed block. After
writing, the directory is reloaded the way a user would into a fresh model object and checked:
held-out perplexity against the trial's reported figure (in the study's numerics), float32 logits
of greedy generation with the KV cache against a recompute without it, and the parameter count
against the study's.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch

from evaluators.healing import DEFAULT_RIDGE, collect_fit_stats, fold_permanently
from evaluators.perplexity import perplexity
from search.errors import SearchError, first_line
from search.front import front_report, ranked_ratio
from search.healing import HEALINGS, check_healable
from search.model.loading import load_model
from search.model.numerics import DTYPES, STOCK_KERNELS, apply_numerics
from search.model.placement import dispatch, parse_device_map
from search.model.removal import Removal
from search.model.sublayer_export import (
    check_sublayer_exportable,
    save_sublayer_model,
    skipped_blocks,
    sublayer_marker,
)
from search.model.surgery import (
    KV_CACHE_TOLERANCE,
    kv_cache_divergence,
    remove_layers,
    skip_blocks,
    total_param_count,
)
from search.records import (
    StudyRecord,
    TrialRecord,
    calib_ppl_ratio,
    find_trial,
    latency_ratio,
    measured_record,
    read_retiming,
)
from search.registry import Registry

PPL_TOLERANCE = 0.01

# --pick: a rule that chooses one point of the front (the front's JSON points).
Pick = Callable[[list[dict]], dict]
PICKS: Registry[Pick] = Registry("pick")


@PICKS.register("knee", "the best balance of quality and speed")
def _knee(front: list[dict]) -> dict:
    """The point closest to the ideal corner after scaling both objectives to [0, 1] over the front
    (L1 distance)."""

    def scaled(value, point: dict) -> float:
        low, high = min(value(p) for p in front), max(value(p) for p in front)
        return 0.0 if high == low else (value(point) - low) / (high - low)

    def latency(p: dict) -> float:
        return p["latency_ratio"]

    return min(front, key=lambda p: (scaled(ranked_ratio, p) + scaled(latency, p), ranked_ratio(p)))


PICKS.add(
    "best-ppl",
    lambda front: min(front, key=ranked_ratio),
    "lowest calibration perplexity ratio (the confirmed one where the study confirms)",
)
PICKS.add("fastest", lambda front: min(front, key=lambda p: p["latency_ratio"]), "lowest latency ratio")


def pick_trial(study: optuna.Study, pick: str) -> int:
    """The trial number of the front point `pick` chooses."""
    rule = PICKS[pick]
    return rule(front_report(study)["front"])["trial"]


@dataclass
class ExportReport:
    out: str
    trial: int
    removed_layers: list[int]
    layers: int
    expected_test_ppl: float | None  # the trial's test_ppl_ratio x the baseline's held-out ppl
    measured_test_ppl: float
    ppl_rel_diff: float | None
    kv_cache_match: bool  # float32 logits with and without the KV cache within KV_CACHE_TOLERANCE
    kv_cache_max_rel_diff: float | None  # largest logit gap over the largest logit (None: cached generation failed)
    kv_cache_error: str | None = None
    params: int | None = None  # the reloaded model's parameters (tied tensors once)
    expected_params: int | None = None  # the study's: baseline minus params_reduction (None: never recorded)
    removed_attention: list[int] = field(default_factory=list)  # lone blocks, original layer indices
    removed_mlp: list[int] = field(default_factory=list)
    trust_remote_code: bool = False  # a sub-layer export: it loads with its modeling file

    @property
    def params_match(self) -> bool:
        return self.expected_params is None or self.params == self.expected_params

    @property
    def ok(self) -> bool:
        ppl_ok = self.ppl_rel_diff is None or self.ppl_rel_diff <= PPL_TOLERANCE
        return ppl_ok and self.kv_cache_match and self.params_match

    @property
    def kv_cache_verdict(self) -> str:
        if self.kv_cache_error:
            return f"FAILED: cached generation raised {self.kv_cache_error}"
        verdict = "agree" if self.kv_cache_match else "DIFFER"
        return (
            f"{verdict} (max gap {self.kv_cache_max_rel_diff:.1e} of the largest logit, limit {KV_CACHE_TOLERANCE:.0e})"
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def finished_trial(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    trial = find_trial(study, number)
    if trial.state != optuna.trial.TrialState.COMPLETE:
        raise SearchError(f"trial {number} is {trial.state.name}, not finished; pick a finished trial")
    return trial


@dataclass
class Pruned:
    """One trial's model with its layers removed and the study's healing folded in, ready to write."""

    model: Any
    tokenizer: Any
    trial: optuna.trial.FrozenTrial
    record: StudyRecord
    removal: Removal  # everything the trial removes, whole layers and lone blocks
    healing: dict | None  # what pruning.json says of the linear healing (None: unhealed)


def check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SearchError(f"--out {out} exists and is not empty; choose a new directory")


def prune_trial(
    study: optuna.Study,
    number: int,
    out: Path | None = None,
    device: str = "cpu",
    trust_remote_code: bool = False,
    device_map: str | None = None,
) -> Pruned:
    """Reload the study's model in float32, fold its healing as the study fitted it, remove the layers
    and skip the point's lone attention and MLP blocks for good, as the study measured them (what
    `write_model` writes in the sub-layer format). `out`: where it will be written, checked before the
    work (None: kept in memory). `device_map`: spread over several devices, as `run --device-map`."""
    trial = finished_trial(study, number)
    record, measured = StudyRecord.read(study), TrialRecord.of(trial)
    n_layers, removed = record.baseline.layers, list(measured.removed_layers)
    kept = [i for i in range(n_layers) if i not in set(removed)]
    lone = measured.removal.remap({old: new for new, old in enumerate(kept)})  # its blocks on the pruned stack
    if out is not None:
        check_out(Path(out))
    loaded = load_model(record.model_spec, "float32", device, trust_remote_code, device_map)
    if record.model_fingerprint not in ("", loaded.fingerprint):
        raise SearchError("the model found now differs from the one this study measured (fingerprint mismatch)")
    model = loaded.model
    if (
        getattr(model.config, "scale_attn_by_inverse_layer_idx", False)
        and removed
        and min(removed) < max(i for i in range(n_layers) if i not in removed)
    ):
        raise SearchError(
            "this GPT-2 config scales attention by layer index; a pruned copy would not reload identically"
        )
    healing = _heal(model, loaded.tokenizer, record, measured.removal)
    remove_layers(model, removed)
    skip_blocks(model, lone.attention, lone.mlp)
    if lone:  # refused here, before anything is written
        check_sublayer_exportable(model, skipped_blocks(model))
    return Pruned(model, loaded.tokenizer, trial, record, measured.removal, healing)


def pruning_record(study: optuna.Study, pruned: Pruned) -> dict:
    """pruning.json: where the model came from, which layers went, what the study measured."""
    record, trial, retiming = pruned.record, pruned.trial, read_retiming(study)
    measured = measured_record(trial, retiming)
    n_layers = record.baseline.layers
    return {
        "source_model": record.model_source,
        "model_fingerprint": record.model_fingerprint or None,
        "study": study.study_name,
        "trial": trial.number,
        "removed_layers": list(pruned.removal.layers),
        **{key: value for key, value in pruned.removal.json().items() if key != "removed_layers" and value},
        "layers_before": n_layers,
        "layers_after": n_layers - len(pruned.removal.layers),
        "params_reduction": measured.params_reduction,
        "ppl_ratio": calib_ppl_ratio(trial),
        "latency_ratio": latency_ratio(trial, retiming),
        "test_ppl_ratio": measured.test_ppl_ratio,
        "healing": pruned.healing,
        "settings": asdict(record.settings),
    }


def export_trial(
    study: optuna.Study,
    number: int,
    out: Path,
    device: str = "cpu",
    trust_remote_code: bool = False,
    device_map: str | None = None,
) -> ExportReport:
    pruned = prune_trial(study, number, out, device, trust_remote_code, device_map)
    write_model(pruned.model, pruned.tokenizer, Path(out), pruning_record(study, pruned))
    trial, expected = pruned.trial, expected_test_ppl(study, pruned.record, pruned.trial)
    del pruned
    return verify(Path(out), study, trial, device, expected, device_map=device_map)


def _heal(model, tokenizer, record: StudyRecord, removal: Removal) -> dict | None:
    """Fold the study's healing into the weights, fitted as the study fitted it (its fitting windows)."""
    settings = record.settings
    fit = HEALINGS[settings.heal]
    if fit is None or not removal:
        return None
    blocks = not removal.whole_layers_only
    check_healable(model, settings.heal, blocks)
    splits = record.splits(tokenizer, settings.heal_tokens or 0)
    if splits.fit is None:
        raise SearchError("the study recorded no healing windows; cannot refit the healing")
    # Mixed numerics (bf16-mixed) fit under the study's autocast; a study with half-precision weights is
    # refitted on the float32 weights that are saved (its verification tolerance covers the difference).
    apply_numerics(model, settings.dtype)
    sequential = settings.heal_fit != "parallel"
    # As the study fitted: the fitting states, each run's sums taken from them when first needed.
    stats = collect_fit_stats(model, splits.fit, splits.bos_id, 4, set(), True, blocks)
    try:
        healing = fit(model, stats, removal, DEFAULT_RIDGE, sequential)
    finally:
        stats.close()
    fold_permanently(model, healing)
    return {
        "method": settings.heal,
        "fitting_tokens": int(splits.fit.numel()),
        "fitting_windows": "after the held-out windows in the corpus (never the held-out ones)",
        "ridge": DEFAULT_RIDGE,
        "fit": settings.heal_fit or "sequential",
        "folded_into": healing.folded_into(),
        "unhealed_runs": [list(run) for run in healing.unhealed],
    }


def write_model(model, tokenizer, out: Path, record: dict) -> None:
    """Safetensors, config, tokenizer and pruning.json, moved into place whole (or not at all).
    A model that skips single blocks is written in the sub-layer format, with its modeling file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        if skipped_blocks(model):
            save_sublayer_model(model, staging)
            record = {**record, "trust_remote_code": True}  # its modeling_sublayer.py builds the kept blocks only
        else:
            model.save_pretrained(staging)  # safetensors
        tokenizer.save_pretrained(staging)
        (staging / "pruning.json").write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty, checked above
        staging.rename(out)  # all or nothing: an interrupted export leaves no half directory
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def expected_test_ppl(study: optuna.Study, record: StudyRecord, trial: optuna.trial.FrozenTrial) -> float | None:
    """The held-out perplexity the study reported for `trial` (None: never measured held-out)."""
    ratio = measured_record(trial, read_retiming(study)).test_ppl_ratio
    return None if ratio is None else ratio * record.baseline.test_ppl


def verify(
    out: Path,
    study: optuna.Study,
    trial: optuna.trial.FrozenTrial,
    device: str = "cpu",
    expected: float | None = None,
    dtype: str | None = None,
    device_map: str | None = None,
) -> ExportReport:
    """Reload `out` as a user would (stock transformers; a sub-layer export with `trust_remote_code`, so
    its own modeling file) and check it reproduces `expected` held-out perplexity (measured in `dtype`,
    default the study's), generates the same with and without the KV cache, and has the parameter
    count the study recorded for the trial.

    Two checks, each in the numerics it is about. The KV-cache check runs in float32, the dtype
    the exported files hold, so it tests the cache's wiring (layer renumbering, per-layer lists,
    the slots of layers without attention), not the rounding of a mixed-precision study. The
    perplexity check runs in the study's numerics, because it must reproduce the trial's held-out figure.
    `device_map`: the reloaded model is spread over these devices (search/model/placement.py) for both.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record, measured = StudyRecord.read(study), TrialRecord.of(trial)
    settings = record.settings
    dtype = dtype or settings.dtype
    how = load_kwargs(Path(out))
    tokenizer = AutoTokenizer.from_pretrained(out, **how)
    splits = record.splits(tokenizer)

    devices = parse_device_map(device_map) if device_map is not None else None
    if devices is not None:
        device = devices[0]  # where the inputs go; the hooks move them on

    def placed(model: Any) -> Any:
        return model.to(device).eval() if devices is None else dispatch(model.eval(), devices)

    model: Any = placed(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **how, **STOCK_KERNELS))
    params = total_param_count(model)
    divergence: float | None
    kv_error = None
    try:
        divergence = _kv_cache_check(model, splits.test[:2, :16].to(device), _pad_id(tokenizer))
    except Exception as exc:  # a cache wired to the wrong layers can fail outright (e.g. an index past its end)
        divergence, kv_error = None, f"{type(exc).__name__}: {first_line(exc)}"

    if DTYPES[dtype] != torch.float32:  # half-precision weights: load them as the study did
        model = placed(AutoModelForCausalLM.from_pretrained(out, dtype=DTYPES[dtype], **how, **STOCK_KERNELS))
    apply_numerics(model, dtype)  # the held-out figure was measured with these numerics
    reloaded = perplexity(model, splits.test, splits.bos_id)
    return ExportReport(
        out=str(out),
        trial=trial.number,
        removed_layers=list(measured.removed_layers),
        layers=model.config.num_hidden_layers,
        expected_test_ppl=expected,
        measured_test_ppl=reloaded,
        ppl_rel_diff=None if expected is None else abs(reloaded - expected) / expected,
        kv_cache_match=divergence is not None and divergence <= KV_CACHE_TOLERANCE,
        kv_cache_max_rel_diff=divergence,
        kv_cache_error=kv_error,
        params=params,
        expected_params=expected_params(record, trial),
        removed_attention=list(measured.removed_attention),
        removed_mlp=list(measured.removed_mlp),
        trust_remote_code=how["trust_remote_code"],
    )


def load_kwargs(out: Path) -> dict[str, bool]:
    """What `from_pretrained` needs to load an exported directory as a user would: `trust_remote_code`
    for a sub-layer export (its tokenizer too, which reads config.json and would otherwise prompt)."""
    return {"trust_remote_code": sublayer_marker(out) is not None}


def expected_params(record: StudyRecord, trial: optuna.trial.FrozenTrial) -> int | None:
    """The parameter count the study gives `trial`'s model (None: no params_reduction recorded)."""
    reduction = TrialRecord.of(trial).params_reduction
    return None if reduction is None else record.baseline.params - round(reduction * record.baseline.params)


def _kv_cache_check(model, windows: torch.Tensor, pad_id: int) -> float:
    """The larger kv_cache_divergence of one unpadded prompt and of a batch whose second row is left-padded:
    only a padded batch builds a real mask, sized from particular cache slots (those of layers without
    attention included), where SDPA skips it for an unpadded one."""
    divergence = kv_cache_divergence(model, windows[:1], pad_token_id=pad_id)
    if len(windows) < 2:
        return divergence
    padded, mask = windows.clone(), torch.ones_like(windows)
    padded[1, :4], mask[1, :4] = pad_id, 0
    return max(divergence, kv_cache_divergence(model, padded, pad_token_id=pad_id, attention_mask=mask))


def _pad_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(token_id, int):
            return token_id
    return 0
