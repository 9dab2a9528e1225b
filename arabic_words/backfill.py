"""`arabic-words backfill`: send an archive of recordings to a running service, resumably.

Every file (found under a folder, or listed in a manifest with the text its speaker was asked to say) is uploaded,
long-polled until its job is final, and written as one record to the output (JSON lines, or CSV when the output's
name ends in ``.csv``). Requests that meet a connection error, a timeout, a 5xx or a 429 are retried with jittered
exponential backoff, honouring ``Retry-After``; a rejected upload (another 4xx) is recorded as failed and not
retried. A second run skips the files recorded as succeeded whose absolute path, size and mtime are unchanged.

Standard library HTTP only (urllib): nothing beyond the service's own dependencies is needed to run it.
"""

from __future__ import annotations

import contextlib
import csv
import email.utils
import http.client
import json
import math
import os
import random
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

AUDIO_SUFFIXES = {
    ".webm", ".weba", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".mp4", ".aac", ".wav", ".flac", ".aiff", ".aif",
}  # fmt: skip
_CONTENT_TYPES = {"m4a": "mp4", "weba": "webm", "oga": "ogg", "aif": "aiff"}
CSV_COLUMNS = (
    "file", "size", "mtime_ns", "status", "text", "confidence", "error_code", "expected", "normalized_match", "job_id",
)  # fmt: skip
FINAL = ("succeeded", "failed")
# Answers that say the caller, not the file, is refused: every further upload would be refused too, so the run stops.
FATAL_CODES = {"unauthorized", "key_revoked"}
API_KEY_ENV = "ARABIC_WORDS_API_KEY"


class BackfillError(Exception):
    """A problem with the command's input (the manifest, the folder): nothing was sent."""


# ----------------------------------------------------------------------------------------------- the inputs
@dataclass(frozen=True)
class Item:
    """One recording to send: its absolute path, and the text its speaker was asked to say (from a manifest)."""

    path: Path
    expected: str | None = None


def absolute(path: Path | str) -> Path:
    """``path`` made absolute and normalized (``..`` folded; symbolic links are kept as they are)."""
    return Path(os.path.abspath(path))


