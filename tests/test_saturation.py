"""bench.saturation: the open-loop generator's pure parts (arrivals, percentiles, the pass rule, the keep-alive
client against a tiny server) and, marked integration, one short real step on a real stack."""

from __future__ import annotations

import asyncio
import json
import statistics

import pytest

from bench import saturation
from bench.saturation import Client, _read_response, arrival_times, highest_sustained, passes, percentile


def test_uniform_arrivals_are_evenly_spaced():
    times = arrival_times(20, 2.0, "uniform")
    assert len(times) == 40
    assert times[0] == 0 and all(abs(b - a - 0.05) < 1e-9 for a, b in zip(times, times[1:], strict=False))


def test_poisson_arrivals_have_the_rate_and_are_seeded():
    times = arrival_times(50, 200.0, "poisson", seed=3)
    assert times == arrival_times(50, 200.0, "poisson", seed=3) != arrival_times(50, 200.0, "poisson", seed=4)
    assert abs(len(times) / 200.0 - 50) < 2  # 10,000 expected, sd 100
    assert times == sorted(times) and times[0] > 0 and times[-1] < 200.0
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert abs(statistics.mean(gaps) - 0.02) < 0.001
    assert statistics.stdev(gaps) > 0.015  # exponential gaps (sd = mean), not a uniform schedule


def test_arrivals_edge_cases():
    assert arrival_times(0, 10) == []
    with pytest.raises(ValueError):
        arrival_times(1, 1, "bursty")


def test_percentile_is_nearest_rank():
    assert percentile([], 0.99) is None
    values = list(range(1, 101))
    assert percentile(values, 0.5) == 50 and percentile(values, 0.99) == 99 and percentile(values, 1.0) == 100
    assert percentile([7.0], 0.99) == 7.0


def _step(rate, p99, errors=None, ok=10):
    return {"rate": rate, "p99_ms": p99, "errors": errors or {}, "ok": ok}


def test_highest_sustained_stops_at_the_first_failure():
    assert passes(_step(10, 999)) and not passes(_step(10, 1001)) and not passes(_step(10, 50, {"timeout": 1}))
    assert not passes(_step(10, None, ok=0))
    steps = [_step(30, 900), _step(10, 100), _step(20, 400), _step(40, 1500), _step(50, 800)]
    assert highest_sustained(steps) == 30  # 50 passing after 40 failed does not count
    assert highest_sustained([_step(10, 2000)]) == 0


def test_read_response_content_length_and_chunked():
    async def parse(raw: bytes):
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        return await _read_response(reader)

    plain = b"HTTP/1.1 202 ACCEPTED\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}"
    assert asyncio.run(parse(plain)) == (202, b"{}", True)
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\nabc"
    assert asyncio.run(parse(closing)) == (200, b"abc", False)
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    assert asyncio.run(parse(chunked)) == (200, b"abcde", True)


def test_client_keeps_connections_alive_and_retries_a_stale_one(monkeypatch):
    """Three requests in a row use one connection; a keep-alive the server closed is replaced without an error."""
    requests = []

    async def serve(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                requests.append(head.split(b" ")[1].decode())
                body = json.dumps({"n": len(requests)}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
                if len(requests) == 3:  # then close, as gunicorn does with an idle keep-alive
                    break
        except asyncio.IncompleteReadError:
            pass
        writer.close()

    async def main():
        server = await asyncio.start_server(serve, saturation.HOST, 0)
        client = Client(server.sockets[0].getsockname()[1])
        answers = [await client.request("GET", f"/{i}") for i in range(3)]
        await asyncio.sleep(0.05)  # the server has closed that connection by now
        answers.append(await client.request("POST", "/again", b"x" * 10, "audio/webm"))
        client.close()
        server.close()
        await server.wait_closed()
        return answers, client.connections

    answers, connections = asyncio.run(main())
    assert [json.loads(body)["n"] for _, body in answers] == [1, 2, 3, 4]
    assert requests == ["/0", "/1", "/2", "/again"] and connections == 2


@pytest.mark.integration
def test_one_short_step_on_a_real_stack(asr_cache_dir):
    """A real stack (Redis, gunicorn, one Celery worker) at 4 uploads/s for 2 s: every job succeeds, the per-job
    costs are accounted to each process group, and the figures are JSON."""
    result = saturation.measure_config(
        "default", [4.0], runs=1, duration_s=2.0, warmup_s=0.5, memory_jobs=20, max_others=1.0, retries=0,
        settings={"ASR_BACKEND": "torch-fp32", "ASR_CACHE_DIR": str(asr_cache_dir), "ASR_BEAM_SIZE": 1},
    )  # fmt: skip
    step = result["sweeps"][0]["steps"][0]
    assert step["ok"] > 0 and step["errors"] == {} and step["p99_ms"] < 10_000, step
    assert {"client", "redis", "web", "worker"} <= set(step["cpu_ms_per_job"]), step
    assert step["worker_timings_ms_per_job"]["inference"] > 0 and step["redis_calls_per_job"] > 5, step
    # the upload is most of a queued job (Redis's allocator rounds: not to the byte)
    assert result["redis_bytes_per_queued_job"] > 0.5 * result["upload_bytes"], result
    assert 0 < result["redis_bytes_per_finished_job"] < result["upload_bytes"], result
    assert result["closed_loop"]["rate"] > 0 and result["backend"] == "torch-fp32", result
    json.dumps(result)
