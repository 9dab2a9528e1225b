"""Uploads that declare a huge decoded size (sample rate x channels x seconds) in a few kilobytes: each is refused, or
decoded, while the decoding process grows by at most 64 MB, measured in a fresh interpreter. Before decoding went
frame by frame, a 98 KB FLAC-in-Matroska at 384 kHz x 8 channels x 30 s grew it by ~1 GB."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from tests.conftest import DATA
from worker.audio import SAMPLE_RATE, InvalidAudio, decode

ROOT = Path(__file__).resolve().parent.parent
MAX_GROWTH_MB = 64
_LAYOUTS = {1: "mono", 2: "stereo", 8: "7.1", 9: "9 channels"}
_FRAME = 4608  # samples a FLAC frame; the same at every rate, so a stream can switch rates mid-way


def _s16_frames(rate: int, channels: int, seconds: float, tone_s: float):
    """Interleaved s16 frames: a 440 Hz tone for ``tone_s`` (not silent, so decodable), then digital silence,
    which FLAC stores in a few bytes a frame whatever the rate and channels."""
    total = int(round(seconds * rate))
    for pos in range(0, total, _FRAME):
        n = min(_FRAME, total - pos)
        if pos < tone_s * rate:
            t = np.arange(pos, pos + n) / rate
            mono = (np.sin(2 * np.pi * 440 * t) * 3000 * (t < tone_s)).astype(np.int16)
        else:
            mono = np.zeros(n, np.int16)
        frame = av.AudioFrame.from_ndarray(np.repeat(mono, channels)[None], format="s16", layout=_LAYOUTS[channels])
        frame.sample_rate, frame.pts = rate, pos
        yield frame


def encoded(rate: int, channels: int, seconds: float, container: str = "matroska", codec: str = "flac",
            tone_s: float = 0.05) -> bytes:  # fmt: skip
    """``seconds`` of audio at any rate FFmpeg's encoder takes (FLAC: up to 655350 Hz), in ``container``."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout=_LAYOUTS[channels])
        for frame in _s16_frames(rate, channels, seconds, tone_s):
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def without_length(flac: bytes) -> bytes:
    """A FLAC file whose STREAMINFO gives no total sample count, as a streaming encoder writes it."""
    assert flac[:4] == b"fLaC"
    data = bytearray(flac)
    field = int.from_bytes(data[21:26], "big") & ~(2**36 - 1)  # the last 36 bits: total samples
    data[21:26] = field.to_bytes(5, "big")
    return bytes(data)


def _flac_packets(rate: int, channels: int, seconds: float, tone_s: float) -> list[av.Packet]:
    encoder = av.CodecContext.create("flac", "w")
    encoder.sample_rate, encoder.layout, encoder.format = rate, _LAYOUTS[channels], "s16"
    encoder.options = {"frame_size": str(_FRAME)}
    encoder.open()
    packets = [p for frame in _s16_frames(rate, channels, seconds, tone_s) for p in encoder.encode(frame)]
    return packets + list(encoder.encode(None))


