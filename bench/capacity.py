"""Capacity model: what a given load needs (web processes, worker cores or GPUs, Redis CPU and memory), from the
per-job costs ``python -m bench.saturation --json FILE`` measured. The arithmetic is here so that docs/scaling.md can
be reproduced and redone for other loads and other machines' measurements:

    python -m bench.saturation --configs prefork --json bench/work/saturation.json
    python -m bench.capacity --from bench/work/saturation.json --clips-per-day 10e6 --peak 5

Every input is a measured median at the highest rate the configuration sustained (``at_sustained``), except the GPU
rate, which is the model's forward pass alone (docs/benchmarks.md, GPU), not an end-to-end measurement.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

DAY_S = 86_400
GIB = 1 << 30


@dataclass(frozen=True)
class JobCosts:
    """One 2.2 s WebM job's measured costs (CPU milliseconds per finished job; Redis bytes)."""

    web_cpu_ms: float  # gunicorn: the upload and its long-polls
    redis_cpu_ms: float  # redis-server, all its commands for the job
    redis_calls: float
    worker_cpu_ms: float  # Celery worker processes: decode, VAD, inference, postprocessing, Celery
    worker_gpu_side_ms: float  # of worker_cpu_ms, what stays on the CPU when the forward pass moves to a GPU
    queued_bytes: float  # Redis memory per job waiting for a worker (upload, record, task message)
    finished_bytes: float  # Redis memory per finished job record, kept for RESULT_TTL_S
    cache_bytes: float  # Redis memory per result-cache entry (CACHE=on), kept for RESULT_TTL_S
    sustained_per_machine: float  # measured: jobs/s the whole stack sustained on the measuring machine
    machine_cores: int

    @classmethod
    def from_saturation(
        cls, results: list[dict], config: str | None, cores: int, redis_bytes: dict[str, float] | None = None
    ) -> JobCosts:
        """The configuration that sustained the most (or ``config``), at its highest sustained rate; Redis bytes
        from ``redis_bytes`` (``measure_redis_bytes``) where given, else the saturation run's own."""
        candidates = [r for r in results if r.get("at_sustained") and (config is None or r["config"] == config)]
        if not candidates:
            raise SystemExit(f"no configuration{' ' + config if config else ''} with a sustained rate in the file")
        best = max(candidates, key=lambda r: r["sustained_median"])
        at = best["at_sustained"]
        cpu, timings = at["cpu_ms_per_job"], at["worker_timings_ms_per_job"]
        return cls(
            web_cpu_ms=cpu["web"],
            redis_cpu_ms=cpu["redis"],
            redis_calls=at["redis_calls_per_job"],
            worker_cpu_ms=cpu["worker"],
            # the forward pass is timed inside `inference`, with the CTC postprocessing (a beam search: ~3 ms), which
            # would stay on the CPU: so this underestimates the CPU a GPU worker needs by about that much
            worker_gpu_side_ms=max(0.0, cpu["worker"] - timings.get("inference", 0.0)),
            queued_bytes=(redis_bytes or {}).get("queued_bytes", best["redis_bytes_per_queued_job"]),
            finished_bytes=(redis_bytes or {}).get("finished_bytes", best["redis_bytes_per_finished_job"]),
            cache_bytes=(redis_bytes or {}).get("cache_bytes", 0.0),
            sustained_per_machine=best["sustained_median"],
            machine_cores=cores,
        )


@dataclass(frozen=True)
class Load:
    clips_per_day: float
    peak_factor: float  # the busiest hour's rate over the day's mean
    result_ttl_s: float = DAY_S  # RESULT_TTL_S
    cache: bool = True  # CACHE=on
    queue_cap: int = 5000  # MAX_QUEUE_DEPTH: the most jobs that may wait (per lane), whatever the outage


@dataclass(frozen=True)
class Headroom:
    cpu_utilisation: float = 0.6  # plan cores to be this busy at peak (p99 stays low only well below saturation)
    redis_core_share: float = 0.5  # one Redis is one core for commands: plan it this busy at peak
    redis_memory_bytes: float = 2 * GIB  # REDIS_MAXMEMORY
    redis_memory_fraction: float = 0.8  # MAX_REDIS_MEMORY_FRACTION: uploads are refused past it


