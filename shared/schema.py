"""Job states, error codes and the result schema returned by the API and the CLI, and the models of every response
body the web app sends: the views build their JSON through them and ``web/openapi.py`` generates the OpenAPI
document's schemas from them (``openapi_schemas``), so the two cannot drift apart."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema, models_json_schema
from typing_extensions import TypedDict  # pydantic needs typing_extensions' TypedDict before Python 3.12


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED)


class ErrorCode(enum.StrEnum):
    # HTTP-level
    NO_FILE = "no_file"
    EMPTY_UPLOAD = "empty_upload"
    UPLOAD_TOO_LARGE = "upload_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    INVALID_EXPECTED = "invalid_expected"
    INVALID_WAIT = "invalid_wait"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    SERVICE_UNAVAILABLE = "service_unavailable"
    QUEUE_FULL = "queue_full"
    INVALID_PRIORITY = "invalid_priority"
    INVALID_VOCABULARY = "invalid_vocabulary"
    UNAUTHORIZED = "unauthorized"
    KEY_REVOKED = "key_revoked"
    RATE_LIMITED = "rate_limited"
    TOO_MANY_INFLIGHT = "too_many_inflight"
    QUOTA_EXCEEDED = "quota_exceeded"
    INTERNAL = "internal_error"
    # job-level
    INVALID_AUDIO = "invalid_audio"
    AUDIO_TOO_LONG = "audio_too_long"
    UPLOAD_EXPIRED = "upload_expired"
    WORKER_CRASHED = "worker_crashed"
    TIMEOUT = "timeout"
    # OpenAI-compatible route (web/openai.py)
    UNSUPPORTED_LANGUAGE = "unsupported_language"
    INVALID_RESPONSE_FORMAT = "invalid_response_format"
    INVALID_TIMESTAMP_GRANULARITIES = "invalid_timestamp_granularities"


@dataclass(frozen=True)
class JobError:
    code: str
    message: str

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message}


class ExpectedComparison(TypedDict):
    """How the transcript compares with the text the speaker was asked to say (shared.text.compare_expected)."""

    text: str  # the expected text, as sent
    normalized_match: bool  # equal after loose normalization (tashkeel, tatweel, alef forms, ...)
    similarity: float  # 1 - character edit distance / length of the longer text


# Descriptions of the result's fields for the OpenAPI document (``Annotated`` changes nothing at run time).
_WORD_CONFIDENCE = "CTC posterior that the audio between its neighbours spells exactly this word, times the share of "
_WORD_CONFIDENCE += "the beam search that agrees on it"


@dataclass(frozen=True)
class WordTiming:
    """One word of a transcript and where it was heard."""

    word: str
    start: Annotated[float, Field(description="seconds from the start of the audio")]
    end: Annotated[float, Field(description="seconds from the start of the audio")]
    confidence: Annotated[float, Field(description=_WORD_CONFIDENCE)]


@dataclass
class TranscriptionResult:
    """A succeeded job's result: the transcript, its confidence and word timings."""

    text: str
    confidence: Annotated[float, Field(description="the weakest word's (empty text: the mean blank posterior)")]
    words: list[WordTiming]
    duration_s: Annotated[float, Field(description="seconds of audio")]
    model: Annotated[str, Field(description="the checkpoint that ran it (ASR_MODEL)")]
    timings_ms: Annotated[
        dict[str, float], Field(description="milliseconds: queue, decode, vad, batch_wait, inference, total")
    ] = field(default_factory=dict)
    backend: Annotated[str, Field(description="the inference backend that ran it, e.g. onnx-int8")] = ""
    batch_size: Annotated[int, Field(description="clips in the forward pass it shared (dynamic batching)")] = 1
    cached: Annotated[
        bool, Field(description="answered from an identical earlier upload (same model and decoding), no worker")
    ] = False
    expected: ExpectedComparison | None = None  # when the client sent `expected`; absent from to_dict() otherwise

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.expected is None:
            del out["expected"]
        return out


# ------------------------------------------------------------------------------------------- response models
# The body of every response the web app builds. Views dump them (``Model(...).model_dump(mode="json")``); the
# OpenAPI document's component schemas are generated from the same classes (``openapi_schemas``).


def _drop_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


def _omitted(description: str | None = None) -> Any:
    """A field that is left out of the JSON when unset (``dump``), so the schema says neither null nor a default."""
    return Field(None, description=description, json_schema_extra=_drop_default)


