"""Voice activity detection before the model (worker/vad.py, worker/pipeline.py): trimmed recordings keep their
transcripts and their word timings, a recording without speech fails as `silent` without the model running, and
VAD=off gives the model every sample."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from shared.config import ConfigError, Settings
from tests.conftest import DATA, read_transcripts
from worker import pipeline
from worker.audio import SAMPLE_RATE, InvalidAudio, decode
from worker.model import ConfiguredModel, load_configured_model
from worker.pipeline import transcribe_bytes
from worker.vad import MIN_TRIM_S, SpeechDetector, _without_edge_blips

WORDS = ["marhaba", "shukran", "kitab", "madrasa", "sabah_alkhayr"]


@pytest.fixture(scope="module")
def model() -> ConfiguredModel:
    """The bundled model as the worker loads it (VAD on, the default), on torch fp32 (nothing to calibrate)."""
    return load_configured_model(Settings(ASR_BACKEND="torch-fp32", TORCH_THREADS=1), torch.device("cpu"))


@pytest.fixture(scope="module")
def without_vad(model: ConfiguredModel) -> ConfiguredModel:
    return dataclasses.replace(model, vad=None)


@pytest.fixture
def forwarded(monkeypatch) -> list[np.ndarray]:
    """Every clip the pipeline hands to the model's forward pass, in order."""
    clips: list[np.ndarray] = []
    real_forward = pipeline.forward

    def counting_forward(model, audio, **kwargs):
        clips.append(audio)
        return real_forward(model, audio, **kwargs)

    monkeypatch.setattr(pipeline, "forward", counting_forward)
    return clips


