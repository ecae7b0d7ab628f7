"""Interrupted trials: find the ones whose worker is gone, fail them, and queue their removal set again.

Optuna's heartbeat fails a trial once it has been silent for the grace period, on any machine.
A restart on the same machine needs no wait: each trial records its worker (host, pid, process
start time), and a worker that no longer exists is proof the trial will never finish. A trial
killed before it recorded its worker (Optuna had just popped it) is proven interrupted when every
worker that ever joined the study (records.joined_workers) is gone.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from search.records import TrialRecord, joined_workers

log = logging.getLogger("search")


def _start_ticks(pid: int) -> str:
    """Process start time in clock ticks since boot (Linux), so a reused pid is not mistaken for the worker."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def _machine() -> str:
    """Host, boot and PID namespace: a pid means the same process only when all three match."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        boot = namespace = "?"
    return f"{socket.gethostname()}/{boot}/{namespace}"


def worker_id() -> str:
    pid = os.getpid()
    return f"{_machine()}:{pid}:{_start_ticks(pid)}"


def worker_gone(worker: str) -> bool:
    """True only when `worker` ran on this machine (same host, boot, PID namespace) and provably no longer runs."""
    machine, pid_text, ticks = (worker.split(":") + ["", ""])[:3]
    if machine != _machine() or "?" in machine or not pid_text.isdigit():
        return False  # elsewhere, or unknowable here: Optuna's heartbeat decides
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # exists, owned by someone else
    return bool(ticks) and _start_ticks(pid) not in ("", ticks)


def recover_interrupted(study: optuna.Study, requeue: bool = True, n_layers: int | None = None) -> list[int]:
    """Fail RUNNING trials whose local worker is gone; with `requeue`, queue failed sets again.

    Only a decided set is queued again: an enqueued one (its fixed parameters), or one whose
    `n_layers` parameters were all suggested. A trial killed half-way through its suggestions was
    never measured and names no set, so retrying its first few parameters would be a random set.
    Returns the numbers of the trials found interrupted. Call it from one worker at a time.
    """
    storage: Any = study._storage  # an RDBStorage: it has the heartbeat's retry callback
    recovered = []
    joined = joined_workers(study) or []
    everyone_gone = bool(joined) and all(worker_gone(w) for w in joined)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = TrialRecord.of(trial).worker
        if not (worker_gone(worker) if worker else everyone_gone):
            continue
        try:
            if storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                recovered.append(trial.number)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker got there first
    if recovered:
        log.info("trials %s were interrupted (their worker is gone): marked them failed", recovered)
    if not requeue:
        return recovered
    # Workers elsewhere: Optuna fails (and retries) trials whose heartbeat is older than the grace period.
    optuna.storages.fail_stale_trials(study)
    # Every failed trial (a dead worker, Ctrl-C, an error) gets its set queued again, within the retry
    # callback's limit, so no removal set, seeds included, is lost to an interruption.
    retry = storage.get_heartbeat_stale_trial_callback()
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    for trial in trials:
        decided = "fixed_params" in trial.system_attrs or (n_layers is not None and len(trial.params) == n_layers)
        if retry is not None and trial.state == TrialState.FAIL and trial.number not in retried and decided:
            before = len(study.get_trials(deepcopy=False))
            retry(study, trial)
            if len(study.get_trials(deepcopy=False)) > before:
                log.info("queued the removal set of failed trial %d again", trial.number)
    return recovered
