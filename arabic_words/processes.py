"""How the service's long-running processes start: ``arabic-words web``, ``arabic-words worker``, ``arabic-words
flower``. This is the one definition; ``arabic-words run``, the Procfile, docker-compose, the tests and the
benchmarks all start these commands (``command()``) rather than writing gunicorn or Celery command lines of their
own."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from shared.config import ConfigError, Settings

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
    """Flower on the broker (the service's Celery configuration: ``arabic_words/flower_app.py``). Neither the broker
    URL (``REDIS_URL``) nor the basic-auth credentials
    (``FLOWER_BASIC_AUTH``, which Flower reads from its environment: ``flower_env``) are on the command line, which
    every user of the machine can read in ``ps``. Without credentials it listens on localhost only: never open
    without a password."""
    argv = [sys.executable, "-m", "celery", "-A", "arabic_words.flower_app", "flower", f"--port={settings.FLOWER_PORT}",
            "--purge_offline_workers=60"]  # fmt: skip
    return [*argv, "--address=0.0.0.0" if flower_credentials(settings) else "--address=127.0.0.1"]


def flower_credentials(settings: Settings) -> str:
    """``user:password`` (several: comma-separated) from FLOWER_BASIC_AUTH or the file FLOWER_BASIC_AUTH_FILE
    names (read here, at startup); empty = none. Flower splits the value at commas, so each part must be a
    ``user:password`` of its own: "ops:a,b" would let in anyone who sends the credential "b"."""
    name, value = "FLOWER_BASIC_AUTH", settings.FLOWER_BASIC_AUTH
    if settings.FLOWER_BASIC_AUTH_FILE:
        if value:
            raise ConfigError("invalid configuration: set FLOWER_BASIC_AUTH or FLOWER_BASIC_AUTH_FILE, not both")
        name = "FLOWER_BASIC_AUTH_FILE"
        try:
            value = Path(settings.FLOWER_BASIC_AUTH_FILE).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"invalid configuration: FLOWER_BASIC_AUTH_FILE={settings.FLOWER_BASIC_AUTH_FILE!r}: "
                f"cannot be read ({exc.__class__.__name__})"
            ) from None
    if value and not all(re.fullmatch(r"[^:,\s]+:[^,\n]+", part) for part in value.split(",")):
        raise ConfigError(f"invalid configuration: {name}=<hidden>: each comma-separated part must be user:password")
    return value


def flower_env(settings: Settings) -> dict[str, str]:
    """What Flower's environment needs beyond the settings: the credentials under FLOWER_BASIC_AUTH, or no such
    variable at all (Flower would take an empty one for the credential '' and answer every request 401)."""
    credentials = flower_credentials(settings)
    return {"FLOWER_BASIC_AUTH": credentials} if credentials else {}


def worker_argv(settings: Settings, extra: Sequence[str] = ()) -> list[str]:
    """``celery worker`` options; ``extra`` (e.g. ``-n name@%h --without-mingle``) come last and win."""
    lanes = ",".join(settings.queues)  # interactive first (see shared.queue: the order is the priority)
    return ["worker", "--loglevel", settings.LOG_LEVEL, "-Q", lanes, "-n", "worker@%h", *extra]


AUTO_WORKER_PROCESSES = 4  # WORKER_CONCURRENCY=0: one process per CPU up to this many (each holds a model copy)


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask: a container's or ``taskset``'s cpuset), else all of them."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def worker_settings(settings: Settings) -> Settings:
    """The settings a worker runs with. ``TORCH_THREADS=0`` leaves a single process the runtime's own thread count
    (every core); with several prefork processes it becomes the CPUs shared among them (at least one each), since N
    processes that each start a thread per core fight over the cores: on 2 cores, 2 processes x 1 thread sustained
    ~60 clips/s of the bundled model against ~30 for 2 x 2 threads on a busy machine (``python -m bench.saturation``,
    2.2 s WebM, p99 <= 1 s), and >= 70 against 40 for 1 process x 2 threads on a quiet one (docs/scaling.md).
    ``WORKER_CONCURRENCY=0`` (the default) becomes one process per CPU, at most ``AUTO_WORKER_PROCESSES``. An
    explicit TORCH_THREADS and the threads pool (``BATCH_MAX_SIZE > 1``) are kept as set."""
    if settings.BATCH_MAX_SIZE > 1:
        return settings
    processes = settings.WORKER_CONCURRENCY or min(cpu_count(), AUTO_WORKER_PROCESSES)
    if settings.TORCH_THREADS or processes == 1:
        return settings.replace(WORKER_CONCURRENCY=processes)
    return settings.replace(WORKER_CONCURRENCY=processes, TORCH_THREADS=max(1, cpu_count() // processes))


def run_worker(settings: Settings, extra: Sequence[str] = ()) -> int:
    """Run a Celery worker in this process (its pool children are forked from it) with ``worker_settings``. With
    METRICS_PORT, this process serves the metrics of them all (shared/metrics.py): their directory is chosen before
    the Celery app, which imports prometheus_client, is."""
    from shared import metrics

    settings = worker_settings(settings)

    metrics.use_group_dir(metrics.prepare_group_dir(settings, "worker") if settings.METRICS_PORT else None)
    from worker.celery_app import configure_logging, create_worker_app

    configure_logging(settings)
    app = create_worker_app(settings)
    if settings.METRICS_PORT:
        metrics.serve(settings)
    return app.start(argv=worker_argv(settings, extra)) or 0


def exec_service(argv: list[str], settings: Settings) -> None:
    """Become ``argv`` (so a supervisor's signals reach gunicorn or Flower directly), with the environment holding
    the settings this process validated."""
    from shared import metrics

    env = {**os.environ, **settings.as_env(), "CELERY_BROKER_URL": settings.REDIS_URL}
    # gunicorn's processes sum their metrics through files in one directory of their own (shared/metrics.py); its pid
    # in the name is this process's, which becomes the gunicorn master
    env.pop(metrics.MULTIPROC_ENV, None)
    if argv == web_argv(settings):
        env[metrics.MULTIPROC_ENV] = str(metrics.prepare_group_dir(settings, "web"))
    # Flower's credentials go to Flower alone, and never as an empty FLOWER_BASIC_AUTH (see flower_env)
    env.pop("FLOWER_BASIC_AUTH", None)
    if argv == flower_argv(settings):
        env.update(flower_env(settings))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)


def stop_process(proc: subprocess.Popen, timeout_s: float, sig: int = signal.SIGTERM) -> int:
    """Stop a child we started: ``sig`` (SIGTERM lets Celery and gunicorn finish their work; SIGINT makes gunicorn
    quit without waiting for open long-polls), then SIGKILL if it has not exited within ``timeout_s``. Returns its
    exit status; a child that has already exited is only reaped."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()
