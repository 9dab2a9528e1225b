"""Priority lanes and the result cache, on the real service (``arabic-words web`` and ``arabic-words worker`` on a
private Redis, loopback only).

- Lanes: a learner's latency (POST an upload, long-poll until it is final; a clip nobody sent before) while idle,
  then while ``arabic-words backfill --priority batch`` sends a folder of clips (1,000 by default). Target: the busy
  median at most 2x the idle one.
- Cache: an upload of bytes transcribed before: POST until ``succeeded`` (the POST's own answer, or one GET), with
  no worker involved. Reference in the same run: the same clip's first, uncached transcription.

Every clip is a fixture word with a little noise of its own, so no two are the same bytes unless meant to be.

    python -m bench.lanes [--clips 1000] [--probes 20] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import redis
import soundfile as sf

from arabic_words.processes import command
from bench.longpoll import HOST, web_stack
from shared import keys

ROOT = Path(__file__).resolve().parent.parent
WORDS = ["kitab", "madrasa", "marhaba", "shukran", "sabah_alkhayr"]


def clip(i: int) -> bytes:
    """Fixture word ``i % 5`` as a 16 kHz WAV with noise seeded by ``i``: unique bytes, the same transcript."""
    audio, rate = sf.read(ROOT / "tests" / "data" / f"{WORDS[i % len(WORDS)]}.flac", dtype="float32")
    audio = audio + np.random.default_rng(i).normal(0, 1e-4, audio.shape).astype(np.float32)
    out = io.BytesIO()
    sf.write(out, audio, rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def _request(port: int, method: str, path: str, body: bytes | None = None, fields: dict | None = None) -> dict:
    conn = http.client.HTTPConnection(HOST, port, timeout=120)
    headers = {}
    if body is not None:
        boundary = uuid.uuid4().hex
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                 for k, v in (fields or {}).items()]  # fmt: skip
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="c.wav"\r\n'
        parts.append(f"{head}Content-Type: audio/wav\r\n\r\n".encode() + body + f"\r\n--{boundary}--\r\n".encode())
        body = b"".join(parts)
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    out = json.loads(response.read())
    conn.close()
    return out


def transcribe_ms(port: int, data: bytes) -> tuple[float, dict]:
    """Wall time from POST to a final state (long-polled; a cached answer is final in the POST's own answer), and
    the final job (read once more, untimed, when the POST's answer was the final state)."""
    t0 = time.perf_counter()
    job = _request(port, "POST", "/v1/transcriptions", data)
    while job.get("status") not in ("succeeded", "failed"):
        job = _request(port, "GET", f"/v1/transcriptions/{job['id']}?wait=30")
    ms = (time.perf_counter() - t0) * 1000
    if "result" not in job:
        job = _request(port, "GET", f"/v1/transcriptions/{job['id']}")
    return ms, job


def run(clips: int, probes: int, concurrency: int) -> dict:
    with (
        tempfile.TemporaryDirectory(prefix="aw-lanes-") as tmp,
        web_stack(
            Path(tmp), QUEUE="bench-lanes", MAX_QUEUE_DEPTH=1_000_000, TORCH_THREADS=1, WORKER_CONCURRENCY=2
        ) as stack,
    ):
        env = {**os.environ, **stack.settings.as_env()}
        log = (Path(tmp) / "worker.log").open("w")
        worker = subprocess.Popen(command("worker", "--without-mingle", "--without-gossip"), env=env, stdout=log,
                                  stderr=subprocess.STDOUT, cwd=ROOT)  # fmt: skip
        try:
            client = redis.Redis.from_url(stack.settings.REDIS_URL)
            while client.zcard(keys.model_processes()) < 2:
                if worker.poll() is not None:
                    raise RuntimeError((Path(tmp) / "worker.log").read_text()[-3000:])
                time.sleep(0.2)
            for i in range(4):  # warm both processes
                transcribe_ms(stack.port, clip(10_000 + i))
            idle = [transcribe_ms(stack.port, clip(20_000 + i))[0] for i in range(probes)]

            folder = Path(tmp) / "archive"
            folder.mkdir()
            for i in range(clips):
                (folder / f"{i:05d}.wav").write_bytes(clip(i))
            backfill = subprocess.Popen(
                [sys.executable, "-m", "arabic_words", "backfill", str(folder), "--url", f"http://{HOST}:{stack.port}",
                 "--out", str(Path(tmp) / "out.jsonl"), "--priority", "batch", "--concurrency", str(concurrency)],
                env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(3)  # the batch lane fills
            busy, depth = [], []
            for i in range(probes):
                depth.append(client.llen(stack.settings.batch_queue))
                busy.append(transcribe_ms(stack.port, clip(30_000 + i))[0])
            still_running = backfill.poll() is None
            backfill.wait(timeout=3600)
            records = [json.loads(line) for line in (Path(tmp) / "out.jsonl").read_text().splitlines()]

            first_ms, first = transcribe_ms(stack.port, clip(40_000))
            again = []
            for _ in range(probes):
                ms, job = transcribe_ms(stack.port, clip(40_000))
                assert job["status"] == "succeeded" and job["result"]["cached"], job
                again.append(ms)
        finally:
            worker.terminate()
            worker.wait(timeout=60)
            log.close()
    return {
        "clips": clips, "probes": probes, "concurrency": concurrency,
        "idle_p50_ms": round(statistics.median(idle), 1), "busy_p50_ms": round(statistics.median(busy), 1),
        "busy_max_ms": round(max(busy), 1), "batch_depth_median": statistics.median(depth),
        "backfill_still_running_at_end_of_probes": still_running,
        "backfill_succeeded": sum(r.get("status") == "succeeded" for r in records), "backfill_records": len(records),
        "cached_p50_ms": round(statistics.median(again), 2), "cached_max_ms": round(max(again), 2),
        "uncached_ms": round(first_ms, 1), "uncached_status": first["status"],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lanes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=1000, help="clips the backfill sends (batch lane)")
    parser.add_argument("--probes", type=int, default=20, help="interactive uploads measured idle and busy")
    parser.add_argument("--concurrency", type=int, default=8, help="the backfill's uploads in flight")
    args = parser.parse_args(argv)
    r = run(args.clips, args.probes, args.concurrency)
    print(f"lanes: {r['clips']}-clip backfill (batch lane, {r['concurrency']} in flight; median batch queue depth "
          f"{r['batch_depth_median']}); interactive uploads, median of {r['probes']}:")  # fmt: skip
    print(f"  idle p50 {r['idle_p50_ms']} ms   during the backfill p50 {r['busy_p50_ms']} ms (max {r['busy_max_ms']})"
          f"   ratio {r['busy_p50_ms'] / r['idle_p50_ms']:.2f} (target <= 2)")  # fmt: skip
    print(f"  backfill: {r['backfill_succeeded']} of {r['backfill_records']} succeeded; still running while measured: "
          f"{r['backfill_still_running_at_end_of_probes']}")  # fmt: skip
    print(
        f"cache: identical re-upload, submit -> succeeded p50 {r['cached_p50_ms']} ms (max {r['cached_max_ms']}), "
        f"against {r['uncached_ms']} ms transcribed ({r['uncached_ms'] / r['cached_p50_ms']:.0f}x; target <= 10 ms)"
    )
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
