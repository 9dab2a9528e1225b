"""OpenAI-compatible ``POST /v1/audio/transcriptions``: a synchronous wrapper over the same queue.

The upload goes through ``web.api.submit`` (validation, admission control, the client's limits, storing, queueing:
one code path for every upload), then the request waits for the job with the app's ``JobWaiter`` for up to
``MAX_WAIT_S``, and answers in OpenAI's shapes. A job not final by then is answered 202 with its id and
``Location``, exactly like ``POST /v1/transcriptions``, so nothing is lost: the client polls it there.

Form fields (multipart, as OpenAI's clients send them):

- ``file``: the recording (required).
- ``model``: accepted and ignored (any value, e.g. ``whisper-1``): the server runs its one model (``ASR_MODEL``).
- ``language``: ``ar`` or absent; anything else is 400 ``unsupported_language``.
- ``prompt``, ``temperature``: accepted and ignored (the CTC model takes no prompt; decoding is deterministic).
- ``response_format``: ``json`` (default), ``text``, ``verbose_json``, ``srt`` or ``vtt``.
- ``timestamp_granularities[]``: ``segment`` (default) and/or ``word``: which of ``segments``/``words`` verbose_json
  carries; srt and vtt get one cue per word when ``word`` is asked for, else one cue for the clip.
- ``expected`` (an extension): the text the speaker was asked to say, as on ``POST /v1/transcriptions``; the json and
  verbose_json answers then carry its comparison (``expected``).

Every error of this route is OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` with this service's
code in ``code``: errors raised before the job exists (validation, auth, limits) are reshaped from the API's own
``{"error": {"code", "message"}}``; a job that failed answers with a status that matches its failure
(``FAILED_STATUS``).
A successful answer names the job record in ``Content-Location`` (word confidences, timings: GET it).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

from flask import Blueprint, Response, current_app, jsonify, request, url_for

from shared.jobs import Job
from shared.schema import (
    ErrorCode,
    JobStatus,
    OpenAIError,
    OpenAIErrorBody,
    OpenAISegment,
    OpenAITranscription,
    OpenAIVerboseTranscription,
    OpenAIWord,
    dump,
)
from web import auth, services
from web.api import MAX_EXPECTED_CHARS, accepted, submit
from web.errors import ApiError
from web.openapi import Reply, errors, json_body, operation, ref

bp = Blueprint("openai", __name__)

RESPONSE_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
GRANULARITIES = ("word", "segment")
LANGUAGES = ("ar",)

# A job that failed: the HTTP status of the answer, by its error code (anything else: 500).
FAILED_STATUS = {
    ErrorCode.INVALID_AUDIO: 400,
    ErrorCode.AUDIO_TOO_LONG: 400,
    ErrorCode.UPLOAD_EXPIRED: 503,  # no worker took it within UPLOAD_TTL_S
    ErrorCode.TIMEOUT: 504,
    ErrorCode.WORKER_CRASHED: 500,
    ErrorCode.INTERNAL: 500,
}
# The request field an error is about (OpenAI's ``param``).
PARAM_OF = {
    ErrorCode.NO_FILE: "file",
    ErrorCode.EMPTY_UPLOAD: "file",
    ErrorCode.UPLOAD_TOO_LARGE: "file",
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: "file",
    ErrorCode.INVALID_AUDIO: "file",
    ErrorCode.AUDIO_TOO_LONG: "file",
    ErrorCode.INVALID_EXPECTED: "expected",
    ErrorCode.UNSUPPORTED_LANGUAGE: "language",
    ErrorCode.INVALID_RESPONSE_FORMAT: "response_format",
    ErrorCode.INVALID_TIMESTAMP_GRANULARITIES: "timestamp_granularities[]",
}


def error_type(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP status."""
    if status in (401, 403):
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def _known(code: str) -> ErrorCode | None:
    try:
        return ErrorCode(code)
    except ValueError:  # werkzeug's own errors have codes of their own (e.g. bad_request)
        return None


def openai_error(status: int, code: str, message: str) -> dict:
    known = _known(code)
    param = PARAM_OF.get(known) if known else None
    return dump(OpenAIErrorBody(error=OpenAIError(message=message, type=error_type(status), param=param, code=code)))


