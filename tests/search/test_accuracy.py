"""`evaluate` and `export --tasks` on tiny studies: the models measured, the store, the front, the errors."""

import json
import shutil

import pytest
from transformers import AutoTokenizer

import search.accuracy
from evaluators.data import make_splits
from search.cli import main
from search.front import front_report
from search.records import COMPLETE, read_accuracy
from search.study import run
from tests.conftest import tiny_model
from tests.search.test_study import tiny_config


@pytest.fixture
def evaluated(monkeypatch):
    """Every model the harness is given (layer count) and the tasks it ran (the real run goes ahead)."""
    calls: list[tuple[int, object]] = []
    real = search.accuracy.run_tasks

    def recording(model, tokenizer, tasks, *args, **kwargs):
        calls.append((model.config.num_hidden_layers, tasks))
        return real(model, tokenizer, tasks, *args, **kwargs)

    monkeypatch.setattr(search.accuracy, "run_tasks", recording)
    return calls


def _flags(tmp_path) -> list[str]:
    return ["--storage", f"sqlite:///{tmp_path / 'store.db'}", "--study", "tiny"]


def test_evaluate_front_stores_results_that_front_show_and_a_rerun_read(
    tmp_path, tiny_model_dir, corpus, capsys, evaluated
):
    config = tiny_config(tmp_path, tiny_model_dir, corpus)
    study = run(config)
    front = front_report(study)["front"]
    assert main(["evaluate", *_flags(tmp_path), "--limit", "8"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[3].startswith("baseline") and f"{len(front) + 1} result(s) measured now" in out

    # The baseline first, then each front point's pruned model; the documents are the held-out windows'.
    assert [layers for layers, _ in evaluated] == [6] + [p["layers"] for p in front]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    splits = make_splits(tokenizer, str(corpus), config.calib_tokens, config.test_tokens, config.seq_len)
    data = evaluated[0][1].configs["heldout_cloze"]["dataset_kwargs"]["data_files"]["test"]
    docs = [json.loads(line) for line in open(data)]
    assert docs == search.accuracy.OFFLINE_TASKS["heldout_cloze"].documents(tokenizer, splits)
    held_out = [tokenizer.decode(w.tolist()) for w in splits.test]
    assert all(any(d["text"] in text for text in held_out) for d in docs)

    report = json.loads(_front(tmp_path, capsys, "json"))
    base = report["baseline"]
    assert set(base["accuracy"]) == {"heldout_cloze"} and base["accuracy_stderr"]["heldout_cloze"] is not None
    assert report["accuracy_tasks"]["heldout_cloze"]["n"] == 8
    for point in report["front"]:
        value = point["accuracy"]["heldout_cloze"]
        assert 0.0 <= value <= 1.0
        kept = point["accuracy_retained"]["heldout_cloze"]
        assert kept == (value / base["accuracy"]["heldout_cloze"] if base["accuracy"]["heldout_cloze"] else None)
    csv_header = _front(tmp_path, capsys, "csv").splitlines()[0]
    assert csv_header.endswith("accuracy:heldout_cloze,accuracy_retained:heldout_cloze")
    assert "accuracy heldout_cloze (acc, n=8" in _front(tmp_path, capsys, "table")

    # A second call measures nothing: same tasks, sets and --limit are read from the store.
    evaluated.clear()
    assert main(["evaluate", *_flags(tmp_path), "--limit", "8", "--format", "json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert not evaluated and again["measured"] == 0 and again["reused"] == len(front) + 1
    assert again["baseline"]["accuracy"]["heldout_cloze"]["value"] == base["accuracy"]["heldout_cloze"]

    # Another --limit is another measurement, stored beside the first; `show` prints the trial's.
    assert main(["evaluate", *_flags(tmp_path), "--limit", "6", "--trial", str(front[0]["trial"])]) == 0
    assert [layers for layers, _ in evaluated] == [6, front[0]["layers"]]
    assert len(read_accuracy(study)) == len(front) + 1 + 2
    assert main(["show", *_flags(tmp_path), "--trial", str(front[0]["trial"])]) == 0
    assert "accuracy heldout_cloze  acc " in capsys.readouterr().out

    # Every document (--limit all) for one point: `front` keeps the limit all its points share,
    # `show` of that point uses the one over the most documents.
    assert main(["evaluate", *_flags(tmp_path), "--limit", "all", "--trial", str(front[0]["trial"])]) == 0
    capsys.readouterr()
    again = json.loads(_front(tmp_path, capsys, "json"))
    assert again["accuracy_tasks"]["heldout_cloze"]["limit"] == 8
    assert all("heldout_cloze" in point["accuracy"] for point in again["front"])
    assert main(["show", *_flags(tmp_path), "--trial", str(front[0]["trial"]), "--format", "json"]) == 0
    shown = json.loads(capsys.readouterr().out)["accuracy"]["heldout_cloze"]
    assert shown["n"] == len(docs) > 8
    assert main(["front", *_flags(tmp_path), "--plot", str(tmp_path / "front.png")]) == 0
    assert (tmp_path / "front.png").stat().st_size > 0


def _front(tmp_path, capsys, fmt: str) -> str:
    assert main(["front", *_flags(tmp_path), "--format", fmt]) == 0
    return capsys.readouterr().out


def test_export_tasks_of_a_healed_bf16_study_reproduce_evaluate(tmp_path, tiny_model_dir, corpus, capsys):
    study = run(tiny_config(tmp_path, tiny_model_dir, corpus, dtype="bf16-mixed", heal="linear", heal_tokens=512))
    point = max(front_report(study)["front"], key=lambda p: len(p["removed_layers"]))
    number = str(point["trial"])
    assert main(["evaluate", *_flags(tmp_path), "--trial", number, "--limit", "10", "--format", "json"]) == 0
    stored = json.loads(capsys.readouterr().out)["points"][0]["accuracy"]["heldout_cloze"]
    out = tmp_path / "exported"
    assert (
        main(
            [
                "export",
                *_flags(tmp_path),
                "--trial",
                number,
                "--out",
                str(out),
                "--tasks",
                "heldout_cloze",
                "--limit",
                "10",
            ]
        )
        == 0
    )
    pruning = json.loads((out / "pruning.json").read_text())
    exported = pruning["accuracy"]["heldout_cloze"]
    assert exported["numerics"] == "bf16-mixed" and exported["n"] == 10 and pruning["healing"] is not None
    # The directory is the evaluated model: the same documents scored the same, a near tie aside.
    assert abs(exported["value"] - stored["value"]) <= 1 / 10
    base = pruning["accuracy_baseline"]["heldout_cloze"]["value"]
    assert pruning["accuracy_retained"]["heldout_cloze"] == (exported["value"] / base if base else None)


def test_evaluate_refuses_before_loading_any_model(tmp_path, tiny_model_dir, corpus, capsys, monkeypatch):
    study = run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=4))
    capsys.readouterr()
    loads: list[object] = []
    monkeypatch.setattr(search.accuracy, "load_model", lambda *a, **k: loads.append(a))
    unfinished = [t.number for t in study.get_trials() if t.state not in COMPLETE]
    cases = [
        (["--trial", "999"], "has no trial 999"),
        (["--tasks", "heldout_clze"], "unknown task 'heldout_clze'; did you mean heldout_cloze"),
        (["--tasks", "arc_esy"], "did you mean arc_easy"),
        (["--tasks", "heldout_cloze,arc_easy"], "task arc_easy: its data cannot be loaded here"),  # offline
        *([(["--trial", str(unfinished[0])], "not finished")] if unfinished else []),
    ]
    for flags, message in cases:
        code = main(["evaluate", *_flags(tmp_path), *flags])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit) as exit:
        main(["evaluate", *_flags(tmp_path), "--limit", "0"])
    assert exit.value.code == 2 and "--limit: '0' must be greater than 0" in capsys.readouterr().err
    assert not loads and not read_accuracy(study)


def test_export_tasks_refuses_a_bad_name_before_exporting(tmp_path, tiny_model_dir, corpus, capsys):
    study = run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=4))
    point = front_report(study)["front"][0]
    capsys.readouterr()
    out = tmp_path / "exported"
    code = main(["export", *_flags(tmp_path), "--trial", str(point["trial"]), "--out", str(out), "--tasks", "arc_esy"])
    assert code == 2 and "did you mean arc_easy" in capsys.readouterr().err and not out.exists()


