"""Long-polls without a thread or a Redis connection each: one pub/sub listener per web process wakes them all.

A pub/sub connection and a blocked thread per waiting request would let a few dozen long-polls starve /healthz and
uploads. Here every waiter of a process shares a single ``PSUBSCRIBE aw:done:*`` connection, read by one background
thread that sets the ``threading.Event`` of each waiter registered for the job whose channel fired. Under gunicorn's
gevent worker (which monkey-patches threading) the thread is a greenlet and the events are cooperative, so a waiting
request costs a greenlet and its socket; under plain threads (Flask's test client, a threaded server) the same code
blocks a thread per waiter.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

from shared import keys
from shared.jobs import Job, JobStore

log = logging.getLogger(__name__)

_CHANNEL_PREFIX = keys.job_done_channel("")


class JobWaiter:
    """Waits for jobs to end, for one web process. Owned by the app (``app.extensions``); the listener thread and its
    connection start on the first wait in a process, i.e. after gunicorn forks its workers.

    The listener survives Redis restarts: it reconnects with exponential backoff (``reconnect_min_s`` doubling up to
    ``reconnect_max_s``) and, whenever it is (re)subscribed, wakes every waiter for a fresh read, since a job may
    have ended while nobody listened. A waiter that is never woken still ends at its timeout with a fresh read.
    """

    def __init__(
        self, store: JobStore, *, reconnect_min_s: float = 0.1, reconnect_max_s: float = 5.0, poll_s: float = 1.0
    ) -> None:
        self.store = store
        self.reconnect_min_s, self.reconnect_max_s, self.poll_s = reconnect_min_s, reconnect_max_s, poll_s
        self._lock = threading.Lock()
        self._waiters: dict[str, set[threading.Event]] = {}
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self._closed = threading.Event()
        self._subscribed = False

    # ------------------------------------------------------------------------------------------------ waiting
    def wait(self, job_id: str, timeout_s: float) -> Job | None:
        """The job once it is final or ``timeout_s`` has passed (then its state at that moment); None if unknown."""
        job = self.store.get(job_id)
        if job is None or job.status.is_final or timeout_s <= 0:
            return job
        deadline = time.monotonic() + timeout_s
        event = threading.Event()
        self._register(job_id, event)
        try:
            job = self.store.get(job_id)  # it may have ended between the first read and the registration
            while job is not None and not job.status.is_final:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                woke = event.wait(remaining)
                event.clear()  # a wake after this point is seen by the read below or by the next wait
                job = self.store.get(job_id)  # on a wake and at the timeout: a fresh read
                if not woke:
                    break
        finally:
            self._unregister(job_id, event)
        return job

    @property
    def waiting(self) -> int:
        """Requests of this process waiting now."""
        with self._lock:
            return sum(len(events) for events in self._waiters.values())

    @property
    def subscribed(self) -> bool:
        """Whether the listener holds a live subscription now."""
        return self._subscribed

    def close(self) -> None:
        """Stop the listener (within ``poll_s``); waiters still end at their timeouts."""
        self._closed.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self.poll_s + 1)

    def _register(self, job_id: str, event: threading.Event) -> None:
        with self._lock:
            if self._pid != os.getpid():  # first wait in this process (or a fork inherited a parent's listener)
                self._pid = os.getpid()
                self._waiters = {}
                self._subscribed = False
                self._thread = threading.Thread(
                    target=self._listen, args=(self._pid,), name="aw-job-waiter", daemon=True
                )
                self._thread.start()
            self._waiters.setdefault(job_id, set()).add(event)

    def _unregister(self, job_id: str, event: threading.Event) -> None:
        with self._lock:
            events = self._waiters.get(job_id)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._waiters[job_id]

    def _wake(self, job_id: str | None) -> None:
        """Wake the waiters of ``job_id``, or every waiter (None)."""
        with self._lock:
            if job_id is None:
                events = [event for group in self._waiters.values() for event in group]
            else:
                events = list(self._waiters.get(job_id, ()))
        for event in events:
            event.set()

    # ----------------------------------------------------------------------------------------------- listener
    def _listen(self, pid: int) -> None:
        delay, failures = self.reconnect_min_s, 0
        while not self._closed.is_set() and os.getpid() == pid:
            pubsub = self.store.redis.pubsub()
            try:
                pubsub.psubscribe(_CHANNEL_PREFIX + "*")
                while not self._closed.is_set():
                    message = pubsub.get_message(timeout=self.poll_s)
                    if message is None:
                        continue
                    if message["type"] == "pmessage":
                        channel = message["channel"]
                        channel = channel.decode() if isinstance(channel, bytes) else channel
                        self._wake(channel[len(_CHANNEL_PREFIX) :])
                    elif message["type"] == "psubscribe":  # also after redis-py reconnected by itself
                        if failures:
                            log.warning("job waiter subscribed again after %d failed attempts", failures)
                        self._subscribed = True
                        delay, failures = self.reconnect_min_s, 0
                        self._wake(None)  # a job may have ended while nobody listened: everyone reads again
            except Exception as exc:  # Redis gone (or anything else): the listener must not die
                failures += 1
                if failures == 1:
                    log.warning("job waiter lost its subscription (%s); reconnecting with backoff", exc)
            finally:
                self._subscribed = False
                with contextlib.suppress(Exception):  # the connection may already be broken
                    pubsub.close()
            self._closed.wait(delay)
            delay = min(delay * 2, self.reconnect_max_s)