def find_audio(directory: Path) -> list[Item]:
    """Every file under ``directory`` (recursively) with an audio suffix, sorted."""
    if not directory.is_dir():
        raise BackfillError(f"{directory}: not a folder")
    paths = (p for p in directory.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
    return [Item(absolute(p)) for p in sorted(paths)]


def read_manifest(manifest: Path) -> list[Item]:
    """``path<TAB>expected text`` lines (``#`` comments and blank lines skipped; a line without a TAB is a path with
    no expected text). Relative paths are relative to the manifest's folder. A path listed twice is sent once."""
    try:
        lines = manifest.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise BackfillError(f"cannot read the manifest {manifest}: {exc}") from exc
    items: dict[Path, Item] = {}
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, expected = line.partition("\t")
        path = absolute(manifest.parent / name.strip())  # an absolute name replaces the folder
        items.setdefault(path, Item(path, expected.strip() or None))
    return list(items.values())


def file_key(path: Path) -> tuple[str, int, int] | None:
    """What resume compares: (absolute path, size, mtime_ns), or None for a file that cannot be read."""
    try:
        st = path.stat()
    except OSError:
        return None
    return str(path), st.st_size, st.st_mtime_ns


# ----------------------------------------------------------------------------------------------- the output
def _int(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


class Output:
    """The records file: JSON lines, or CSV when its name ends in ``.csv``; appended to, never rewritten."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.is_csv = path.suffix.lower() == ".csv"
        self._file: TextIO | None = None
        self._csv: csv.DictWriter | None = None

    def succeeded_keys(self) -> set[tuple[str, int, int]]:
        """The (file, size, mtime_ns) of every record that says succeeded (unparseable lines, e.g. one cut short by
        a kill, and records without a size and mtime are ignored: those files are sent again)."""
        if not self.path.exists():
            return set()
        with self.path.open(encoding="utf-8", newline="") as f:
            if self.is_csv:
                rows: Iterable[dict] = list(csv.DictReader(f))
            else:
                rows = []
                for line in f:
                    with contextlib.suppress(ValueError):
                        record = json.loads(line)
                        if isinstance(record, dict):
                            rows.append(record)
        keys = set()
        for row in rows:
            size, mtime_ns = _int(row.get("size")), _int(row.get("mtime_ns"))
            if row.get("status") == "succeeded" and row.get("file") and size is not None and mtime_ns is not None:
                keys.add((str(row["file"]), size, mtime_ns))
        return keys

    def __enter__(self) -> Output:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        self._file = self.path.open("a", encoding="utf-8", newline="" if self.is_csv else None)
        if self.is_csv:
            self._csv = csv.DictWriter(self._file, fieldnames=CSV_COLUMNS)
            if fresh:
                self._csv.writeheader()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()

    def write(self, record: dict) -> None:
        assert self._file is not None
        if self._csv is not None:
            self._csv.writerow(csv_row(record))
        else:
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()


def csv_row(record: dict) -> dict:
    result = record.get("result") or {}
    error = record.get("error") or {}
    compared = result.get("expected") or {}
    return {
        "file": record["file"],
        "size": record.get("size"),
        "mtime_ns": record.get("mtime_ns"),
        "status": record.get("status"),
        "text": result.get("text", ""),
        "confidence": result.get("confidence", ""),
        "error_code": error.get("code", ""),
        "expected": record.get("expected") or "",
        "normalized_match": compared.get("normalized_match", ""),
        "job_id": record.get("id") or "",
    }


# ------------------------------------------------------------------------------------------------ requests
@dataclass(frozen=True)
class Backoff:
    """How often and how long to retry one request: ``retries`` more tries after the first, waiting ``base_s``
    doubling to ``cap_s`` (each wait drawn between half and all of that), or what ``Retry-After`` says (up to
    ``max_retry_after_s``, plus up to a tenth more, at most a second, so that clients told the same do not return
    together)."""

    retries: int = 8
    base_s: float = 0.5
    cap_s: float = 30.0
    max_retry_after_s: float = 300.0

    def delay(self, attempt: int, retry_after_s: float | None = None) -> float:
        if retry_after_s is not None and retry_after_s > 0:
            wait_s = min(retry_after_s, self.max_retry_after_s)
            return wait_s + random.uniform(0, min(1.0, wait_s / 10))
        step = min(self.cap_s, self.base_s * 2**attempt)
        return random.uniform(step / 2, step)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header: delay-seconds or an HTTP date; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class RequestFailed(Exception):
    """A request that was refused (a 4xx other than 429) or whose retries ran out; ``error`` is the record's."""

    def __init__(self, error: dict) -> None:
        super().__init__(error.get("message", ""))
        self.error = error


class Stopped(Exception):
    """The run is stopping (Ctrl-C, or an answer that every further request would get too)."""


def _is_retried(status: int) -> bool:
    return status == 429 or status >= 500


def _api_error(status: int, body: bytes) -> dict:
    """The API's ``{"error": {"code", "message"}}`` from an error answer, plus its HTTP status; for a body that is
    not one (a proxy's HTML page), ``http_<status>``."""
    error: dict = {}
    with contextlib.suppress(ValueError, AttributeError):
        error = dict(json.loads(body)["error"])
    if not isinstance(error.get("code"), str):
        error = {"code": f"http_{status}", "message": body[:200].decode("utf-8", "replace").strip()}
    return {**error, "http_status": status}


def _multipart(fields: dict[str, str], filename: str, content_type: str, data: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body: the text ``fields``, then the recording as the field ``file``."""
    boundary = f"----arabic-words-{uuid.uuid4().hex}"
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    safe_name = filename.replace("\\", "_").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{safe_name}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n".encode()
    )
    parts.append(data)
    parts.append(f"\r\n--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class Client:
    """Talks to the service for one run: builds the requests (auth header, form fields, query parameters) and
    retries them. ``fields`` are sent as form fields and ``params`` as query parameters with every upload (e.g.
    ``fields={"priority": "batch"}``); an item's expected text is the field ``expected``."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        fields: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        backoff: Backoff = Backoff(),
        upload_timeout_s: float = 60.0,
        poll_wait_s: int = 20,
        stop: threading.Event | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.fields = dict(fields or {})
        self.params = dict(params or {})
        self.backoff = backoff
        self.upload_timeout_s = upload_timeout_s
        self.poll_wait_s = poll_wait_s
        self.stop = stop or threading.Event()
        self._lock = threading.Lock()
        self.retried = 0  # requests sent again, over the whole run

    # -- building
    def headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "arabic-words-backfill"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def upload_request(self, item: Item, data: bytes) -> urllib.request.Request:
        fields = dict(self.fields)
        if item.expected is not None:
            fields["expected"] = item.expected
        suffix = item.path.suffix.lower()[1:]
        content_type = "audio/" + _CONTENT_TYPES.get(suffix, suffix)
        body, multipart_type = _multipart(fields, item.path.name, content_type, data)
        query = f"?{urllib.parse.urlencode(self.params)}" if self.params else ""
        return urllib.request.Request(
            f"{self.url}/v1/transcriptions{query}",
            data=body,
            headers={**self.headers(), "Content-Type": multipart_type},
            method="POST",
        )

    def poll_request(self, job_id: str, wait_s: int) -> urllib.request.Request:
        path = f"/v1/transcriptions/{urllib.parse.quote(job_id, safe='')}?wait={wait_s}"
        return urllib.request.Request(self.url + path, headers=self.headers(), method="GET")

    # -- sending
    def send(self, make_request: Callable[[], urllib.request.Request], timeout_s: float) -> dict:
        """The JSON answer to a request, retried on connection errors, timeouts, 5xx and 429; raises RequestFailed
        for another 4xx (at once) or when the retries run out, Stopped when the run stops meanwhile."""
        attempt = 0
        while True:
            if self.stop.is_set():
                raise Stopped
            retry_after_s = None
            try:
                with urllib.request.urlopen(make_request(), timeout=timeout_s) as response:
                    body = response.read()
                try:
                    answer = json.loads(body)
                except ValueError:
                    answer = None
                if not isinstance(answer, dict):
                    raise RequestFailed({"code": "bad_response", "message": f"not a JSON object: {body[:200]!r}"})
                return answer
            except urllib.error.HTTPError as exc:
                try:
                    body = exc.read()
                except (OSError, ValueError, http.client.HTTPException):
                    body = b""
                finally:
                    exc.close()
                error = _api_error(exc.code, body)
                if not _is_retried(exc.code):
                    raise RequestFailed(error) from None
                retry_after_s = parse_retry_after(exc.headers.get("Retry-After"))
            except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, cut short (URLError too)
                reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
                error = {"code": "connection_error", "message": f"{type(reason).__name__}: {reason}"}
            if attempt >= self.backoff.retries:
                raise RequestFailed(error)
            delay = self.backoff.delay(attempt, retry_after_s)
            attempt += 1
            with self._lock:
                self.retried += 1
            if self.stop.wait(delay):
                raise Stopped

    def transcribe(self, item: Item, timeout_s: float) -> dict:
        """Send one file and long-poll its job until it is final or ``timeout_s`` pass: its record (the API's job
        shape with ``file``, ``size``, ``mtime_ns`` and, from a manifest, ``expected``)."""
        record: dict = {"file": str(item.path), "size": None, "mtime_ns": None}
        if item.expected is not None:
            record["expected"] = item.expected
        try:
            st = item.path.stat()
            data = item.path.read_bytes()
        except OSError as exc:
            return _failed(record, None, {"code": "unreadable", "message": str(exc)})
        record.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
        try:
            job = self.send(lambda: self.upload_request(item, data), self.upload_timeout_s)
        except RequestFailed as exc:
            return _failed(record, None, exc.error)
        job_id = str(job.get("id", ""))
        deadline = time.monotonic() + timeout_s
        while job.get("status") not in FINAL:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                message = f"the job was still {job.get('status')} after {timeout_s:g} s (--timeout)"
                return _failed(record, job_id, {"code": "wait_timeout", "message": message})
            wait_s = max(1, min(self.poll_wait_s, math.ceil(remaining)))
            try:
                job = self.send(lambda wait_s=wait_s: self.poll_request(job_id, wait_s), wait_s + 30)
            except RequestFailed as exc:
                return _failed(record, job_id, exc.error)
        job.pop("url", None)
        return {**record, **job}


def _failed(record: dict, job_id: str | None, error: dict) -> dict:
    return {**record, "id": job_id, "status": "failed", "result": None, "error": error}


# ----------------------------------------------------------------------------------------------------- a run
@dataclass
class Options:
    url: str = "http://127.0.0.1:8000"
    out: Path = Path("backfill.jsonl")
    directory: Path | None = None  # walked for AUDIO_SUFFIXES, or
    manifest: Path | None = None  # ``path<TAB>expected text`` lines
    concurrency: int = 4
    timeout_s: float = 300.0  # per job, from its upload to its final state
    retries: int = 8
    api_key: str | None = None
    fields: dict[str, str] = field(default_factory=dict)  # form fields sent with every upload
    params: dict[str, str] = field(default_factory=dict)  # query parameters sent with every upload
    progress: bool = True
    backoff: Backoff | None = None  # default: Backoff(retries=retries)


@dataclass
class Summary:
    out: Path
    succeeded: int = 0
    failed: Counter = field(default_factory=Counter)  # by error code
    skipped: int = 0  # already recorded as succeeded, unchanged
    not_sent: int = 0  # left when the run stopped early
    retried: int = 0
    stopped_by: str = ""  # "interrupted", or the error code that stopped the run

    @property
    def exit_code(self) -> int:
        if self.stopped_by == "interrupted":
            return 130
        return 1 if self.failed or self.not_sent else 0

    def line(self) -> str:
        failed = sum(self.failed.values())
        by_code = ", ".join(f"{code}: {n}" for code, n in sorted(self.failed.items()))
        parts = [f"{self.succeeded} succeeded", f"{failed} failed" + (f" ({by_code})" if by_code else "")]
        parts.append(f"{self.skipped} skipped (already done)")
        if self.not_sent:
            parts.append(f"{self.not_sent} not sent")
        text = "backfill: " + ", ".join(parts)
        if self.retried:
            text += f"; {self.retried} requests retried"
        if self.stopped_by:
            text += f"; stopped early ({self.stopped_by})"
        return f"{text}; records in {self.out}"


def run(options: Options) -> Summary:
    """Send every file not yet done; write one record per file as it finishes; the summary of the run."""
    from tqdm import tqdm

    if (options.directory is None) == (options.manifest is None):
        raise BackfillError("give a DIRECTORY or --manifest FILE.tsv (one of them)")
    parsed = urllib.parse.urlsplit(options.url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise BackfillError(f"--url must be an http:// or https:// address, not {options.url!r}")
    if options.concurrency < 1:
        raise BackfillError("--concurrency must be at least 1")
    items = read_manifest(options.manifest) if options.manifest else find_audio(options.directory)  # type: ignore[arg-type]
    output = Output(options.out)
    done = output.succeeded_keys()
    todo = [item for item in items if file_key(item.path) not in done]
    summary = Summary(out=options.out, skipped=len(items) - len(todo))
    client = Client(
        options.url,
        api_key=options.api_key,
        fields=options.fields,
        params=options.params,
        backoff=options.backoff or Backoff(retries=options.retries),
    )

    def one(item: Item) -> dict | None:
        try:
            return client.transcribe(item, options.timeout_s)
        except Stopped:
            return None

    progress = tqdm(total=len(todo), unit="file", desc="backfill", disable=not options.progress, file=sys.stderr)
    pool = ThreadPoolExecutor(options.concurrency)
    pending: set[Future] = set()
    queue = iter(todo)
    try:
        with output:
            while True:
                while not client.stop.is_set() and len(pending) < options.concurrency:  # a few in flight, no more
                    item = next(queue, None)
                    if item is None:
                        break
                    pending.add(pool.submit(one, item))
                if not pending:
                    break
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    record = future.result()
                    if record is None:
                        continue
                    output.write(record)
                    progress.update(1)
                    if record["status"] == "succeeded":
                        summary.succeeded += 1
                    else:
                        code = (record.get("error") or {}).get("code") or "unknown"
                        summary.failed[code] += 1
                        if code in FATAL_CODES and not client.stop.is_set():
                            summary.stopped_by = code
                            client.stop.set()
                progress.set_postfix(failed=sum(summary.failed.values()), retried=client.retried, refresh=False)
    except KeyboardInterrupt:
        summary.stopped_by = "interrupted"
        client.stop.set()
        for future in pending:
            future.cancel()
    finally:
        pool.shutdown(wait=summary.stopped_by != "interrupted", cancel_futures=True)
        progress.close()
    summary.retried = client.retried
    summary.not_sent = len(todo) - summary.succeeded - sum(summary.failed.values())
    return summary
