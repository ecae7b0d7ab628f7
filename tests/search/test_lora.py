import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import evaluators.lora
import search.lora
from evaluators.data import make_splits
from evaluators.lora import LoraSettings
from search.cli import main
from search.errors import SearchError
from search.lora import heal_trial
from search.records import COMPLETE
from tests.search.test_study import tiny_config

FAST = LoraSettings(steps=3, rank=4, alpha=8, lr=1e-3)


def _deepest_measured(study):
    measured = [t for t in study.get_trials(states=COMPLETE) if "test_ppl_ratio" in t.user_attrs]
    return max(measured, key=lambda t: len(t.user_attrs["removed_layers"]))


@pytest.fixture
def windows_seen(monkeypatch):
    """Every window batch LoRA trains on (the real fine-tuning runs; this only records its input)."""
    seen: list[torch.Tensor] = []
    real = evaluators.lora.finetune_lora

    def recording(model, windows, *args, **kwargs):
        seen.append(windows.clone())
        return real(model, windows, *args, **kwargs)

    monkeypatch.setattr(search.lora, "finetune_lora", recording)
    return seen


@pytest.mark.parametrize("dtype", ["float32", "bf16-mixed"])
def test_heal_exports_a_verified_model_and_reports_both_references(
    tmp_path, tiny_model_dir, tiny_gpt2_dir, corpus, dtype, windows_seen
):
    for model_dir, heal in ((tiny_model_dir, "linear"), (tiny_gpt2_dir, "none")):
        where = tmp_path / model_dir.name
        config = tiny_config(where, model_dir, corpus, trials=6, dtype=dtype, heal=heal, heal_tokens=512)
        from search.study import run

        study = run(config)
        trial = _deepest_measured(study)
        windows_seen.clear()
        report = heal_trial(study, trial.number, where / "out", FAST, tokens=512)
        assert report.export.ok and report.export.kv_cache_match
        assert report.export.ppl_rel_diff is not None and report.export.ppl_rel_diff <= 0.01
        # Before LoRA, the model is the trial's own: its held-out figure is the study's.
        expected = trial.user_attrs["test_ppl_ratio"]
        assert report.ratios()["test_ppl_ratio_before"] == pytest.approx(expected, rel=1e-3)
        assert report.reference is not None and report.after.test_ppl != report.before.test_ppl
        assert report.ratios()["test_ppl_ratio_vs_reference"] == report.after.test_ppl / report.reference.test_ppl

        # Fitted on the fitting windows only (both fine-tunings), never on calibration or held-out ones.
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        splits = make_splits(tokenizer, str(corpus), config.calib_tokens, config.test_tokens, config.seq_len, 512)
        assert len(windows_seen) == 2 and all(torch.equal(w, splits.fit) for w in windows_seen)
        rows = {tuple(r.tolist()) for r in torch.cat([splits.test, splits.calib])}
        assert not rows & {tuple(r.tolist()) for r in windows_seen[0]}

        exported = AutoModelForCausalLM.from_pretrained(where / "out")
        assert exported.config.num_hidden_layers == 6 - len(trial.user_attrs["removed_layers"])
        record = json.loads((where / "out" / "pruning.json").read_text())
        assert record["lora"]["rank"] == 4 and record["lora"]["steps"] == 3
        assert record["lora"]["measured"]["after"]["test_ppl"] == report.after.test_ppl
        assert (record["healing"] is not None) == (heal == "linear")


def test_heal_command(tmp_path, tiny_model_dir, corpus, capsys):
    from search.study import run

    study = run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=6))
    trial = _deepest_measured(study)
    flags = [
        "--storage",
        f"sqlite:///{tmp_path / 'store.db'}",
        "--study",
        "tiny",
        "--steps",
        "2",
        "--rank",
        "2",
        "--tokens",
        "512",
    ]
    code = main(["heal", "--trial", str(trial.number), "--out", str(tmp_path / "out"), "--no-reference", *flags])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "pruned, after LoRA" in out and "fine-tuned the same way" not in out

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    code = main(["heal", "--trial", str(trial.number), "--out", str(tmp_path / "full"), *flags])
    assert code == 2 and "not empty" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"

    code = main(["heal", "--pick", "knee", "--out", str(tmp_path / "j"), "--no-reference", "--format", "json", *flags])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["ok"] and report["reference"] is None and "test_ppl_ratio" in report
    assert (report["lora"]["steps"], report["lora"]["rank"], report["fitting_tokens"]) == (2, 2, 512)


def test_heal_refuses_the_study_corpus_as_second_corpus(tmp_path, tiny_model_dir, corpus):
    from search.study import run

    study = run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=6))
    with pytest.raises(SearchError, match="another domain"):
        heal_trial(study, _deepest_measured(study).number, tmp_path / "out", FAST, eval_dataset=str(corpus))


def test_heal_refuses_a_missing_trial_before_any_work(tmp_path, tiny_model_dir, corpus, windows_seen):
    from search.study import run

    study = run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=6))
    with pytest.raises(SearchError, match="no trial 999"):
        heal_trial(study, 999, tmp_path / "out", FAST)
    assert not windows_seen and not (tmp_path / "out").exists()


def test_heal_of_a_sublayer_point_writes_a_verified_sublayer_export(tmp_path, tiny_model_dir, corpus):
    """LoRA adapts the kept blocks only (a skipped block has no projection to adapt) and the merged model
    is written in the sub-layer format, reloaded with its modeling file and verified."""
    from search.model.removal import Removal
    from search.records import TrialRecord
    from search.study import run

    study = run(tiny_config(tmp_path, tiny_model_dir, corpus, granularity="sublayer", budget=0.25, trials=8))
    blocky = [t for t in study.get_trials(states=COMPLETE) if not TrialRecord.of(t).removal.whole_layers_only]
    trial = max(blocky, key=lambda t: ("test_ppl_ratio" in t.user_attrs, len(TrialRecord.of(t).removal.blocks())))
    removal = TrialRecord.of(trial).removal
    report = heal_trial(study, trial.number, tmp_path / "out", FAST, tokens=512, reference=False)
    assert report.export.ok and report.export.trust_remote_code and report.export.kv_cache_match
    assert report.export.params == report.export.expected_params
    assert Removal.of(report.removed_layers, report.removed_attention, report.removed_mlp) == removal
    if "test_ppl_ratio" in trial.user_attrs:  # before LoRA the model is the trial's own
        assert report.ratios()["test_ppl_ratio_before"] == pytest.approx(trial.user_attrs["test_ppl_ratio"], rel=1e-3)
    assert report.after.test_ppl != report.before.test_ppl
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert len(exported.config.removed_attention) == len(removal.attention)  # on the exported stack's indices
    record = json.loads((tmp_path / "out" / "pruning.json").read_text())
    assert record["trust_remote_code"] and record["lora"]["measured"]["after"]["test_ppl"] == report.after.test_ppl
