"""The study store under stress: kill -9 mid-trial, several workers on one study, hostile inputs.

Real SQLite files and a real PostgreSQL server (see tests/postgres.py), real worker processes."""

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from search.errors import redact
from search.records import counts_towards_trials
from search.sampler import removal_set
from search.store import exclusive
from tests.test_cli import ROOT, assert_one_line_error, cli, tiny_run_args

# A worker killed the instant Optuna hands it trial 2: RUNNING in the store, before the objective's first line.
DIES_ON_POP = """
import os, signal, sys
from optuna.trial import Trial
from search.cli import main
init = Trial.__init__
def dying(self, *args, **kwargs):
    init(self, *args, **kwargs)
    if self.number == 2:
        os.kill(os.getpid(), signal.SIGKILL)
Trial.__init__ = dying
sys.exit(main(sys.argv[1:]))
"""


def ctrl_c_on_call(module: str, name: str, call: int = 4) -> str:
    """A worker program that sends itself SIGINT on the `call`-th call of `module.name`."""
    return f"""
import os, signal, sys
import {module} as patched
from search.cli import main
original, calls = patched.{name}, []
def interrupted(*args, **kwargs):
    calls.append(1)
    if len(calls) == {call}:
        os.kill(os.getpid(), signal.SIGINT)
    return original(*args, **kwargs)
patched.{name} = interrupted
sys.exit(main(sys.argv[1:]))
"""


# Ctrl-C inside trial 4's evaluation, after its removal set was decided: no race with a trial ending.
CTRL_C_IN_TRIAL = ctrl_c_on_call("search.objective", "shape_latency")
# Ctrl-C while Optuna records trial 4's result (a signal landing in the store write): Optuna's `_run_trial`
# then fails in its own `finally` (UnboundLocalError), an Exception whose context is the interrupt.
CTRL_C_IN_TELL = ctrl_c_on_call("optuna.study._optimize", "_tell_with_warning")


