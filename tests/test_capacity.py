"""bench.capacity's arithmetic: the capacity model in docs/scaling.md is reproduced from measured per-job costs."""

from __future__ import annotations

import json

import pytest

from bench.capacity import DAY_S, GIB, Headroom, JobCosts, Load, main, plan

COSTS = JobCosts(
    web_cpu_ms=5.0, redis_cpu_ms=1.0, redis_calls=40.0, worker_cpu_ms=30.0, worker_gpu_side_ms=6.0,
    queued_bytes=25_000, finished_bytes=4_000, cache_bytes=500, sustained_per_machine=50.0, machine_cores=2,
)  # fmt: skip


def test_cores_and_processes_scale_with_the_peak_rate():
    out = plan(COSTS, Load(clips_per_day=8_640_000, peak_factor=5), Headroom(cpu_utilisation=0.5), gpu_clips_per_s=100)
    assert out["mean_per_s"] == pytest.approx(100) and out["peak_per_s"] == pytest.approx(500)
    assert out["web_cores"] == pytest.approx(500 * 0.005 / 0.5) and out["web_processes"] == 5
    assert out["worker_cores_cpu_only"] == pytest.approx(30)
    assert out["machines_like_measured"] == pytest.approx(20)
    assert out["redis_core_share_at_peak"] == pytest.approx(0.5) and out["redis_instances_for_cpu"] == 1
    assert out["redis_calls_per_s_at_peak"] == pytest.approx(20_000)
    assert out["redis_peak_capacity_per_s"] == pytest.approx(500)
    assert out["gpus"] == pytest.approx(10) and out["gpu_host_cpu_cores"] == pytest.approx(6)


def test_redis_memory_holds_a_ttl_of_records_and_both_full_lanes():
    headroom = Headroom(redis_memory_bytes=2 * GIB, redis_memory_fraction=0.8)
    day = plan(COSTS, Load(clips_per_day=8_640_000, peak_factor=5, result_ttl_s=DAY_S), headroom)
    assert day["records_alive"] == pytest.approx(8_640_000)
    assert day["redis_finished_bytes"] == pytest.approx(8_640_000 * 4_500)
    assert day["redis_queued_bytes_max"] == pytest.approx(2 * 5000 * 25_000)
    fits = (0.8 * 2 * GIB - 2 * 5000 * 25_000) / 4_500
    assert day["clips_per_day_at_memory_limit"] == pytest.approx(fits)
    assert day["result_ttl_s_that_fits"] == pytest.approx(fits / 100)
    # a TTL shorter than a day holds the peak's rate of records; without the cache a record is smaller
    hour = plan(COSTS, Load(clips_per_day=8_640_000, peak_factor=5, result_ttl_s=3600, cache=False), headroom)
    assert hour["records_alive"] == pytest.approx(500 * 3600)
    assert hour["redis_finished_bytes"] == pytest.approx(500 * 3600 * 4_000)
    assert hour["clips_per_day_at_memory_limit"] == pytest.approx(
        (0.8 * 2 * GIB - 2 * 5000 * 25_000) / 4_000 / 3600 * DAY_S / 5
    )


def test_measures_redis_bytes_through_the_job_store():
    """A real redis-server, the bundled model's real result: a queued job holds its upload, a finished one does not."""
    from bench.capacity import measure_redis_bytes

    measured = measure_redis_bytes(jobs=200)
    assert measured["upload_bytes"] < measured["queued_bytes"] < measured["upload_bytes"] + 4_000, measured
    assert 300 < measured["finished_bytes"] < 4_000 and 100 < measured["cache_bytes"] < 2_000, measured


def test_reads_what_the_saturation_benchmark_writes(tmp_path, capsys):
    def config(name: str, sustained: float, web_ms: float) -> dict:
        return {
            "config": name, "sustained_median": sustained, "redis_bytes_per_queued_job": 26_000,
            "redis_bytes_per_finished_job": 3_800,
            "at_sustained": {
                "cpu_ms_per_job": {"web": web_ms, "redis": 0.7, "worker": 26.0, "client": 0.5},
                "worker_timings_ms_per_job": {"decode": 4.7, "inference": 21.0},
                "redis_calls_per_job": 43.0,
            },
        }  # fmt: skip

    source = tmp_path / "saturation.json"
    source.write_text(json.dumps([config("threads", 40, 9.0), config("prefork", 60, 4.5), {"at_sustained": None}]))
    costs = JobCosts.from_saturation(json.loads(source.read_text()), None, 2)
    assert (costs.web_cpu_ms, costs.sustained_per_machine, costs.worker_gpu_side_ms) == (4.5, 60, 5.0)
    assert (costs.finished_bytes, costs.cache_bytes) == (3_800, 0.0)
    costs = JobCosts.from_saturation(json.loads(source.read_text()), "threads", 2, {"finished_bytes": 1500.0})
    assert (costs.web_cpu_ms, costs.finished_bytes, costs.queued_bytes) == (9.0, 1500.0, 26_000)
    out = tmp_path / "plan.json"
    assert main(["--from", str(source), "--saturation-bytes", "--gpu-clips-per-s", "200", "--json", str(out)]) == 0
    assert "GPUs at 200 clips/s" in capsys.readouterr().out
    assert json.loads(out.read_text())["plan"]["web_processes"] == 5  # 578.7/s x 4.5 ms / 0.6
