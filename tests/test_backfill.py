"""`arabic-words backfill` hardened (arabic_words/backfill.py): retries and backoff, resume, manifests, CSV, API keys.

The service is real where it matters (the session's web app served over HTTP, and its Celery worker); the faults are
made by small local servers in front of it, or in its place: one that answers 503 or 429 before passing requests on,
one that appears only after the backfill started, and a scripted stand-in for the failures no real service gives on
demand.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import soundfile
from werkzeug.wrappers import Request, Response

from arabic_words import backfill
from arabic_words.backfill import BackfillError, Backoff, Item, Options, Output
from shared.access import KeyStore, Limits
from shared.redis_server import free_port
from shared.text import is_model_text
from tests.conftest import DATA, read_transcripts, serve_http
from web import create_app, services

TRANSCRIPTS = read_transcripts()
FAST = Backoff(retries=8, base_s=0.05, cap_s=0.2)  # for the stand-in's failures: the schedule itself is tested apart


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "arabic_words", "backfill", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})  # fmt: skip


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def by_name(rows: list[dict]) -> dict[str, dict]:
    return {Path(r["file"]).name: r for r in rows}


def folder_of(tmp_path: Path, *names: str, aiff: bool = False) -> Path:
    folder = tmp_path / "archive"
    folder.mkdir()
    for name in names:
        shutil.copy(DATA / name, folder / name)
    if aiff:
        audio, rate = soundfile.read(DATA / "kitab.wav")
        soundfile.write(folder / "kitab.aiff", audio, rate, format="AIFF", subtype="PCM_16")
    return folder


def json_response(status: int, body: dict, headers: dict | None = None) -> Response:
    return Response(json.dumps(body), status=status, headers=headers or {}, content_type="application/json")


def error(status: int, code: str, headers: dict | None = None) -> Response:
    return json_response(status, {"error": {"code": code, "message": code}}, headers)


class Proxy:
    """Passes requests on to ``target`` (the real service), except that it first answers with what ``script`` holds
    for the requests it matches: a list of (method, Response) taken in order, one per matching request."""

    def __init__(self, target: str, script: list[tuple[str, Response]]) -> None:
        self.target, self.script, self.seen = target, script, []
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        request = Request(environ)
        with self.lock:
            self.seen.append((time.monotonic(), request.method, request.full_path))
            if self.script and self.script[0][0] == request.method:
                return self.script.pop(0)[1](environ, start_response)
        query = f"?{request.query_string.decode()}" if request.query_string else ""
        forwarded = urllib.request.Request(
            self.target + request.path + query,
            data=request.get_data() if request.method == "POST" else None,
            headers={k: v for k, v in request.headers.items() if k in ("Content-Type", "Authorization")},
            method=request.method,
        )
        try:
            with urllib.request.urlopen(forwarded, timeout=60) as answer:
                status, body = answer.status, answer.read()
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read()
        return Response(body, status=status, content_type="application/json")(environ, start_response)


class StandIn:
    """A scripted service: uploads and polls answer what ``uploads`` and ``polls`` give in turn (the last one again
    when they run out); every request is kept, with its form fields, for the tests to look at."""

    def __init__(self, uploads: list[Response], polls: list[Response] | None = None) -> None:
        self.uploads = uploads
        self.polls = polls or [json_response(200, {"id": "j1", "status": "succeeded", "error": None,
                                                   "result": {"text": "كتاب", "confidence": 0.9}})]  # fmt: skip
        self.requests: list[dict] = []
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        request = Request(environ)
        with self.lock:
            self.requests.append({
                "at": time.monotonic(), "method": request.method, "path": request.path, "args": dict(request.args),
                "headers": dict(request.headers), "form": dict(request.form),
                "file": request.files["file"].read() if "file" in request.files else None,
            })  # fmt: skip
            queue = self.uploads if request.method == "POST" else self.polls
            response = queue.pop(0) if len(queue) > 1 else queue[0]
        if request.method == "GET" and response.status_code == 200:
            body = json.loads(response.get_data())
            if body["status"] not in ("succeeded", "failed"):
                time.sleep(min(float(request.args.get("wait", 0)), 0.6))  # a long-poll that ends unfinished
        return response(environ, start_response)

    def of(self, method: str) -> list[dict]:
        return [r for r in self.requests if r["method"] == method]


ACCEPTED = json_response(202, {"id": "j1", "status": "queued", "url": "/v1/transcriptions/j1"})


# ------------------------------------------------------------------------------------------ without a worker
def test_manifest_lines_paths_and_comments(tmp_path):
    elsewhere = tmp_path / "elsewhere" / "b.wav"
    manifest = tmp_path / "lists" / "m.tsv"
    manifest.parent.mkdir()
    manifest.write_text(
        f"# path<TAB>expected\n\nsub/a.webm\tكتاب \n{elsewhere}\tشكرا\nno-text.mp3\nsub/a.webm\tagain\n",
        encoding="utf-8",
    )
    items = backfill.read_manifest(manifest)
    assert items == [
        Item(manifest.parent / "sub" / "a.webm", "كتاب"),  # relative to the manifest's folder; stripped
        Item(elsewhere, "شكرا"),  # absolute stays
        Item(manifest.parent / "no-text.mp3", None),
    ]  # the second line for a.webm is dropped
    with pytest.raises(BackfillError):
        backfill.read_manifest(tmp_path / "missing.tsv")


def test_walk_finds_aiff_and_only_audio(tmp_path):
    for name in ("a.AIFF", "b.aif", "c.wav", "d.txt", "sub/e.webm", "f.flac.bak"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert [i.path.name for i in backfill.find_audio(tmp_path)] == ["a.AIFF", "b.aif", "c.wav", "e.webm"]
    assert all(i.path.is_absolute() for i in backfill.find_audio(tmp_path))


def test_backoff_schedule_and_retry_after():
    policy = Backoff()
    for attempt, step in [(0, 0.5), (1, 1.0), (3, 4.0), (6, 30.0), (20, 30.0)]:
        delays = [policy.delay(attempt) for _ in range(200)]
        assert all(step / 2 <= d <= step for d in delays)
        assert max(delays) - min(delays) > step / 10  # jittered
    assert all(7 <= policy.delay(0, 7.0) <= 7.7 for _ in range(100))  # Retry-After: at least what it says
    assert policy.delay(0, 10_000) <= 301  # capped
    assert backfill.parse_retry_after("3") == 3.0
    assert backfill.parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert backfill.parse_retry_after("soon") is None and backfill.parse_retry_after(None) is None


def test_outputs_resume_keys_jsonl_and_csv(tmp_path):
    audio = tmp_path / "a.wav"
    audio.write_bytes(b"RIFF")
    key = backfill.file_key(audio)
    result = {"text": "كتاب", "confidence": 0.5, "expected": {"normalized_match": True}}
    ok = {"file": key[0], "size": key[1], "mtime_ns": key[2], "id": "j", "status": "succeeded", "error": None,
          "result": result, "expected": "كتاب"}  # fmt: skip
    bad = {**ok, "file": "/x/b.wav", "status": "failed", "result": None, "error": {"code": "invalid_audio"}}
    for name in ("out.jsonl", "out.csv"):
        with Output(tmp_path / name) as output:
            output.write(ok)
            output.write(bad)
        assert Output(tmp_path / name).succeeded_keys() == {key}
    with (tmp_path / "out.jsonl").open("a") as f:
        f.write('{"file": "/cut/short", "size": 1, "mtime')  # a line cut short by a kill
    assert Output(tmp_path / "out.jsonl").succeeded_keys() == {key}
    with Output(tmp_path / "out.csv") as output:  # appending writes no second header
        output.write(ok)
    lines = (tmp_path / "out.csv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == ",".join(backfill.CSV_COLUMNS) and len(lines) == 4
    assert lines[1] == f"{key[0]},{key[1]},{key[2]},succeeded,كتاب,0.5,,كتاب,True,j"


def test_429_with_retry_after_is_honoured_then_the_upload_is_accepted(tmp_path):
    """Also: the request carries the key, the expected text and any extra form field or query parameter; polls
    long-poll (wait=20) and a 502 there is retried too."""
    stand_in = StandIn(
        [error(429, "rate_limited", {"Retry-After": "1"}), ACCEPTED],
        [Response("<html>bad gateway</html>", status=502), json_response(200, {"id": "j1", "status": "processing"}),
         json_response(200, {"id": "j1", "status": "succeeded", "error": None, "result": {"text": "كتاب"}})],
    )  # fmt: skip
    manifest = tmp_path / "m.tsv"
    manifest.write_text("kitab.webm\tكتاب\n", encoding="utf-8")
    shutil.copy(DATA / "kitab.webm", tmp_path / "kitab.webm")
    with serve_http(stand_in) as url:
        options = Options(url=url, out=tmp_path / "out.jsonl", manifest=manifest, api_key="aw_secret",
                          fields={"priority": "batch"}, params={"source": "archive"}, progress=False)  # fmt: skip
        started = time.monotonic()
        summary = backfill.run(options)
    assert summary.succeeded == 1 and not summary.failed and summary.retried == 2 and summary.exit_code == 0
    first, second = stand_in.of("POST")
    assert second["at"] - first["at"] >= 1.0  # waited the Retry-After
    assert time.monotonic() - started >= 1.0
    assert second["headers"]["Authorization"] == "Bearer aw_secret"
    assert second["form"] == {"expected": "كتاب", "priority": "batch"}
    assert second["args"] == {"source": "archive"}
    assert second["file"] == (DATA / "kitab.webm").read_bytes()
    polls = stand_in.of("GET")
    assert len(polls) == 3 and all(p["args"]["wait"] == "20" for p in polls)
    assert all(p["path"] == "/v1/transcriptions/j1" and p["headers"]["Authorization"] for p in polls)
    (record,) = records(options.out)
    assert record["status"] == "succeeded" and record["expected"] == "كتاب" and record["id"] == "j1"


def test_a_rejected_upload_is_not_retried_and_retries_run_out(tmp_path):
    folder = folder_of(tmp_path, "kitab.webm")
    stand_in = StandIn([error(413, "upload_too_large")])
    with serve_http(stand_in) as url:
        summary = backfill.run(Options(url=url, out=tmp_path / "a.jsonl", directory=folder, progress=False))
    assert len(stand_in.of("POST")) == 1 and summary.retried == 0
    assert summary.failed == {"upload_too_large": 1} and summary.exit_code == 1
    (record,) = records(tmp_path / "a.jsonl")
    assert record["status"] == "failed" and record["id"] is None
    assert record["error"]["code"] == "upload_too_large" and record["error"]["http_status"] == 413

    stand_in = StandIn([error(503, "service_unavailable")])
    with serve_http(stand_in) as url:
        options = Options(url=url, out=tmp_path / "b.jsonl", directory=folder, progress=False, retries=2,
                          backoff=Backoff(retries=2, base_s=0.05))  # fmt: skip
        summary = backfill.run(options)
    assert len(stand_in.of("POST")) == 3 and summary.failed == {"service_unavailable": 1}
    assert "1 failed (service_unavailable: 1)" in summary.line() and "2 requests retried" in summary.line()


def test_a_job_not_final_within_the_timeout(tmp_path):
    folder = folder_of(tmp_path, "kitab.webm")
    stand_in = StandIn([ACCEPTED], [json_response(200, {"id": "j1", "status": "processing"})])
    with serve_http(stand_in) as url:
        options = Options(url=url, out=tmp_path / "o.jsonl", directory=folder, timeout_s=0.5, progress=False)
        summary = backfill.run(options)
    assert summary.failed == {"wait_timeout": 1}
    assert stand_in.of("GET")[0]["args"]["wait"] == "1"  # never longer than the time left
    (record,) = records(options.out)
    assert record["id"] == "j1" and record["error"]["code"] == "wait_timeout"


def test_a_refused_key_stops_the_run(tmp_path):
    folder = folder_of(tmp_path, "kitab.webm", "kitab.ogg", "kitab.mp3")
    stand_in = StandIn([error(401, "unauthorized")])
    with serve_http(stand_in) as url:
        options = Options(url=url, out=tmp_path / "o.jsonl", directory=folder, concurrency=1, progress=False)
        summary = backfill.run(options)
    assert summary.failed == {"unauthorized": 1} and summary.not_sent == 2 and summary.exit_code == 1
    assert len(stand_in.of("POST")) == 1
    assert "2 not sent" in summary.line() and "stopped early (unauthorized)" in summary.line()


def test_bad_usage_exits_2(tmp_path):
    proc = run_cli("--out", str(tmp_path / "o.jsonl"))  # neither a folder nor a manifest
    assert proc.returncode == 2 and "DIRECTORY or --manifest" in proc.stderr
    proc = run_cli(str(tmp_path), "--url", "localhost:8000")
    assert proc.returncode == 2 and "--url" in proc.stderr


# ------------------------------------------------------------------------------------- with the real service
@pytest.fixture()
def service(app) -> Iterator[str]:
    """The session's web app over HTTP (its jobs run on the session's worker)."""
    with serve_http(app) as url:
        yield url


@pytest.mark.usefixtures("worker")
@pytest.mark.integration
def test_a_folder_then_resume_skips_all_and_a_touched_file_is_sent_again(service, tmp_path):
    folder = folder_of(tmp_path, "marhaba.webm", "shukran.mp3", aiff=True)
    out = tmp_path / "results.jsonl"
    first = run_cli(str(folder), "--url", service, "--out", str(out))
    assert first.returncode == 0, first.stderr
    rows = by_name(records(out))
    assert set(rows) == {"marhaba.webm", "shukran.mp3", "kitab.aiff"}
    for name, row in rows.items():
        assert row["status"] == "succeeded" and row["error"] is None
        assert row["result"]["text"] == TRANSCRIPTS[name.replace("aiff", "wav")]
        assert (row["size"], row["mtime_ns"]) == ((s := (folder / name).stat()).st_size, s.st_mtime_ns)
    assert "3 succeeded, 0 failed, 0 skipped (already done)" in first.stderr

    second = run_cli(str(folder), "--url", service, "--out", str(out))
    assert second.returncode == 0 and len(records(out)) == 3
    assert "0 succeeded, 0 failed, 3 skipped (already done)" in second.stderr

    touched = folder / "shukran.mp3"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 1_000_000_000))
    third = run_cli(str(folder), "--url", service, "--out", str(out))
    assert third.returncode == 0 and "1 succeeded, 0 failed, 2 skipped (already done)" in third.stderr
    last = records(out)[3:]
    assert [Path(r["file"]).name for r in last] == ["shukran.mp3"]
    assert last[0]["mtime_ns"] == touched.stat().st_mtime_ns and last[0]["status"] == "succeeded"


@pytest.mark.usefixtures("worker")
@pytest.mark.integration
def test_a_manifest_sends_expected_texts(service, tmp_path):
    folder = folder_of(tmp_path, "kitab.webm", "shukran.webm")
    manifest = tmp_path / "lists" / "batch.tsv"
    manifest.parent.mkdir()
    manifest.write_text(
        f"# file\texpected\n../archive/kitab.webm\tكِتَاب\n{folder / 'shukran.webm'}\t{TRANSCRIPTS['kitab.webm']}\n",
        encoding="utf-8",
    )
    out = tmp_path / "results.jsonl"
    proc = run_cli("--manifest", str(manifest), "--url", service, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = by_name(records(out))
    assert rows["kitab.webm"]["expected"] == "كِتَاب"
    assert rows["kitab.webm"]["result"]["expected"]["normalized_match"] is True  # tashkeel folded
    assert rows["shukran.webm"]["expected"] == TRANSCRIPTS["kitab.webm"]
    assert rows["shukran.webm"]["result"]["expected"]["normalized_match"] is False
    assert rows["shukran.webm"]["result"]["text"] == TRANSCRIPTS["shukran.webm"]


@pytest.mark.usefixtures("worker")
@pytest.mark.integration
def test_csv_output_with_a_bad_file_and_resume(service, tmp_path):
    folder = folder_of(tmp_path, "madrasa.flac", "marhaba.ogg")
    noise = random.Random(16).randbytes(4096)
    (folder / "noise.wav").write_bytes(b"\0" + noise)  # no audio container's magic: refused at upload (415)
    out = tmp_path / "results.csv"
    first = run_cli(str(folder), "--url", service, "--out", str(out))
    assert first.returncode == 1
    assert "2 succeeded, 1 failed (invalid_audio: 1), 0 skipped (already done)" in first.stderr
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "file,size,mtime_ns,status,text,confidence,error_code,expected,normalized_match,job_id"
    rows = {Path(r["file"]).name: r for r in csv.DictReader(lines)}
    assert rows["noise.wav"]["status"] == "failed" and rows["noise.wav"]["error_code"] == "invalid_audio"
    assert rows["noise.wav"]["job_id"] == ""  # refused before a job existed
    for name in ("madrasa.flac", "marhaba.ogg"):
        assert rows[name]["status"] == "succeeded" and rows[name]["job_id"]
        assert is_model_text(rows[name]["text"]) and 0 < float(rows[name]["confidence"]) <= 1
        assert int(rows[name]["size"]) == (folder / name).stat().st_size
    second = run_cli(str(folder), "--url", service, "--out", str(out))  # resumes from the CSV: only the bad file
    assert second.returncode == 1 and "0 succeeded, 1 failed (invalid_audio: 1), 2 skipped" in second.stderr
    assert len(out.read_text(encoding="utf-8").splitlines()) == 5  # one header


@pytest.mark.usefixtures("worker")
@pytest.mark.integration
def test_503s_are_retried_with_retry_after_then_pass_to_the_service(service, tmp_path):
    folder = folder_of(tmp_path, "sabah_alkhayr.webm")
    proxy = Proxy(service, [("POST", error(503, "service_unavailable", {"Retry-After": "1"})),
                            ("POST", error(503, "service_unavailable"))])  # fmt: skip
    with serve_http(proxy) as url:
        started = time.monotonic()
        summary = backfill.run(Options(url=url, out=tmp_path / "o.jsonl", directory=folder, progress=False))
        elapsed = time.monotonic() - started
    assert summary.succeeded == 1 and summary.retried == 2 and summary.exit_code == 0
    posts = [at for at, method, _ in proxy.seen if method == "POST"]
    assert len(posts) == 3 and posts[1] - posts[0] >= 1.0  # the Retry-After
    assert posts[2] - posts[1] >= 0.5  # the backoff's second step (1 s, jittered down to half at most)
    assert elapsed >= 1.5
    (record,) = records(tmp_path / "o.jsonl")
    assert record["result"]["text"] == TRANSCRIPTS["sabah_alkhayr.webm"]


@pytest.mark.usefixtures("worker")
@pytest.mark.integration
def test_connection_refused_until_the_service_appears(app, tmp_path):
    folder = folder_of(tmp_path, "madrasa.webm")
    port = free_port()
    appeared = threading.Event()
    done = threading.Event()

    def later() -> None:
        time.sleep(1.0)
        with serve_http(app, port):
            appeared.set()
            done.wait(60)

    thread = threading.Thread(target=later, daemon=True)
    thread.start()
    try:
        started = time.monotonic()
        options = Options(url=f"http://127.0.0.1:{port}", out=tmp_path / "o.jsonl", directory=folder, progress=False)
        summary = backfill.run(options)
        elapsed = time.monotonic() - started
    finally:
        done.set()
        thread.join(10)
    assert appeared.is_set() and summary.succeeded == 1 and summary.retried >= 1
    assert elapsed >= 1.0
    (record,) = records(options.out)
    assert record["status"] == "succeeded" and record["result"]["text"] == TRANSCRIPTS["madrasa.webm"]


@pytest.mark.usefixtures("worker")
@pytest.mark.integration
def test_api_key_from_the_environment(settings, tmp_path):
    """A service that requires keys (same Redis and queue as the session's worker): the key from
    ARABIC_WORDS_API_KEY is sent as a Bearer token; without it the first refusal stops the run."""
    app = create_app(settings.replace(AUTH_MODE="required"))
    store = KeyStore(services(app).store.redis)
    name = f"backfill-test-{os.getpid()}-{time.monotonic_ns()}"
    _, secret = store.create(name, Limits())
    folder = folder_of(tmp_path, "kitab.m4a", "shukran.wav")
    try:
        with serve_http(app) as url:
            refused = run_cli(str(folder), "--url", url, "--out", str(tmp_path / "no.jsonl"), "--concurrency", "1",
                              env={"ARABIC_WORDS_API_KEY": ""})  # fmt: skip
            assert refused.returncode == 1
            assert "1 failed (unauthorized: 1)" in refused.stderr and "1 not sent" in refused.stderr
            out = tmp_path / "yes.jsonl"
            accepted = run_cli(str(folder), "--url", url, "--out", str(out), env={"ARABIC_WORDS_API_KEY": secret})
            assert accepted.returncode == 0, accepted.stderr
            assert secret not in accepted.stderr
            assert {r["status"] for r in records(out)} == {"succeeded"} and len(records(out)) == 2
    finally:
        store.revoke(name)
