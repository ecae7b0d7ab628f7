"""Interrupted trials: find the ones whose worker is gone, fail them, and queue their removal set again.

Optuna's heartbeat fails a trial once it has been silent for the grace period, on any machine.
A restart on the same machine needs no wait: each trial records its worker (host, pid, process
start time), and a worker that no longer exists is proof the trial will never finish.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import optuna
from optuna.trial import TrialState

log = logging.getLogger("search")


def _start_ticks(pid: int) -> str:
    """Process start time in clock ticks since boot (Linux), so a reused pid is not mistaken for the worker."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def worker_id() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_ticks(pid)}"


def worker_gone(worker: str) -> bool:
    """True only when `worker` ran on this host and provably no longer runs."""
    host, pid_text, ticks = (worker.split(":") + ["", ""])[:3]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # exists, owned by someone else
    return bool(ticks) and _start_ticks(pid) not in ("", ticks)


def recover_interrupted(study: optuna.Study) -> list[int]:
    """Fail the RUNNING trials of dead local workers and retry their sets; returns their numbers."""
    storage = study._storage
    retry = storage.get_heartbeat_stale_trial_callback() if hasattr(storage, "get_heartbeat_stale_trial_callback") else None
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        if not worker or not worker_gone(worker):
            continue
        try:
            if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
        if retry is not None:
            retry(study, storage.get_trial(trial._trial_id))
        recovered.append(trial.number)
    if recovered:
        log.info("trials %s were interrupted (their worker is gone): failed them and queued their sets again", recovered)
    # Stale trials of workers elsewhere: Optuna fails them once their heartbeat is older than the grace period.
    optuna.storages.fail_stale_trials(study)
    return recovered
