"""Whether a running trial's worker is still alive: heartbeats, stale trials, retries.

Each trial records the worker (sweeper) that runs it, as user attr ``worker``
(``<host>:<pid>``, :func:`worker_name`). A trial stays RUNNING in the storage when its worker
dies (killed, machine lost); such a trial is *stale*:

- on this machine, a trial whose worker process has ended (:func:`fail_dead_local`);
- on any machine, with an RDB storage and heartbeats (:class:`Heartbeat`, every
  ``heartbeat_interval`` seconds for each trial a worker runs), a trial whose heartbeat stopped
  for ``grace_period`` (:func:`fail_unbeating`).

Stale trials end FAIL with the reason in user attr ``fail_reason``; :func:`queue_retry` queues
one again with the same params, up to ``max_retry`` times.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from tumorseg.sweep.trials import is_baseline

log = logging.getLogger(__name__)

OnStale = Callable[[FrozenTrial], None]


def worker_name() -> str:
    """This worker as a trial's ``worker`` user attr: ``<host>:<pid>``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Heartbeat:
    """Records a heartbeat for each trial this sweeper runs, every ``interval`` seconds, so
    workers elsewhere can tell its trials from those of a worker that died."""

    def __init__(self, storage: Any, interval: float) -> None:
        self.storage, self.interval = storage, interval
        self.trial_ids: set[int] = set()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="optuna-heartbeat", daemon=True)
        self.thread.start()

    def add(self, trial_id: int) -> None:
        with self.lock:
            self.trial_ids.add(trial_id)
        self.storage.record_heartbeat(trial_id)

    def remove(self, trial_id: int) -> None:
        with self.lock:
            self.trial_ids.discard(trial_id)

    def _beat(self) -> None:
        while not self.stopped.wait(self.interval):
            with self.lock:
                ids = list(self.trial_ids)
            for trial_id in ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as err:  # a database hiccup: try again next beat
                    log.warning("heartbeat of trial id %d failed: %s", trial_id, err)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()


def fail_dead_local(study: optuna.Study, on_stale: OnStale) -> None:
    """FAIL the running trials of this machine whose worker process has ended; ``on_stale``
    gets each one so failed."""
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        where, _, pid = str(t.user_attrs.get("worker", "")).rpartition(":")
        if where == host and pid.isdigit() and not alive(int(pid)):
            reason = f"stale: its sweeper (pid {pid} on {host}) ended while it ran"
            study._storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            log.warning("trial %d: %s", t.number, reason)
            on_stale(study._storage.get_trial(t._trial_id))


def fail_unbeating(study: optuna.Study, grace: float, on_stale: OnStale) -> None:
    """Optuna's ``fail_stale_trials`` (trials without a heartbeat for the storage's grace
    period, ``grace`` seconds), with the reason recorded before the trial ends; ``on_stale``
    gets each trial this worker failed (not those another worker failed first)."""
    storage = study._storage
    for trial_id in storage._get_stale_trial_ids(study._study_id):
        trial = storage.get_trial(trial_id)
        reason = (
            f"stale: no heartbeat from its sweeper ({trial.user_attrs.get('worker', '?')}) "
            f"for {grace} s"
        )
        try:
            storage.set_trial_user_attr(trial_id, "fail_reason", reason)
            if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker failed it first
        log.warning("trial %d: %s", trial.number, reason)
        on_stale(storage.get_trial(trial_id))


def queue_retry(study: optuna.Study, trial: FrozenTrial, max_retry: int | None) -> bool:
    """Queue stale ``trial`` again with the same params (user attrs ``retry_of``, ``retries``),
    unless it was retried ``max_retry`` times already; whether it was."""
    retries = int(trial.user_attrs.get("retries", 0))
    if not max_retry or retries >= max_retry:
        return False
    attrs: dict[str, Any] = {"retry_of": trial.number, "retries": retries + 1}
    if is_baseline(trial):
        attrs["baseline"] = True
    study.enqueue_trial(trial.params, user_attrs=attrs)
    log.info("trial %d queued again (retry %d of %d)", trial.number, retries + 1, max_retry)
    return True
