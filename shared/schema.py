"""Job states, error codes and the result schema returned by the API and the CLI."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field


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


@dataclass(frozen=True)
class JobError:
    code: str
    message: str

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message}


@dataclass(frozen=True)
class WordTiming:
    word: str
    start: float  # seconds from the start of the audio
    end: float
    confidence: float


@dataclass
class TranscriptionResult:
    text: str
    confidence: float
    words: list[WordTiming]
    duration_s: float
    model: str
    timings_ms: dict[str, float] = field(default_factory=dict)  # queue, decode, batch_wait, inference, total
    backend: str = ""  # the inference backend that ran it (worker.backends.Backend)
    batch_size: int = 1  # clips in the forward pass this one shared (dynamic batching)
    expected: dict | None = None  # {"text", "normalized_match", "similarity"} when the client sent `expected`

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.expected is None:
            del out["expected"]
        return out
