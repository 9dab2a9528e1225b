"""Results by content: an upload whose bytes were transcribed recently, by the same model with the same decoding,
finishes at once from the stored result, without a worker.

The key is the SHA-256 of the bytes plus a digest of everything that shapes the transcript: the model, its backend
and decoder settings, the silence trimming, and the request's vocabulary. What is stored is the result without its
per-request parts (``expected``, which the web app computes again for the new request, and the timings); entries live
``RESULT_TTL_S``. ``CACHE=off`` turns it off.
"""

from __future__ import annotations

import hashlib
import json

import redis

from shared import keys
from shared.config import Settings

_PER_REQUEST = ("expected", "timings_ms", "cached", "batch_size")


def content_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _decoding(settings: Settings, vocabulary: list[str]) -> str:
    shaping = [settings.ASR_MODEL, settings.ASR_BACKEND, settings.ASR_BEAM_SIZE, settings.ASR_LEXICON,
               settings.ASR_LEXICON_PENALTY, settings.VAD, settings.VAD_MARGIN_S, sorted(vocabulary)]  # fmt: skip
    return hashlib.sha256(json.dumps(shaping, ensure_ascii=False).encode()).hexdigest()[:16]


class ResultCache:
    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis, self.settings = client, settings
        self.enabled = settings.CACHE == "on"

    def _key(self, digest: str, vocabulary: list[str]) -> str:
        return keys.cached_result(digest, _decoding(self.settings, vocabulary))

    def get(self, digest: str, vocabulary: list[str]) -> dict | None:
        """The stored result for these bytes and this decoding, without its per-request parts; None on a miss."""
        if not self.enabled:
            return None
        raw = self.redis.get(self._key(digest, vocabulary))
        return json.loads(raw) if raw else None

    def put(self, digest: str, vocabulary: list[str], result: dict) -> None:
        if not self.enabled:
            return
        shared = {k: v for k, v in result.items() if k not in _PER_REQUEST}
        self.redis.set(self._key(digest, vocabulary), json.dumps(shared, ensure_ascii=False),
                       ex=self.settings.RESULT_TTL_S)  # fmt: skip