def worker(model_dir, corpus, url, *extra, program=("-m", "search")) -> subprocess.Popen:
    args = list(tiny_run_args(model_dir, corpus, "unused", *extra))
    args[args.index("--storage") + 1] = url
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    # A runner that starts us in the background may ignore SIGINT; a worker gets the default, like a terminal's.
    return subprocess.Popen(
        [sys.executable, *program, *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def trials(url, study="tiny"):
    """Read with a throwaway engine: tests poll this several times a second, and a pooled engine per call
    holds a server connection until it is garbage-collected (PostgreSQL refuses clients past 100)."""
    storage = optuna.storages.RDBStorage(url, engine_kwargs={"poolclass": sqlalchemy.pool.NullPool})
    try:
        return optuna.load_study(study_name=study, storage=storage).get_trials()
    finally:
        storage.engine.dispose()


def completed_snapshot(url, study="tiny"):
    return {t.number: (t.values, t.params, t.user_attrs) for t in trials(url, study) if t.state == TrialState.COMPLETE}


@pytest.fixture(scope="module")
def slow_model_dir(tmp_path_factory):
    """A wider 6-layer Llama: a trial over 8k tokens takes about a second, long enough to be killed mid-way."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import tiny_tokenizer

    path = tmp_path_factory.mktemp("slow-llama")
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_interrupt_mid_trial_then_resume(tmp_path, slow_model_dir, sig):
    from tests.conftest import write_corpus

    corpus = write_corpus(tmp_path / "big.txt", lines=1200)
    url = f"sqlite:///{tmp_path / 'kill.db'}"
    slow = ("--trials", "12", "--calib-tokens", "8192", "--seq-len", "256")
    proc = worker(slow_model_dir, corpus, url, *slow)
    deadline = time.time() + 240
    while time.time() < deadline:
        time.sleep(0.2)
        if not (tmp_path / "kill.db").exists():
            continue
        try:
            states = [t.state for t in trials(url)]
        except Exception:
            continue  # study not created yet
        if states.count(TrialState.COMPLETE) >= 3 and TrialState.RUNNING in states:
            break
    else:
        proc.kill()
        pytest.fail(f"worker never reached a running trial: {proc.communicate()[1][-2000:]}")
    os.kill(proc.pid, sig)
    _, first_err = proc.communicate(timeout=60)
    before = completed_snapshot(url)
    if sig == signal.SIGKILL:
        interrupted = [t for t in trials(url) if t.state == TrialState.RUNNING]
    else:  # Ctrl-C: Optuna records the trial as failed, and the CLI says how to resume
        assert proc.returncode == 130 and "run the same command again to resume" in first_err, first_err[-3000:]
        interrupted = [t for t in trials(url) if t.state == TrialState.FAIL]
    # The trial seen running may finish in the milliseconds before the signal lands (a repeated set is
    # answered from the store at once): then the signal stops the worker between trials and none is lost.
    assert len(interrupted) <= 1 and len(before) >= 3

    resumed = worker(slow_model_dir, corpus, url, *slow)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    after = completed_snapshot(url)
    assert {n: after[n] for n in before} == before  # every completed trial untouched
    final = trials(url)
    assert not [t for t in final if t.state == TrialState.RUNNING]
    assert len(after) == 12
    if not interrupted:
        return
    lost = interrupted[0]
    assert next(t for t in final if t.number == lost.number).state == TrialState.FAIL
    retried = [t for t in final if t.state == TrialState.COMPLETE and t.system_attrs.get("failed_trial") == lost.number]
    decided = lost.system_attrs.get("fixed_params") or (lost.params if len(lost.params) == 6 else None)
    if decided:
        assert len(retried) == 1 and retried[0].params == decided  # its removal set ran again
    else:  # stopped between two suggestions: no set was decided, so none is retried
        assert retried == []
    if sig == signal.SIGKILL:
        assert "interrupted" in err  # recovered at once: the dead worker proves it, no grace period


def ctrl_c_then_resume(url, model_dir, corpus, program):
    """Run `program` (a worker that interrupts itself) towards 8 trials, then the plain command again, which
    must finish them with every trial completed before the stop untouched: the stopped worker's stderr,
    the trials it left, and every trial after the resume."""
    stopped = worker(model_dir, corpus, url, "--trials", "8", program=("-c", program))
    _, err = stopped.communicate(timeout=120)
    assert stopped.returncode == 130 and "run the same command again to resume" in err, err[-2000:]
    left, before = trials(url), completed_snapshot(url)
    assert len(before) >= 3

    resumed = worker(model_dir, corpus, url, "--trials", "8")
    _, resumed_err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, resumed_err
    after = completed_snapshot(url)
    assert {n: after[n] for n in before} == before and len(after) == 8
    return err, left, trials(url)


def test_ctrl_c_inside_a_trial_fails_it_and_resume_runs_its_set_again(tmp_path, tiny_model_dir, corpus):
    _, left, final = ctrl_c_then_resume(f"sqlite:///{tmp_path / 'ctrl-c.db'}", tiny_model_dir, corpus, CTRL_C_IN_TRIAL)
    (lost,) = [t for t in left if t.state == TrialState.FAIL]
    assert len(lost.params) > 0  # its set was decided before the signal
    retried = [t for t in final if t.state == TrialState.COMPLETE and t.system_attrs.get("failed_trial") == lost.number]
    assert [t.params for t in retried] == [lost.params]


def test_ctrl_c_while_a_result_is_recorded_is_an_interrupt_and_resume_completes(tmp_path, tiny_model_dir, corpus):
    err, _, final = ctrl_c_then_resume(f"sqlite:///{tmp_path / 'tell.db'}", tiny_model_dir, corpus, CTRL_C_IN_TELL)
    assert "error:" not in err  # no one-line failure beside the interrupt
    assert not [t for t in final if t.state == TrialState.RUNNING]


def test_kill_before_the_trial_names_its_worker_then_resume(tmp_path, tiny_model_dir, corpus):
    url = f"sqlite:///{tmp_path / 'pop.db'}"
    dead = worker(tiny_model_dir, corpus, url, "--trials", "6", program=("-c", DIES_ON_POP))
    dead.communicate(timeout=120)
    assert dead.returncode == -signal.SIGKILL
    popped = next(t for t in trials(url) if t.number == 2)
    assert popped.state == TrialState.RUNNING and "worker" not in popped.user_attrs  # nothing names its worker
    before = completed_snapshot(url)

    resumed = worker(tiny_model_dir, corpus, url, "--trials", "6")
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    final = trials(url)
    assert not [t for t in final if t.state == TrialState.RUNNING]
    assert next(t for t in final if t.number == 2).state == TrialState.FAIL and "interrupted" in err
    after = completed_snapshot(url)
    assert {n: after[n] for n in before} == before and len(after) == 6
    if "fixed_params" in popped.system_attrs:  # a queued set: it runs again
        retried = [t for t in final if t.system_attrs.get("failed_trial") == 2 and t.state == TrialState.COMPLETE]
        assert [t.params for t in retried] == [popped.system_attrs["fixed_params"]]


def _check_shared_study(url, study, target):
    final = trials(url, study)
    assert not [t for t in final if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    done = [t for t in final if t.state == TrialState.COMPLETE]
    assert target <= len(done) <= target + 1  # a second worker may finish the trial it was running
    measured = [removal_set(t) for t in done if "duplicate_of" not in t.user_attrs]
    assert len(measured) == len(set(measured))  # no removal set measured twice
    assert len({t.user_attrs["worker"] for t in done}) == 2  # both workers really ran trials
    for stage in ("greedy stage 1", "greedy stage 2"):
        assert sum(t.user_attrs.get("proposed_by") == stage for t in final) == 1  # seeded exactly once


def test_two_workers_share_a_postgresql_study(postgres_url, tiny_model_dir, corpus):
    extra = ("--trials", "14", "--study", "pg-two")
    workers = [worker(tiny_model_dir, corpus, postgres_url, *extra) for _ in range(2)]
    for proc in workers:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    _check_shared_study(postgres_url, "pg-two", 14)


def test_two_workers_share_a_sqlite_study(tmp_path, tiny_model_dir, corpus):
    url = f"sqlite:///{tmp_path / 'two.db'}"
    extra = ("--trials", "14")
    workers = [worker(tiny_model_dir, corpus, url, *extra) for _ in range(2)]
    for proc in workers:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    _check_shared_study(url, "tiny", 14)


def _running_workers(url, study) -> dict[int, int]:
    """pid -> number of the trial it is measuring, for every RUNNING trial that names its worker."""
    running = {}
    for t in trials(url, study):
        worker = t.user_attrs.get("worker")
        if t.state == TrialState.RUNNING and worker:
            running[int(worker.split(":")[-2])] = t.number
    return running


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_four_workers_two_killed_mid_trial_and_restarted(tmp_path, request, slow_model_dir, backend):
    """Four workers on one study; two die by SIGKILL while measuring and start again. The study reaches
    --trials, every completed trial survives, no set is measured twice and nothing stays RUNNING."""
    from tests.conftest import write_corpus

    corpus = write_corpus(tmp_path / "big.txt", lines=1200)
    study = f"four-{backend}"
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'four.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    target = 14
    slow = ("--trials", str(target), "--calib-tokens", "8192", "--seq-len", "256", "--study", study)
    workers = [worker(slow_model_dir, corpus, url, *slow) for _ in range(4)]
    try:
        deadline, running = time.time() + 300, {}
        while time.time() < deadline:
            time.sleep(0.2)
            try:
                states = [t.state for t in trials(url, study)]
                running = _running_workers(url, study)
            except Exception:
                continue  # store or study not created yet
            alive = {p.pid for p in workers if p.poll() is None}
            if states.count(TrialState.COMPLETE) >= 4 and len(set(running) & alive) >= 2:
                break
        else:
            pytest.fail(f"never saw two workers measuring: {[p.poll() for p in workers]}")
        victims = [p for p in workers if p.pid in running][:2]
        for proc in victims:
            os.kill(proc.pid, signal.SIGKILL)
        for proc in victims:
            proc.wait(timeout=60)
        # Read again once they are dead: a trial seen running a moment ago may have finished or been
        # pruned (over budget, rejected) before the signal landed; only one still RUNNING was lost.
        killed_in = {t.number for t in trials(url, study) if t.number in {running[p.pid] for p in victims}}
        killed_in &= {t.number for t in trials(url, study) if t.state == TrialState.RUNNING}
        before = completed_snapshot(url, study)
        workers += [worker(slow_model_dir, corpus, url, *slow) for _ in victims]  # restarted
        for proc in workers:
            if proc in victims:
                continue
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-3000:]
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.kill()

    final = trials(url, study)
    assert not [t for t in final if t.state == TrialState.RUNNING]
    after = completed_snapshot(url, study)
    assert {n: after[n] for n in before} == before  # every trial completed before the kills, untouched
    done = [t for t in final if t.state == TrialState.COMPLETE]
    counted = [t for t in final if counts_towards_trials(t)]  # rejected trials count too
    assert target <= len(counted) <= target + 3  # the other workers may finish the trial each was running
    measured = [removal_set(t) for t in done if "duplicate_of" not in t.user_attrs]
    assert len(measured) == len(set(measured))  # no removal set measured twice
    # A trial killed mid-way is failed (unless it finished in the instant before the signal landed),
    # and its set, if decided, runs once more, unless the others reached --trials first.
    lost = [t for t in final if t.number in killed_in]
    assert all(t.state == TrialState.FAIL for t in lost)
    for t in lost:
        decided = t.system_attrs.get("fixed_params") or (t.params if len(t.params) == 6 else None)
        retried = [r.params for r in done if r.system_attrs.get("failed_trial") == t.number]
        assert retried in ([], [decided]) if decided else retried == []


def test_studies_and_front_work_on_postgresql(postgres_url, tiny_model_dir, corpus, tmp_path):
    args = list(tiny_run_args(tiny_model_dir, corpus, "unused", "--trials", "3", "--study", "pg-front"))
    args[args.index("--storage") + 1] = postgres_url
    assert cli(*args, cwd=tmp_path).returncode == 0
    result = cli("front", "--storage", postgres_url, "--study", "pg-front", "--format", "csv", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("trial,removed_layers")


def test_exclusive_serialises_sqlite_workers(tmp_path):
    url = f"sqlite:///{tmp_path / 'lock.db'}"
    code = (
        "import sys, time; sys.path.insert(0, %r)\n"
        "from search.store import exclusive\n"
        "with exclusive(%r, 'x'):\n    print('in', flush=True); time.sleep(1.5)\n"
    ) % (str(ROOT), url)
    with exclusive(url, "x"):
        other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)
        assert other.poll() is None  # blocked while we hold the lock
    other.wait(timeout=30)
    assert other.stdout.read().strip() == "in"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_simultaneous_first_opens_all_succeed(tmp_path, request, backend):
    # A worker and a `front` reader (or two workers) opening a brand-new store at once both try to
    # create Optuna's tables; without the store lock one died on a unique-key collision (CI, once).
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'fresh.db'}"
    else:
        url = request.getfixturevalue("postgres_url").rsplit("/", 1)[0] + "/fresh_race"
        base = request.getfixturevalue("postgres_url")
        import sqlalchemy

        engine = sqlalchemy.create_engine(base, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("CREATE DATABASE fresh_race"))
        engine.dispose()
    start = time.time() + 2.0
    code = (
        "import sys, time; sys.path.insert(0, %r)\n"
        "from search.store import open_storage\n"
        "time.sleep(max(0.0, %r - time.time()))\n"
        "open_storage(%r).get_all_studies(); print('ok')\n"
    ) % (str(ROOT), start, url)
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(6)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert [out.strip() for out, _ in results] == ["ok"] * 6, [err[-500:] for _, err in results]


def test_corrupt_sqlite_file_is_refused_untouched(tmp_path):
    store = tmp_path / "broken.db"
    store.write_bytes(b"this is not a database" * 100)
    before = store.read_bytes()
    result = cli("front", "--storage", f"sqlite:///{store}", cwd=tmp_path)
    assert_one_line_error(result, "cannot open storage")
    result = cli("run", "--storage", f"sqlite:///{store}", cwd=tmp_path)
    assert_one_line_error(result, "cannot open storage")
    assert store.read_bytes() == before


def test_front_of_study_without_finished_trials(tmp_path):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    study = optuna.create_study(study_name="empty", storage=url, directions=["minimize", "minimize"])
    study.set_user_attr("settings", {"model": "m", "budget": 0.1})
    study.set_user_attr("baseline", {"layers": 2, "params": 1, "calib_ppl": 1.0, "test_ppl": 1.0, "latency_ms": 1.0})
    assert_one_line_error(cli("front", "--storage", url, cwd=tmp_path), "no finished trials")


def test_study_for_another_model_is_refused(tmp_path, tiny_model_dir, tiny_gpt2_dir, corpus):
    store = tmp_path / "mix.db"
    assert cli(*tiny_run_args(tiny_model_dir, corpus, store, "--trials", "2"), cwd=tmp_path).returncode == 0
    before = completed_snapshot(f"sqlite:///{store}")
    # Same study name, other model directory with the same folder name: caught by name or fingerprint.
    result = cli(*tiny_run_args(tiny_gpt2_dir, corpus, store, "--trials", "2"), cwd=tmp_path)
    assert_one_line_error(result, "--study")
    assert completed_snapshot(f"sqlite:///{store}") == before


def test_model_without_known_decoder_stack(tmp_path, corpus):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from tests.conftest import tiny_tokenizer

    path = tmp_path / "neox"
    GPTNeoXForCausalLM(
        GPTNeoXConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    ).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    result = cli(*tiny_run_args(path, corpus, tmp_path / "neox.db"), cwd=tmp_path)
    assert_one_line_error(result, "gpt_neox", "gpt2, llama", "search/model/architectures")
    assert not (tmp_path / "neox.db").exists()


def test_redact_masks_passwords():
    assert redact("postgresql+psycopg://me:pa55@db:5432/x") == "postgresql+psycopg://me:***@db:5432/x"
    assert redact("sqlite:///studies/a.db") == "sqlite:///studies/a.db"


def test_redact_hides_a_password_containing_at_signs():
    assert redact("postgresql+psycopg://me:p@ss@db:5432/x") == "postgresql+psycopg://me:***@db:5432/x"


def test_a_worker_elsewhere_is_never_declared_gone():
    from search.recovery import worker_gone, worker_id

    me = worker_id()
    assert not worker_gone(me)  # alive
    machine, pid, ticks = me.split(":")
    assert not worker_gone(f"other-host/x/1:{pid}:{ticks}")  # another machine: only the heartbeat decides
    assert worker_gone(f"{machine}:999999999:1")  # this machine, no such process


def test_recovery_requeues_decided_sets_only(tmp_path):
    from search.recovery import recover_interrupted, worker_id
    from search.store import open_storage

    machine, _, _ = worker_id().split(":")
    dead = f"{machine}:999999999:1"
    study = optuna.create_study(study_name="r", storage=open_storage(f"sqlite:///{tmp_path / 'r.db'}"))
    flag = optuna.distributions.CategoricalDistribution([False, True])
    # Three workers died mid-trial: one after all 3 suggestions, one after 1, one on an enqueued seed after 1.
    full = study.ask({f"drop_0{i}": flag for i in range(3)})
    partial = study.ask({"drop_00": flag})
    study.enqueue_trial({"drop_00": True, "drop_01": True, "drop_02": False})
    seed = study.ask({"drop_00": flag})
    for trial in (full, partial, seed):
        trial.set_user_attr("worker", dead)

    assert sorted(recover_interrupted(study, n_layers=3)) == [0, 1, 2]
    queued = {t.system_attrs["failed_trial"]: t for t in study.get_trials(states=(TrialState.WAITING,))}
    assert set(queued) == {0, 2}  # the half-suggested free proposal named no set
    assert queued[0].params == full.params
    assert queued[2].system_attrs["fixed_params"] == {"drop_00": True, "drop_01": True, "drop_02": False}