# ------------------------------------------------------------------------------------------------ errors
def _openai_errors(response: Response) -> Response:
    """The API's error bodies (``web.errors``: {"error": {"code", "message"}}) in OpenAI's shape, same code."""
    if response.status_code < 400 or not response.is_json:
        return response
    body = response.get_json(silent=True)
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or "type" in error:  # not ours, or OpenAI's already
        return response
    reshaped = openai_error(response.status_code, str(error.get("code", "")), str(error.get("message", "")))
    response.set_data(current_app.json.dumps(reshaped))
    return response


bp.before_request(auth.check_access)  # keys, the client's limits and the job id reserved for the upload (web/auth.py)
bp.after_request(auth.rate_headers)
bp.after_request(_openai_errors)
bp.teardown_request(auth.release_unused)


# ----------------------------------------------------------------------------------------------- request
@dataclass(frozen=True)
class Options:
    response_format: str
    granularities: frozenset[str]


def _form(name: str) -> str:
    value = request.form.get(name) if request.mimetype == "multipart/form-data" else None
    return (value or "").strip()


def _options() -> Options:
    """The request's options, checked before anything is stored or queued."""
    language = _form("language").lower()
    if language and language not in LANGUAGES:
        raise ApiError(400, ErrorCode.UNSUPPORTED_LANGUAGE, f"only Arabic ('ar') is transcribed, not {language!r}")
    response_format = _form("response_format") or "json"
    if response_format not in RESPONSE_FORMATS:
        raise ApiError(
            400, ErrorCode.INVALID_RESPONSE_FORMAT, f"'response_format' must be one of {', '.join(RESPONSE_FORMATS)}"
        )
    granularities: list[str] = []
    if request.mimetype == "multipart/form-data":
        granularities = request.form.getlist("timestamp_granularities[]") + request.form.getlist(
            "timestamp_granularities"
        )
    granularities = [value.strip() for value in granularities if value.strip()]
    if any(value not in GRANULARITIES for value in granularities):
        raise ApiError(
            400, ErrorCode.INVALID_TIMESTAMP_GRANULARITIES, "'timestamp_granularities[]' takes 'word' and/or 'segment'"
        )
    return Options(response_format, frozenset(granularities or ["segment"]))


# ------------------------------------------------------------------------------------------------ answers
def _answer(job: Job, options: Options):
    """A final job in the format asked for."""
    if job.status is JobStatus.FAILED:
        error = job.error or {}
        code = str(error.get("code") or ErrorCode.INTERNAL.value)
        known = _known(code)
        status = FAILED_STATUS.get(known, 500) if known else 500
        headers = {"Retry-After": "5"} if status == 503 else {}
        return jsonify(openai_error(status, code, str(error.get("message", "the job failed")))), status, headers
    result = job.result or {}
    text = str(result.get("text", ""))
    duration = float(result.get("duration_s", 0.0))
    words = [OpenAIWord(word=w["word"], start=w["start"], end=w["end"]) for w in result.get("words", [])]
    expected = result.get("expected")
    headers = {"Content-Location": url_for("api.get_transcription", job_id=job.id)}
    fmt = options.response_format
    if fmt == "json":
        body = OpenAITranscription(text=text, **({"expected": expected} if expected else {}))
        return jsonify(dump(body)), 200, headers
    if fmt == "verbose_json":
        extra: dict = {}
        if "word" in options.granularities:
            extra["words"] = words
        if "segment" in options.granularities:
            extra["segments"] = [segment(result, duration)]
        if expected:
            extra["expected"] = expected
        verbose = OpenAIVerboseTranscription(
            task="transcribe", language="arabic", duration=duration, text=text, **extra
        )
        return jsonify(dump(verbose)), 200, headers
    if fmt == "text":
        return Response(text + "\n", mimetype="text/plain"), 200, headers
    if "word" in options.granularities:
        cues = [(w.start, w.end, w.word) for w in words]
    else:
        cues = [(0.0, duration, text)] if text else []
    if fmt == "srt":
        return Response(srt(cues), mimetype="text/plain"), 200, headers
    return Response(vtt(cues), mimetype="text/vtt"), 200, headers


