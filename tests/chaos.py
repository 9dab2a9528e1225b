"""The chaos suite's harness: a Redis with an append-only file that can be killed and restarted on its port, worker
processes in their own process groups (to SIGKILL a pool child or the whole worker), the real web app, and a ledger
that checks the promise: every accepted job ends, exactly once, within the window.

`make chaos` runs every scenario at full size (CHAOS_FULL=1); `make test` runs each once, small.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from arabic_words.processes import command
from shared import keys
from shared.config import BUNDLED_MODEL_DIR, Settings
from shared.redis_server import start_redis

ROOT = Path(__file__).resolve().parent.parent
FULL = os.environ.get("CHAOS_FULL") == "1"
ROWS: list[dict] = []  # one per scenario, printed as a table at the end of the session (tests/conftest.py)


def repeats(fast: int, full: int) -> int:
    return full if FULL else fast


def chaos_settings(redis_url: str, cache_dir: Path, **overrides: object) -> Settings:
    base = Settings(
        REDIS_URL=redis_url,
        ASR_MODEL=str(BUNDLED_MODEL_DIR),
        ASR_BACKEND="torch-fp32",  # loads in about a second: workers are started and killed many times here
        ASR_CACHE_DIR=str(cache_dir),
        QUEUE="chaos",
        TORCH_THREADS=1,
        WORKER_CONCURRENCY=1,
        TASK_TIME_LIMIT_S=60,
        MAX_ATTEMPTS=3,
        CACHE="off",  # every scenario resubmits the same fixture: each job must reach a worker
    )
    return base.replace(**overrides)


class RedisUnderTest:
    """redis-server with an append-only file on a fixed port, which the suite stops and starts again."""

    def __init__(self, port: int, data_dir: Path) -> None:
        self.port, self.data_dir = port, data_dir
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = start_redis(self.port, self.data_dir, persistent=True, maxmemory="1gb")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=30)


def start_worker(settings: Settings, log_path: Path, *, name: str, wait_ready: bool = True) -> subprocess.Popen:
    """A real `celery worker` in a process group of its own; returns once one of its processes has a model."""
    argv = command("worker", "-n", f"{name}-{os.getpid()}@%h", "--without-mingle", "--without-gossip")
    with log_path.open("a") as log_file:
        proc = subprocess.Popen(
            argv, env={**os.environ, **settings.as_env()}, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT,
            start_new_session=True,
        )  # fmt: skip
    if wait_ready:
        deadline = time.monotonic() + 120
        while not ready_pids(settings, proc):
            if proc.poll() is not None or time.monotonic() > deadline:
                kill_group(proc)
                raise AssertionError(f"worker did not get ready:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.1)
    return proc


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def ready_pids(settings: Settings, proc: subprocess.Popen) -> set[int]:
    """The worker's processes (itself or its pool children) with a fresh heartbeat: a loaded model."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        fresh = client.zrangebyscore(keys.model_processes(), time.time() - keys.MODEL_HEARTBEAT_STALE_S, "+inf")
    except redis.RedisError:
        return set()
    finally:
        client.close()
    pids = {int(m.decode().rpartition(":")[2]) for m in fresh}
    return pids & ({proc.pid} | descendants(proc.pid))


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def stop_worker(proc: subprocess.Popen) -> None:
    """A warm shutdown (SIGTERM), then whatever is left of its group is killed."""
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
    kill_group(proc)


def _status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field}")


def peak_rss_mb(pid: int) -> float:
    return _status_mb(pid, "VmHWM")


def rss_mb(pid: int) -> float:
    return _status_mb(pid, "VmRSS")


def reset_peak_rss(pid: int) -> None:
    """Start the process's peak RSS (VmHWM) again from its current RSS (Linux: clear_refs 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@dataclass
class Ledger:
    """Accepted jobs, the first final state seen for each, and when: the promise's bookkeeping."""

    settings: Settings
    accepted: dict[str, float] = field(default_factory=dict)  # job id -> monotonic time accepted
    finals: dict[str, tuple[float, str]] = field(default_factory=dict)  # job id -> (seconds to final, record JSON)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.settings.REDIS_URL, socket_timeout=5)

    def accept(self, job_id: str) -> str:
        self.accepted[job_id] = time.monotonic()
        return job_id

    def _final_record(self, r: redis.Redis, job_id: str) -> str | None:
        raw = {k.decode(): v.decode() for k, v in r.hgetall(keys.job(job_id)).items()}
        if raw.get("status") not in ("succeeded", "failed"):
            return None
        return json.dumps({k: raw.get(k) for k in ("status", "result", "error", "finished_at")}, sort_keys=True)

    def poll(self) -> None:
        r = self.client()
        try:
            for job_id, at in self.accepted.items():
                if job_id not in self.finals:
                    record = self._final_record(r, job_id)
                    if record is not None:
                        self.finals[job_id] = (time.monotonic() - at, record)
        except redis.RedisError:
            pass
        finally:
            r.close()

    def wait_all(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.finals) < len(self.accepted) and time.monotonic() < deadline:
            self.poll()
            time.sleep(0.1)

    def status(self, job_id: str) -> dict:
        r = self.client()
        try:
            return {k.decode(): v.decode() for k, v in r.hgetall(keys.job(job_id)).items()}
        finally:
            r.close()

    def changed(self) -> int:
        """Final jobs whose record is no longer what it was when first seen final."""
        r = self.client()
        try:
            return sum(self._final_record(r, j) != record for j, (_, record) in self.finals.items())
        finally:
            r.close()

    def outcomes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, record in self.finals.values():
            rec = json.loads(record)
            key = rec["status"] if rec["status"] == "succeeded" else f"failed {json.loads(rec['error'])['code']}"
            counts[key] = counts.get(key, 0) + 1
        return counts

    def report(self, scenario: str, before: str, extra: str = "") -> dict:
        """Record the scenario's row and return it; the caller asserts on it."""
        window = self.settings.TASK_TIME_LIMIT_S + 60
        lost = len(self.accepted) - len(self.finals)
        slowest = max((s for s, _ in self.finals.values()), default=0.0)
        row = {
            "scenario": scenario, "jobs": len(self.accepted), "lost": lost, "changed": self.changed(),
            "slowest_s": round(slowest, 1), "window_s": window, "outcomes": self.outcomes(), "extra": extra,
            "before": before, "ok": lost == 0 and slowest <= window,
        }  # fmt: skip
        row["ok"] = row["ok"] and row["changed"] == 0
        ROWS.append(row)
        return row


def format_table(rows: list[dict]) -> str:
    lines = [
        "| scenario | jobs | lost | final changed | slowest to final (s) | outcomes | measured | before this change |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        outcomes = ", ".join(f"{v} {k}" for k, v in sorted(r["outcomes"].items()))
        lines.append(
            f"| {r['scenario']} | {r['jobs']} | {r['lost']} | {r['changed']} | {r['slowest_s']} (limit "
            f"{r['window_s']}) | {outcomes} | {r['extra']} | {r['before']} |"
        )
    return "\n".join(lines)
