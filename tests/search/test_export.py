import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from search.errors import SearchError
from search.export import export_trial, pick_trial
from search.front import front_report
from search.model.architectures import architecture_of
from search.model.surgery import (
    KV_CACHE_TOLERANCE,
    _renumber,
    decoder_layers,
    layers_removed,
    removal_applied,
    total_param_count,
)
from search.records import COMPLETE, StudyRecord, TrialRecord
from tests.search.test_study import tiny_config


@pytest.fixture(params=["llama", "gpt2"])
def tiny_study(request, tmp_path, tiny_model_dir, tiny_gpt2_dir, corpus):
    from search.study import run

    model_dir = {"llama": tiny_model_dir, "gpt2": tiny_gpt2_dir}[request.param]
    return run(tiny_config(tmp_path, model_dir, corpus, trials=6)), model_dir


def test_export_reloads_with_stock_transformers(tiny_study, tmp_path):
    study, model_dir = tiny_study
    # The deepest cut among trials with a held-out figure (the export check compares against it).
    measured = [t for t in study.get_trials(states=COMPLETE) if "test_ppl_ratio" in t.user_attrs]
    trial = max(measured, key=lambda t: len(t.user_attrs["removed_layers"]))
    removed = trial.user_attrs["removed_layers"]
    report = export_trial(study, trial.number, tmp_path / "out")
    assert report.ok and report.kv_cache_match and report.ppl_rel_diff is not None and report.ppl_rel_diff <= 0.01

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    original = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert exported.config.num_hidden_layers == 6 - len(removed)
    types = getattr(original.config, "layer_types", None)
    if types:
        assert exported.config.layer_types == [t for i, t in enumerate(types) if i not in removed]
    ids = torch.randint(3, 90, (2, 20))
    with torch.no_grad(), layers_removed(original, removed):
        expected = original(input_ids=ids).logits
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, expected)
    record = json.loads((tmp_path / "out" / "pruning.json").read_text())
    assert record["removed_layers"] == removed and record["trial"] == trial.number
    assert record["study"] == study.study_name and record["layers_after"] == 6 - len(removed)
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "pruning.json",
    }
    assert not list((tmp_path / "out").glob("*.bin"))  # no pickles
    assert not (tmp_path / "out" / "modeling_sublayer.py").exists()  # stock: no custom code
    assert "auto_map" not in json.loads((tmp_path / "out" / "config.json").read_text())
    assert not report.trust_remote_code and report.params == report.expected_params == total_param_count(exported)


def test_pick_rules(tiny_study):
    study, _ = tiny_study
    front = front_report(study)["front"]
    by_trial = {p["trial"]: p for p in front}
    assert by_trial[pick_trial(study, "best-ppl")]["ppl_ratio"] == min(p["ppl_ratio"] for p in front)
    assert by_trial[pick_trial(study, "fastest")]["latency_ratio"] == min(p["latency_ratio"] for p in front)
    assert pick_trial(study, "knee") in by_trial


def test_export_refuses_to_overwrite_and_unfinished_trials(tiny_study, tmp_path):
    study, _ = tiny_study
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    number = study.get_trials(states=COMPLETE)[0].number
    with pytest.raises(SearchError, match="not empty"):
        export_trial(study, number, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(SearchError, match="no trial 999"):
        export_trial(study, 999, tmp_path / "new")


def test_written_directory_shrinks_per_layer_lists(tmp_path):
    """Qwen2 interleaves sliding and full attention: the saved `layer_types` must match the kept layers."""
    from search.export import write_model
    from search.model.surgery import remove_layers
    from tests.conftest import tiny_model, tiny_tokenizer

    model = tiny_model("qwen2")
    types = list(model.config.layer_types)
    ids = torch.randint(3, 90, (1, 12))
    remove_layers(model, [0, 3])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    write_model(model, tiny_tokenizer(), tmp_path / "q", {"removed_layers": [0, 3]})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    assert reloaded.config.num_hidden_layers == 4
    assert reloaded.config.layer_types == [t for i, t in enumerate(types) if i not in (0, 3)]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)
        cached = reloaded.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = reloaded.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


def _measured_trial(study):
    measured = [t for t in study.get_trials(states=COMPLETE) if "test_ppl_ratio" in t.user_attrs]
    return max(measured, key=lambda t: len(t.user_attrs["removed_layers"]))


def spy_on_kv_check_logits(monkeypatch) -> list[torch.dtype]:
    """The dtypes of the logits export's KV-cache check computes (bf16 ones would make it test rounding).

    Whether bf16 rounding actually flips a greedy token depends on the CPU (native bf16 units or
    emulation), so tests assert the cause, the numerics of the check, on every machine.
    """
    import search.export

    seen: list[torch.dtype] = []
    check = search.export.kv_cache_divergence

    def spy(model, *args, **kwargs):
        hook = model.get_output_embeddings().register_forward_hook(lambda m, i, out: seen.append(out.dtype))
        try:
            return check(model, *args, **kwargs)
        finally:
            hook.remove()

    monkeypatch.setattr(search.export, "kv_cache_divergence", spy)
    return seen


def test_export_of_a_bf16_mixed_study_verifies(tmp_path, tiny_model_dir, corpus, monkeypatch):
    """Perplexity is reproduced in the study's bf16-mixed numerics; the KV-cache check runs in float32."""
    from search.study import run

    study = run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=4, dtype="bf16-mixed"))
    seen = spy_on_kv_check_logits(monkeypatch)
    report = export_trial(study, _measured_trial(study).number, tmp_path / "out")
    assert report.ok and report.kv_cache_match and report.kv_cache_error is None
    assert report.kv_cache_max_rel_diff <= KV_CACHE_TOLERANCE and report.ppl_rel_diff <= 0.01
    assert seen and set(seen) == {torch.float32}


