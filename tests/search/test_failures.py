"""Failures a user can act on: each one exits non-zero with one `error:` line, no traceback, no lost trial."""

import shutil
import subprocess
import sys

import optuna
import pytest
import torch
from safetensors.torch import load_file

from search.errors import SearchError
from search.failures import check_device, interrupted, store_failure
from tests.test_cli import ROOT, assert_one_line_error, cli, tiny_run_args


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && umount $d"
    return subprocess.run(["unshare", "-Urm", "sh", "-c", probe], capture_output=True).returncode == 0


FILL_DISK = r"""
set -u
mount -t tmpfs -o size=2m tmpfs "$STORE_DIR"
cd "$ROOT"
python -m search $ARGS --trials 4 >/dev/null 2>"$OUT/first.err"; echo $? >"$OUT/first.rc"
cp "$STORE_DIR/s.db" "$OUT/before.db"
free=$(df -k --output=avail "$STORE_DIR" | tail -1)
head -c $((free - 32))k /dev/zero >"$STORE_DIR/filler" 2>/dev/null   # leave 32 KiB: a few trials fit
python -m search $ARGS --trials 30 >/dev/null 2>"$OUT/full.err"; echo $? >"$OUT/full.rc"
cp "$STORE_DIR/s.db" "$OUT/full.db"
rm "$STORE_DIR/filler"
python -m search $ARGS --trials 30 >/dev/null 2>"$OUT/resume.err"; echo $? >"$OUT/resume.rc"
cp "$STORE_DIR/s.db" "$OUT/after.db"
"""


def _trials(db) -> dict:
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{db}")
    return {
        t.number: (t.values, t.params, t.user_attrs)
        for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    }


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare and a tmpfs mount in a user namespace")
def test_store_filesystem_filling_up_mid_study(tmp_path, tiny_model_dir, corpus):
    """A real tiny filesystem fills while a study runs: one line, trials intact, the same command resumes."""
    store_dir, out = tmp_path / "store", tmp_path / "out"
    store_dir.mkdir(), out.mkdir()
    args = " ".join(tiny_run_args(tiny_model_dir, corpus, store_dir / "s.db"))
    env = {
        "STORE_DIR": str(store_dir),
        "OUT": str(out),
        "ROOT": str(ROOT),
        "ARGS": args,
        "PATH": sys.prefix + "/bin:/usr/bin:/bin",
    }
    env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run(["unshare", "-Urm", "bash", "-c", FILL_DISK], env=env, check=True, timeout=600)

    assert (out / "first.rc").read_text().strip() == "0"
    full = (out / "full.err").read_text()
    assert (out / "full.rc").read_text().strip() != "0"
    assert "Traceback" not in full and "failed with parameters" not in full
    errors = [line for line in full.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(errors) == 1, full
    assert "ran out of disk space" in errors[0] and str(store_dir / "s.db") in errors[0]
    assert "run the same command again" in errors[0]

    before, during, after = _trials(out / "before.db"), _trials(out / "full.db"), _trials(out / "after.db")
    assert len(before) == 4
    assert {n: during[n] for n in before} == before  # nothing completed earlier was touched
    assert (out / "resume.rc").read_text().strip() == "0", (out / "resume.err").read_text()
    assert {n: after[n] for n in during} == during
    assert len(after) == 21  # every feasible set of the 6-layer model at 40 %


def test_dropped_postgres_connection_is_named_with_the_next_step(postgres_url):
    """A real server-side disconnect, as a study worker would meet it mid-trial."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(postgres_url, poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as victim, engine.connect() as admin:
        pid = victim.execute(sqlalchemy.text("SELECT pg_backend_pid()")).scalar()
        admin.execute(sqlalchemy.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(sqlalchemy.exc.OperationalError) as raised:
            victim.execute(sqlalchemy.text("SELECT 1"))
    url = postgres_url.replace("search@", "search:hunter2@")
    message = str(store_failure(raised.value, url))
    assert message.startswith("lost the study store") and "every completed trial is saved" in message
    assert "run the same command again" in message and "hunter2" not in message


def test_other_errors_are_not_mistaken_for_store_failures():
    assert store_failure(ValueError("database or disk is full"), "sqlite:///x.db") is None  # not from a driver
    assert store_failure(RuntimeError("boom"), "sqlite:///x.db") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_cuda_names_usable_devices(tmp_path, tiny_model_dir, corpus):
    result = cli(*tiny_run_args(tiny_model_dir, corpus, tmp_path / "s.db", "--device", "cuda"), cwd=tmp_path)
    assert_one_line_error(result, "--device cuda", "usable here: cpu", "CUDA build of torch")
    assert not (tmp_path / "s.db").exists()
    with pytest.raises(SearchError, match="not a torch device name"):
        check_device("gpu0")
    result = cli(*tiny_run_args(tiny_model_dir, corpus, tmp_path / "s.db", "--device-map", "auto"), cwd=tmp_path)
    assert_one_line_error(result, "--device-map auto", "this torch sees none")
    two_gpus = tiny_run_args(tiny_model_dir, corpus, tmp_path / "s.db", "--device-map", "cuda:0,cuda:1")
    result = cli(*two_gpus, cwd=tmp_path)
    assert_one_line_error(result, "--device-map cuda:0", "CUDA build of torch")
    assert not (tmp_path / "s.db").exists()


def test_pickle_only_checkpoint_is_refused_with_a_conversion_command(tmp_path, tiny_model_dir, corpus):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for item in tiny_model_dir.iterdir():
        if item.suffix == ".json":
            shutil.copy(item, pickled)
    torch.save(load_file(tiny_model_dir / "model.safetensors"), pickled / "pytorch_model.bin")
    args = tiny_run_args(pickled, corpus, tmp_path / "s.db")
    result = cli(*args, cwd=tmp_path)
    assert_one_line_error(result, "only pickle weights", "pytorch_model.bin", "safetensors", "convert them once")
    assert not (tmp_path / "s.db").exists()

    # The command the message gives converts the directory, and the converted copy runs.
    convert = result.stderr.split("convert them once: ", 1)[1].strip()
    subprocess.run(convert, shell=True, check=True, cwd=tmp_path, capture_output=True, timeout=300)
    converted = tiny_run_args(f"{pickled}-safetensors", corpus, tmp_path / "s.db", "--trials", "2")
    assert cli(*converted, cwd=tmp_path).returncode == 0


def test_window_longer_than_the_model_is_refused_before_reading_data(tmp_path, tiny_model_dir):
    missing = tmp_path / "no-such-corpus.txt"  # the model's limit is checked first, so the data never matters
    result = cli(*tiny_run_args(tiny_model_dir, missing, tmp_path / "s.db", "--seq-len", "100000"), cwd=tmp_path)
    assert_one_line_error(result, "--seq-len 100000", "256 positions", "--seq-len 256 or less")
    assert not (tmp_path / "s.db").exists()


def test_an_error_raised_while_an_interrupt_unwinds_is_the_interrupt():
    def cleanup_that_fails():
        try:
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("cleanup failed")  # as Optuna's `finally` does under Ctrl-C

    with pytest.raises(RuntimeError) as caught:
        cleanup_that_fails()
    assert interrupted(caught.value)
    wrapped = ValueError("outer")
    wrapped.__cause__ = caught.value
    assert interrupted(wrapped)
    assert not interrupted(ValueError("an ordinary failure"))
