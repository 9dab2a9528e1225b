"""The one configuration object. Every setting is an environment variable with a default (see README)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_MODEL_DIR = REPO_ROOT / "worker" / "models" / "arabic-words-small"
BUNDLED_LEXICON = REPO_ROOT / "worker" / "data" / "ar-words.txt.gz"


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


@dataclass(frozen=True)
class Settings:
    # Redis: broker, job records and uploads. Empty = `arabic-words run` starts its own embedded server.
    REDIS_URL: str = field(default_factory=lambda: _env("REDIS_URL", ""))
    # Seconds an upload's bytes stay in Redis waiting for a worker.
    UPLOAD_TTL_S: int = field(default_factory=lambda: int(_env("UPLOAD_TTL_S", "3600")))
    # Seconds a job record (status and result) is kept after it was created.
    RESULT_TTL_S: int = field(default_factory=lambda: int(_env("RESULT_TTL_S", "86400")))
    MAX_UPLOAD_BYTES: int = field(default_factory=lambda: int(_env("MAX_UPLOAD_BYTES", str(10 * 1024 * 1024))))
    MAX_AUDIO_S: float = field(default_factory=lambda: float(_env("MAX_AUDIO_S", "30")))
    # Longest `?wait=` a client may ask for.
    MAX_WAIT_S: float = field(default_factory=lambda: float(_env("MAX_WAIT_S", "30")))
    # Deliveries of one job before it is failed as `worker_crashed` (a poison upload must not loop forever).
    MAX_ATTEMPTS: int = field(default_factory=lambda: int(_env("MAX_ATTEMPTS", "3")))
    # Model: a local directory or a hub id (needs internet), loaded with from_pretrained.
    ASR_MODEL: str = field(default_factory=lambda: _env("ASR_MODEL", str(BUNDLED_MODEL_DIR)))
    # Inference backend: auto | torch-fp32 | torch-int8 | onnx-fp32 | onnx-int8 | torch-fp16 (CUDA). `auto` is
    # torch-fp16 on a GPU; on the CPU it measures once per checkpoint and machine and picks the fastest backend
    # that agrees with fp32 (see worker/backends.py).
    ASR_BACKEND: str = field(default_factory=lambda: _env("ASR_BACKEND", "auto"))
    # ONNX exports and `auto`'s measurements, keyed by a hash of the checkpoint. Empty = ~/.cache/arabic-words.
    ASR_CACHE_DIR: str = field(default_factory=lambda: _env("ASR_CACHE_DIR", ""))
    # Decoding: CTC beam search of this width; 1 = greedy (best path).
    ASR_BEAM_SIZE: int = field(default_factory=lambda: int(_env("ASR_BEAM_SIZE", "12")))
    # Word list the beam search prefers (one word per line, optionally .gz); "none" = no list. Default: the
    # bundled hunspell-ar list (worker/data/ar-words.txt.gz), used with Arabic vocabularies only.
    ASR_LEXICON: str = field(default_factory=lambda: _env("ASR_LEXICON", str(BUNDLED_LEXICON)))
    # Log-probability a word outside the list costs in the beam search (0 = the list changes nothing).
    ASR_LEXICON_PENALTY: float = field(default_factory=lambda: float(_env("ASR_LEXICON_PENALTY", "2.0")))
    # Dynamic batching: >1 runs the worker with a threads pool of this many jobs whose forward passes are
    # grouped into batches of up to this size (meant for GPUs; on a 2-core CPU batching buys little).
    BATCH_MAX_SIZE: int = field(default_factory=lambda: int(_env("BATCH_MAX_SIZE", "1")))
    # How long the first clip of a batch waits for others (milliseconds).
    BATCH_WINDOW_MS: float = field(default_factory=lambda: float(_env("BATCH_WINDOW_MS", "10")))
    # CPU threads per worker process for torch (0 = torch's default).
    TORCH_THREADS: int = field(default_factory=lambda: int(_env("TORCH_THREADS", "0")))
    # Worker processes per worker (Celery prefork pool); each loads its own model.
    WORKER_CONCURRENCY: int = field(default_factory=lambda: int(_env("WORKER_CONCURRENCY", "1")))
    # Seconds the worker parent waits for a child's model load before killing it.
    WORKER_INIT_TIMEOUT_S: float = field(default_factory=lambda: float(_env("WORKER_INIT_TIMEOUT_S", "300")))
    # Seconds after which a job is hard-killed (must stay below the broker's visibility timeout).
    TASK_TIME_LIMIT_S: int = field(default_factory=lambda: int(_env("TASK_TIME_LIMIT_S", "120")))
    QUEUE: str = field(default_factory=lambda: _env("QUEUE", "transcribe"))
    PORT: int = field(default_factory=lambda: int(_env("PORT", "8000")))
    FLOWER_PORT: int = field(default_factory=lambda: int(_env("FLOWER_PORT", "5555")))
    # "user:password" for Flower's basic auth; empty leaves Flower bound to localhost only.
    FLOWER_BASIC_AUTH: str = field(default_factory=lambda: _env("FLOWER_BASIC_AUTH", ""))
    LOG_LEVEL: str = field(default_factory=lambda: _env("LOG_LEVEL", "INFO"))
    # Admission control: uploads get 429 `queue_full` (with Retry-After) once this many jobs wait in the queue...
    MAX_QUEUE_DEPTH: int = field(default_factory=lambda: int(_env("MAX_QUEUE_DEPTH", "5000")))
    # ...or once Redis uses this share of its `maxmemory` (Redis is the broker: overload is refused at the door,
    # never evicted).
    MAX_REDIS_MEMORY_FRACTION: float = field(default_factory=lambda: float(_env("MAX_REDIS_MEMORY_FRACTION", "0.8")))
    # `maxmemory` of the embedded Redis that `arabic-words run` starts (with `noeviction` and an append-only file).
    REDIS_MAXMEMORY: str = field(default_factory=lambda: _env("REDIS_MAXMEMORY", "2gb"))
    # Seconds a worker keeps retrying (with backoff) when Redis is unreachable mid-job before it hands the message
    # back to the broker; the job is never failed or acked away for it.
    REDIS_RETRY_S: float = field(default_factory=lambda: float(_env("REDIS_RETRY_S", "60")))
    # Fault injection for the chaos suite (docs/chaos.md); 0 = off, the default. Each delays one step so that a fault
    # from outside (SIGKILL, a Redis stop) lands at that moment, or makes a forward pass hang:
    # FAULT_SLOW_FORWARD_S sleeps in the forward pass (a soft time limit interrupts it, like slow Python code);
    FAULT_SLOW_FORWARD_S: float = field(default_factory=lambda: float(_env("FAULT_SLOW_FORWARD_S", "0")))
    # FAULT_STUCK_FORWARD_S blocks there with signals masked (nothing but a kill ends it, like stuck native code);
    FAULT_STUCK_FORWARD_S: float = field(default_factory=lambda: float(_env("FAULT_STUCK_FORWARD_S", "0")))
    # FAULT_PAUSE_BEFORE_PUBLISH_S pauses the web app between storing a job and publishing its task.
    FAULT_PAUSE_BEFORE_PUBLISH_S: float = field(
        default_factory=lambda: float(_env("FAULT_PAUSE_BEFORE_PUBLISH_S", "0"))
    )

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        return replace(cls(), **overrides)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def broker_visibility_timeout_s(self) -> int:
        # Redis redelivers an unacked task after this long even if it is still running. A redelivery of a job some
        # live process holds is dropped (JobStore.claim says busy), so this need not wait an hour; it is how long a
        # message delivered to a worker that died before claiming its job waits to be handed out again (a claimed
        # job is taken back by the reaper within seconds).
        return max(300, self.TASK_TIME_LIMIT_S * 2)
