"""worker.audio.decode: every format, every bad-input code, hostile files, and fuzzing."""

from __future__ import annotations

import io
import os
import signal
import struct
import sys
import time
from fractions import Fraction
from types import SimpleNamespace

import av
import numpy as np
import pytest
import soundfile as sf
import soxr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.audio_format import sniff_container
from tests.conftest import DATA, read_transcripts
from worker.audio import SAMPLE_RATE, InvalidAudio, decode

CLIPS = sorted(read_transcripts())
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
MAX_AUDIO_S = 30.0


def reference_decode(data: bytes) -> np.ndarray:
    """FFmpeg's own resampler, through a different path than decode() (swresample, not soxr)."""
    out = []
    with av.open(io.BytesIO(data)) as container:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        for frame in container.decode(audio=0):
            out += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
        out += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(out)


def best_correlation(a: np.ndarray, b: np.ndarray, max_shift: int = 64) -> float:
    """Correlation allowing a small shift (resamplers and codec priming differ by a few samples)."""
    best = -1.0
    for shift in range(-max_shift, max_shift + 1, 2):
        x, y = (a[shift:], b) if shift >= 0 else (a, b[-shift:])
        n = min(len(x), len(y))
        best = max(best, float(np.corrcoef(x[:n], y[:n])[0, 1]))
    return best


@pytest.mark.parametrize("name", CLIPS)
def test_every_format_decodes_like_the_reference(name):
    data = (DATA / name).read_bytes()
    audio = decode(data, max_audio_s=MAX_AUDIO_S)
    ref = reference_decode(data)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - len(ref)) <= SAMPLE_RATE * 0.03  # same length within codec priming (<= 30 ms)
    assert best_correlation(audio, ref) >= 0.99
    assert np.abs(audio).max() <= 1.0 + 1e-6


@pytest.mark.parametrize(
    ("head", "container"),
    [
        (b"RIFF\0\0\0\0WAVEfmt ", "wav"),
        (b"fLaC\0\0\0\x22", "flac"),
        (b"OggS\0\x02", "ogg"),
        (b"\x1a\x45\xdf\xa3\x9f", "webm"),
        (b"\0\0\0\x20ftypM4A ", "mp4"),
        (b"ID3\x04\0", "mp3"),
        (b"\xff\xfb\x90\x64", "mp3"),
        (b"\xff\xf1\x50\x80", "aac"),
        (b"#EXTM3U\n", None),
        (b"ffconcat version 1.0\n", None),
        (b"\x89PNG\r\n\x1a\n", None),
        (b"<html>", None),
    ],
)
def test_sniff_container(head, container):
    assert sniff_container(head) == container