def segment(result: dict, duration: float) -> OpenAISegment:
    """The clip as OpenAI's one segment; the whisper-specific numbers as OpenAISegment documents them."""
    text = str(result.get("text", ""))
    confidences = [float(w.get("confidence", 0.0)) for w in result.get("words", [])]
    if not confidences:
        confidences = [float(result.get("confidence", 0.0))]
    avg_logprob = sum(math.log(max(c, 1e-10)) for c in confidences) / len(confidences)
    data = text.encode("utf-8")
    compression_ratio = len(data) / len(zlib.compress(data)) if data else 0.0
    no_speech_prob = float(result.get("confidence", 0.0)) if not text else 0.0
    return OpenAISegment(
        id=0, seek=0, start=0.0, end=duration, text=text, tokens=[], temperature=0.0,
        avg_logprob=round(avg_logprob, 6), compression_ratio=round(compression_ratio, 6),
        no_speech_prob=round(no_speech_prob, 6),
    )  # fmt: skip


def _clock(seconds: float, separator: str) -> str:
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{ms:03d}"


def srt(cues: list[tuple[float, float, str]]) -> str:
    return "".join(
        f"{i}\n{_clock(start, ',')} --> {_clock(end, ',')}\n{text}\n\n" for i, (start, end, text) in enumerate(cues, 1)
    )


def vtt(cues: list[tuple[float, float, str]]) -> str:
    return "WEBVTT\n\n" + "".join(
        f"{_clock(start, '.')} --> {_clock(end, '.')}\n{text}\n\n" for start, end, text in cues
    )


# ------------------------------------------------------------------------------------------------- route
_FORM = {
    "type": "object",
    "required": ["file"],
    "properties": {
        "file": {"type": "string", "format": "binary", "description": "the recording (as POST /v1/transcriptions)"},
        "model": {"type": "string", "description": "accepted and ignored (e.g. `whisper-1`): ASR_MODEL runs"},
        "language": {
            "type": "string",
            "enum": list(LANGUAGES),
            "description": "`ar` or absent (else 400 `unsupported_language`)",
        },
        "prompt": {"type": "string", "description": "accepted and ignored"},
        "temperature": {"type": "number", "description": "accepted and ignored (decoding is deterministic)"},
        "response_format": {"type": "string", "enum": list(RESPONSE_FORMATS), "default": "json"},
        "timestamp_granularities[]": {
            "type": "array",
            "items": {"type": "string", "enum": list(GRANULARITIES)},
            "description": "`segment` (default) and/or `word`: verbose_json's `segments`/`words`; srt and vtt get a "
            "cue per word with `word`, else one cue for the clip",
        },
        "expected": {
            "type": "string",
            "maxLength": MAX_EXPECTED_CHARS,
            "description": "an extension: the text the speaker was asked to say; json and verbose_json then carry "
            "`expected`",
        },
    },
}
_SUCCESS = Reply(
    "the transcript in `response_format`: json and verbose_json as JSON, text and srt as text/plain, vtt as text/vtt",
    {"application/json": {"anyOf": [ref("OpenAITranscription"), ref("OpenAIVerboseTranscription")]},
     "text/plain": {"type": "string"}, "text/vtt": {"type": "string"}},
    ("Content-Location",),
)  # fmt: skip
_OPENAI_ERRORS = errors(
    400, 401, 403, 413, 415, 429, 500, 503, 504, schema="OpenAIErrorBody",
    notes={
        400: "`no_file`, `empty_upload`, `invalid_expected`, `unsupported_language`, `invalid_response_format`, "
        "`invalid_timestamp_granularities`; or the job failed as `invalid_audio` or `audio_too_long`",
        500: "the job failed as `worker_crashed` or `internal_error`",
        503: "Redis or the queue is unavailable, or the job failed as `upload_expired`",
    },
)  # fmt: skip


@bp.post("/v1/audio/transcriptions")
@operation(
    "Transcribe a recording, OpenAI-style (synchronous)",
    {200: _SUCCESS,
     202: Reply("not final within MAX_WAIT_S: the job goes on; poll `url` (GET /v1/transcriptions/{id})",
                json_body("JobCreated"), ("Location",)),
     **_OPENAI_ERRORS},
    description="Compatible with OpenAI's audio transcription API and its clients (`base_url` = this server's "
    "`/v1`). Queues the upload like POST /v1/transcriptions and waits for it up to MAX_WAIT_S.",
    tags=("openai",), request_body={"required": True, "content": {"multipart/form-data": {"schema": _FORM}}},
)  # fmt: skip
def create_transcription():
    options = _options()
    job = submit()
    app = services()
    final = app.waiter.wait(job.id, app.settings.MAX_WAIT_S) or job
    if not final.status.is_final:
        return accepted(final)
    return _answer(final, options)
