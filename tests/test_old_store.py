"""A study store written by commit 493c72b still opens, reads the same, resumes and exports.

The fixture is a real 4-trial study on the embedded model (see tests/fixtures/README.md), so these
checks hold later code to the store layout and study attributes that code wrote, not to its own.
"""

import json
import shutil
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search.cli import main
from tests.test_cli import cli

pytestmark = pytest.mark.real_model

FIXTURES = Path(__file__).resolve().parent / "fixtures"
STORE = FIXTURES / "store_493c72b.db"
FRONT = json.loads((FIXTURES / "store_493c72b.front.json").read_text())

# The flags the fixture was made with (the README's command), less --trials.
RUN_FLAGS = (
    *("--budget", "8%", "--calib-tokens", "512", "--test-tokens", "512", "--sensitivity-tokens", "256"),
    *("--seq-len", "128", "--latency-repeats", "3", "--latency-tokens", "32", "--dtype", "float32"),
)


@pytest.fixture
def store(tmp_path) -> str:
    """A fresh copy of the fixture: every test may change its store."""
    shutil.copyfile(STORE, tmp_path / "old.db")
    return f"sqlite:///{tmp_path / 'old.db'}"


def in_process(capsys, *args: str) -> str:
    """Run a command in this process (no interpreter start-up to pay); its stdout, after it exits 0."""
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def trials(url: str) -> dict[int, tuple]:
    study = optuna.load_study(study_name="old", storage=url)
    return {t.number: (t.state, t.values, t.params, t.user_attrs) for t in study.trials}


def test_front_show_and_studies_read_as_the_old_code_wrote_them(store, capsys):
    front = in_process(capsys, "front", "--format", "json", "--study", "old", "--storage", store)
    assert json.loads(front) == FRONT

    for point in FRONT["front"]:
        details = json.loads(
            in_process(capsys, "show", "--trial", str(point["trial"]), "--format", "json", "--storage", store)
        )
        assert details["state"] == "COMPLETE"
        for key in ("removed_layers", "layers", "params_reduction", "ppl_ratio", "latency_ratio", "test_ppl_ratio"):
            assert details[key] == point[key], key
    table = in_process(capsys, "show", "--trial", "1", "--storage", store)  # a trial off the front, as a table
    assert "state" in table and "COMPLETE" in table and "14 15" in table

    listing = in_process(capsys, "studies", "--storage", store).splitlines()
    header, row = listing[0].split(), listing[2].split()
    summary = dict(zip(header, row))
    assert summary["study"] == "old" and summary["model"] == "SmolLM2-135M-Instruct"
    assert summary["complete"] == "4" and summary["front"] == str(len(FRONT["front"]))


def test_export_of_a_front_trial_verifies(store, tmp_path, capsys):
    knee = FRONT["front"][1]  # two layers removed
    out = tmp_path / "pruned"
    in_process(capsys, "export", "--trial", str(knee["trial"]), "--out", str(out), "--storage", store)  # verified
    record = json.loads((out / "pruning.json").read_text())
    assert record["layers_after"] == knee["layers"] and record["settings"]["dtype"] == "float32"


def test_run_resumes_without_reseeding_and_keeps_the_old_trials(store, tmp_path):
    before = trials(store)
    attrs_before = optuna.load_study(study_name="old", storage=store).user_attrs
    assert sum(state == TrialState.COMPLETE for state, *_ in before.values()) == 4

    result = cli("run", *RUN_FLAGS, "--trials", "6", "--study", "old", "--storage", store, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "resuming study 'old'" in result.stderr
    assert "new study" not in result.stderr and "greedy stage" not in result.stderr  # not seeded again

    study = optuna.load_study(study_name="old", storage=store)
    assert {key: study.user_attrs.get(key) for key in attrs_before} == attrs_before  # new keys may appear
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) >= 6  # 8% of 30 layers: thousands of feasible sets
    after = trials(store)
    for number, trial in before.items():
        if trial[0] == TrialState.COMPLETE:
            assert after[number] == trial, number
