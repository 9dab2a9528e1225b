"""`make bench`: decode, model and end-to-end service latency, each beside the reference method measured in the
same run. Prints tables and writes bench/results.json. Medians after warm-up; machines are noisy.

    python -m bench [--quick] [--only decode,model,service]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf

from shared.config import BUNDLED_MODEL_DIR
from training.synth import encode
from worker.audio import SAMPLE_RATE, decode

HERE = Path(__file__).parent
DATA = HERE.parent / "tests" / "data"


def median_ms(fn: Callable[[], object], runs: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def speech(seconds: float) -> np.ndarray:
    """Real (synthetic) Arabic speech from the committed fixtures, repeated to ``seconds``."""
    words = [decode((DATA / f"{name}.flac").read_bytes()) for name in ("marhaba", "shukran", "sabah_alkhayr")]
    audio = np.concatenate(words)
    audio = np.tile(audio, int(np.ceil(seconds * SAMPLE_RATE / len(audio))))
    return audio[: int(seconds * SAMPLE_RATE)].copy()


def ffmpeg_binary() -> str:
    """The reference design's `ffmpeg`: the system one if installed, else imageio-ffmpeg's static binary."""
    system = shutil.which("ffmpeg")
    if system:
        return system
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def reference_pipe_decode(data: bytes, ffmpeg: str) -> np.ndarray:
    """The reference method: spawn ffmpeg, feed the upload on stdin, parse the WAV it prints."""
    out = subprocess.run(
        [ffmpeg, "-nostdin", "-loglevel", "error", "-i", "pipe:0", "-ac", "1", "-ar", "16000", "-f", "wav", "pipe:1"],
        input=data,
        capture_output=True,
        check=True,
    ).stdout
    audio, _ = sf.read(io.BytesIO(out), dtype="float32")
    return audio


def librosa_load(data: bytes, suffix: str) -> np.ndarray:
    import librosa

    with tempfile.NamedTemporaryFile(suffix=suffix) as f:  # librosa's audioread fallback wants a path
        f.write(data)
        f.flush()
        return librosa.load(f.name, sr=SAMPLE_RATE, mono=True)[0]


def bench_decode(runs: int, durations: list[float]) -> list[dict]:
    ffmpeg = ffmpeg_binary()
    print(f"\n## decode to 16 kHz mono float32 (ms, median of {runs}); reference: {ffmpeg} pipe")
    header = f"{'format':<16}{'dur s':>6}{'decode':>9}{'pipe':>9}{'librosa':>9}{'pipe/decode':>12}{'corr':>7}"
    print(header)
    rows = []
    for seconds in durations:
        audio = speech(seconds)
        for fmt, rate, channels in [
            ("webm", 48_000, 1),
            ("ogg", 48_000, 1),
            ("mp3", 44_100, 1),
            ("m4a", 44_100, 1),
            ("wav", 16_000, 1),
            ("wav", 44_100, 2),
            ("flac", 16_000, 1),
        ]:
            data = encode(audio, fmt, sample_rate=rate, channels=channels)
            ours = decode(data, max_audio_s=3600)
            ref = reference_pipe_decode(data, ffmpeg)
            n = min(len(ours), len(ref))
            corr = float(np.corrcoef(ours[:n], ref[:n])[0, 1])
            t_ours = median_ms(lambda d=data: decode(d, max_audio_s=3600), runs)
            t_pipe = median_ms(lambda d=data: reference_pipe_decode(d, ffmpeg), max(5, runs // 4), warmup=1)
            t_librosa = median_ms(lambda d=data, f=fmt: librosa_load(d, "." + f), max(5, runs // 4), warmup=1)
            label = f"{fmt} {rate // 1000}k{' st' if channels == 2 else ''}"
            row = {
                "format": label, "seconds": seconds, "decode_ms": round(t_ours, 2), "pipe_ms": round(t_pipe, 2),
                "librosa_ms": round(t_librosa, 2), "ratio_pipe_over_decode": round(t_pipe / t_ours, 1),
                "length_diff_samples": len(ours) - len(ref), "correlation": round(corr, 4),
            }  # fmt: skip
            rows.append(row)
            print(f"{label:<16}{seconds:>6}{t_ours:>9.2f}{t_pipe:>9.1f}{t_librosa:>9.1f}"
                  f"{t_pipe / t_ours:>11.1f}x{corr:>7.3f}")  # fmt: skip
    return rows


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_model(runs: int, threads: int) -> dict:
    import torch

    from worker.asr import infer, load_model, postprocess, transcribe_audio, warm_up

    torch.set_num_threads(threads)
    print(f"\n## bundled model, CPU {threads} threads (ms, median of {runs})")
    rss_before = peak_rss_mb()
    start = time.perf_counter()
    model = load_model(str(BUNDLED_MODEL_DIR), threads=threads)
    load_s = time.perf_counter() - start
    warm_ms = warm_up(model)
    out = {"load_s": round(load_s, 3), "warmup_ms": round(warm_ms, 1), "latency": []}
    print(f"load {load_s:.2f} s, warm-up {warm_ms:.0f} ms")
    print(f"{'clip s':>7}{'features+model':>16}{'postprocess':>13}{'total':>8}{'x realtime':>12}")
    for seconds in (1.0, 2.2, 5.0):
        audio = speech(seconds)
        log_probs = infer(model, audio)
        t_infer = median_ms(lambda a=audio: infer(model, a), runs)
        frame_s = len(audio) / SAMPLE_RATE / log_probs.shape[0]
        t_post = median_ms(
            lambda lp=log_probs, fs=frame_s: postprocess(lp, model.id_to_token, model.blank_id, fs), runs
        )
        t_total = median_ms(lambda a=audio: transcribe_audio(model, a), runs)
        out["latency"].append({"seconds": seconds, "infer_ms": round(t_infer, 2), "postprocess_ms": round(t_post, 3),
                               "total_ms": round(t_total, 2)})  # fmt: skip
        print(f"{seconds:>7}{t_infer:>16.2f}{t_post:>13.3f}{t_total:>8.2f}{seconds * 1000 / t_total:>11.0f}x")
    out["peak_rss_mb_added"] = round(peak_rss_mb() - rss_before, 1)
    return out


def bench_service(runs: int) -> dict:
    """POST a 2.2 s WebM through the real app -> Redis -> Celery worker, then GET ?wait=; split the total."""
    import redis as redis_lib

    from shared import keys
    from shared.config import Settings
    from shared.queue import make_celery
    from shared.redis_server import free_port, start_redis
    from web import create_app

    print(f"\n## end to end through HTTP (Flask test client) + Redis + Celery worker (ms, median of {runs})")
    tmp = tempfile.TemporaryDirectory()
    port = free_port()
    redis_proc = start_redis(port, Path(tmp.name), persistent=False)
    settings = Settings.from_env(REDIS_URL=f"redis://127.0.0.1:{port}/0", QUEUE="bench")
    env = {**os.environ, **{k: str(v) for k, v in settings.as_dict().items()}}
    started = time.perf_counter()
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", "bench", "-c", "1",
         "--loglevel", "WARNING", "--without-mingle", "--without-gossip"],
        env=env, cwd=HERE.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        client_redis = redis_lib.Redis(port=port)
        while client_redis.hlen(keys.model_loads()) < 1:
            if worker.poll() is not None:
                raise RuntimeError("worker exited")
            time.sleep(0.05)
        worker_start_s = time.perf_counter() - started
        make_celery(settings).control.ping(timeout=5)
        app = create_app(settings).test_client()
        data = encode(speech(2.2), "webm")
        samples = []
        for i in range(runs + 3):
            t0 = time.perf_counter()
            job = app.post("/v1/transcriptions", data=data, content_type="audio/webm").get_json()
            body = app.get(f"{job['url']}?wait=30").get_json()
            wall = (time.perf_counter() - t0) * 1000
            assert body["status"] == "succeeded", body
            if i >= 3:
                t = body["result"]["timings_ms"]
                samples.append({"wall": wall, **t, "overhead": wall - t["decode"] - t["inference"]})
        med = {k: round(statistics.median(s[k] for s in samples), 2) for k in samples[0]}
        print(f"worker cold start (process + model load + warm-up): {worker_start_s:.1f} s")
        print("  ".join(f"{k} {v}" for k, v in med.items()))
        return {"worker_start_s": round(worker_start_s, 2), "median_ms": med}
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        redis_proc.terminate()
        redis_proc.wait(timeout=10)
        tmp.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer runs (a smoke test, not figures to quote)")
    parser.add_argument("--only", default="decode,model,service")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    runs = 5 if args.quick else 25
    parts = set(args.only.split(","))
    results: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(),
    }
    if "decode" in parts:
        results["decode"] = bench_decode(runs, [1.0, 2.2] if args.quick else [1.0, 2.2, 30.0])
    if "model" in parts:
        results["model"] = bench_model(runs, args.threads)
    if "service" in parts:
        results["service"] = bench_service(max(5, runs // 2))
    (HERE / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nwrote {HERE / 'results.json'}")


if __name__ == "__main__":
    main()
