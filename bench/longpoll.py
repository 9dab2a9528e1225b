"""Long-poll load on the web server alone: K concurrent ``?wait=W`` long-polls while /healthz and uploads are timed.

Loopback only and bounded: it starts its own redis-server (free port, temporary directory) and the web server with
the service's own web command (``arabic-words web``, ``arabic_words/processes.py``), and no Celery worker, so every job
stays queued and every long-poll waits its full time; each long-poll is re-issued when it answers, so K stay open
throughout. Meanwhile it sends GET /healthz and multipart uploads (tests/data/kitab.wav) at fixed rates (open loop:
a slow answer does not delay the next request) and, a few times, finishes a job through ``JobStore.succeed`` while a
long-poll waits on it (wake latency). Everything stops after warm-up + duration (+ at most one probe timeout).

    python -m bench.longpoll [--polls 500] [--wait 10] [--duration 20] [--runs 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

from arabic_words.processes import stop_process
from shared.config import Settings
from shared.jobs import JobStore
from shared.redis_server import free_port, start_redis

REPO_ROOT = Path(__file__).resolve().parent.parent
UPLOAD_FIXTURE = REPO_ROOT / "tests" / "data" / "kitab.wav"
HOST = "127.0.0.1"


@dataclass
class WebStack:
    port: int
    store: JobStore
    settings: Settings
    command: list[str]  # the gunicorn command line `arabic-words web` runs
    log_path: Path


@contextlib.contextmanager
def web_stack(
    tmp_dir: Path, *, redis_url: str | None = None, start_timeout_s: float = 30, **overrides: object
) -> Iterator[WebStack]:
    """A redis-server (unless ``redis_url``) and the web server as ``arabic-words run`` starts it, on loopback ports;
    no worker. ``overrides``: more settings. Stopped (quick shutdown: open long-polls are cut) on the way out."""
    from arabic_words.processes import command, web_argv

    redis_proc = None
    if redis_url is None:
        redis_port = free_port()
        redis_proc = start_redis(redis_port, tmp_dir / "redis", persistent=False)
        redis_url = f"redis://{HOST}:{redis_port}/0"
    settings = Settings(
        **{"QUEUE": "bench-longpoll", "LOG_LEVEL": "WARNING", **overrides,
           "REDIS_URL": redis_url, "HOST": HOST, "PORT": free_port()}
    )  # loopback only, whatever the overrides: this is a load generator's target  # fmt: skip
    web_command, env = command("web"), {**os.environ, **settings.as_env()}
    log_path = tmp_dir / "gunicorn.log"
    with log_path.open("w") as log_file:
        web = subprocess.Popen(web_command, env=env, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT)
    client = redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"http://{HOST}:{settings.PORT}/healthz", timeout=2):
                    break
            except OSError:
                if web.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the web server did not start:\n{log_path.read_text()[-3000:]}") from None
                time.sleep(0.1)
        yield WebStack(settings.PORT, JobStore(client, settings), settings, web_argv(settings), log_path)
    finally:
        stop_process(web, 15, signal.SIGINT)  # gunicorn: quick shutdown (TERM would wait for the open long-polls)
        client.close()
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(timeout=10)


# ------------------------------------------------------------------------------------------------ HTTP client
def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode()


def _multipart_upload(data: bytes, filename: str) -> bytes:
    boundary = f"bench{uuid.uuid4().hex}"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        f"Content-Type: audio/wav\r\n\r\n".encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /v1/transcriptions HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def http_request(port: int, raw: bytes, timeout_s: float) -> tuple[int, bytes]:
    """Send one request on a fresh connection (``Connection: close``); (status, body). Raises TimeoutError."""

    async def exchange() -> bytes:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(raw)
            await writer.drain()
            return await reader.read()
        finally:
            writer.close()

    data = await asyncio.wait_for(exchange(), timeout_s)
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/"):
        raise ConnectionError("no HTTP answer")
    return int(head.split(b" ", 2)[1]), body


def _error_name(exc: BaseException) -> str:
    return "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..1) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass
class _Probe:
    latencies_s: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    sent: int = 0

    def summary(self) -> dict:
        ms = [x * 1000 for x in self.latencies_s]

        def rank(q: float) -> float | None:
            value = percentile(ms, q)
            return None if value is None else round(value, 1)

        return {"sent": self.sent, "ok": len(ms), "errors": dict(self.errors), "p50_ms": rank(0.5),
                "p99_ms": rank(0.99), "max_ms": rank(1.0)}  # fmt: skip


# ---------------------------------------------------------------------------------------------------- load
async def _load(
    stack: WebStack,
    job_ids: list[str],
    wait_s: float,
    duration_s: float,
    warmup_s: float,
    healthz_rate: float,
    upload_rate: float,
    wake_checks: int,
    probe_timeout_s: float,
) -> dict:
    loop = asyncio.get_running_loop()
    port = stack.port
    stop = asyncio.Event()
    polls = {"answers": 0, "valid": 0, "early": 0, "invalid": Counter(), "errors": Counter(), "in_flight": 0}
    peak_in_flight = 0

    async def long_poll(job_id: str, delay: float) -> None:
        nonlocal peak_in_flight
        await asyncio.sleep(delay)  # spread over the warm-up, so re-issues do not all land at once
        raw = _get(f"/v1/transcriptions/{job_id}?wait={wait_s:g}")
        while not stop.is_set():
            started = loop.time()
            polls["in_flight"] += 1
            peak_in_flight = max(peak_in_flight, polls["in_flight"])
            try:
                status, body = await http_request(port, raw, wait_s + probe_timeout_s)
            except (OSError, TimeoutError, ValueError) as exc:
                polls["errors"][_error_name(exc)] += 1
                await asyncio.sleep(0.2)
                continue
            finally:
                polls["in_flight"] -= 1
            elapsed = loop.time() - started
            polls["answers"] += 1
            answer = json.loads(body) if status == 200 else {}
            if status == 200 and answer.get("status") == "queued":
                polls["valid"] += 1
                polls["early"] += elapsed < wait_s - 0.5  # a queued job must hold the request its whole wait
            else:
                polls["invalid"][f"{status} {answer.get('status', body[:60].decode(errors='replace'))}"] += 1

    async def probe(raw: bytes, expect: int, into: _Probe) -> None:
        into.sent += 1
        started = loop.time()
        try:
            status, _ = await http_request(port, raw, probe_timeout_s)
        except (OSError, TimeoutError, ValueError) as exc:
            into.errors[_error_name(exc)] += 1
            return
        if status == expect:
            into.latencies_s.append(loop.time() - started)
        else:
            into.errors[f"http {status}"] += 1

    async def at_rate(rate: float, raw: bytes, expect: int, into: _Probe, end: float) -> None:
        if rate <= 0:
            return
        tasks, next_at = [], loop.time()
        while next_at < end:
            tasks.append(asyncio.create_task(probe(raw, expect, into)))
            next_at += 1 / rate
            await asyncio.sleep(max(0.0, next_at - loop.time()))
        await asyncio.gather(*tasks)

    wake = _Probe()

    async def wake_check(delay: float) -> None:
        """A job finished (JobStore.succeed, as a worker does) while a long-poll waits on it: time to the answer."""
        await asyncio.sleep(delay)
        wake.sent += 1
        job = await asyncio.to_thread(stack.store.create, b"never sent to a worker")
        waiting = asyncio.create_task(
            http_request(port, _get(f"/v1/transcriptions/{job.id}?wait=20"), 20 + probe_timeout_s)
        )
        await asyncio.sleep(1.0)  # let the long-poll reach the server and start waiting
        if waiting.done():
            wake.errors["answered before the job ended"] += 1
            return
        finished = loop.time()
        await asyncio.to_thread(stack.store.succeed, job.id, {"text": "", "bench": True})
        try:
            status, body = await waiting
        except (OSError, TimeoutError, ValueError) as exc:
            wake.errors[_error_name(exc)] += 1
            return
        if status == 200 and json.loads(body).get("status") == "succeeded":
            wake.latencies_s.append(loop.time() - finished)
        else:
            wake.errors[f"http {status}"] += 1

    upload_raw = _multipart_upload(UPLOAD_FIXTURE.read_bytes(), UPLOAD_FIXTURE.name)
    poll_tasks = [asyncio.create_task(long_poll(j, random.uniform(0, warmup_s * 0.8))) for j in job_ids]
    await asyncio.sleep(warmup_s)
    healthz, uploads = _Probe(), _Probe()
    end = loop.time() + duration_s
    checks = [asyncio.create_task(wake_check(duration_s * (i + 0.3) / wake_checks)) for i in range(wake_checks)]
    await asyncio.gather(
        at_rate(healthz_rate, _get("/healthz"), 200, healthz, end),
        at_rate(upload_rate, upload_raw, 202, uploads, end),
        *checks,
    )
    open_at_end = polls["in_flight"]
    stop.set()
    for task in poll_tasks:
        task.cancel()
    await asyncio.gather(*poll_tasks, return_exceptions=True)
    del polls["in_flight"]
    polls.update(invalid=dict(polls["invalid"]), errors=dict(polls["errors"]), open_at_end=open_at_end,
                 peak_open=peak_in_flight)  # fmt: skip
    return {"healthz": healthz.summary(), "upload": uploads.summary(), "wake": wake.summary(), "long_polls": polls}


def measure(
    stack: WebStack,
    *,
    polls: int = 500,
    wait_s: float = 10.0,
    duration_s: float = 20.0,
    warmup_s: float = 3.0,
    healthz_rate: float = 10.0,
    upload_rate: float = 2.0,
    wake_checks: int = 3,
    probe_timeout_s: float = 10.0,
) -> dict:
    """Run the load against a started ``web_stack``; the figures as a dict (latencies in ms)."""
    job_ids = [stack.store.create(b"never sent to a worker").id for _ in range(polls)]
    started = time.monotonic()
    result = asyncio.run(
        _load(stack, job_ids, wait_s, duration_s, warmup_s, healthz_rate, upload_rate, wake_checks, probe_timeout_s)
    )
    config = {"polls": polls, "wait_s": wait_s, "duration_s": duration_s, "warmup_s": warmup_s,
              "healthz_rate": healthz_rate, "upload_rate": upload_rate, "probe_timeout_s": probe_timeout_s}  # fmt: skip
    return {"config": config, "server": " ".join(stack.command[1:]), "wall_s": round(time.monotonic() - started, 1),
            **result}  # fmt: skip


def run(**kwargs: float) -> dict:
    """Start a fresh stack, ``measure(**kwargs)``, stop it."""
    with tempfile.TemporaryDirectory(prefix="aw-longpoll-") as tmp, web_stack(Path(tmp)) as stack:
        return measure(stack, **kwargs)


def _line(name: str, s: dict) -> str:
    return (f"{name:<8} sent {s['sent']:>4}  ok {s['ok']:>4}  p50 {s['p50_ms']} ms  p99 {s['p99_ms']} ms  "
            f"max {s['max_ms']} ms  errors {s['errors'] or 0}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.longpoll", description=__doc__.split("\n\n")[0])
    parser.add_argument("--polls", type=int, default=500, help="concurrent long-polls (default 500)")
    parser.add_argument("--wait", type=float, default=10.0, help="?wait= of each long-poll, seconds (default 10)")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds, after the warm-up")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds to open the long-polls")
    parser.add_argument("--healthz-rate", type=float, default=10.0, help="GET /healthz per second")
    parser.add_argument("--upload-rate", type=float, default=2.0, help="uploads per second")
    parser.add_argument("--probe-timeout", type=float, default=10.0, help="a probe unanswered this long is an error")
    parser.add_argument("--runs", type=int, default=1, help="fresh stacks, one after another; prints medians")
    parser.add_argument("--json", action="store_true", help="also print every run's dict as JSON")
    args = parser.parse_args(argv)
    kwargs = dict(polls=args.polls, wait_s=args.wait, duration_s=args.duration, warmup_s=args.warmup,
                  healthz_rate=args.healthz_rate, upload_rate=args.upload_rate,
                  probe_timeout_s=args.probe_timeout)  # fmt: skip
    results = []
    for i in range(args.runs):
        result = run(**kwargs)
        results.append(result)
        lp = result["long_polls"]
        print(f"run {i + 1}/{args.runs}: {args.polls} long-polls ?wait={args.wait:g} for {args.duration:g} s "
              f"(server: {result['server']})")  # fmt: skip
        for name in ("healthz", "upload", "wake"):
            print("  " + _line(name, result[name]))
        print(f"  long-polls: {lp['answers']} answers, {lp['valid']} valid (200 queued), {lp['early']} early, "
              f"invalid {lp['invalid'] or 0}, errors {lp['errors'] or 0}, open at end {lp['open_at_end']}")  # fmt: skip
        if args.json:
            print(json.dumps(result))
        sys.stdout.flush()
    if args.runs > 1:
        print(f"median of {args.runs} runs (ms; a run with no answers counts as inf):")
        for name in ("healthz", "upload", "wake"):
            cells = []
            for stat in ("p50_ms", "p99_ms", "max_ms"):
                values = [r[name][stat] if r[name][stat] is not None else math.inf for r in results]
                cells.append(f"{stat[:-3]} {statistics.median(values)}")
            errors = sum(sum(r[name]["errors"].values()) for r in results)
            print(f"  {name:<8} {'  '.join(cells)}  errors (all runs) {errors}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
