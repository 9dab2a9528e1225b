"""Per-key limits under a burst, over the real web server (``arabic-words web``: gunicorn, gevent) and Redis.

One key with a small rate sends a burst of uploads from several connections at once; every request past its
budget must be refused with 429 (nothing queued), and quickly: a refusal is answered before the upload's body is
read. Reference in the same run: the same uploads from a key without limits (the accepted path: read, validate,
store, queue). Latencies are medians and percentiles of per-request wall times, client side.

    python -m bench.limits [--requests 1000] [--connections 10] [--rate 10] [--runs 3]
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.longpoll import HOST, web_stack
from shared.access import KeyStore, Limits

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "data" / "kitab.webm"


def _burst(port: int, key: str, requests: int, connections: int) -> list[tuple[int, float]]:
    """(status, ms) of ``requests`` uploads sent over ``connections`` keep-alive connections at once."""
    body = FIXTURE.read_bytes()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "audio/webm"}
    out: list[tuple[int, float]] = []
    lock = threading.Lock()
    share = [requests // connections + (i < requests % connections) for i in range(connections)]
    start = threading.Barrier(connections)

    def client(n: int) -> None:
        conn = http.client.HTTPConnection(HOST, port, timeout=30)
        mine = []
        start.wait()
        for _ in range(n):
            t0 = time.perf_counter()
            conn.request("POST", "/v1/transcriptions", body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            mine.append((response.status, (time.perf_counter() - t0) * 1000))
        conn.close()
        with lock:
            out.extend(mine)

    threads = [threading.Thread(target=client, args=(n,)) for n in share]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _stats(ms: list[float]) -> dict:
    if not ms:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(ms)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"n": len(ms), "p50_ms": round(statistics.median(ordered), 2), "p99_ms": round(p99, 2),
            "max_ms": round(ordered[-1], 2)}  # fmt: skip


def run(requests: int = 1000, connections: int = 10, rate: int = 10) -> dict:
    with (
        tempfile.TemporaryDirectory(prefix="aw-limits-") as tmp,
        web_stack(Path(tmp), AUTH_MODE="required", QUEUE="bench-limits", MAX_QUEUE_DEPTH=1_000_000) as stack,
    ):
        store = KeyStore(stack.store.redis)
        _, limited = store.create("limited", Limits(rate_per_min=rate))
        _, unlimited = store.create("reference", Limits())
        _burst(stack.port, unlimited, 20, 2)  # warm both gunicorn processes and their Redis connections
        queued_before = stack.store.redis.llen("bench-limits")
        results = _burst(stack.port, limited, requests, connections)
        queued = stack.store.redis.llen("bench-limits") - queued_before
        reference = _burst(stack.port, unlimited, min(requests, 200), connections)
    refused = [ms for status, ms in results if status == 429]
    accepted = [ms for status, ms in results if status == 202]
    return {
        "requests": requests, "connections": connections, "rate_per_min": rate,
        "accepted": len(accepted), "refused": len(refused),
        "other": sorted({status for status, _ in results} - {202, 429}), "queued": queued,
        "refused_ms": _stats(refused), "reference_accepted_ms": _stats([ms for s, ms in reference if s == 202]),
        "refused_over_20ms": sum(ms > 20 for ms in refused),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.limits", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--rate", type=int, default=10, help="the limited key's requests per minute")
    parser.add_argument("--runs", type=int, default=3, help="fresh stacks; prints each and the medians")
    args = parser.parse_args(argv)
    runs = []
    print(f"{args.requests} uploads (12 KB WebM) over {args.connections} connections, key limited to "
          f"{args.rate}/min; reference: a key without limits")  # fmt: skip
    print(f"{'run':<5}{'accepted':>9}{'refused':>8}{'queued':>7}{'429 p50':>9}{'429 p99':>9}{'429 max':>9}"
          f"{'>20ms':>7}{'ref p50':>9}{'ref p99':>9}{'ratio p50':>10}")  # fmt: skip
    for i in range(args.runs):
        r = run(args.requests, args.connections, args.rate)
        runs.append(r)
        ref, refused = r["reference_accepted_ms"], r["refused_ms"]
        print(f"{i + 1:<5}{r['accepted']:>9}{r['refused']:>8}{r['queued']:>7}{refused['p50_ms']:>9}"
              f"{refused['p99_ms']:>9}{refused['max_ms']:>9}{r['refused_over_20ms']:>7}{ref['p50_ms']:>9}"
              f"{ref['p99_ms']:>9}{ref['p50_ms'] / refused['p50_ms']:>10.1f}")  # fmt: skip
        if r["other"]:
            print(f"     other statuses: {r['other']}")
    if args.runs > 1:
        med = {k: statistics.median(r["refused_ms"][k] for r in runs) for k in ("p50_ms", "p99_ms", "max_ms")}
        ref = statistics.median(r["reference_accepted_ms"]["p50_ms"] for r in runs)
        print(f"median of {args.runs}: 429 p50 {med['p50_ms']} ms, p99 {med['p99_ms']} ms, max {med['max_ms']} ms; "
              f"accepted-upload p50 {ref} ms ({ref / med['p50_ms']:.1f}x a refusal)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