def test_evaluate_refuses_a_study_whose_model_changed(tmp_path, tiny_model_dir, corpus, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    study = run(tiny_config(tmp_path, model_dir, corpus, trials=4))
    tiny_model("llama", seed=1).save_pretrained(model_dir)  # other weights under the same path
    assert main(["evaluate", *_flags(tmp_path), "--limit", "4"]) == 2
    assert "measured another model" in capsys.readouterr().err and not read_accuracy(study)


def test_evaluate_stores_its_results_on_postgresql(postgres_url, tiny_model_dir, corpus, tmp_path, capsys):
    run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=4, study="pg-accuracy", storage=postgres_url))
    flags = ["--storage", postgres_url, "--study", "pg-accuracy"]
    assert main(["evaluate", *flags, "--limit", "4"]) == 0
    capsys.readouterr()
    assert main(["front", *flags, "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accuracy_tasks"]["heldout_cloze"]["limit"] == 4
    assert all("heldout_cloze" in point["accuracy_retained"] for point in report["front"])


def test_heal_tasks_score_all_four_models(tmp_path, tiny_model_dir, corpus, capsys, evaluated, monkeypatch):
    import search.lora

    monkeypatch.setattr(search.lora, "run_tasks", search.accuracy.run_tasks)  # the recording one
    study = run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=6))
    point = max(front_report(study)["front"], key=lambda p: len(p["removed_layers"]))
    capsys.readouterr()
    args = ["--trial", str(point["trial"]), "--out", str(tmp_path / "healed"), "--steps", "2", "--rank", "2"]
    args += ["--tokens", "512", "--tasks", "heldout_cloze", "--limit", "6"]
    assert main(["heal", *_flags(tmp_path), *args]) == 0
    out = capsys.readouterr().out
    # unpruned, the unpruned reference after LoRA, the pruned model before and after LoRA
    assert [layers for layers, _ in evaluated] == [6, 6, point["layers"], point["layers"]]
    assert "heldout_cloze acc" in out and "heldout_cloze: " in out  # a random model may score 0: shares "-"
    measured = json.loads((tmp_path / "healed" / "pruning.json").read_text())["lora"]["measured"]
    for name in ("unpruned", "before", "after", "reference"):
        result = measured[name]["accuracy"]["heldout_cloze"]
        assert result["n"] == 6 and result["numerics"] == "float32"
    values = {name: measured[name]["accuracy"]["heldout_cloze"]["value"] for name in measured}
    expected = f"{values['after'] / values['unpruned']:.1%} after" if values["unpruned"] else "- after"
    assert expected in out