def measure_redis_bytes(jobs: int = 2000) -> dict[str, float]:
    """Redis memory per job, measured on a private redis-server through the service's own code: ``jobs`` uploads
    of the 2.2 s WebM stored (JobStore.create), claimed and finished with the bundled model's real result of it, and
    as many result-cache entries. ``used_memory`` deltas over many jobs, so per-connection buffers do not count
    (the saturation run's own figure, over 200 jobs with a worker connecting, includes them). A queued job's figure
    lacks its Celery task message (about 1 KB)."""
    import tempfile

    import redis
    import torch

    from bench.__main__ import speech
    from shared.cache import ResultCache, content_digest
    from shared.config import Settings
    from shared.jobs import JobStore
    from shared.redis_server import free_port, start_redis
    from training.synth import encode
    from worker.model import load_configured_model
    from worker.pipeline import transcribe_bytes

    data = encode(speech(2.2), "webm")
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        server = start_redis(port, Path(tmp), persistent=False)
        try:
            client = redis.Redis(port=port)
            settings = Settings(REDIS_URL=f"redis://127.0.0.1:{port}/0", ASR_BACKEND="torch-fp32")
            model = load_configured_model(settings, torch.device("cpu"))
            result = transcribe_bytes(model, data, max_audio_s=30).to_dict()
            store, cache = JobStore(client, settings), ResultCache(client, settings)
            used = lambda: client.info("memory")["used_memory"]  # noqa: E731
            base = used()
            ids = [store.create(data, subject="ip:192.0.2.1", digest=content_digest(data)).id for _ in range(jobs)]
            queued = used()
            for job_id in ids:
                store.claim(job_id, "bench")
                store.succeed(job_id, result)
            finished = used()
            for i in range(jobs):
                cache.put(content_digest(data + i.to_bytes(4, "little")), [], result)
            cached = used()
        finally:
            server.terminate()
            server.wait(timeout=10)
    return {
        "upload_bytes": len(data),
        "queued_bytes": (queued - base) / jobs,
        "finished_bytes": (finished - base) / jobs,
        "cache_bytes": (cached - finished) / jobs,
    }


def plan(costs: JobCosts, load: Load, headroom: Headroom = Headroom(), gpu_clips_per_s: float = 0.0) -> dict:
    """Cores, processes and Redis figures for ``load``. Records alive = rate x RESULT_TTL_S, with the day's mean
    rate for a TTL of a day or more and the peak rate for a shorter one (a peak lasts hours)."""
    mean = load.clips_per_day / DAY_S
    peak = mean * load.peak_factor
    alive_rate = mean if load.result_ttl_s >= DAY_S else peak
    records = alive_rate * load.result_ttl_s
    record_bytes = costs.finished_bytes + (costs.cache_bytes if load.cache else 0.0)
    finished_memory = records * record_bytes
    queued_memory = 2 * load.queue_cap * costs.queued_bytes  # both lanes full: the most admission control lets in
    usable = headroom.redis_memory_bytes * headroom.redis_memory_fraction
    records_that_fit = max(0.0, usable - queued_memory) / record_bytes
    web_cores = peak * costs.web_cpu_ms / 1000 / headroom.cpu_utilisation
    worker_cores = peak * costs.worker_cpu_ms / 1000 / headroom.cpu_utilisation
    redis_share = peak * costs.redis_cpu_ms / 1000  # of one core
    out = {
        "mean_per_s": mean,
        "peak_per_s": peak,
        "web_cores": web_cores,
        "web_processes": max(1, math.ceil(web_cores)),  # WEB_PROCESSES: one gevent process per core
        "worker_cores_cpu_only": worker_cores,
        "machines_like_measured": peak / (costs.sustained_per_machine * headroom.cpu_utilisation),
        "redis_core_share_at_peak": redis_share,
        "redis_calls_per_s_at_peak": peak * costs.redis_calls,
        "redis_instances_for_cpu": max(1, math.ceil(redis_share / headroom.redis_core_share)),
        "redis_peak_capacity_per_s": headroom.redis_core_share * 1000 / costs.redis_cpu_ms,
        "records_alive": records,
        "redis_finished_bytes": finished_memory,
        "redis_queued_bytes_max": queued_memory,
        "redis_bytes_needed": finished_memory + queued_memory,
        "redis_bytes_usable": usable,
        # the clips/day at which this load's records (plus full queues) fill the usable memory
        "clips_per_day_at_memory_limit": records_that_fit / load.result_ttl_s * DAY_S * mean / alive_rate,
        "result_ttl_s_that_fits": records_that_fit / alive_rate,
    }
    if gpu_clips_per_s > 0:
        out["gpus"] = peak / (gpu_clips_per_s * headroom.cpu_utilisation)
        out["gpu_host_cpu_cores"] = peak * costs.worker_gpu_side_ms / 1000 / headroom.cpu_utilisation
    return out