def switching_rate(parts: list[tuple[int, float]], channels: int = 1) -> bytes:
    """FLAC in Matroska whose header (and first frames) say ``parts[0]``'s rate, and whose later frames switch to
    the next parts' rates (each FLAC frame header carries its own): FFmpeg's decoder passes each on."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as out:
        stream = out.add_stream("flac", rate=parts[0][0], layout=_LAYOUTS[channels])
        stream.codec_context.options = {"frame_size": str(_FRAME)}  # its STREAMINFO's block size
        start_s = 0.0
        for rate, seconds in parts:
            for packet in _flac_packets(rate, channels, seconds, tone_s=0.5):
                if not packet.size:
                    continue  # the encoder's last word: a new STREAMINFO, which would say the last rate
                copy = av.Packet(bytes(packet))  # without side data
                copy.stream, copy.time_base = stream, Fraction(1, 1000)
                copy.pts = copy.dts = round(start_s * 1000)
                copy.duration = round((packet.duration or _FRAME) / rate * 1000)
                start_s += (packet.duration or _FRAME) / rate
                out.mux(copy)
    return buf.getvalue()


def nine_channel_wav(seconds: float = 1.0, rate: int = 48_000) -> bytes:
    samples = np.zeros((int(seconds * rate), 9), np.float32)
    samples[: rate // 10] = 0.1 * np.sin(np.arange(rate // 10) / 5)[:, None]
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


# name -> (build the upload, the reason decode() refuses it with, or None: it decodes)
HOSTILE = {
    "384k_8ch_30s_flac_in_matroska": (lambda: encoded(384_000, 8, 30), "sample_rate_too_high"),
    "384k_8ch_30s_flac": (lambda: encoded(384_000, 8, 30, container="flac"), "sample_rate_too_high"),
    "48k_header_then_384k_8ch_29s_frames": (
        lambda: switching_rate([(48_000, 1), (384_000, 29)], channels=8),
        "sample_rate_too_high",
    ),
    "9ch_wav": (nine_channel_wav, "too_many_channels"),
    "9ch_pcm_in_matroska": (lambda: encoded(16_000, 9, 1, codec="pcm_s16le"), "too_many_channels"),
    "192k_8ch_29.9s_flac_in_matroska": (lambda: encoded(192_000, 8, 29.9), None),
    "192k_8ch_29.9s_flac": (lambda: encoded(192_000, 8, 29.9, container="flac"), None),
    "192k_8ch_31s_flac_in_matroska": (lambda: encoded(192_000, 8, 31), "audio_too_long"),
    "192k_8ch_31s_flac_without_length": (
        lambda: without_length(encoded(192_000, 8, 31, container="flac")),
        "audio_too_long",
    ),
}

# A fresh interpreter: imports, then decodes of ordinary fixtures (codecs, soxr, allocator pools warmed), then the
# peak RSS before and after decoding the upload: its growth is the decode's peak over everything before it. The peak
# is VmHWM, this address space's own high-water mark; ru_maxrss would not do: Linux carries the parent's peak over
# into it at exec, so under a big pytest process it would already be higher than any decode here and never grow.
_CHILD = r"""
import json, sys
from pathlib import Path
from worker.audio import InvalidAudio, decode

def peak_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024

for name in ("kitab.flac", "kitab.webm", "kitab.mp3", "kitab.wav"):
    decode((Path(sys.argv[2]) / name).read_bytes(), max_audio_s=30)
data = Path(sys.argv[1]).read_bytes()
before = peak_mb()
try:
    result = {"samples": len(decode(data, max_audio_s=30))}
except InvalidAudio as exc:
    result = {"reason": exc.reason}
result["growth_mb"] = peak_mb() - before
print(json.dumps(result))
"""


def decode_in_fresh_process(data: bytes, tmp_path: Path) -> dict:
    path = tmp_path / "upload.bin"
    path.write_bytes(data)
    done = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(DATA)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc/self/status")
@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_sizes_are_decoded_or_refused_in_bounded_memory(name, tmp_path):
    build, reason = HOSTILE[name]
    data = build()
    assert len(data) < 10 * 2**20  # within MAX_UPLOAD_BYTES' default: it reaches a worker
    result = decode_in_fresh_process(data, tmp_path)
    assert result["growth_mb"] <= MAX_GROWTH_MB, result
    if reason is None:
        assert abs(result.get("samples", 0) - 29.9 * SAMPLE_RATE) <= 0.01 * SAMPLE_RATE, result
    else:
        assert result.get("reason") == reason, result


def _refused(data: bytes) -> InvalidAudio:
    with pytest.raises(InvalidAudio) as info:
        decode(data, max_audio_s=30)
    return info.value


@pytest.mark.parametrize("container", ["matroska", "flac"])
def test_sample_rate_over_192k_is_refused_from_the_header(container):
    refused = _refused(encoded(192_001, 1, 0.2, container=container))
    assert refused.reason == "sample_rate_too_high" and "192001 Hz" in refused.message
    audio = decode(encoded(192_000, 8, 0.2, container=container), max_audio_s=30)
    assert len(audio) == pytest.approx(0.2 * SAMPLE_RATE, abs=2)


def test_sample_rate_over_192k_is_refused_on_the_frame_that_has_it():
    """The header (and the first frames, which FFmpeg reads while opening) say 48 kHz; a later frame says more."""
    data = switching_rate([(48_000, 1), (384_000, 1)])
    with av.open(io.BytesIO(data), format="matroska") as container:
        assert container.streams.audio[0].codec_context.sample_rate == 48_000
    assert _refused(data).reason == "sample_rate_too_high"


@pytest.mark.parametrize("data", [nine_channel_wav(0.2), encoded(16_000, 9, 0.2, codec="pcm_s16le")],
                         ids=["wav", "pcm_in_matroska"])  # fmt: skip
def test_more_than_8_channels_is_refused(data):
    refused = _refused(data)
    assert refused.reason == "too_many_channels" and "9 channels" in refused.message