def test_verification_fails_when_the_reloaded_cache_is_wired_to_the_wrong_layers(
    tmp_path, tiny_model_dir, corpus, monkeypatch
):
    """A model whose attention layers keep the indices they had before removal must not pass."""
    import transformers

    from search.cli import main
    from search.study import run

    study = run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=4))
    trial = _measured_trial(study)
    removed = trial.user_attrs["removed_layers"]
    kept = [i for i in range(6) if i not in removed]
    load = transformers.AutoModelForCausalLM.from_pretrained

    def not_renumbered(*args, **kwargs):
        model = load(*args, **kwargs)
        for layer, original in zip(decoder_layers(model), kept):
            _renumber(layer, original, architecture_of(model).index_attrs)
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", not_renumbered)
    report = export_trial(study, trial.number, tmp_path / "out")
    assert not report.ok and not report.kv_cache_match
    storage = f"sqlite:///{tmp_path / 'store.db'}"
    code = main(
        [
            "export",
            "--study",
            "tiny",
            "--storage",
            storage,
            "--trial",
            str(trial.number),
            "--out",
            str(tmp_path / "again"),
        ]
    )
    assert code == 2


@pytest.mark.parametrize("dtype", ["float32", "bf16-mixed"])
def test_a_healed_study_exports_its_healed_weights(tmp_path, tiny_model_dir, tiny_gpt2_dir, corpus, dtype):
    from search.study import run

    for model_dir in (tiny_model_dir, tiny_gpt2_dir) if dtype == "float32" else (tiny_model_dir,):
        where = tmp_path / model_dir.name
        study = run(tiny_config(where, model_dir, corpus, trials=6, dtype=dtype, heal="linear", heal_tokens=512))
        measured = [t for t in study.get_trials(states=COMPLETE) if "test_ppl_ratio" in t.user_attrs]
        assert measured and not any("unhealed_test_ppl_ratio" in t.user_attrs for t in measured)  # healed only
        trial = max(measured, key=lambda t: (len(t.user_attrs["removed_layers"]), min(t.user_attrs["removed_layers"])))
        removed = trial.user_attrs["removed_layers"]
        report = export_trial(study, trial.number, where / "out")
        assert report.ok and report.ppl_rel_diff <= 0.01 and report.kv_cache_match, report
        record = json.loads((where / "out" / "pruning.json").read_text())
        assert record["healing"]["method"] == "linear" and record["settings"]["heal"] == "linear"
        healed_layers = [int(k) for k in record["healing"]["folded_into"]]
        assert healed_layers and all(layer + 1 in removed for layer in healed_layers)

        exported = AutoModelForCausalLM.from_pretrained(where / "out").eval()
        original = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        ids = torch.randint(3, 90, (2, 20))
        with torch.no_grad(), layers_removed(original, removed):
            unhealed = original(input_ids=ids).logits
        with torch.no_grad():  # the weights were healed (and report.ok: to the study's healed held-out figure)
            assert not torch.allclose(exported(input_ids=ids).logits, unhealed, atol=1e-4)


def test_a_sublayer_point_exports_with_its_modeling_file_and_verifies(tmp_path, tiny_model_dir, corpus, capsys):
    """Reloaded with trust_remote_code it is the study's in-memory model; `--model DIR` loads it without."""
    from evaluators.data import make_splits
    from evaluators.perplexity import perplexity
    from search.cli import main
    from search.model.loading import load_model
    from search.study import run

    study = run(tiny_config(tmp_path, tiny_model_dir, corpus, granularity="sublayer", budget=0.25, trials=10))
    blocky = [t for t in study.get_trials(states=COMPLETE) if not TrialRecord.of(t).removal.whole_layers_only]
    # A held-out figure to check against where one was stored (front points), else the most blocks.
    trial = max(blocky, key=lambda t: ("test_ppl_ratio" in t.user_attrs, len(TrialRecord.of(t).removal.blocks())))
    removal = TrialRecord.of(trial).removal
    storage = f"sqlite:///{tmp_path / 'store.db'}"
    out = tmp_path / "out"
    code = main(["export", "--study", "tiny", "--storage", storage, "--trial", str(trial.number), "--out", str(out)])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["ok"] and report["trust_remote_code"] and report["kv_cache_match"]
    assert report["params"] == report["expected_params"] is not None
    assert report["removed_attention"] == list(removal.attention) and report["removed_mlp"] == list(removal.mlp)
    if report["expected_test_ppl"] is not None:
        assert report["ppl_rel_diff"] <= 0.01

    exported = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(3, 90, (2, 20))
    settings = StudyRecord.read(study).settings
    splits = make_splits(load_model(str(tiny_model_dir)).tokenizer, settings.dataset, 256, 128, 32)
    with torch.no_grad(), removal_applied(original, removal):
        expected = original(input_ids=ids).logits
        in_memory_ppl = perplexity(original, splits.test, splits.bos_id)
        in_memory_params = total_param_count(original)
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, expected)
    assert report["measured_test_ppl"] == pytest.approx(in_memory_ppl, rel=1e-5)
    assert report["params"] == in_memory_params == total_param_count(exported)
    record = json.loads((out / "pruning.json").read_text())
    assert record["removed_layers"] == list(removal.layers) and record["trust_remote_code"] is True
    assert record.get("removed_attention", []) == list(removal.attention)
    assert record.get("removed_mlp", []) == list(removal.mlp)

    loaded = load_model(str(out))  # the engine's own path: no trust_remote_code, no code from the directory
    assert perplexity(loaded.model, splits.test, splits.bos_id) == pytest.approx(in_memory_ppl, rel=1e-5)
    assert total_param_count(loaded.model) == in_memory_params
