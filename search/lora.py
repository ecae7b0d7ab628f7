"""The `heal` command: LoRA-heal one trial's pruned model, export it, and say what the healing bought.

The trial's model is built as `export` builds it (layers removed, the study's linear healing
folded in), fine-tuned with LoRA on fitting windows (evaluators/lora.py: taken from the corpus
after the held-out windows, never from them), merged, written as a stock `transformers` directory
and verified like an export. Held-out perplexity, and the second corpus's if there is one, is
measured before and after.

Two ratios are reported, because fine-tuning on the corpus adapts any model to it: against the
unpruned model as it is (what the study's ratios are against), and against the unpruned model
fine-tuned the same way on the same windows (`reference`): what pruning still costs once both
models saw the same text.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch

from evaluators.accuracy import TaskResult, Tasks, run_tasks
from evaluators.data import Splits, eval_windows
from evaluators.lora import LoraRun, LoraSettings, finetune_lora
from evaluators.perplexity import perplexity
from search.accuracy import AccuracySettings, prepare_tasks, study_tasks
from search.errors import SearchError
from search.export import (
    ExportReport,
    check_out,
    finished_trial,
    prune_trial,
    pruning_record,
    verify,
    write_model,
)
from search.front import retained
from search.model.loading import load_model
from search.model.numerics import apply_numerics, mixed_precision
from search.model.removal import Removal
from search.records import StudyRecord, TrialRecord
from search.tables import table

log = logging.getLogger("search")
DEFAULT_TOKENS = 32768  # fitting tokens when the study itself did not heal (else the study's --heal-tokens)


@dataclass(frozen=True)
class Figures:
    """Perplexity of one model: held-out split, and the second corpus when there is one; accuracy with --tasks."""

    test_ppl: float
    eval_ppl: float | None = None
    accuracy: dict[str, TaskResult] = field(default_factory=dict)


@dataclass
class HealReport:
    out: str
    trial: int
    removed_layers: list[int]  # whole layers
    removed_attention: list[int]  # lone blocks (original indices), as in the front
    removed_mlp: list[int]
    dtype: str  # numerics of fine-tuning and of every figure below
    fitting_tokens: int
    lora: dict
    unpruned: Figures  # the unpruned model, not fine-tuned
    before: Figures  # the trial's model as exported (pruned, the study's healing folded), before LoRA
    after: Figures  # the same after LoRA, merged
    reference: Figures | None  # the unpruned model fine-tuned the same way (None: --no-reference)
    seconds: float
    export: ExportReport

    def ratios(self) -> dict[str, float | None]:
        def ratio(model: Figures | None, base: Figures | None, key: str) -> float | None:
            a, b = (getattr(x, key) if x else None for x in (model, base))
            return None if a is None or b is None else a / b

        out: dict[str, float | None] = {}
        for split in ("test", "eval"):
            out[f"{split}_ppl_ratio_before"] = ratio(self.before, self.unpruned, f"{split}_ppl")
            out[f"{split}_ppl_ratio"] = ratio(self.after, self.unpruned, f"{split}_ppl")
            out[f"{split}_ppl_ratio_vs_reference"] = ratio(self.after, self.reference, f"{split}_ppl")
            out[f"reference_{split}_ppl_ratio"] = ratio(self.reference, self.unpruned, f"{split}_ppl")
        return {k: v for k, v in out.items() if v is not None}

    def accuracy_retained(self) -> dict[str, dict[str, float]]:
        """Per task, each model's share of another's headline accuracy (the unpruned model's unless named)."""
        kept: dict[str, dict[str, float]] = {}
        for task, unpruned in self.unpruned.accuracy.items():
            shares = {
                "before": (self.before, unpruned),
                "after": (self.after, unpruned),
                "reference": (self.reference, unpruned),
                "after_vs_reference": (self.after, self.reference.accuracy.get(task) if self.reference else None),
            }
            kept[task] = {}
            for name, (model, base) in shares.items():
                result = model.accuracy.get(task) if isinstance(model, Figures) else None
                share = (
                    None
                    if result is None or base is None
                    else retained(result.value, base.value, result.higher_is_better)
                )
                if share is not None:
                    kept[task][name] = share
        return kept

    def to_dict(self) -> dict:
        report = asdict(self)
        report["export"] = self.export.to_dict()
        kept = {"accuracy_retained": self.accuracy_retained()} if self.unpruned.accuracy else {}
        return {**report, **self.ratios(), **kept, "ok": self.export.ok}


def heal_trial(
    study: optuna.Study,
    number: int,
    out: Path,
    settings: LoraSettings = LoraSettings(),
    tokens: int | None = None,
    eval_dataset: str | None = None,
    eval_tokens: int | None = None,
    reference: bool = True,
    device: str = "cpu",
    trust_remote_code: bool = False,
    accuracy: AccuracySettings = AccuracySettings(tasks=()),
) -> HealReport:
    """LoRA-heal trial `number`, write it to `out`, verify the directory, and measure what changed
    (perplexity, and with `accuracy.tasks` downstream accuracy, of all four models)."""
    started = time.perf_counter()
    out = Path(out)
    record = StudyRecord.read(study)
    stored = record.settings
    removal = TrialRecord.of(finished_trial(study, number)).removal  # a finished trial, before minutes of work
    tasks = list(dict.fromkeys(accuracy.tasks))
    manager, early = prepare_tasks(accuracy) if tasks else (None, None)
    eval_dataset = eval_dataset or stored.eval_dataset
    if eval_dataset and Path(eval_dataset).expanduser().exists():
        eval_dataset = str(Path(eval_dataset).expanduser().resolve())  # as the study stores its --dataset
    if eval_dataset and eval_dataset == stored.dataset:
        raise SearchError("--eval-dataset is the study's --dataset corpus; pass text from another domain")
    tokens = tokens or stored.heal_tokens or DEFAULT_TOKENS
    # float32 or the study's bf16-mixed; a study with half-precision weights is fine-tuned in float32
    dtype = stored.dtype if stored.dtype == "bf16-mixed" else "float32"

    check_out(out)
    loaded = load_model(record.model_spec, "float32", device, trust_remote_code)
    splits = record.splits(loaded.tokenizer, tokens)
    assert splits.fit is not None  # record.splits refuses a study whose windows give none
    second = (
        eval_windows(loaded.tokenizer, eval_dataset, eval_tokens or stored.eval_tokens or 8192, stored.seq_len)
        if eval_dataset
        else None
    )
    built = study_tasks(manager, tasks, loaded.tokenizer, record, early) if manager is not None else None
    scoring = _Scoring(built, accuracy, loaded.tokenizer, dtype)
    _numerics(loaded.model, dtype)
    unpruned = _measure(loaded.model, splits, second, scoring)
    tuned: Figures | None = None
    if reference:  # first, so the export below is written with every figure
        model, _ = finetune_lora(loaded.model, splits.fit, splits.bos_id, settings, desc="LoRA (unpruned reference)")
        tuned = _measure(model, splits, second, scoring)
        log.info("unpruned reference: held-out ppl %.3f after LoRA, %.3f before", tuned.test_ppl, unpruned.test_ppl)
        del model
    del loaded
    gc.collect()

    pruned = prune_trial(study, number, out, device, trust_remote_code)
    _numerics(pruned.model, dtype)
    before = _measure(pruned.model, splits, second, scoring)
    log.info("pruned model: held-out ppl %.3f before LoRA", before.test_ppl)
    model, run = finetune_lora(pruned.model, splits.fit, splits.bos_id, settings, desc="LoRA (pruned model)")
    after = _measure(model, splits, second, scoring)
    log.info("pruned model: held-out ppl %.3f after LoRA (%.0f s)", after.test_ppl, run.seconds)
    lora = _lora_record(settings, run, int(splits.fit.numel()))
    pruning = pruning_record(study, pruned)
    pruning["lora"] = {
        **lora,
        "dtype": dtype,
        "measured": {
            name: asdict(figures) if figures else None
            for name, figures in (("unpruned", unpruned), ("before", before), ("after", after), ("reference", tuned))
        },
    }
    write_model(model, pruned.tokenizer, out, pruning)
    trial = pruned.trial
    del model, pruned
    gc.collect()

    report = verify(out, study, trial, device, expected=after.test_ppl, dtype=dtype)
    return HealReport(
        out=str(out),
        trial=trial.number,
        **removal.json(),
        dtype=dtype,
        fitting_tokens=int(splits.fit.numel()),
        lora=lora,
        unpruned=unpruned,
        before=before,
        after=after,
        reference=tuned,
        seconds=time.perf_counter() - started,
        export=report,
    )


def _removal(report: HealReport) -> Removal:
    return Removal.of(report.removed_layers, report.removed_attention, report.removed_mlp)


@dataclass
class _Scoring:
    """The tasks (built once) each model is also scored on; none without --tasks."""

    tasks: Tasks | None
    settings: AccuracySettings
    tokenizer: Any
    numerics: str


def _measure(model: Any, splits: Splits, second: torch.Tensor | None, scoring: _Scoring) -> Figures:
    test = perplexity(model, splits.test, splits.bos_id)
    accuracy = {}
    if scoring.tasks is not None:
        s = scoring.settings
        accuracy = run_tasks(model, scoring.tokenizer, scoring.tasks, s.limit, s.batch_size, scoring.numerics)
    return Figures(test, None if second is None else perplexity(model, second, splits.bos_id), accuracy)


def _numerics(model: Any, dtype: str) -> None:
    if mixed_precision(model) is None:
        apply_numerics(model, dtype)


def _lora_record(settings: LoraSettings, run: LoraRun, fitting_tokens: int) -> dict:
    return {
        **asdict(settings),
        "target_modules": run.target_modules,
        "trainable_parameters": run.trainable_parameters,
        "fitting_tokens": fitting_tokens,
        "fitting_windows": "after the held-out windows in the corpus (never the held-out ones)",
        "seconds": run.seconds,
        "first_loss": run.losses[0] if run.losses else None,
        "last_loss": run.losses[-1] if run.losses else None,
    }


def format_heal(report: HealReport) -> str:
    """Held-out (and second-corpus) perplexity of each model, and the ratios that matter."""
    rows = [("unpruned", report.unpruned), ("pruned, before LoRA", report.before), ("pruned, after LoRA", report.after)]
    if report.reference:
        rows.append(("unpruned, after the same LoRA", report.reference))
    second = report.unpruned.eval_ppl is not None
    tasks = list(report.unpruned.accuracy)
    header = ["model", "held-out ppl"] + (["second-corpus ppl"] if second else [])
    header += [f"{t} {report.unpruned.accuracy[t].metric}" for t in tasks]
    cells = [
        [name, f"{f.test_ppl:.3f}"]
        + ([f"{f.eval_ppl:.3f}"] if second else [])
        + [f"{f.accuracy[t].value:.4f}" for t in tasks]
        for name, f in rows
    ]
    ratios = report.ratios()
    lines = [
        f"trial {report.trial}: removed {_removal(report).describe()}, LoRA rank {report.lora['rank']}, "
        f"{report.lora['steps']} steps on {report.fitting_tokens} fitting tokens, {report.dtype}, "
        f"{report.seconds:.0f} s in all",
        table(header, cells),
        f"held-out ratio to the unpruned model: {ratios['test_ppl_ratio_before']:.4f} before, "
        f"{ratios['test_ppl_ratio']:.4f} after LoRA",
    ]
    if "test_ppl_ratio_vs_reference" in ratios:
        lines.append(
            f"held-out ratio to the unpruned model fine-tuned the same way: {ratios['test_ppl_ratio_vs_reference']:.4f}"
            f" (the fine-tuning alone moved the unpruned model x{ratios['reference_test_ppl_ratio']:.4f})"
        )
    if "eval_ppl_ratio" in ratios:
        lines.append(
            f"second corpus: {ratios['eval_ppl_ratio_before']:.4f} before, {ratios['eval_ppl_ratio']:.4f} after"
            + (
                f", {ratios['eval_ppl_ratio_vs_reference']:.4f} vs the reference"
                if "eval_ppl_ratio_vs_reference" in ratios
                else ""
            )
        )
    for task, kept in report.accuracy_retained().items():
        shares = {name: f"{kept[name]:.1%}" if name in kept else "-" for name in ("before", "after")}
        lines.append(
            f"{task}: {shares['before']} of the unpruned model's before LoRA, {shares['after']} after"
            + (f", {kept['after_vs_reference']:.1%} of the reference's" if "after_vs_reference" in kept else "")
        )
    lines.append(
        f"wrote {report.out}: reloaded, held-out ppl {report.export.measured_test_ppl:.3f} "
        f"(diff {report.export.ppl_rel_diff:.2%}, limit 1%); KV cache {report.export.kv_cache_verdict}"
    )
    return "\n".join(lines)
