"""Throughput at saturation, end to end over HTTP: the highest rate of uploads the service sustains with p99 <= 1 s.

Each worker configuration gets a fresh stack on loopback (a private redis-server and ``arabic-words web`` via
``bench.longpoll.web_stack``, plus ``arabic-words worker``), with the result cache off (every upload is the same
bytes) and no admission limit. An open-loop load generator then offers uploads at fixed rates, step by step: arrivals
are scheduled in advance (Poisson by default: exponential gaps, seeded; ``--arrivals uniform`` spaces them evenly),
never waiting for answers, so a slow server cannot slow the offered load. Each arrival POSTs the same 2.2 s WebM of
speech to /v1/transcriptions and long-polls ``GET <url>?wait=`` until the job is final; its latency runs from its
*scheduled* arrival to the final answer (a late client counts against the server, not in its favour). A step passes
when every job of its measured window succeeded and their p99 is at most 1 s; the sweep stops at the first failing
step. The reference, measured on the same stack in the same run, is the closed-loop rate: one job at a time.

Where the time goes, over each step's measured window: CPU seconds per finished job of the gunicorn processes
(web), redis-server, the worker processes and this load client (``psutil``), the worker's own timings (decode, vad,
inference: ``result.timings_ms``), the CPU other processes of a shared machine took, and idle = cores x wall - all
of it. Redis: commands per job (``INFO commandstats``), bytes per queued job (``used_memory`` before and after uploads
wait with no worker yet) and bytes per finished job kept for RESULT_TTL_S (what deleting those jobs' records frees
once the worker has run them).

    python -m bench.saturation [--configs default,prefork,threads,batching] [--rates 10,20,30,40,50] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import redis

from arabic_words.processes import AUTO_WORKER_PROCESSES, command, cpu_count, stop_process
from bench.longpoll import HOST, WebStack, percentile, web_stack
from shared import keys

ROOT = Path(__file__).resolve().parent.parent
CLIP_S = 2.2
TARGET_RATE = 40.0  # issue 19: >= 40 clips/s of 2.2 s WebM on 2 cores...
TARGET_P99_MS = 1000.0  # ...with p99 <= 1 s


@dataclass(frozen=True)
class Config:
    """A worker configuration: settings for the whole stack and extra ``celery worker`` options."""

    description: str
    settings: dict = field(default_factory=dict)
    worker_options: tuple[str, ...] = ()

    @property
    def model_processes(self) -> int:
        """Processes that load a model (and heartbeat): prefork children, else the worker's main process."""
        pooled = "threads" in self.worker_options or self.settings.get("BATCH_MAX_SIZE", 1) > 1
        if pooled:
            return 1
        return int(self.settings.get("WORKER_CONCURRENCY", 0)) or min(cpu_count(), AUTO_WORKER_PROCESSES)


CONFIGS = {
    "default": Config("shipped defaults: prefork, a process per CPU (at most 4), the CPUs shared among them"),
    "single": Config(
        "prefork, 1 process, TORCH_THREADS=0 (the runtime's own thread count): the default before 2026-12-01",
        {"WORKER_CONCURRENCY": 1},
    ),
    "prefork": Config("prefork, 2 processes x 1 thread", {"WORKER_CONCURRENCY": 2, "TORCH_THREADS": 1}),
    "prefork-t0": Config(
        "prefork, 2 processes, TORCH_THREADS=0 (each process takes the runtime's own thread count)",
        {"WORKER_CONCURRENCY": 2},
    ),
    "threads": Config(
        "threads pool, 1 process x 2 job threads, 1 inference thread each (no batching)",
        {"TORCH_THREADS": 1},
        ("--pool", "threads", "--concurrency", "2"),
    ),
    "batching": Config(
        "dynamic batching, 1 process, BATCH_MAX_SIZE=8, BATCH_WINDOW_MS=10, 2 inference threads",
        {"BATCH_MAX_SIZE": 8, "BATCH_WINDOW_MS": 10.0, "TORCH_THREADS": 2},
    ),
}