def noise(seconds: float, dbfs: float, seed: int) -> np.ndarray:
    """White noise whose RMS is ``dbfs``."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(round(seconds * SAMPLE_RATE)) * 10 ** (dbfs / 20)).astype(np.float32)


def wav(audio: np.ndarray) -> bytes:
    out = io.BytesIO()
    sf.write(out, np.clip(audio, -1, 1), SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return out.getvalue()


def padded(word: str, before_s: float, after_s: float, floor_dbfs: float = -60.0, seed: int = 0) -> np.ndarray:
    """A fixture between ``before_s`` and ``after_s`` of silence, over a noise floor (a recording's room)."""
    audio = decode((DATA / f"{word}.wav").read_bytes(), max_audio_s=30)
    silence = np.zeros(round(before_s * SAMPLE_RATE), np.float32), np.zeros(round(after_s * SAMPLE_RATE), np.float32)
    out = np.concatenate([silence[0], audio, silence[1]])
    return out + noise(len(out) / SAMPLE_RATE, floor_dbfs, seed)


# ------------------------------------------------------------------------------------------- with the model


@pytest.mark.parametrize("name", sorted(read_transcripts()))
def test_fixtures_transcribe_the_same_with_vad_on_and_off(model, without_vad, name):
    """Every committed recording (each word in every container): the same text, confidence and word timings.
    They are tight (0.2-0.5 s around the word): little or nothing to trim, and nothing may change."""
    data = (DATA / name).read_bytes()
    on = transcribe_bytes(model, data, max_audio_s=30)
    off = transcribe_bytes(without_vad, data, max_audio_s=30)
    assert on.text == off.text == read_transcripts()[name]
    assert on.words == off.words
    assert on.duration_s == off.duration_s
    assert "vad" in on.timings_ms and "vad" not in off.timings_ms


@pytest.mark.parametrize("word", WORDS)
def test_noisy_fixtures_transcribe_the_same_with_vad_on_and_off(model, without_vad, word):
    """The fixtures under noise (no padding): white at 20 dB below the word's loudest frame."""
    audio = decode((DATA / f"{word}.wav").read_bytes(), max_audio_s=30)
    frames = audio[: len(audio) // 480 * 480].reshape(-1, 480)
    loudest_dbfs = 10 * np.log10(float(np.max(np.mean(frames**2, axis=1))))
    data = wav(audio + noise(len(audio) / SAMPLE_RATE, loudest_dbfs - 20, seed=len(word)))
    on = transcribe_bytes(model, data, max_audio_s=30)
    off = transcribe_bytes(without_vad, data, max_audio_s=30)
    assert (on.text, on.words) == (off.text, off.words)


@pytest.mark.parametrize("word", WORDS)
def test_padded_recordings_are_trimmed_and_keep_the_words_and_their_timings(model, without_vad, forwarded, word):
    """A word with 0.5-1.5 s of room noise either side (-60 dBFS), as learners record: the model runs on the speech
    and its margin only, and gives the fixture's own transcript, with each word where it is in the recording (the
    fixture's timing moved by the padding; the model's frames are 20 ms) and the recording's duration."""
    rng = np.random.default_rng(len(word))
    before, after = (float(x) for x in rng.uniform(0.5, 1.5, size=2))
    audio = padded(word, before, after, seed=len(word))
    result = transcribe_bytes(model, wav(audio), max_audio_s=30)
    alone = transcribe_bytes(without_vad, (DATA / f"{word}.wav").read_bytes(), max_audio_s=30)
    assert result.text == alone.text == read_transcripts()[f"{word}.wav"]
    assert len(forwarded[0]) < len(audio) - before * SAMPLE_RATE  # at least the leading padding went
    assert result.duration_s == round(len(audio) / SAMPLE_RATE, 3)
    for word_on, word_alone in zip(result.words, alone.words, strict=True):
        assert word_on.start == pytest.approx(word_alone.start + before, abs=0.041)
        assert word_on.end == pytest.approx(word_alone.end + before, abs=0.041)


def test_timings_say_what_the_vad_cost(model):
    result = transcribe_bytes(model, wav(padded("kitab", 1.5, 1.5)), max_audio_s=30)
    assert list(result.timings_ms) == ["decode", "vad", "inference"]
    assert 0 < result.timings_ms["vad"] < result.timings_ms["inference"]


@pytest.mark.parametrize(
    "audio",
    [noise(3.0, -70, seed=1), noise(3.0, -50, seed=2), noise(3.0, -20, seed=3), noise(0.6, -40, seed=4)],
    ids=["white-70dBFS", "white-50dBFS", "white-20dBFS", "short-white-40dBFS"],
)
def test_noise_without_speech_fails_as_silent_without_running_the_model(model, forwarded, audio):
    with pytest.raises(InvalidAudio) as caught:
        transcribe_bytes(model, wav(audio), max_audio_s=30)
    assert caught.value.reason == "silent"
    assert forwarded == []


def test_vad_off_gives_the_model_every_sample(without_vad, forwarded):
    data = wav(padded("marhaba", 1.2, 1.4))
    result = transcribe_bytes(without_vad, data, max_audio_s=30)
    assert np.array_equal(forwarded[0], decode(data, max_audio_s=30))
    assert "vad" not in result.timings_ms


def test_vad_setting_builds_the_detector(tiny_wav2vec2: Path):
    base = {"ASR_MODEL": str(tiny_wav2vec2), "ASR_BACKEND": "torch-fp32", "ASR_LEXICON": "none"}
    on = load_configured_model(Settings(**base, VAD_MARGIN_S=0.4), torch.device("cpu"))
    off = load_configured_model(Settings(**base, VAD="off"), torch.device("cpu"))
    assert on.vad == SpeechDetector(margin_s=0.4)
    assert off.vad is None
    assert Settings().VAD == "on"


@pytest.mark.parametrize("values", [{"VAD": "maybe"}, {"VAD_MARGIN_S": -0.1}, {"VAD_MARGIN_S": "wide"}])
def test_bad_vad_settings_are_refused_in_one_line(values):
    with pytest.raises(ConfigError) as caught:
        Settings(**values)
    assert next(iter(values)) in str(caught.value)
    assert "\n" not in str(caught.value)


# ------------------------------------------------------------------------------------------- the detector alone


@pytest.mark.parametrize("gain_db", [0, -20, -40, -55])
def test_quiet_speech_is_found_whatever_its_level(gain_db):
    """The detector sees every clip at one level (its 95th-percentile frame at -30 dBFS): a word recorded 55 dB
    too quietly is still found and kept whole (the model normalizes its input too). Without that, WebRTC's
    detector, which judges by energy too, found no speech in this word 55 dB down."""
    audio = padded("shukran", 1.0, 1.0, floor_dbfs=-90) * np.float32(10 ** (gain_db / 20))
    word = decode((DATA / "shukran.wav").read_bytes(), max_audio_s=30)
    loud = np.flatnonzero(np.abs(word) > 0.01 * np.abs(word).max())
    first, last = SAMPLE_RATE + loud[0], SAMPLE_RATE + loud[-1]
    start, end = SpeechDetector().speech_span(audio)
    assert start <= first - 0.2 * SAMPLE_RATE and end >= last + 0.2 * SAMPLE_RATE
    assert start > 0 and end < len(audio)


@pytest.mark.parametrize("seed", [9, 11])
def test_a_faint_sound_above_the_background_is_never_silence(seed):
    """A quarter second of hiss 6 dB over a steady background: no speech to WebRTC's detector on these two noises
    (it models voiced speech, and called some whispered held-out words silence), so the energy over the background
    keeps it."""
    audio = noise(3.0, -60, seed=seed)
    audio[20_000:24_000] += noise(0.25, -54, seed=seed + 1)
    assert SpeechDetector(above_floor_db=None).speech_span(audio) is None
    start, end = SpeechDetector().speech_span(audio)
    assert start <= 20_000 - 0.2 * SAMPLE_RATE and end >= 24_000 + 0.2 * SAMPLE_RATE


def test_a_tight_clip_is_left_whole():
    """Ends with less than MIN_TRIM_S to cut past the margin are kept: the saving would be small and transcripts
    move with small changes at the ends."""
    word = decode((DATA / "kitab.wav").read_bytes(), max_audio_s=30)
    assert SpeechDetector().speech_span(word) == (0, len(word))
    assert MIN_TRIM_S > 0


def test_a_clip_shorter_than_a_frame_is_kept_whole():
    assert SpeechDetector().speech_span(noise(0.02, -30, seed=6)) == (0, 320)


def test_nothing_carries_over_from_one_clip_to_the_next():
    """A detector per call: the same clip gets the same answer whatever came before (and threads may share one)."""
    detector = SpeechDetector()
    speech = padded("madrasa", 1.0, 0.8)
    first = detector.speech_span(speech)
    detector.speech_span(noise(3.0, -20, seed=7))
    detector.speech_span(padded("kitab", 0.5, 0.5, floor_dbfs=-30))
    assert detector.speech_span(speech) == first


@pytest.mark.parametrize(
    ("frames", "kept"),
    [
        ("111....11111...1", ".......11111...."),  # the detector's first frames and a codec's last one
        ("1111....111", "1111......."),  # a run longer than EDGE_BLIP_FRAMES is speech
        ("..111..", "..111.."),
        ("1.1", "1.1"),  # nothing else: when in doubt, speech
        ("11", "11"),
    ],
)
def test_short_runs_at_the_edges_are_dropped_only_beside_other_speech(frames, kept):
    speech = np.array([c == "1" for c in frames])
    assert "".join("1" if x else "." for x in _without_edge_blips(speech)) == kept
