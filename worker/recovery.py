"""Taking back jobs whose worker process is gone, and the faults the chaos suite injects.

Every worker process beats a heartbeat into Redis (``JobStore.heartbeat``) and holds each job it runs under a lease
(``JobStore.claim``). Once a process has been silent for ``keys.MODEL_HEARTBEAT_STALE_S`` (SIGKILL, OOM killer,
host lost) or a lease runs out, one process at a time sends such a job's task again and puts it back to ``queued``
(within ``MAX_ATTEMPTS``; past them it is failed as ``worker_crashed``). The broker's own redelivery of an unacked
message waits for its visibility timeout; this takes seconds.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable

from shared import keys
from shared.config import Settings
from shared.jobs import JobStore
from shared.schema import ErrorCode
from worker import metrics

log = logging.getLogger(__name__)


def process_name(pid: int | None = None) -> str:
    """A worker process as "<hostname>:<pid>", its name in the heartbeats and as a job's owner."""
    return f"{socket.gethostname()}:{pid or os.getpid()}"


def is_dead_here(owner: str) -> bool:
    """Whether ``owner`` names a process on this host that no longer exists (a pool child just killed: its
    heartbeat is not stale yet, but its job need not wait for that)."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, owned by someone else
        return False
    return False


def sweep_lost_jobs(store: JobStore, member: str, send: Callable[[str, str], None]) -> int:
    """One pass of the reaper (if no other process holds its lock); returns the jobs it took back."""
    lock_ms = int(keys.MODEL_HEARTBEAT_S * 1000)
    if not store.redis.set(keys.reaper_lock(), member, nx=True, px=lock_ms):
        return 0
    taken = 0
    for job_id in store.reap_candidates():
        outcome, owner = store.reap_check(job_id)
        if outcome == "failed":
            metrics.job_failed(ErrorCode.WORKER_CRASHED.value)
            log.error("job failed: its worker died on every attempt job_id=%s owner=%s", job_id, owner)
        elif outcome == "stale":
            job = store.get(job_id)
            if job is None:
                continue
            # Send first, then mark: dying in between leaves a duplicate message (dropped as busy or final), never
            # a queued job without one.
            send(job_id, job.queue)
            if store.mark_requeued(job_id, owner):
                taken += 1
                log.warning("job taken back from a lost worker process job_id=%s owner=%s", job_id, owner)
    return taken


# ------------------------------------------------------------------------------------------ fault injection
def forward_fault(settings: Settings) -> Callable[[], None] | None:
    """What the forward pass does first when a FAULT_* setting asks for it (None, the default: nothing)."""
    slow, stuck = settings.FAULT_SLOW_FORWARD_S, settings.FAULT_STUCK_FORWARD_S
    if slow <= 0 and stuck <= 0:
        return None

    def fault() -> None:
        if slow > 0:
            time.sleep(slow)  # a soft time limit's exception interrupts this, as it would slow Python code
        if stuck > 0:
            # like a forward pass stuck in native code: no soft time limit (SIGUSR1) gets through, only a kill
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGALRM})
            try:
                time.sleep(stuck)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    log.warning("fault injection on: FAULT_SLOW_FORWARD_S=%s FAULT_STUCK_FORWARD_S=%s", slow, stuck)
    return fault
