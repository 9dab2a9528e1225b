"""How the service's long-running processes start: ``arabic-words web``, ``arabic-words worker``, ``arabic-words
flower``. This is the one definition; ``arabic-words run``, the Procfile, docker-compose, the tests and the
benchmarks all start these commands (``command()``) rather than writing gunicorn or Celery command lines of their
own."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from shared.config import Settings

SERVICES = ("web", "worker", "flower")


def command(service: str, *extra: str) -> list[str]:
    """The argv that starts ``service`` with this interpreter (settings come from the environment it is given)."""
    if service not in SERVICES:
        raise ValueError(f"unknown service {service!r}")
    return [sys.executable, "-m", "arabic_words", service, *extra]


def web_argv(settings: Settings) -> list[str]:
    """gunicorn serving the Flask app factory. gevent: a waiting ``?wait=`` long-poll is a greenlet woken by one
    Redis subscription per process (web/waiting.py), so each process holds up to 1000 connections. ``--timeout`` is
    gevent's heartbeat (a blocked event loop), not a per-request limit; the graceful timeout outlasts the longest
    long-poll, so a restart lets the open ones answer."""
    return [
        sys.executable, "-m", "gunicorn",
        "--bind", f"{settings.HOST}:{settings.PORT}",
        "--worker-class", "gevent",
        "--workers", str(settings.WEB_PROCESSES),
        "--worker-connections", "1000",
        "--timeout", "60",
        "--graceful-timeout", str(int(settings.MAX_WAIT_S) + 5),
        "web:create_app()",
    ]  # fmt: skip


def flower_argv(settings: Settings) -> list[str]:
    """Flower on the broker (``CELERY_BROKER_URL`` in its environment: a password in the URL stays out of ``ps``).
    Without FLOWER_BASIC_AUTH it listens on localhost only: never open without a password."""
    argv = [sys.executable, "-m", "celery", "flower", f"--port={settings.FLOWER_PORT}", "--purge_offline_workers=60"]
    if settings.FLOWER_BASIC_AUTH:
        return [*argv, "--address=0.0.0.0", f"--basic-auth={settings.FLOWER_BASIC_AUTH}"]
    return [*argv, "--address=127.0.0.1"]


def worker_argv(settings: Settings, extra: Sequence[str] = ()) -> list[str]:
    """``celery worker`` options; ``extra`` (e.g. ``-n name@%h --without-mingle``) come last and win."""
    return ["worker", "--loglevel", settings.LOG_LEVEL, "-Q", settings.QUEUE, "-n", "worker@%h", *extra]


def run_worker(settings: Settings, extra: Sequence[str] = ()) -> int:
    """Run a Celery worker in this process (its pool children are forked from it)."""
    from worker.celery_app import configure_logging, create_worker_app

    configure_logging(settings)
    return create_worker_app(settings).start(argv=worker_argv(settings, extra)) or 0


def exec_service(argv: list[str], settings: Settings) -> None:
    """Become ``argv`` (so a supervisor's signals reach gunicorn or Flower directly), with the environment holding
    the settings this process validated."""
    env = {**os.environ, **settings.as_env(), "CELERY_BROKER_URL": settings.REDIS_URL}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)
