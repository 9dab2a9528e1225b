"""The one configuration object: every setting is an environment variable with a default, documented where it is
defined (and in the README's table). Each entry point builds one ``Settings`` (``arabic-words ...``, the web app
factory) and passes it down; nothing else reads the environment. A bad value is refused at startup with one line
naming the variable (``ConfigError``), not when some code path first uses it."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Data that ships inside the package (a wheel has it too): the bundled model and the Arabic word list.
_WORKER_PACKAGE = Path(__file__).resolve().parent.parent / "worker"
BUNDLED_MODEL_DIR = _WORKER_PACKAGE / "models" / "arabic-words-small"
BUNDLED_LEXICON = _WORKER_PACKAGE / "data" / "ar-words.txt.gz"

# worker.backends.Backend's values (a test keeps the two equal; the web app must not import torch to validate)
AsrBackend = Literal["auto", "torch-fp32", "torch-int8", "onnx-fp32", "onnx-int8", "torch-fp16"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class ConfigError(ValueError):
    """A setting has a value the service cannot run with; the message is one line naming each bad variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=True, frozen=True, extra="forbid")

    # ------------------------------------------------------------------------------------------- Redis and jobs
    # Redis: broker, job records and uploads. Empty = `arabic-words run` starts its own embedded server. One Redis:
    # redis://[[user]:password@]host[:port][/db] (rediss:// for TLS, unix:// for a socket). Past one Redis, the master
    # of a Redis Sentinel group, followed through a failover by the job store and Celery's broker alike:
    # sentinel://[[user]:password@]host:26379;sentinel://host2:26379;...[/db]?master_name=NAME (the password is the
    # master's; `&sentinel_password=...` if the sentinels have one of their own). See shared/redis_client.py.
    REDIS_URL: str = ""
    # Port of that embedded server; 0 = any free port.
    REDIS_PORT: int = Field(0, ge=0, le=65535)
    # `maxmemory` of the embedded Redis (with `noeviction` and an append-only file), e.g. 2gb, 512mb.
    REDIS_MAXMEMORY: str = Field("2gb", pattern=r"^(?i:\d+(b|k|kb|m|mb|g|gb)?)$")
    # Where `arabic-words run` keeps its runtime data (the embedded Redis's append-only file). Empty =
    # $XDG_STATE_HOME/arabic-words, else ~/.local/state/arabic-words: never the source tree or site-packages.
    STATE_DIR: str = ""
    # Seconds an upload's bytes stay in Redis waiting for a worker.
    UPLOAD_TTL_S: int = Field(3600, ge=1)
    # Seconds a job record (status and result) is kept after it was created.
    RESULT_TTL_S: int = Field(86400, ge=1)
    MAX_UPLOAD_BYTES: int = Field(10 * 1024 * 1024, ge=1)
    MAX_AUDIO_S: float = Field(30.0, gt=0)
    # Longest `?wait=` a client may ask for.
    MAX_WAIT_S: float = Field(30.0, ge=0)
    # Deliveries of one job before it is failed as `worker_crashed` (a poison upload must not loop forever).
    MAX_ATTEMPTS: int = Field(3, ge=1)
    # Admission control: uploads get 429 `queue_full` (with Retry-After) once this many jobs wait in the queue...
    MAX_QUEUE_DEPTH: int = Field(5000, ge=1)
    # ...or once Redis uses this share of its `maxmemory` (Redis is the broker: overload is refused at the door,
    # never evicted).
    MAX_REDIS_MEMORY_FRACTION: float = Field(0.8, gt=0, le=1)
    # Seconds a worker keeps retrying (with backoff) when Redis is unreachable mid-job before it hands the message
    # back to the broker; the job is never failed or acked away for it.
    REDIS_RETRY_S: float = Field(60.0, ge=0)
    # Replicas that must hold an accepted job (its record, upload and task message) before the web answers 202, and a
    # final state before the worker acks its message (Redis `WAIT`): replication is asynchronous, so without it a
    # failover can lose what the dead master had not sent yet (docs/chaos.md). -1 = 1 with a sentinel:// REDIS_URL,
    # else 0 (no WAIT: with no replica it would wait its whole timeout). A timeout is logged, not refused: the write
    # is on the master already.
    REDIS_REPLICA_ACKS: int = Field(-1, ge=-1)
    # How long one `WAIT` may hold a request or a worker (ms).
    REDIS_REPLICA_ACK_TIMEOUT_MS: int = Field(1000, ge=1)
    # The Celery queues: interactive jobs (a learner waiting) go to QUEUE, `priority=batch` jobs (backfills) to
    # BATCH_QUEUE (empty = QUEUE + "-batch"); every worker takes both and always the interactive queue first.
    QUEUE: str = Field("transcribe", pattern=r"^[A-Za-z0-9_.:-]+$")
    BATCH_QUEUE: str = Field("", pattern=r"^$|^[A-Za-z0-9_.:-]+$")
    # Results by content (shared/cache.py): an upload whose bytes were transcribed within RESULT_TTL_S, with the same
    # model, decoding and vocabulary, finishes at once from that result. `off` transcribes every upload.
    CACHE: Literal["on", "off"] = "on"

    # ------------------------------------------------------------------------------------------------- model
    # A CTC checkpoint loaded with from_pretrained: a local directory or a hub id (needs internet).
    ASR_MODEL: str = Field(str(BUNDLED_MODEL_DIR), min_length=1)
    # Inference backend. `auto` is torch-fp16 on a GPU; on the CPU it measures once per checkpoint and machine and
    # picks the fastest backend that agrees with fp32 (see worker/backends.py).
    ASR_BACKEND: AsrBackend = "auto"
    # ONNX exports and `auto`'s measurements, keyed by a hash of the checkpoint. Empty = ~/.cache/arabic-words.
    ASR_CACHE_DIR: str = ""
    # Decoding: CTC beam search of this width; 1 = greedy (best path).
    ASR_BEAM_SIZE: int = Field(12, ge=1)
    # Word list the beam search prefers (one word per line, optionally .gz); "none" = no list. Default: the
    # bundled hunspell-ar list, used with Arabic vocabularies only.
    ASR_LEXICON: str = str(BUNDLED_LEXICON)
    # Log-probability a word outside the list costs in the beam search (0 = the list changes nothing).
    ASR_LEXICON_PENALTY: float = Field(2.0, ge=0)
    # Voice activity detection before the model (worker/vad.py, WebRTC's detector): `on` runs the model only on the
    # stretch from the first to the last speech in a recording, plus VAD_MARGIN_S either side (word timings stay the
    # whole recording's), and fails a recording without speech as `silent` without running the model. `off` gives
    # the model every sample.
    VAD: Literal["on", "off"] = "on"
    # Seconds kept before the first and after the last frame the detector calls speech (soft word edges it may miss).
    VAD_MARGIN_S: float = Field(0.25, ge=0, le=5)

    # ------------------------------------------------------------------------------------------------ worker
    # Dynamic batching: >1 runs the worker with a threads pool of this many jobs whose forward passes are grouped
    # into batches of up to this size (meant for GPUs; on a 2-core CPU batching buys little).
    BATCH_MAX_SIZE: int = Field(1, ge=1)
    # How long the first clip of a batch waits for others (milliseconds).
    BATCH_WINDOW_MS: float = Field(10.0, ge=0)
    # CPU threads per worker process for torch and ONNX Runtime (0 = torch's default, every core, for one process;
    # with several worker processes, the CPUs shared among them: arabic_words.processes.worker_settings).
    TORCH_THREADS: int = Field(0, ge=0)
    # Worker processes per worker (Celery prefork pool); each loads its own model. 0 = one per CPU the worker may
    # run on, at most 4 (arabic_words.processes.worker_settings): on 2 cores, 2 processes x 1 thread sustained >= 70
    # clips/s of the bundled model (2.2 s WebM, p99 <= 1 s) where 1 process x 2 threads sustained 40, one job at a
    # time (`python -m bench.saturation`, docs/scaling.md); past 4, each further model copy costs memory (the
    # bundled model ~0.5 GB RSS, a wav2vec2-large ~1.8 GB) for a share of the same cores. 1 keeps memory to one model.
    WORKER_CONCURRENCY: int = Field(0, ge=0)
    # Seconds the worker parent waits for a child's model load before killing it.
    WORKER_INIT_TIMEOUT_S: float = Field(300.0, gt=0)
    # Seconds after which a job is hard-killed; its soft limit, which fails it as `timeout`, is 5 s earlier.
    TASK_TIME_LIMIT_S: int = Field(120, ge=2)

    # ------------------------------------------------------------------------------------------- web, Flower
    # Address the web server (`arabic-words web`) binds: loopback by default; 0.0.0.0 in a container.
    HOST: str = Field("127.0.0.1", min_length=1)
    PORT: int = Field(8000, ge=1, le=65535)
    # gunicorn processes (gevent: each holds up to 1000 connections, long-polls included).
    WEB_PROCESSES: int = Field(2, ge=1)
    FLOWER_PORT: int = Field(5555, ge=1, le=65535)
    # "user:password" for Flower's basic auth; empty leaves Flower bound to localhost only.
    FLOWER_BASIC_AUTH: str = Field("", pattern=r"^$|^[^:]+:.+$")
    # Path of a file holding that "user:password" instead (e.g. a Docker secret), read when Flower starts; set one of
    # the two, not both. Either way Flower is given it by environment, never on its command line.
    FLOWER_BASIC_AUTH_FILE: str = ""
    LOG_LEVEL: LogLevel = "INFO"

    # ------------------------------------------------------------------------------------------------ metrics
    # Prometheus (shared/metrics.py). The web server always answers GET /metrics, unauthenticated like /healthz: keep
    # it off the public internet (block /metrics at the proxy). A worker serves its own metrics (its pool children's
    # included) from its parent process on HOST:METRICS_PORT/metrics; 0 = no endpoint.
    METRICS_PORT: int = Field(0, ge=0, le=65535)
    # Where the processes of one web server or worker keep the files their metrics are summed from (prometheus_client's
    # multiprocess mode): <dir>/web/<pid> and <dir>/worker/<pid>, emptied when that server starts and removed by a later
    # start once its process is gone. A local directory (not one shared between machines). Empty = STATE_DIR/metrics.
    METRICS_DIR: str = ""

    # ----------------------------------------------------------------------------------- access and limits
    # API keys (`arabic-words keys create`, sent as `Authorization: Bearer <key>`): `required`, `off`, or `auto`:
    # required whenever HOST is not a loopback address (a container, a server), off on 127.0.0.1 (`make run`).
    AUTH_MODE: Literal["auto", "required", "off"] = "auto"
    # Limits of a key created without its own, and of each client address when auth is off (the local machine,
    # a loopback address, is not limited then). 0 = no limit. Requests per minute (a token bucket)...
    RATE_LIMIT_PER_MIN: int = Field(120, ge=0)
    # ...jobs not yet final at once...
    MAX_INFLIGHT: int = Field(20, ge=0)
    # ...and seconds of transcribed audio per UTC day.
    AUDIO_S_PER_DAY: float = Field(3600.0, ge=0)
    # Origins allowed to call the API from a browser (CORS), comma-separated, e.g. "https://app.example.org";
    # empty = none (the page this server serves needs none).
    CORS_ORIGINS: str = ""

    # ------------------------------------------------------------------------------------------ fault injection
    # For the chaos suite (docs/chaos.md); 0 = off, the default. Each delays one step so that a fault from outside
    # (SIGKILL, a Redis stop) lands at that moment, or makes a forward pass hang:
    # FAULT_SLOW_FORWARD_S sleeps in the forward pass (a soft time limit interrupts it, like slow Python code);
    FAULT_SLOW_FORWARD_S: float = Field(0.0, ge=0)
    # FAULT_STUCK_FORWARD_S blocks there with signals masked (nothing but a kill ends it, like stuck native code);
    FAULT_STUCK_FORWARD_S: float = Field(0.0, ge=0)
    # FAULT_PAUSE_BEFORE_PUBLISH_S pauses the web app between storing a job and publishing its task.
    FAULT_PAUSE_BEFORE_PUBLISH_S: float = Field(0.0, ge=0)

    def __init__(self, **values: object) -> None:
        """Read the environment; ``values`` override it (tests, the CLI's ``--model``)."""
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(_one_line(exc)) from None

    @model_validator(mode="after")
    def _lanes_differ(self) -> Settings:
        if self.BATCH_QUEUE == self.QUEUE:
            raise ValueError("BATCH_QUEUE must differ from QUEUE (the batch lane must not delay learners)")
        return self

    @property
    def batch_queue(self) -> str:
        return self.BATCH_QUEUE or f"{self.QUEUE}-batch"

    @property
    def queues(self) -> tuple[str, str]:
        """Every lane, the one a worker takes first first."""
        return self.QUEUE, self.batch_queue

    @field_validator("REDIS_URL")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        from shared.redis_client import check_url  # imports redis-py only; the message names no password

        check_url(value)
        return value

    @field_validator("LOG_LEVEL", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    def replace(self, **changes: object) -> Settings:
        """A copy with ``changes``, validated like the original."""
        return type(self)(**{**self.model_dump(), **changes})

    def as_env(self) -> dict[str, str]:
        """Every setting as the environment variable that gives it (for the processes ``arabic-words run`` and the
        tests start)."""
        return {name: str(value) for name, value in self.model_dump().items()}

    @property
    def replica_acks(self) -> int:
        if self.REDIS_REPLICA_ACKS >= 0:
            return self.REDIS_REPLICA_ACKS
        return 1 if self.REDIS_URL.startswith("sentinel://") else 0

    @property
    def auth_required(self) -> bool:
        if self.AUTH_MODE != "auto":
            return self.AUTH_MODE == "required"
        return not _is_loopback(self.HOST)

    @property
    def cors_origins(self) -> list[str]:
        return [origin.strip().rstrip("/") for origin in self.CORS_ORIGINS.split(",") if origin.strip()]

    @property
    def state_dir(self) -> Path:
        if self.STATE_DIR:
            return Path(self.STATE_DIR)
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(base) / "arabic-words"

    @property
    def broker_visibility_timeout_s(self) -> int:
        # Redis redelivers an unacked task after this long even if it is still running. A redelivery of a job some
        # live process holds is dropped (JobStore.claim says busy), so this need not wait an hour; it is how long a
        # message delivered to a worker that died before claiming its job waits to be handed out again (a claimed
        # job is taken back by the reaper within seconds).
        return max(300, self.TASK_TIME_LIMIT_S * 2)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# never echoed in an error message (logs are read by more people than the secrets are meant for)
_SECRETS = {"FLOWER_BASIC_AUTH", "REDIS_URL"}


def _one_line(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        name = ".".join(str(part) for part in error["loc"])
        if not name:  # a rule across settings: its message names them (the input is all of them, secrets too)
            problems.append(error["msg"].removeprefix("Value error, "))
            continue
        value = "<hidden>" if name in _SECRETS else repr(error.get("input"))
        problems.append(f"{name}={value}: {error['msg']}")
    return "invalid configuration: " + "; ".join(problems)
