"""The command line as a user meets it: real subprocesses, real SQLite files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "search", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


# Small windows, one latency round, exact numerics: what every CLI test on a tiny model evaluates with.
TINY_EVALUATION = (
    *("--calib-tokens", "256", "--test-tokens", "128", "--sensitivity-tokens", "128", "--seq-len", "32"),
    *("--latency-tokens", "16", "--latency-repeats", "1", "--dtype", "float32"),
)


def tiny_run_args(model_dir, corpus, store, *extra):
    return (
        "run",
        "--model",
        str(model_dir),
        "--dataset",
        str(corpus),
        "--budget",
        "40%",
        "--storage",
        f"sqlite:///{store}",
        "--study",
        "tiny",
        *TINY_EVALUATION,
        *("--confirm-tokens", "0"),  # tests/search/test_confirmation.py and the real-model test confirm
        *extra,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_help_explains_every_subcommand(tmp_path):
    top = cli("--help", cwd=tmp_path)
    assert top.returncode == 0 and "run" in top.stdout and "front" in top.stdout
    run_help = cli("run", "--help", cwd=tmp_path).stdout
    for flag in (
        "--model",
        "--dataset",
        "--budget",
        "--trials",
        "--study",
        "--storage",
        "--calib-tokens",
        "--test-tokens",
        "--dtype",
        "--compile",
    ):
        assert flag in run_help
    assert "--format" in cli("front", "--help", cwd=tmp_path).stdout


@pytest.mark.parametrize(
    "args, needles",
    [
        (("run", "--budget", "abc"), ["--budget", "'abc'", "not a number"]),
        (("run", "--budget", "150%"), ["--budget", "below 100%"]),
        (("run", "--budget", "0"), ["--budget"]),
        (("run", "--budget", "100%"), ["--budget", "below 100%"]),
        (("run", "--budget", "-3%"), ["--budget"]),
        (("run", "--trials", "0"), ["--trials"]),
        (("run", "--model", "./no/such/model"), ["--model", "no such file"]),
        (("run", "--storage", "not a url"), ["--storage", "not a valid SQLAlchemy URL"]),
        (("run", "--storage", "postgresql+psycopg://user:hunter2@127.0.0.1:9/x"), ["cannot open storage", "***"]),
        (("front", "--study", "missing"), ["no study store"]),
    ],
)
def test_bad_input_is_one_line_and_creates_nothing(tmp_path, args, needles):
    result = cli(*args, cwd=tmp_path)
    assert_one_line_error(result, *needles)
    assert "hunter2" not in result.stderr + result.stdout
    assert not (tmp_path / "studies").exists() or not any((tmp_path / "studies").iterdir())


def test_unreadable_model_directory(tmp_path):
    (tmp_path / "empty-model").mkdir()
    assert_one_line_error(cli("run", "--model", str(tmp_path / "empty-model"), cwd=tmp_path), "cannot load --model")
    assert not (tmp_path / "studies").exists()


def test_dataset_too_small_for_requested_tokens(tmp_path, tiny_model_dir):
    from tests.conftest import write_corpus

    small = write_corpus(tmp_path / "small.txt", lines=5)
    result = cli(*tiny_run_args(tiny_model_dir, small, tmp_path / "s.db", "--calib-tokens", "100000"), cwd=tmp_path)
    assert_one_line_error(result, "fewer than the", "--calib-tokens")
    assert not (tmp_path / "s.db").exists()


def test_not_a_gguf_file(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not gguf at all")
    assert_one_line_error(cli("run", "--model", str(fake), cwd=tmp_path), "not a GGUF file")


def test_run_then_front_in_every_format(tmp_path, tiny_model_dir, corpus):
    store = tmp_path / "s.db"
    first = cli(*tiny_run_args(tiny_model_dir, corpus, store, "--trials", "5"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "removed_layers" in first.stdout and "ppl_ratio" in first.stdout  # the front table
    report = json.loads(cli("front", "--storage", f"sqlite:///{store}", "--format", "json", cwd=tmp_path).stdout)
    assert report["study"] == "tiny" and report["front"]
    csv_out = cli("front", "--storage", f"sqlite:///{store}", "--study", "tiny", "--format", "csv", cwd=tmp_path).stdout
    assert (
        csv_out.splitlines()[0] == "trial,removed_layers,layers,params_reduction,ppl_ratio,latency_ratio,test_ppl_ratio"
    )
    assert len(csv_out.splitlines()) == len(report["front"]) + 1
    # The same command again: nothing to do, same front.
    again = cli(*tiny_run_args(tiny_model_dir, corpus, store, "--trials", "5"), cwd=tmp_path)
    assert again.returncode == 0 and "nothing to run" in again.stderr
    assert (
        json.loads(cli("front", "--storage", f"sqlite:///{store}", "--format", "json", cwd=tmp_path).stdout) == report
    )
    # Budget too small for one layer of this model: one line, store untouched.
    small = cli(*tiny_run_args(tiny_model_dir, corpus, tmp_path / "other.db", "--budget", "5%"), cwd=tmp_path)
    assert_one_line_error(small, "too small to remove even one layer")
    assert not (tmp_path / "other.db").exists()


def test_front_of_unknown_study_lists_the_known_ones(tmp_path, tiny_model_dir, corpus):
    store = tmp_path / "s.db"
    assert cli(*tiny_run_args(tiny_model_dir, corpus, store, "--trials", "2"), cwd=tmp_path).returncode == 0
    assert_one_line_error(
        cli("front", "--storage", f"sqlite:///{store}", "--study", "nope", cwd=tmp_path), "studies: tiny"
    )


def test_a_healed_study_reports_healed_and_second_corpus_figures(tmp_path, tiny_model_dir, corpus):
    from tests.conftest import write_corpus

    other = write_corpus(tmp_path / "other.txt", lines=200, seed=7)
    store = tmp_path / "healed.db"
    args = (*tiny_run_args(tiny_model_dir, corpus, store), "--trials", "6", "--heal", "linear")
    args = (*args, "--heal-tokens", "512", "--eval-dataset", str(other), "--eval-tokens", "128")
    done = cli(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    front = json.loads(cli("front", "--storage", f"sqlite:///{store}", "--format", "json", cwd=tmp_path).stdout)
    assert front["heal"] == "linear" and front["eval_dataset"] == str(other) and front["baseline"]["eval_ppl"] > 1
    for point in front["front"]:
        assert point["test_ppl_ratio"] > 0 and point["eval_ppl_ratio"] > 0
        assert not any(key.startswith("unhealed_") for key in point)  # healed studies measure the healed model only
    table = cli("front", "--storage", f"sqlite:///{store}", cwd=tmp_path).stdout
    assert "healed (linear): ratios are the healed model's" in table and "second corpus" in table
    # One greedy path, scored healed (the unhealed path is not walked as well).
    assert "greedy stage 1 (healed ratio): remove" in done.stderr and "(ppl): remove" not in done.stderr
    # What the stored figures mean may not change on resume; the second corpus may not be the first.
    changed = cli(*["none" if a == "linear" else a for a in args], "--trials", "7", cwd=tmp_path)
    assert_one_line_error(changed, "other settings", "heal")
    same = cli(*tiny_run_args(tiny_model_dir, corpus, tmp_path / "x.db"), "--eval-dataset", str(corpus), cwd=tmp_path)
    assert_one_line_error(same, "--eval-dataset is the --dataset corpus")
    missing = cli(
        *tiny_run_args(tiny_model_dir, corpus, tmp_path / "y.db"), "--eval-dataset", "no-such:corpus", cwd=tmp_path
    )
    assert_one_line_error(missing, "cannot load --eval-dataset 'no-such:corpus'")
    assert not (tmp_path / "y.db").exists()  # refused before the store was created


def test_heal_linear_is_refused_in_one_line_for_gemma3(tmp_path, corpus):
    from tests.conftest import tiny_model, tiny_tokenizer

    path = tmp_path / "gemma"
    tiny_model("gemma3").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    refused = cli(*tiny_run_args(path, corpus, tmp_path / "g.db"), "--heal", "linear", cwd=tmp_path)
    assert_one_line_error(refused, "--heal linear is not available", "post_feedforward_layernorm")