# ------------------------------------------------------------------------------------------------ arrivals
def arrival_times(rate: float, seconds: float, kind: str = "poisson", seed: int = 0) -> list[float]:
    """Offsets (s) of the arrivals in ``[0, seconds)`` at ``rate`` per second: Poisson (exponential gaps from a
    seeded generator) or ``uniform`` (every 1/rate s)."""
    if rate <= 0:
        return []
    if kind == "uniform":
        return [i / rate for i in range(math.ceil(seconds * rate - 1e-9))]
    if kind != "poisson":
        raise ValueError(f"unknown arrival process {kind!r}")
    rng, out, t = random.Random(seed), [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= seconds:
            return out
        out.append(t)


def passes(step: dict, p99_ms: float = TARGET_P99_MS) -> bool:
    """A step is sustained when it finished every job it was offered without an error, with p99 <= ``p99_ms``."""
    return step["ok"] > 0 and not step["errors"] and step["p99_ms"] is not None and step["p99_ms"] <= p99_ms


def highest_sustained(steps: list[dict], p99_ms: float = TARGET_P99_MS) -> float:
    """The highest offered rate of the steps below the first failing one (0 if the first fails)."""
    best = 0.0
    for step in sorted(steps, key=lambda s: s["rate"]):
        if not passes(step, p99_ms):
            break
        best = step["rate"]
    return best


# ------------------------------------------------------------------------------------------------ HTTP client
class HttpError(Exception):
    pass


class Client:
    """HTTP/1.1 over asyncio streams with a pool of keep-alive connections: cheap on the CPU it shares with the
    server. A connection idle past ``idle_s`` is dropped (gunicorn closes idle keep-alives after 2 s); a reused
    connection the server closed before answering is retried once on a new one."""

    def __init__(self, port: int, idle_s: float = 1.0) -> None:
        self.port, self.idle_s = port, idle_s
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self.connections = 0

    async def request(self, method: str, path: str, body: bytes = b"", content_type: str = "") -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {len(body)}\r\n"
        raw = (head + (f"Content-Type: {content_type}\r\n" if content_type else "") + "\r\n").encode() + body
        for attempt in (0, 1):
            reader, writer, reused = await self._acquire()
            try:
                writer.write(raw)
                await writer.drain()
                status, answer, keep = await _read_response(reader)
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                writer.close()
                if reused and attempt == 0 and (not isinstance(exc, asyncio.IncompleteReadError) or not exc.partial):
                    continue  # a stale keep-alive: the server never saw the request
                raise
            except BaseException:  # cancelled or timed out mid-request: the connection is in an unknown state
                writer.close()
                raise
            if keep:
                self._idle.append((reader, writer, time.monotonic()))
            else:
                writer.close()
            return status, answer
        raise AssertionError("unreachable")

    async def _acquire(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        now = time.monotonic()
        while self._idle:
            reader, writer, since = self._idle.pop()
            if now - since < self.idle_s and not reader.at_eof():
                return reader, writer, True
            writer.close()
        reader, writer = await asyncio.open_connection(HOST, self.port)
        self.connections += 1
        return reader, writer, False

    def close(self) -> None:
        for _, writer, _ in self._idle:
            writer.close()
        self._idle.clear()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")
        body = b"".join(chunks)
    else:
        return status, await reader.read(), False
    keep = headers.get("connection", "").lower() != "close" and lines[0].startswith("HTTP/1.1")
    return status, body, keep


async def transcribe(client: Client, data: bytes, timeout_s: float) -> dict:
    """POST ``data``, long-poll until final; the final job. Raises HttpError / TimeoutError."""
    deadline = time.monotonic() + timeout_s
    status, body = await client.request("POST", "/v1/transcriptions", data, "audio/webm")
    if status != 202:
        raise HttpError(f"POST {status}")
    job = json.loads(body)
    url = job["url"]
    while job["status"] not in ("succeeded", "failed"):
        wait = min(30.0, deadline - time.monotonic())
        if wait <= 0:
            raise TimeoutError
        status, body = await client.request("GET", f"{url}?wait={wait:.1f}")
        if status != 200:
            raise HttpError(f"GET {status}")
        job = json.loads(body)
    return job


# ------------------------------------------------------------------------------------------------ accounting
class Accounting:
    """CPU seconds per group of this benchmark's processes, the machine's busy time, and Redis counters, between
    ``start()`` and ``stop()``."""

    def __init__(self, worker_pid: int, redis_client: redis.Redis) -> None:
        self.worker_pid, self.redis = worker_pid, redis_client

    def _group(self, proc: psutil.Process) -> str | None:
        try:
            if proc.pid == os.getpid():
                return "client"
            if proc.pid == self.worker_pid or self.worker_pid in {p.pid for p in proc.parents()}:
                return "worker"
            name, cmdline = proc.name(), " ".join(proc.cmdline())
        except psutil.Error:
            return None
        if name.startswith("redis-server") or "redis-server" in cmdline:
            return "redis"
        if "gunicorn" in cmdline:
            return "web"
        return None

    def _snapshot(self) -> dict:
        me = psutil.Process()
        cpu: dict[int, tuple[str, float]] = {}
        for proc in [me, *me.children(recursive=True)]:
            group = self._group(proc)
            if group is None:
                continue
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            cpu[proc.pid] = (group, times.user + times.system)
        # niced processes count: with autogroup scheduling (Linux's default for desktops and many VMs) another
        # session's nice-19 process takes its group's share of the cores all the same
        machine = psutil.cpu_times()
        stats = self.redis.info("commandstats")
        return {
            "t": time.monotonic(), "cpu": cpu,
            "machine_busy": sum(machine) - machine.idle - machine.iowait,
            "commands": {k.removeprefix("cmdstat_"): (v["calls"], v["usec"]) for k, v in stats.items()},
        }  # fmt: skip

    def start(self) -> None:
        self._start = self._snapshot()

    def stop(self) -> dict:
        """CPU seconds per group, machine busy seconds (every process, other users' too), wall, Redis calls/usec."""
        end, start = self._snapshot(), self._start
        groups: Counter = Counter()
        for pid, (group, seconds) in end["cpu"].items():
            groups[group] += seconds - start["cpu"].get(pid, (group, 0.0))[1]
        commands = {}
        for name, (calls, usec) in end["commands"].items():
            calls0, usec0 = start["commands"].get(name, (0, 0))
            if calls > calls0:
                commands[name] = (calls - calls0, usec - usec0)
        return {"wall_s": end["t"] - start["t"], "cpu_s": dict(groups),
                "machine_busy_s": end["machine_busy"] - start["machine_busy"], "redis_commands": commands}  # fmt: skip


# ------------------------------------------------------------------------------------------------ one step
@dataclass
class _Job:
    scheduled: float
    finished: float | None = None
    latency_s: float | None = None
    error: str | None = None
    timings: dict = field(default_factory=dict)
    lateness_s: float = 0.0


async def _step(
    port: int, data: bytes, offsets: list[float], timeout_s: float, window: tuple[float, float], account: Accounting
) -> tuple[list[_Job], dict]:
    loop = asyncio.get_running_loop()
    client = Client(port)
    start = loop.time() + 0.05
    jobs: list[_Job] = []

    async def one(job: _Job) -> None:
        job.lateness_s = loop.time() - job.scheduled
        try:
            final = await asyncio.wait_for(transcribe(client, data, timeout_s), timeout_s + 1)
        except TimeoutError:
            job.error = "timeout"
            return
        except (OSError, HttpError, asyncio.IncompleteReadError, ValueError) as exc:
            job.error = str(exc) if isinstance(exc, HttpError) else type(exc).__name__
            return
        job.finished = loop.time()
        if final["status"] != "succeeded":
            job.error = f"job {final.get('error', {}).get('code', final['status'])}"
            return
        job.latency_s = job.finished - job.scheduled
        job.timings = final["result"].get("timings_ms", {})

    async def window_clock() -> dict:
        await asyncio.sleep(max(0.0, start + window[0] - loop.time()))
        account.start()
        await asyncio.sleep(max(0.0, start + window[1] - loop.time()))
        return account.stop()

    clock = asyncio.create_task(window_clock())
    tasks = []
    for offset in offsets:
        job = _Job(start + offset)
        jobs.append(job)
        await asyncio.sleep(max(0.0, job.scheduled - loop.time()))
        tasks.append(asyncio.create_task(one(job)))
    usage = await clock
    await asyncio.gather(*tasks)
    for job in jobs:  # relative to the step's start, for the window test
        job.scheduled -= start
        if job.finished is not None:
            job.finished -= start
    client.close()
    usage["client_connections"] = client.connections
    return jobs, usage


def run_step(
    stack: WebStack,
    account: Accounting,
    data: bytes,
    rate: float,
    *,
    duration_s: float,
    warmup_s: float,
    arrivals: str = "poisson",
    seed: int = 0,
    timeout_s: float = 10.0,
) -> dict:
    """Offer ``rate`` uploads/s for ``warmup_s + duration_s``; figures over the measured window (the jobs that
    arrived in it for latency and errors, the jobs that finished in it for throughput and per-job costs)."""
    offsets = arrival_times(rate, warmup_s + duration_s, arrivals, seed)
    window = (warmup_s, warmup_s + duration_s)
    jobs, usage = asyncio.run(_step(stack.port, data, offsets, timeout_s, window, account))
    measured = [j for j in jobs if window[0] <= j.scheduled < window[1]]
    done = [j for j in jobs if j.finished is not None and window[0] <= j.finished < window[1] and j.error is None]
    latencies = [j.latency_s * 1000 for j in measured if j.latency_s is not None]
    errors = Counter(j.error for j in measured if j.error)
    n = max(1, len(done))
    timing_names = sorted({k for j in done for k in j.timings})
    worker_ms = {k: round(sum(j.timings.get(k, 0.0) for j in done) / n, 2) for k in timing_names}
    cpu_ms = {g: round(s * 1000 / n, 2) for g, s in sorted(usage["cpu_s"].items())}
    cores = os.cpu_count() or 1
    wall = usage["wall_s"]
    ours_s = sum(usage["cpu_s"].values())
    others_s = max(0.0, usage["machine_busy_s"] - ours_s)  # other processes of a shared machine
    idle_ms = round((cores * wall - ours_s - others_s) * 1000 / n, 2)
    commands = usage["redis_commands"]
    top = sorted(commands.items(), key=lambda kv: -kv[1][0])
    return {
        "rate": rate, "arrivals": arrivals, "offered": len(measured), "ok": len(latencies),
        "errors": dict(errors), "throughput": round(len(done) / wall, 2),
        "p50_ms": _round(percentile(latencies, 0.5)), "p99_ms": _round(percentile(latencies, 0.99)),
        "max_ms": _round(max(latencies, default=None)),
        "client_lateness_p99_ms": _round(percentile([j.lateness_s * 1000 for j in measured], 0.99)),
        "finished_in_window": len(done), "wall_s": round(wall, 2),
        "cpu_ms_per_job": cpu_ms, "idle_ms_per_job": idle_ms,
        "cpu_share": {g: round(s / (cores * wall), 3) for g, s in sorted(usage["cpu_s"].items())},
        "machine_busy_share": round(usage["machine_busy_s"] / (cores * wall), 3),
        # the machine's busy time that was not this benchmark's processes (other users of a shared machine)
        "others_share": round(others_s / (cores * wall), 3),
        "others_ms_per_job": round(others_s * 1000 / n, 2),
        "worker_timings_ms_per_job": worker_ms,
        "redis_calls_per_job": round(sum(c for c, _ in commands.values()) / n, 1),
        "redis_usec_per_job": round(sum(u for _, u in commands.values()) / n, 1),
        "redis_top_commands_per_job": {name: round(c / n, 2) for name, (c, _) in top[:8]},
        "client_connections": usage["client_connections"],
    }  # fmt: skip


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


async def _closed_loop(port: int, data: bytes, jobs: int) -> list[float]:
    client, out = Client(port), []
    for _ in range(jobs):
        t0 = time.perf_counter()
        final = await transcribe(client, data, 30)
        if final["status"] != "succeeded":
            raise RuntimeError(f"closed-loop job did not succeed: {final}")
        out.append((time.perf_counter() - t0) * 1000)
    client.close()
    return out


def closed_loop(stack: WebStack, data: bytes, jobs: int = 30) -> dict:
    """The reference: one job at a time (submit, long-poll, the next one): jobs per second and median latency."""
    t0 = time.perf_counter()
    latencies = asyncio.run(_closed_loop(stack.port, data, jobs))
    wall = time.perf_counter() - t0
    return {"jobs": jobs, "rate": round(jobs / wall, 2), "p50_ms": round(statistics.median(latencies), 1)}


# ------------------------------------------------------------------------------------------------ a stack
@contextlib.contextmanager
def worker_process(stack: WebStack, config: Config, tmp: Path, start_timeout_s: float = 300) -> Iterator[int]:
    """``arabic-words worker`` for ``stack`` with ``config``'s options; its pid once every model process is warm."""
    env = {**os.environ, **stack.settings.as_env()}
    argv = command("worker", "--without-mingle", "--without-gossip", *config.worker_options)
    log_path = tmp / "worker.log"
    with log_path.open("w") as log:
        worker = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    client = redis.Redis.from_url(stack.settings.REDIS_URL)
    try:
        deadline = time.monotonic() + start_timeout_s
        while client.zcard(keys.model_processes()) < config.model_processes:
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        yield worker.pid
    finally:
        stop_process(worker, 60)
        client.close()


async def _submit_many(port: int, data: bytes, n: int) -> list[str]:
    client, urls = Client(port), []
    for _ in range(n):
        status, body = await client.request("POST", "/v1/transcriptions", data, "audio/webm")
        if status != 202:
            raise HttpError(f"POST {status}: {body[:200]!r}")
        urls.append(json.loads(body)["url"])
    client.close()
    return urls


async def _wait_all(port: int, urls: list[str]) -> int:
    """Long-poll every job until final; the size of the last final answer (bytes)."""
    client, size = Client(port), 0
    for url in urls:
        while True:
            status, body = await client.request("GET", f"{url}?wait=30")
            if json.loads(body)["status"] in ("succeeded", "failed"):
                size = len(body)
                break
    client.close()
    return size


def _wait_quiet(max_share: float, timeout_s: float = 60.0) -> bool:
    """Wait until the machine's busy share over one second (niced processes too) is at most ``max_share`` (this
    benchmark's stack is idle between steps, so that is other processes); False after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        times = psutil.cpu_times_percent(interval=1.0)
        share = (100 - times.idle - times.iowait) / 100
        if share <= max_share:
            return True
        if time.monotonic() > deadline:
            print(f"  (the machine stays {share:.0%} busy without this benchmark: measuring anyway)", flush=True)
            return False


def _drain(client: redis.Redis, queue: str, timeout_s: float = 120) -> None:
    """Wait until no job waits in ``queue`` or is held by a worker (a saturated step's backlog)."""
    deadline = time.monotonic() + timeout_s
    while client.llen(queue) or client.zcard(keys.processing()):
        if time.monotonic() > deadline:
            raise RuntimeError("the backlog did not drain")
        time.sleep(0.2)


def measure_config(
    name: str,
    rates: list[float],
    *,
    runs: int = 1,
    duration_s: float = 15.0,
    warmup_s: float = 3.0,
    arrivals: str = "poisson",
    memory_jobs: int = 200,
    log_level: str = "WARNING",
    stop_after_failure: bool = True,
    max_others: float = 0.1,
    retries: int = 2,
    settings: dict | None = None,
) -> dict:
    """A fresh stack with ``CONFIGS[name]``: Redis bytes per queued and per finished job, the closed-loop reference,
    then ``runs`` sweeps over ``rates`` (each stopped at its first failing step unless ``stop_after_failure`` is
    off). On a shared machine a step waits (up to a minute) until other processes use at most ``max_others`` of the
    cores, and one that other processes took more of than that while it ran is run again, up to ``retries`` times
    (then kept, marked ``contended``). ``settings``: more settings for the stack (they win over the config's)."""
    config = CONFIGS[name]
    from bench.__main__ import speech
    from bench.models import WORK
    from training.synth import encode

    data = encode(speech(CLIP_S), "webm")
    overrides = {"QUEUE": "bench-saturation", "CACHE": "off", "MAX_QUEUE_DEPTH": 1_000_000, "LOG_LEVEL": log_level,
                 "ASR_CACHE_DIR": str(WORK / "cache"), **config.settings, **(settings or {})}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="aw-saturation-") as tmp, web_stack(Path(tmp), **overrides) as stack:
        client = redis.Redis.from_url(stack.settings.REDIS_URL)
        # Redis bytes: uploads waiting with no worker yet, then the same jobs finished (kept for RESULT_TTL_S)
        before = client.info("memory")["used_memory"]
        urls = asyncio.run(_submit_many(stack.port, data, memory_jobs))
        queued = client.info("memory")["used_memory"]
        with worker_process(stack, config, Path(tmp)) as worker_pid:
            started = time.perf_counter()
            result_bytes = asyncio.run(_wait_all(stack.port, urls))  # also warms the worker up
            first_jobs_s = time.perf_counter() - started
            # a finished job's record: what Redis frees when these records go (the worker's connections, which
            # also arrived since `before`, stay)
            finished = client.info("memory")["used_memory"]
            client.delete(*[keys.job(url.rstrip("/").rsplit("/", 1)[1]) for url in urls])
            record_bytes = (finished - client.info("memory")["used_memory"]) / memory_jobs
            _wait_quiet(max_others)
            reference = closed_loop(stack, data)
            account = Accounting(worker_pid, client)
            sweeps = []
            for run in range(runs):
                steps = []
                for rate in rates:
                    for attempt in range(1 + retries):
                        _wait_quiet(max_others)
                        step = run_step(stack, account, data, rate, duration_s=duration_s, warmup_s=warmup_s,
                                        arrivals=arrivals, seed=run * 1000 + int(rate) + attempt)  # fmt: skip
                        step["contended"] = step["others_share"] > max_others
                        _print_step(name, run, step)
                        _drain(client, stack.settings.QUEUE)
                        if not step["contended"]:
                            break
                    steps.append(step)
                    if stop_after_failure and not passes(step):
                        break
                sweeps.append({"steps": steps, "sustained": highest_sustained(steps)})
        backend = _backend(client)
        client.close()
    sustained = [s["sustained"] for s in sweeps]
    return {
        "config": name, "description": config.description, "settings": config.settings,
        "worker_options": list(config.worker_options), "backend": backend, "upload_bytes": len(data),
        "redis_bytes_per_queued_job": round((queued - before) / memory_jobs),
        "redis_bytes_per_finished_job": round(record_bytes),
        "redis_bytes_since_start_per_finished_job": round((finished - before) / memory_jobs),
        "result_answer_bytes": result_bytes,
        "backlog_of_memory_jobs_s": round(first_jobs_s, 2),
        "closed_loop": reference, "sweeps": sweeps, "sustained_median": statistics.median(sustained),
        "sustained_runs": sustained,
    }  # fmt: skip


def _backend(client: redis.Redis) -> str:
    """The backend the worker ran (from a finished job's result), or '?'."""
    for key in client.scan_iter(match=keys.job("*"), count=100):
        raw = client.hget(key, "result")
        if raw:
            return json.loads(raw).get("backend", "?")
    return "?"


# ------------------------------------------------------------------------------------------------ report
def _print_step(name: str, run: int, s: dict) -> None:
    cpu = " ".join(f"{g} {v}" for g, v in s["cpu_ms_per_job"].items())
    work = " ".join(f"{k} {v}" for k, v in s["worker_timings_ms_per_job"].items() if k not in ("total",))
    print(f"  {name:<9} run {run + 1} rate {s['rate']:>5g}/s: done {s['throughput']:>6.2f}/s  p50 {s['p50_ms']} "
          f"p99 {s['p99_ms']} ms  errors {s['errors'] or 0}  {'ok' if passes(s) else 'FAIL'} | CPU ms/job: {cpu} "
          f"others {s['others_ms_per_job']} idle {s['idle_ms_per_job']}{' CONTENDED' if s.get('contended') else ''} "
          f"| worker ms/job: {work} | redis {s['redis_calls_per_job']} calls/job", flush=True)  # fmt: skip


def _median_step(results: list[dict], rate: float) -> dict | None:
    """Per-rate medians over the sweeps that reached ``rate``."""
    steps = [s for r in results for s in r["steps"] if s["rate"] == rate]
    if not steps:
        return None

    def med(get):
        values = [v for v in (get(s) for s in steps) if v is not None]
        return round(statistics.median(values), 2) if values else None

    groups = sorted({g for s in steps for g in s["cpu_ms_per_job"]})
    timing = sorted({k for s in steps for k in s["worker_timings_ms_per_job"]})
    return {
        "rate": rate, "sweeps": len(steps), "throughput": med(lambda s: s["throughput"]),
        "p50_ms": med(lambda s: s["p50_ms"]), "p99_ms": med(lambda s: s["p99_ms"]),
        "errors": sum(sum(s["errors"].values()) for s in steps),
        "passed": sum(passes(s) for s in steps),
        "cpu_ms_per_job": {g: med(lambda s, g=g: s["cpu_ms_per_job"].get(g)) for g in groups},
        "idle_ms_per_job": med(lambda s: s["idle_ms_per_job"]),
        "worker_timings_ms_per_job": {k: med(lambda s, k=k: s["worker_timings_ms_per_job"].get(k)) for k in timing},
        "redis_calls_per_job": med(lambda s: s["redis_calls_per_job"]),
        "redis_usec_per_job": med(lambda s: s["redis_usec_per_job"]),
        "machine_busy_share": med(lambda s: s["machine_busy_share"]),
        "others_share": med(lambda s: s["others_share"]),
        "others_ms_per_job": med(lambda s: s["others_ms_per_job"]),
        "contended": sum(bool(s.get("contended")) for s in steps),
    }  # fmt: skip


def report(results: list[dict]) -> None:
    """The summary table: per configuration, the highest sustained rate beside the closed-loop reference, then
    where the time goes at that rate."""
    print(f"\n## saturation: 2.2 s WebM over HTTP, {os.cpu_count()} cores; sustained = highest offered rate with "
          f"p99 <= {TARGET_P99_MS:g} ms and no errors (median over sweeps); reference = the same stack closed-loop "
          f"(one job at a time)")  # fmt: skip
    print(f"{'config':<10}{'backend':<11}{'sustained/s':>12}{'runs':>16}{'closed-loop/s':>14}{'x ref':>7}"
          f"  target >= {TARGET_RATE:g}/s")  # fmt: skip
    for r in results:
        ratio = r["sustained_median"] / r["closed_loop"]["rate"] if r["closed_loop"]["rate"] else float("nan")
        verdict = "met" if r["sustained_median"] >= TARGET_RATE else "MISSED"
        runs = ",".join(f"{x:g}" for x in r["sustained_runs"])
        print(f"{r['config']:<10}{r['backend']:<11}{r['sustained_median']:>12g}{runs:>16}"
              f"{r['closed_loop']['rate']:>14.1f}{ratio:>6.1f}x  {verdict}  ({r['description']})")  # fmt: skip
    print("\n## where the time goes at the highest sustained rate (medians; CPU ms per finished job; other "
          "processes: not this benchmark's;\n## idle = cores x wall - all of them; worker ms = the worker's own "
          "timings)")  # fmt: skip
    for r in results:
        rate = r["sustained_median"] or min(s["rate"] for sw in r["sweeps"] for s in sw["steps"])
        m = _median_step(r["sweeps"], rate)
        r["at_sustained"] = m
        if m is None:
            continue
        cpu = "  ".join(f"{g} {v}" for g, v in m["cpu_ms_per_job"].items())
        work = "  ".join(f"{k} {v}" for k, v in m["worker_timings_ms_per_job"].items() if k != "total")
        print(
            f"{r['config']:<10} @ {rate:g}/s (done {m['throughput']}/s, p50 {m['p50_ms']} p99 {m['p99_ms']} ms): "
            f"CPU {cpu}  other processes {m['others_ms_per_job']}  idle {m['idle_ms_per_job']} | worker {work}"
            + (f" | {m['contended']} of {m['sweeps']} contended" if m["contended"] else "")
        )
        print(f"{'':<10}   redis: {m['redis_calls_per_job']} commands/job ({m['redis_usec_per_job']} us in Redis), "
              f"{r['redis_bytes_per_queued_job']} B per queued job (upload {r['upload_bytes']} B), "
              f"{r['redis_bytes_per_finished_job']} B per finished job kept for RESULT_TTL_S, "
              f"final answer {r['result_answer_bytes']} B")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.saturation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="default,prefork,threads,batching", help=f"of {', '.join(CONFIGS)}")
    parser.add_argument("--rates", default="10,20,30,40,50", help="offered uploads/s, in order")
    parser.add_argument("--runs", type=int, default=3, help="sweeps per configuration (medians)")
    parser.add_argument("--duration", type=float, default=15.0, help="measured seconds per step")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds per step before the measured window")
    parser.add_argument("--arrivals", choices=("poisson", "uniform"), default="poisson")
    parser.add_argument("--log-level", default="WARNING", help="LOG_LEVEL of web and worker (the service: INFO)")
    parser.add_argument("--keep-going", action="store_true", help="run every rate, not stopping at a failure")
    parser.add_argument(
        "--max-others",
        type=float,
        default=0.1,
        help="share of the cores other processes may take during a step before it is run again",
    )
    parser.add_argument("--retries", type=int, default=2, help="reruns of a step other processes contended")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    results = []
    for name in args.configs.split(","):
        print(f"# {name}: {CONFIGS[name].description}", flush=True)
        results.append(measure_config(name, rates, runs=args.runs, duration_s=args.duration, warmup_s=args.warmup,
                                      arrivals=args.arrivals, log_level=args.log_level,
                                      stop_after_failure=not args.keep_going, max_others=args.max_others,
                                      retries=args.retries))  # fmt: skip
        r = results[-1]
        if args.json:  # as each configuration ends: a long run cut short keeps what it measured
            args.json.write_text(json.dumps(results, indent=1))
        print(f"  closed-loop reference {r['closed_loop']['rate']}/s (p50 {r['closed_loop']['p50_ms']} ms); "
              f"sustained per sweep {r['sustained_runs']}", flush=True)  # fmt: skip
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