class _Body(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class JobCreated(_Body):
    """An accepted upload (202): poll ``url`` (the ``Location`` header) for its result."""

    id: str = Field(description="the job id: 32 hex characters (122 random bits)", examples=["3f0c" + "0" * 28])
    status: Literal[JobStatus.QUEUED, JobStatus.PROCESSING, JobStatus.SUCCEEDED] = Field(
        description="`queued` for a new upload; `succeeded` when an identical upload's result answered it at once "
        "(`result.cached`); the OpenAI-compatible route's 202 may say `processing`"
    )
    url: str = Field(description="where the job is answered: GET it, optionally with ?wait=")


class JobFailure(BaseModel):
    """Why a job failed."""

    model_config = ConfigDict(extra="allow")
    code: str = Field(description="`invalid_audio`, `audio_too_long`, `upload_expired`, `timeout`, `worker_crashed` "
                      "or `internal_error`")  # fmt: skip
    message: str
    reason: str | SkipJsonSchema[None] = _omitted(
        "for `invalid_audio`: unrecognized_format, corrupt, truncated, no_audio_stream, unsupported_codec, "
        "zero_length, silent, non_finite, sample_rate_too_high, too_many_channels"
    )


class JobView(BaseModel):
    """A job as GET /v1/transcriptions/{id} answers it (``shared.jobs.Job.public``): ``result`` is the worker's
    ``TranscriptionResult.to_dict()`` once it succeeded, ``error`` is set once it failed."""

    id: str
    status: JobStatus
    result: TranscriptionResult | None
    error: JobFailure | None


class ErrorDetail(_Body):
    code: str = Field(description="stable, machine-readable: see ErrorCode (e.g. `no_file`, `queue_full`)")
    message: str = Field(description="for people")


class ErrorBody(_Body):
    """Every error of the API (``web.errors``)."""

    error: ErrorDetail


class Health(_Body):
    status: Literal["ok"]


class Readiness(_Body):
    """Ready when Redis answers, a worker answers a ping and a worker process has its model loaded."""

    status: Literal["ready", "not_ready"]
    redis: bool = Field(description="Redis answered a PING")
    workers: int = Field(ge=0, description="Celery workers that answered a ping within 1 s")
    model_processes: int = Field(ge=0, description="worker processes with their model loaded (fresh heartbeat)")


# OpenAI-compatible shapes (POST /v1/audio/transcriptions, web/openai.py)


class OpenAITranscription(_Body):
    """`response_format=json`. ``expected`` (an extension) only when the request sent an ``expected`` text."""

    text: str
    expected: ExpectedComparison | SkipJsonSchema[None] = _omitted()


class OpenAIWord(_Body):
    word: str
    start: float = Field(description="seconds from the start of the audio")
    end: float


class OpenAISegment(_Body):
    """The clip as one segment. The numbers whisper-specific models report are filled as documented here."""

    id: int = Field(description="always 0: one segment per clip")
    seek: int = Field(description="always 0")
    start: float = Field(description="0.0")
    end: float = Field(description="the clip's duration in seconds")
    text: str
    tokens: list[int] = Field(description="always empty: the CTC model spells letters, it has no token ids")
    temperature: float = Field(description="always 0.0: decoding is a deterministic beam search")
    avg_logprob: float = Field(description="mean natural log of the words' confidences (of the transcript's "
                               "confidence when no word was found)")  # fmt: skip
    compression_ratio: float = Field(description="UTF-8 length of the text / its zlib-compressed length, as whisper "
                                     "computes it")  # fmt: skip
    no_speech_prob: float = Field(description="for an empty transcript its confidence (the mean blank posterior), "
                                  "else 0.0")  # fmt: skip


class OpenAIVerboseTranscription(_Body):
    """`response_format=verbose_json`: ``words`` when `word` timestamps were asked for, ``segments`` when `segment`
    timestamps were (the default)."""

    task: Literal["transcribe"]
    language: Literal["arabic"]
    duration: float = Field(description="seconds of audio")
    text: str
    words: list[OpenAIWord] | SkipJsonSchema[None] = _omitted("with timestamp_granularities[]=word")
    segments: list[OpenAISegment] | SkipJsonSchema[None] = _omitted("with timestamp_granularities[]=segment "
                                                                   "(the default)")  # fmt: skip
    expected: ExpectedComparison | SkipJsonSchema[None] = _omitted("when the request sent `expected`")


class OpenAIError(_Body):
    message: str
    type: str = Field(description="`invalid_request_error` (4xx), `authentication_error` (401, 403), "
                      "`rate_limit_error` (429) or `server_error` (5xx)")  # fmt: skip
    param: str | None = Field(description="the request field at fault, when one is")
    code: str = Field(description="this service's error code (the same as the rest of the API's)")


class OpenAIErrorBody(_Body):
    """Every error of the OpenAI-compatible route: OpenAI's shape, a superset of ErrorBody's."""

    error: OpenAIError


RESPONSE_MODELS: tuple[type[BaseModel], ...] = (
    JobCreated, JobView, ErrorBody, Health, Readiness, OpenAITranscription, OpenAIVerboseTranscription,
    OpenAIErrorBody,
)  # fmt: skip


def dump(model: BaseModel) -> dict[str, Any]:
    """A response model as the JSON the API sends (optional extensions that are unset are left out)."""
    return model.model_dump(mode="json", exclude_none=False, exclude_unset=True)


def openapi_schemas(
    models: tuple[type[BaseModel], ...] = RESPONSE_MODELS, ref_prefix: str = "#/components/schemas/"
) -> dict[str, dict[str, Any]]:
    """JSON Schema (2020-12, as OpenAPI 3.1 uses it) of ``models`` and everything they refer to, keyed by name, with
    references of the form ``{ref_prefix}{name}``."""
    _, top = models_json_schema([(m, "serialization") for m in models], ref_template=ref_prefix + "{model}")
    return top.get("$defs", {})
