"""Prometheus plumbing for the web server and the worker: prometheus_client's multiprocess mode.

A web server (a gunicorn master and its ``WEB_PROCESSES`` forked gevent workers) and a worker (a Celery parent and
its forked prefork children) are each a *process group*. Every process of a group writes its metrics to
memory-mapped files in the group's directory, and whichever process answers a scrape sums all the files
(``MultiProcessCollector``): a counter counts every request whatever process served it, and a pool child that was
killed or replaced keeps the counts it made.

- The group's directory is ``<METRICS_DIR or STATE_DIR/metrics>/<group>/<pid>``, the pid of the group's first
  process (``arabic-words web`` execs gunicorn, so it is the gunicorn master's; the Celery parent's). It is made
  empty when the group starts, and directories of groups whose process is gone are removed then: servers running
  side by side on one machine never share or wipe each other's files.
- ``PROMETHEUS_MULTIPROC_DIR`` names it. prometheus_client chooses its storage when it is first imported, so the
  variable is set before any process of the group imports it: in the environment ``arabic-words web`` execs gunicorn
  with, and in the worker's own environment before its Celery app is imported (``arabic_words/processes.py``).
- A live gauge's value from a process that is gone (killed, replaced) is dropped at each scrape:
  ``mark_process_dead`` for every pid with a live-gauge file whose process no longer runs. That is gunicorn's
  ``child_exit`` hook of the prometheus_client docs, done where the files are read, so it covers Celery's pool too.
  Counters and histograms of dead processes are kept: they are part of the totals.

This module imports prometheus_client only inside its functions: the worker imports it before the variable is set.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

from shared.config import ConfigError, Settings

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
GROUPS = ("web", "worker")


def base_dir(settings: Settings) -> Path:
    return Path(settings.METRICS_DIR) if settings.METRICS_DIR else settings.state_dir / "metrics"


def prepare_group_dir(settings: Settings, group: str, pid: int | None = None) -> Path:
    """The empty directory of the process group ``group`` whose first process is ``pid`` (default: this one);
    directories of the same group whose process is gone are removed."""
    if group not in GROUPS:
        raise ValueError(f"unknown metrics group {group!r}")
    pid = os.getpid() if pid is None else pid
    parent = base_dir(settings) / group
    path = parent / str(pid)
    try:
        parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        for sibling in parent.iterdir():
            if sibling.name.isdigit() and int(sibling.name) != pid and not _alive(int(sibling.name)):
                shutil.rmtree(sibling, ignore_errors=True)
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(mode=0o700)
    except OSError as exc:
        raise ConfigError(f"invalid configuration: METRICS_DIR={str(base_dir(settings))!r}: {exc.strerror}") from None
    return path


def use_group_dir(path: Path | None) -> None:
    """Make this process (and the processes it forks) keep its metrics in ``path``; None: in memory, this process's
    own. Must come before prometheus_client is imported."""
    if "prometheus_client" in sys.modules and os.environ.get(MULTIPROC_ENV) != (str(path) if path else None):
        raise RuntimeError("prometheus_client was imported before its multiprocess directory was chosen")
    if path is None:
        os.environ.pop(MULTIPROC_ENV, None)
    else:
        os.environ[MULTIPROC_ENV] = str(path)


def group_dir() -> Path | None:
    """This process's group directory; None when its metrics are its own (tests, a bare ``create_app()``)."""
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


def exposition_registry(path: Path | None = None):
    """A registry to expose: the sum over the group directory ``path`` (default: this process's, in multiprocess
    mode), else this process's own metrics. Register scrape-time collectors (e.g. the queue depth) on it as well."""
    from prometheus_client import REGISTRY, CollectorRegistry

    registry = CollectorRegistry()
    path = path or group_dir()
    registry.register(_GroupCollector(path) if path is not None else _Forward(REGISTRY))
    return registry


def render(registry) -> tuple[bytes, str]:
    """(body, content type) of a scrape."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(registry), CONTENT_TYPE_LATEST


def serve(settings: Settings) -> None:
    """Answer GET /metrics on HOST:METRICS_PORT from a thread of this process (the worker's parent) with the sum
    over its group. Processes forked later (the pool's children) close their copy of the listening socket."""
    from prometheus_client import start_http_server

    try:
        server, _ = start_http_server(settings.METRICS_PORT, addr=settings.HOST, registry=exposition_registry())
    except OSError as exc:
        raise ConfigError(
            f"invalid configuration: METRICS_PORT={settings.METRICS_PORT}: cannot listen on "
            f"{settings.HOST}:{settings.METRICS_PORT} ({exc.strerror})"
        ) from None
    os.register_at_fork(after_in_child=server.socket.close)
    log.info("metrics on http://%s:%d/metrics (dir %s)", settings.HOST, settings.METRICS_PORT, group_dir())


def reap_dead(path: Path) -> list[int]:
    """Drop the live gauges of processes that are gone (their files name their pid); returns those pids."""
    from prometheus_client import multiprocess

    dead = sorted({pid for pid in _pids(path.glob("gauge_live*_*.db")) if not _alive(pid)})
    for pid in dead:
        multiprocess.mark_process_dead(pid, str(path))
    return dead


def file_pids(path: Path) -> set[int]:
    """The pids that have written metrics in ``path`` (one set of files per process that ever did)."""
    return _pids(path.glob("*.db"))


def _pids(files: Iterable[Path]) -> set[int]:
    pids = set()
    for file in files:
        tail = file.stem.rpartition("_")[2]
        if tail.isdigit():
            pids.add(int(tail))
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class _GroupCollector:
    """The group directory's files, summed at each scrape, once the dead processes' live gauges are dropped."""

    def __init__(self, path: Path) -> None:
        from prometheus_client import multiprocess

        self.path = path
        self._files = multiprocess.MultiProcessCollector(None, str(path))

    def collect(self):
        reap_dead(self.path)
        return self._files.collect()


class _Forward:
    """Another registry's metrics (this process's own, outside multiprocess mode)."""

    def __init__(self, registry) -> None:
        self._registry = registry

    def collect(self):
        return self._registry.collect()