def test_evaluate_measures_a_sublayer_point_with_its_blocks_skipped(
    tmp_path, tiny_model_dir, corpus, capsys, monkeypatch
):
    from search.model.sublayer_export import skipped_blocks
    from search.records import TrialRecord

    study = run(tiny_config(tmp_path, tiny_model_dir, corpus, granularity="sublayer", budget=0.25, trials=6))
    trial = next(t for t in study.get_trials(states=COMPLETE) if not TrialRecord.of(t).removal.whole_layers_only)
    removal = TrialRecord.of(trial).removal
    seen = []
    real = search.accuracy.run_tasks
    monkeypatch.setattr(
        search.accuracy, "run_tasks", lambda model, *a, **k: seen.append(skipped_blocks(model)) or real(model, *a, **k)
    )
    capsys.readouterr()
    args = ["evaluate", *_flags(tmp_path), "--trial", str(trial.number), "--limit", "4"]
    assert main([*args, "--format", "json"]) == 0
    point = json.loads(capsys.readouterr().out)["points"][0]
    assert (point["removed_attention"], point["removed_mlp"]) == (list(removal.attention), list(removal.mlp))
    assert point["layers"] == 6 - len(removal.layers)
    kept = [i for i in range(6) if i not in removal.layers]
    assert seen == [type(removal)(), removal.remap({old: new for new, old in enumerate(kept)})]  # baseline, point
    assert main(args) == 0 and removal.describe() in capsys.readouterr().out