def report(costs: JobCosts, load: Load, headroom: Headroom, result: dict, gpu_clips_per_s: float) -> None:
    print(f"## capacity for {load.clips_per_day:,.0f} clips/day, peak {load.peak_factor:g}x the mean "
          f"({result['mean_per_s']:.1f}/s mean, {result['peak_per_s']:.1f}/s peak); cores planned "
          f"{headroom.cpu_utilisation:.0%} busy at peak")  # fmt: skip
    print(f"inputs per job: web {costs.web_cpu_ms} ms CPU, Redis {costs.redis_cpu_ms} ms CPU / {costs.redis_calls} "
          f"commands, worker {costs.worker_cpu_ms} ms CPU ({costs.worker_gpu_side_ms:.1f} ms of it not the forward "
          f"pass); Redis {costs.queued_bytes:.0f} B queued, {costs.finished_bytes:.0f} B finished record, "
          f"{costs.cache_bytes:.0f} B cache entry; measured {costs.sustained_per_machine:g} jobs/s on "
          f"{costs.machine_cores} cores")  # fmt: skip
    rows = [
        ("web processes (WEB_PROCESSES, 1 core each)", f"{result['web_processes']} ({result['web_cores']:.1f} cores)"),
        ("worker cores, CPU inference", f"{result['worker_cores_cpu_only']:.0f}"),
        (f"machines like the measured one ({costs.machine_cores} cores, whole stack)",
         f"{result['machines_like_measured']:.0f}"),
        ("Redis: one core's share at peak", f"{result['redis_core_share_at_peak']:.2f} "
         f"({result['redis_calls_per_s_at_peak']:,.0f} commands/s); one Redis carries "
         f"{result['redis_peak_capacity_per_s']:,.0f} jobs/s at {headroom.redis_core_share:.0%}"),
        ("Redis instances for CPU", f"{result['redis_instances_for_cpu']}"),
        ("Redis memory: finished records (+ cache)", f"{result['records_alive']:,.0f} records, "
         f"{result['redis_finished_bytes'] / GIB:.1f} GiB"),
        ("Redis memory: both lanes full (MAX_QUEUE_DEPTH)", f"{result['redis_queued_bytes_max'] / GIB:.2f} GiB"),
        ("Redis memory needed / usable", f"{result['redis_bytes_needed'] / GIB:.1f} / "
         f"{result['redis_bytes_usable'] / GIB:.1f} GiB"),
        ("clips/day at which that memory is full", f"{result['clips_per_day_at_memory_limit']:,.0f}"),
        ("RESULT_TTL_S that fits at this load", f"{result['result_ttl_s_that_fits']:,.0f} s"),
    ]  # fmt: skip
    if gpu_clips_per_s > 0:
        rows += [
            (f"GPUs at {gpu_clips_per_s:g} clips/s each (forward pass only)", f"{result['gpus']:.1f}"),
            ("CPU cores beside them (decode, VAD, postprocessing, Celery)", f"{result['gpu_host_cpu_cores']:.0f}"),
        ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", type=Path, required=True, help="python -m bench.saturation --json")
    parser.add_argument("--config", help="the saturation configuration to use (default: the one that sustained most)")
    parser.add_argument("--cores", type=int, default=2, help="cores of the machine the saturation run measured")
    parser.add_argument(
        "--saturation-bytes", action="store_true", help="Redis bytes from the saturation run, not measured now"
    )
    parser.add_argument("--clips-per-day", type=float, default=10e6)
    parser.add_argument("--peak", type=float, default=5.0)
    parser.add_argument("--result-ttl-s", type=float, default=DAY_S)
    parser.add_argument("--cache", choices=("on", "off"), default="on")
    parser.add_argument("--queue-cap", type=int, default=5000, help="MAX_QUEUE_DEPTH")
    parser.add_argument("--redis-maxmemory-gib", type=float, default=2.0)
    parser.add_argument("--utilisation", type=float, default=0.6)
    parser.add_argument("--gpu-clips-per-s", type=float, default=0.0, help="per GPU, forward pass (0: no GPU rows)")
    parser.add_argument("--json", type=Path, help="also write inputs and results here")
    args = parser.parse_args(argv)
    results = json.loads(args.source.read_text())
    redis_bytes = None if args.saturation_bytes else measure_redis_bytes()
    costs = JobCosts.from_saturation(results, args.config, args.cores, redis_bytes)
    load = Load(args.clips_per_day, args.peak, args.result_ttl_s, args.cache == "on", args.queue_cap)
    headroom = Headroom(cpu_utilisation=args.utilisation, redis_memory_bytes=args.redis_maxmemory_gib * GIB)
    result = plan(costs, load, headroom, args.gpu_clips_per_s)
    report(costs, load, headroom, result, args.gpu_clips_per_s)
    if args.json:
        args.json.write_text(json.dumps({"costs": asdict(costs), "load": asdict(load), "headroom": asdict(headroom),
                                         "redis_bytes_measured": redis_bytes, "plan": result}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
