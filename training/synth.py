"""espeak-ng speech synthesis and augmentation, shared by the dataset builder and the test-fixture script.

Needs the espeak-ng program (Debian: ``apt-get install espeak-ng``); only training and fixture generation do.
``ESPEAK_NG=DIR`` runs the copy that ``training.bundle_espeak`` made in DIR instead (a machine without apt).
"""

from __future__ import annotations

import io
import os
import re
import subprocess

import av
import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16_000


def _espeak(*args: str) -> tuple[list[str], dict[str, str] | None]:
    """The espeak-ng command line (and environment) for ``args``: the system's, or the bundle in $ESPEAK_NG."""
    bundle = os.environ.get("ESPEAK_NG")
    if not bundle:
        return ["espeak-ng", *args], None
    env = dict(os.environ, LD_LIBRARY_PATH=os.path.join(bundle, "lib"))
    return [os.path.join(bundle, "espeak-ng"), f"--path={bundle}", *args], env


def espeak_variants() -> list[str]:
    """Names of espeak-ng's voice variants (``ar+NAME``), sorted."""
    command, env = _espeak("--voices=variant")
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
    return sorted(set(re.findall(r"!v/(\S+)", out)))


def speak(text: str, variant: str | None, speed: int = 175, pitch: int = 50, word_gap: int = 0) -> np.ndarray:
    """Speak ``text`` with espeak-ng's Arabic voice; return 16 kHz mono float32."""
    voice = "ar" if not variant else f"ar+{variant}"
    command, env = _espeak("-v", voice, "-s", str(speed), "-p", str(pitch), "-g", str(word_gap), "--stdout", text)
    wav = subprocess.run(command, capture_output=True, check=True, timeout=30, env=env).stdout
    audio, sr = sf.read(io.BytesIO(wav), dtype="float32")
    return soxr.resample(audio, sr, SAMPLE_RATE).astype(np.float32)


def encode(
    audio: np.ndarray, fmt: str, sample_rate: int = SAMPLE_RATE, channels: int = 1, options: dict | None = None
) -> bytes:
    """Encode mono float32 audio in memory with FFmpeg's libraries.

    ``fmt``: webm (Opus, as browsers record), ogg (Opus), mp3, m4a (AAC), flac, wav.
    ``sample_rate``/``channels`` are the output's (audio is resampled / duplicated to get there); ``options`` are
    the muxer's (e.g. ``{"live": "1"}``: a WebM without a duration, as MediaRecorder writes).
    """
    container, codec, rate = {
        "webm": ("webm", "libopus", 48_000),
        "ogg": ("ogg", "libopus", 48_000),
        "mp3": ("mp3", "libmp3lame", sample_rate),
        "m4a": ("mp4", "aac", sample_rate),
        "flac": ("flac", "flac", sample_rate),
        "wav": ("wav", "pcm_s16le", sample_rate),
    }[fmt]
    if rate != SAMPLE_RATE:
        audio = soxr.resample(audio, SAMPLE_RATE, rate).astype(np.float32)
    samples = np.clip(audio, -1, 1)
    layout = "mono" if channels == 1 else "stereo"
    planar = np.tile(samples[None, :], (channels, 1)).astype(np.float32)
    buf = io.BytesIO()
    with av.open(buf, "w", format=container, options=options or {}) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        frame_size = stream.codec_context.frame_size or 1024
        fmt_name = stream.codec_context.format.name if stream.codec_context.format else "fltp"
        for start in range(0, planar.shape[1], frame_size):
            chunk = planar[:, start : start + frame_size]
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout=layout)
            frame.sample_rate = rate
            frame.pts = start
            for resampled in _to_codec_format(frame, fmt_name, layout, rate):
                for packet in stream.encode(resampled):
                    out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def _to_codec_format(frame: av.AudioFrame, fmt_name: str, layout: str, rate: int) -> list[av.AudioFrame]:
    if fmt_name == "fltp":
        return [frame]
    resampler = av.AudioResampler(format=fmt_name, layout=layout, rate=rate)
    return list(resampler.resample(frame))


def decode_any(data: bytes) -> np.ndarray:
    """Decode bytes to 16 kHz mono float32 with PyAV (for round trips during data generation only)."""
    chunks = []
    with av.open(io.BytesIO(data)) as container:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        for frame in container.decode(audio=0):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)


def augment(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random silence padding, gain, band limiting, noise at several SNRs and codec round trips."""
    pad = lambda: np.zeros(int(rng.uniform(0, 0.35) * SAMPLE_RATE), np.float32)  # noqa: E731
    audio = np.concatenate([pad(), audio, pad()])
    if rng.random() < 0.2:  # telephone-ish band limit
        low = int(rng.choice([8_000, 11_025]))
        audio = soxr.resample(soxr.resample(audio, SAMPLE_RATE, low), low, SAMPLE_RATE)[: len(audio)]
    if rng.random() < 0.7:
        snr_db = rng.choice([30.0, 20.0, 15.0, 10.0, 5.0])
        noise = rng.standard_normal(len(audio)).astype(np.float32)
        if rng.random() < 0.5:  # pink-ish: integrate white noise a little
            noise = np.cumsum(noise) * 0.02
            noise -= np.convolve(noise, np.ones(400) / 400, mode="same")
        signal_power = float(np.mean(audio**2)) + 1e-9
        noise *= np.sqrt(signal_power / (10 ** (snr_db / 10)) / (float(np.mean(noise**2)) + 1e-12))
        audio = audio + noise
    audio = audio * (10 ** (rng.uniform(-20, 4) / 20))
    peak = float(np.max(np.abs(audio))) if len(audio) else 0.0
    if peak > 0.99:
        audio = audio * (0.99 / peak)
    if rng.random() < 0.3:
        audio = decode_any(encode(audio.astype(np.float32), str(rng.choice(["webm", "mp3", "ogg"]))))
    return audio.astype(np.float32)
