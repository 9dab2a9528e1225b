"""bytes -> TranscriptionResult, with no I/O: what the Celery task and `arabic-words transcribe` both run."""

from __future__ import annotations

import time

from shared.schema import TranscriptionResult
from shared.text import compare_expected
from worker.asr import LoadedModel, transcribe_audio
from worker.audio import SAMPLE_RATE, decode


def transcribe_bytes(
    model: LoadedModel, data: bytes, *, max_audio_s: float, expected: str | None = None
) -> TranscriptionResult:
    """Decode and transcribe one upload. Raises ``worker.audio.InvalidAudio`` for bad input.

    ``timings_ms`` holds decode, inference and their total; the caller adds queue time and the end-to-end total.
    """
    t0 = time.perf_counter()
    audio = decode(data, max_audio_s=max_audio_s)
    t1 = time.perf_counter()
    transcript = transcribe_audio(model, audio)
    t2 = time.perf_counter()
    return TranscriptionResult(
        text=transcript.text,
        confidence=transcript.confidence,
        words=transcript.words,
        duration_s=round(len(audio) / SAMPLE_RATE, 3),
        model=model.name,
        timings_ms={"decode": round((t1 - t0) * 1000, 2), "inference": round((t2 - t1) * 1000, 2)},
        expected=compare_expected(expected, transcript.text).to_dict() if expected else None,
    )