def _wav(samples: np.ndarray, rate: int = SAMPLE_RATE, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def _reason(data: bytes, max_audio_s: float = MAX_AUDIO_S) -> str:
    with pytest.raises(InvalidAudio) as info:
        decode(data, max_audio_s=max_audio_s)
    assert info.value.message
    return info.value.reason


def test_empty():
    assert _reason(b"") == "empty"


@pytest.mark.parametrize(
    "data",
    [
        b"hello world, not audio",
        b"#EXTM3U\n#EXTINF:1,\nfile:///etc/passwd\n",
        b"ffconcat version 1.0\nfile /etc/passwd\n",
        b"\x89PNG\r\n\x1a\n" + b"\0" * 100,
        b"<?xml version='1.0'?><smil/>",
    ],
)
def test_unrecognized_or_hostile_formats_are_refused_before_ffmpeg_sees_them(data):
    assert _reason(data) == "unrecognized_format"


def test_wrong_header():
    real = (DATA / "kitab.flac").read_bytes()
    assert _reason(b"RIFF\0\0\0\0WAVE" + real[12:]) in ("corrupt", "unrecognized_format")
    assert _reason(b"fLaC" + bytes(200)) == "corrupt"
    assert _reason(b"\x1a\x45\xdf\xa3" + bytes(500)) == "corrupt"


def test_truncated():
    wav = (DATA / "kitab.wav").read_bytes()
    assert _reason(wav[: len(wav) // 2]) == "truncated"
    assert _reason((DATA / "kitab.webm").read_bytes()[:150]) in ("corrupt", "truncated")
    assert _reason((DATA / "kitab.m4a").read_bytes()[:300]) in ("corrupt", "truncated")


@pytest.mark.parametrize("name", ["kitab.webm", "kitab.ogg", "sabah_alkhayr.webm"])
@pytest.mark.parametrize("share", [0.3, 0.6, 0.9])
def test_cut_off_opus_is_truncated_not_half_transcribed(name, share):
    """Matroska's demuxer stops quietly at a cut (caught by the declared duration); OGG's runs out of bytes."""
    data = (DATA / name).read_bytes()
    assert _reason(data[: int(len(data) * share)]) == "truncated"


def _webm_opus(seconds: float, **options: str) -> bytes:
    from bench.__main__ import speech
    from training.synth import encode

    return encode(speech(seconds), "webm", options=options)


def test_live_webm_without_a_declared_duration_decodes():
    """Browsers' MediaRecorder writes WebM as a live stream: no Duration, so no cut-off check, and still audio."""
    data = _webm_opus(2.2, live="1")
    with av.open(io.BytesIO(data), format="matroska") as container:
        assert not container.duration
    assert abs(len(decode(data, max_audio_s=MAX_AUDIO_S)) - 2.2 * SAMPLE_RATE) <= 0.03 * SAMPLE_RATE


def _stereo_opus(left: np.ndarray, right: np.ndarray, container: str) -> bytes:
    """Two different channels at 48 kHz through FFmpeg's libopus encoder (``training.synth.encode`` writes copies)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream("libopus", rate=48_000, layout="stereo")
        planar = np.stack([left, right]).astype(np.float32)
        for start in range(0, planar.shape[1], 960):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(planar[:, start : start + 960]), format="fltp",
                                               layout="stereo")  # fmt: skip
            frame.sample_rate, frame.pts = 48_000, start
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def _decode_both_ways(data: bytes, monkeypatch) -> tuple[np.ndarray, np.ndarray]:
    """decode() through libopus (checking that it was used), then through FFmpeg's own Opus decoder and soxr."""
    import worker.audio as audio_module

    if sys.platform == "linux":  # PyAV's manylinux wheels carry libopus; elsewhere FFmpeg may be all there is
        assert audio_module._libopus() is not None
    elif audio_module._libopus() is None:
        pytest.skip("no libopus to load here: FFmpeg decodes Opus")
    calls = []
    real = audio_module._decode_opus
    monkeypatch.setattr(audio_module, "_decode_opus", lambda *args: calls.append(1) or real(*args))
    through_libopus = decode(data, max_audio_s=MAX_AUDIO_S)
    assert calls == [1]
    monkeypatch.setattr(audio_module, "_libopus", lambda: None)
    return through_libopus, decode(data, max_audio_s=MAX_AUDIO_S)


@pytest.mark.parametrize("fmt", ["webm", "ogg"])
@pytest.mark.parametrize("seconds", [1.0, 2.2, 12.0])
def test_opus_decoded_by_libopus_matches_ffmpegs_decoder(fmt, seconds, monkeypatch):
    """libopus at 16 kHz gives FFmpeg's samples (its decoder at 48 kHz, then soxr): the same count, the container's
    pre-skip and end trimming applied the same way, and the same signal."""
    from bench.__main__ import speech
    from training.synth import encode

    ours, ffmpeg = _decode_both_ways(encode(speech(seconds), fmt), monkeypatch)
    assert len(ours) == len(ffmpeg)
    assert np.corrcoef(ours, ffmpeg)[0, 1] > 0.9999 and np.abs(ours - ffmpeg).max() < 0.01


@pytest.mark.parametrize("seconds", [1.0, 1.6, 2.2, 12.0])
def test_opus_decoded_in_two_halves_matches_one_decoder(seconds, monkeypatch):
    """The second half's decoder starts 200 ms early and drops that output: the joined samples are one decoder's,
    to within rounding at the seam, and none are lost or doubled. (With the RFC's 80 ms the 1.6 s clip was up to
    0.05 off after the seam.)"""
    import threading

    import worker.audio as audio_module

    data = _webm_opus(seconds)
    monkeypatch.setattr(audio_module, "_SPLIT_MIN_S", 1e9)
    one = decode(data, max_audio_s=MAX_AUDIO_S)
    monkeypatch.undo()
    started = []

    class CountingThread(threading.Thread):
        def start(self):
            started.append(self.name)
            super().start()

    monkeypatch.setattr(audio_module.threading, "Thread", CountingThread)
    two = decode(data, max_audio_s=MAX_AUDIO_S)
    assert len(two) == len(one)
    assert np.abs(two - one).max() < 0.002 and np.corrcoef(two, one)[0, 1] > 0.99999
    assert len(started) == (1 if seconds >= 1.5 else 0)  # short clips are not worth a second thread


@pytest.mark.parametrize("container", ["webm", "ogg"])
def test_stereo_opus_is_downmixed_by_averaging(container, monkeypatch):
    t = np.arange(48_000 * 2) / 48_000
    left = (np.sin(2 * np.pi * 300 * t) * 0.5).astype(np.float32)
    ours, ffmpeg = _decode_both_ways(_stereo_opus(left, -left * 0.5, container), monkeypatch)
    assert len(ours) == len(ffmpeg)
    assert np.abs(ours - ffmpeg).max() < 0.01
    middle = slice(SAMPLE_RATE // 4, -SAMPLE_RATE // 4)
    assert np.sqrt(np.mean(ours[middle] ** 2)) == pytest.approx(0.25 * 0.5 / np.sqrt(2), rel=0.05)  # (L + R) / 2


def test_opus_packets_straight_to_libopus():
    """The OpusHead's pre-skip, and damaged packets: libopus refuses a malformed one (code 3, zero frames).
    FFmpeg's demuxers drop most such packets before any decoder sees them, so packets are handed over directly."""
    import worker.audio as audio_module

    lib = audio_module._libopus()
    if lib is None:
        pytest.skip("no libopus to load here")

    class Packets:  # what _decode_opus reads from a demuxer: its packets, 20 ms each
        def __init__(self, *payloads: bytes) -> None:
            self.payloads = payloads

        def demux(self, stream):
            for payload in self.payloads:
                packet = av.Packet(payload)
                packet.duration = 960
                yield packet

    stream = SimpleNamespace(time_base=Fraction(1, 48_000))
    silence, damaged = b"\xf8\xff\xfe", b"\xfb\x00"  # a 20 ms CELT frame of silence; an invalid packet
    assert len(audio_module._decode_opus(lib, Packets(silence, silence), stream, 30, 0)) == 2 * 320
    # no skip samples from the container: the OpusHead's pre-skip (312 at 48 kHz) is dropped, as FFmpeg drops it
    assert len(audio_module._decode_opus(lib, Packets(silence, silence), stream, 30, 312)) == 2 * 320 - 104
    for packets, reason in [
        ((silence, silence, damaged), "truncated"),
        ((damaged, silence), "corrupt"),
        ((silence,) * 90 + (damaged,) + (silence,) * 9, "truncated"),  # 2 s: in the second decoder's half
        ((damaged,) + (silence,) * 99, "corrupt"),  # 2 s: in the first half, while the second decodes fine
    ]:
        with pytest.raises(InvalidAudio) as refused:
            audio_module._decode_opus(lib, Packets(*packets), stream, 30, 0)
        assert refused.value.reason == reason, len(packets)
    assert len(audio_module._decode_opus(lib, Packets(*(silence,) * 100), stream, 30, 0)) == 100 * 320  # split too


def test_only_plain_opus_headers_go_to_libopus():
    from worker.audio import _opus_head_is_plain

    def head(channels=1, gain=0, family=0, magic=b"OpusHead"):
        return magic + bytes([1, channels]) + struct.pack("<HIhB", 312, 48_000, gain, family)

    assert _opus_head_is_plain(head()) and _opus_head_is_plain(head(channels=2))
    assert not _opus_head_is_plain(head(gain=256))  # +1 dB output gain: FFmpeg applies it
    assert not _opus_head_is_plain(head(channels=6, family=1))  # surround: a multistream decoder's job
    assert not _opus_head_is_plain(head(magic=b"OpusTags"))
    assert not _opus_head_is_plain(head()[:18]) and not _opus_head_is_plain(None)


def test_zero_length():
    assert _reason(_wav(np.zeros(0, np.float32))) == "zero_length"


@pytest.mark.parametrize("rate", [SAMPLE_RATE, 44_100])
def test_silent(rate):
    assert _reason(_wav(np.zeros(rate, np.float32), rate)) == "silent"


def test_too_few_samples_to_resample_is_zero_length():
    assert _reason(_wav(np.full(1, 0.5, np.float32), 48_000)) == "zero_length"


@pytest.mark.parametrize("rate", [SAMPLE_RATE, 44_100, 48_000])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [0, 100, -1])
def test_non_finite(bad, rate, where):
    """Checked after resampling, so a lone bad sample at either end must still be caught through the filter."""
    samples = np.full(rate, 0.1, np.float32)
    samples[where] = bad
    assert _reason(_wav(samples, rate, subtype="FLOAT")) == "non_finite"


def test_wav_header_without_a_decodable_codec():
    """Found by the fuzzer: PCM with 0 bits per sample; libsndfile refuses it and FFmpeg opens a stream without a
    decoder (no codec context at all)."""
    fmt = struct.pack("<HHIIHH", 1, 2, 68, 0, 0, 0)
    body = b"WAVEfmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", 4000) + bytes(4000)
    assert _reason(b"RIFF" + struct.pack("<I", len(body)) + body) == "unsupported_codec"


def test_no_audio_stream():
    buf = io.BytesIO()
    with av.open(buf, "w", format="webm") as out:
        stream = out.add_stream("libvpx", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    assert _reason(buf.getvalue()) == "no_audio_stream"


def test_too_long_is_refused_from_the_header_before_reading():
    # a WAV header promising an hour of audio, with 1 s of data behind it
    wav = bytearray(_wav((np.random.default_rng(0).standard_normal(SAMPLE_RATE) * 0.1).astype(np.float32)))
    data_pos = wav.index(b"data")
    struct.pack_into("<I", wav, data_pos + 4, SAMPLE_RATE * 2 * 3600)
    assert _reason(bytes(wav), max_audio_s=30) in ("audio_too_long", "truncated")


@pytest.mark.parametrize("fmt", ["flac", "webm", "mp3"])
def test_small_file_that_expands_to_a_long_one_is_refused_early(fmt):
    from training.synth import encode

    data = encode(np.zeros(SAMPLE_RATE * 300, np.float32), fmt)  # five minutes of zeros compress to little
    assert len(data) < 2_000_000  # well under MAX_UPLOAD_BYTES, yet 10x MAX_AUDIO_S once decoded
    started = time.perf_counter()
    assert _reason(data, max_audio_s=30) == "audio_too_long"
    assert time.perf_counter() - started < 2.0  # stopped at the limit, not after decoding five minutes


def test_unsupported_codec_in_an_accepted_container():
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as out:
        stream = out.add_stream("ac3", rate=48000)
        samples = (np.random.default_rng(0).standard_normal((1, 48000)) * 0.1).astype(np.float32)
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 48000, 0
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    assert _reason(buf.getvalue()) == "unsupported_codec"


def test_stereo_is_downmixed_by_averaging():
    left = (np.sin(np.arange(SAMPLE_RATE) / 10) * 0.5).astype(np.float32)
    stereo = np.stack([left, -left * 0.5], axis=1)
    audio = decode(_wav(stereo), max_audio_s=MAX_AUDIO_S)
    assert np.allclose(audio, left * 0.25, atol=2e-4)


def test_resamples_to_16k():
    rate = 44_100
    tone = (np.sin(2 * np.pi * 440 * np.arange(rate) / rate) * 0.5).astype(np.float32)
    audio = decode(_wav(tone, rate), max_audio_s=MAX_AUDIO_S)
    assert len(audio) == SAMPLE_RATE
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) - 440) <= 1  # 1 Hz bins over 1 s


def _speech(seconds: float, rate: int) -> np.ndarray:
    from bench.__main__ import speech

    return soxr.resample(speech(seconds), SAMPLE_RATE, rate, quality="HQ").astype(np.float32)


def test_long_input_converted_block_by_block_is_the_one_shot_result():
    """Past one block (2**17 samples a channel), decode() downmixes and resamples as it reads, through soxr's
    streaming resampler: the samples are those of downmixing and resampling everything at once, as it did before."""
    left = _speech(10, 44_100)
    stereo = np.stack([left, -0.5 * left], axis=1)
    whole = soxr.resample(np.float32(0.5) * stereo[:, 0] + np.float32(0.5) * stereo[:, 1], 44_100, SAMPLE_RATE,
                          quality="HQ")  # fmt: skip
    audio = decode(_wav(stereo, 44_100, subtype="FLOAT"), max_audio_s=MAX_AUDIO_S)
    assert len(audio) == len(whole) and np.abs(audio - whole).max() < 1e-6

    from tests.test_decode_memory import encoded  # FFmpeg's decoder: ~1,000 frames of FLAC at 96 kHz

    data = encoded(96_000, 2, 12, tone_s=12)
    with av.open(io.BytesIO(data), format="matroska") as container:
        samples = np.concatenate([f.to_ndarray().reshape(-1, 2) for f in container.decode(audio=0)])
    mono = (samples.astype(np.float32) / 32767) @ np.full(2, 0.5, np.float32)
    whole = soxr.resample(mono, 96_000, SAMPLE_RATE, quality="HQ")
    audio = decode(data, max_audio_s=MAX_AUDIO_S)
    assert len(audio) == len(whole) == 12 * SAMPLE_RATE and np.abs(audio - whole).max() < 1e-6


@pytest.mark.parametrize("path", ["soundfile", "ffmpeg"])
def test_exactly_max_audio_s_decodes_and_one_sample_more_is_too_long(path):
    """max_audio_s x rate samples (3 s at 48 kHz: past one block) is the most: one more is refused."""
    from tests.test_decode_memory import encoded

    rate = 48_000
    for n, reason in [(3 * rate, None), (3 * rate + 1, "audio_too_long")]:
        if path == "soundfile":
            samples = np.zeros(n, np.float32)
            samples[:rate] = _speech(1, rate)
            data = _wav(samples, rate)
        else:
            data = encoded(rate, 1, n / rate)
        if reason is None:
            assert len(decode(data, max_audio_s=3)) == 3 * SAMPLE_RATE
        else:
            assert _reason(data, max_audio_s=3) == reason


def test_rate_change_mid_stream_is_resampled_part_by_part():
    """FLAC frames each carry their rate and FFmpeg's decoder passes a change on: each part is resampled from its
    own rate (a 440 Hz tone in both stays 440 Hz) and its duration counted at it. (Before, everything was
    resampled from the last frame's rate: 1 s at 24 kHz then 1 s at 48 kHz came out 1.5 s long, the first
    part an octave down.)"""
    from tests.test_decode_memory import switching_rate

    audio = decode(switching_rate([(24_000, 1), (48_000, 1)]), max_audio_s=MAX_AUDIO_S)
    assert len(audio) == 2 * SAMPLE_RATE
    for start in (0, SAMPLE_RATE):  # each part opens with 0.5 s of the tone
        part = audio[start + 800 : start + 800 + SAMPLE_RATE // 4]
        assert abs(np.argmax(np.abs(np.fft.rfft(part))) * 4 - 440) <= 4  # 4 Hz bins
    # 20 s at 24 kHz, then 48 kHz: 9 s more is 29 s, 11 s more is 31 s (880,000 samples: under 30 s at 48 kHz)
    assert len(decode(switching_rate([(24_000, 20), (48_000, 9)]), max_audio_s=30)) == 29 * SAMPLE_RATE
    assert _reason(switching_rate([(24_000, 20), (48_000, 11)]), max_audio_s=30) == "audio_too_long"


# ------------------------------------------------------------------------------------------ whose error it is
def _raise_once(error: type[Exception], where: str = ""):
    """A stand-in for one of worker.audio's own helpers with a bug: raises ``error`` (in thread ``where`` only, if
    given), else does what the helper does."""
    import threading

    def install(owner, attribute: str, monkeypatch) -> None:
        real = getattr(owner, attribute)

        def buggy(*args, **kwargs):
            if not where or threading.current_thread().name == where:
                raise error("a bug of ours")
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, attribute, buggy)

    return install


@pytest.mark.parametrize(
    ("name", "helper", "thread", "path"),
    [
        ("kitab.webm", "_opus_split_points", "", "_decode_opus"),
        ("kitab.ogg", "_skip_samples", "", "_decode_opus"),
        ("kitab.webm", "_opus_run", "", "_decode_opus"),
        ("sabah_alkhayr.ogg", "_opus_run", "opus-second-half", "_decode_opus"),  # 1.86 s: decoded in two halves
        ("kitab.mp3", "_frame_samples", "", "_decode_frames"),
        ("kitab.m4a", "_Mono16k.add", "", "_decode_frames"),
        ("kitab.webm", "_Mono16k.add", "", "_decode_frames"),  # FFmpeg's Opus decoder: no libopus
        ("kitab.wav", "_Mono16k.add", "", "_decode_soundfile"),
        ("kitab.flac", "_Mono16k.add", "", "_decode_soundfile"),
    ],
)
@pytest.mark.parametrize("error", [IndexError, ValueError, KeyError])
def test_a_bug_of_ours_is_not_reported_as_a_bad_upload(name, helper, thread, path, error, monkeypatch):
    """An exception from worker.audio's own code, decoding a good file through the real decoders, reaches the
    caller as itself, traceback and all (the worker reports it as internal_error), not as InvalidAudio: only what
    FFmpeg and libsndfile raise about the upload becomes InvalidAudio."""
    import worker.audio as audio_module

    if path == "_decode_frames" and name.endswith(".webm"):
        monkeypatch.setattr(audio_module, "_libopus", lambda: None)
    elif path == "_decode_opus" and audio_module._libopus() is None:
        pytest.skip("no libopus to load here: FFmpeg decodes Opus")
    owner, _, attribute = helper.rpartition(".")
    _raise_once(error, thread)(getattr(audio_module, owner) if owner else audio_module, attribute, monkeypatch)
    with pytest.raises(error, match="a bug of ours") as raised:
        decode((DATA / name).read_bytes(), max_audio_s=MAX_AUDIO_S)
    assert type(raised.value) is error  # InvalidAudio is a ValueError too
    called = [entry.name for entry in raised.traceback]
    assert path in called
    if path == "_decode_soundfile":
        assert "_decode_ffmpeg" not in called  # no second try through FFmpeg either


@pytest.mark.parametrize("name", ["kitab.wav", "kitab.flac"])
def test_soundfile_misused_is_a_bug_not_a_file_for_ffmpeg(name, monkeypatch):
    """soundfile's TypeError for a wrong argument (here a block size of None) is not libsndfile failing to read the
    file: it propagates, rather than sending the file on to FFmpeg as if libsndfile could not read it."""
    import worker.audio as audio_module

    monkeypatch.setattr(audio_module, "_BLOCK", None)
    with pytest.raises(TypeError) as raised:
        decode((DATA / name).read_bytes(), max_audio_s=MAX_AUDIO_S)
    called = [entry.name for entry in raised.traceback]
    assert "_decode_soundfile" in called and "_decode_ffmpeg" not in called


def test_what_ffmpeg_raises_becomes_invalid_audio_with_its_cause():
    with pytest.raises(InvalidAudio) as refused:
        decode(b"\x1a\x45\xdf\xa3" + bytes(500), max_audio_s=MAX_AUDIO_S)
    assert refused.value.reason == "corrupt"
    assert isinstance(refused.value.__cause__, av.error.FFmpegError)


def _tagged(container: str, codec: str, title: str) -> bytes:
    """A second of a tone whose title tag is written in Latin-1, not UTF-8 (as in files from older taggers)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=container, metadata_encoding="latin-1") as out:
        stream = out.add_stream(codec, rate=48_000, layout="mono")
        out.metadata["title"] = stream.metadata["title"] = title
        tone = (np.sin(2 * np.pi * 440 * np.arange(48_000) / 48_000) * 0.3).astype(np.float32)[None]
        step = stream.codec_context.frame_size or 1024
        for start in range(0, tone.shape[1], step):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(tone[:, start : start + step]), format="fltp",
                                               layout="mono")  # fmt: skip
            frame.sample_rate, frame.pts = 48_000, start
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("container", "codec"), [("webm", "libopus"), ("ogg", "libopus"), ("mp3", "libmp3lame"), ("mp4", "aac")]
)
def test_a_tag_that_is_not_utf8_does_not_refuse_the_recording(container, codec):
    """PyAV decodes every tag while opening, as strict UTF-8 by default: a UnicodeDecodeError, found by the fuzzer,
    that refused these files as corrupt."""
    data = _tagged(container, codec, "caf\xe9")
    assert "café".encode("latin-1") in data
    assert abs(len(decode(data, max_audio_s=MAX_AUDIO_S)) - SAMPLE_RATE) <= 0.03 * SAMPLE_RATE


# ------------------------------------------------------------------------------------------------ fuzzing
_SEEDS = [(DATA / name).read_bytes() for name in CLIPS if name.startswith(("kitab", "shukran"))]


class DecodeHung(Exception):
    pass


def _alarm(*_):
    raise DecodeHung("decode took over 10 s")


def _check(data: bytes) -> None:
    """decode() returns audio or raises InvalidAudio: never another exception, never a hang."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(10)
    try:
        audio = decode(data, max_audio_s=MAX_AUDIO_S)
    except InvalidAudio as exc:
        assert exc.reason and exc.message
        return
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert audio.dtype == np.float32 and audio.ndim == 1 and len(audio) > 0
    assert np.isfinite(audio).all()


@st.composite
def mutated_clip(draw):
    data = bytearray(draw(st.sampled_from(_SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "zero", "dup"]))
        pos = draw(st.integers(0, len(data) - 1)) if data else 0
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            data = data[:pos] + data[pos + draw(st.integers(1, 4096)) :]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "zero":
            data[pos : pos + draw(st.integers(1, 256))] = bytes(min(256, len(data) - pos))
        elif kind == "dup" and data:
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 2048))]
    return bytes(data)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutated_clip())
def test_fuzz_mutated_clips(data):
    _check(data)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from([b"", b"RIFF\0\0\0\0WAVE", b"fLaC", b"OggS", b"\x1a\x45\xdf\xa3", b"ID3", b"\xff\xfb",
                        b"\0\0\0\x18ftyp"]), st.binary(max_size=4096))  # fmt: skip
def test_fuzz_random_bytes_behind_real_magic(magic, tail):
    _check(magic + tail)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_decode_does_not_leak():
    clips = [(DATA / name).read_bytes() for name in CLIPS if name.startswith("sabah")]
    bad = (DATA / "sabah_alkhayr.webm").read_bytes()[:300]
    for _ in range(30):  # warm-up: allocator pools, codec tables
        for data in clips:
            decode(data, max_audio_s=MAX_AUDIO_S)
    before = _rss_mb()
    for _ in range(150):
        for data in clips:
            decode(data, max_audio_s=MAX_AUDIO_S)
        with pytest.raises(InvalidAudio):
            decode(bad, max_audio_s=MAX_AUDIO_S)
    assert _rss_mb() - before < 25  # 1,050 decodes: a leak of even 25 kB each would show
