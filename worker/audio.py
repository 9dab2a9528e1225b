"""Decode uploaded bytes to 16 kHz mono float32, in process, refusing anything that is not plain audio.

WAV and FLAC go through libsndfile (soundfile); everything else through FFmpeg's libraries (PyAV), from memory,
with the demuxer forced from an allow-list chosen by magic bytes: FFmpeg never probes, so playlist/concat/image
demuxers that can open other files or URLs are never reached. Opus (most uploads: browsers record it) is decoded by
libopus itself, straight to 16 kHz. Durations and sample counts are checked while decoding, so a tiny file that
claims or expands to hours is refused early. Resampling is soxr's.

Memory is bounded by the output, not the input: sample rates above 192 kHz and more than 8 channels are refused, from
the header and again on every decoded frame, and each frame (or block) becomes float32 mono at once and goes through a
streaming resampler, so a decode holds 16 kHz x ``max_audio_s`` samples plus one block at the input's rate, however
many channels at whatever rate the upload declares.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import io
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import av
import numpy as np
import soundfile as sf
import soxr

from shared.audio_format import UNRECOGNIZED_FORMAT_MESSAGE, sniff_container

SAMPLE_RATE = 16_000
_T = TypeVar("_T")
_SILENCE_PEAK = 10 ** (-80 / 20)  # below -80 dBFS everywhere: nothing to transcribe

# container -> FFmpeg demuxer name (forced, never probed)
_DEMUXERS = {
    "webm": "matroska",
    "mp3": "mp3",
    "mp4": "mov",
    "aac": "aac",
    "wav": "wav",
    "flac": "flac",
    "ogg": "ogg",
    "aiff": "aiff",
}
_CODECS = {
    "opus", "vorbis", "mp3", "mp3float", "aac", "aac_fixed", "flac", "alac", "mp2", "speex",
    "pcm_s16le", "pcm_s24le", "pcm_s32le", "pcm_f32le", "pcm_f64le", "pcm_u8", "pcm_s16be", "pcm_s24be",
    "pcm_s32be", "pcm_f32be", "pcm_mulaw", "pcm_alaw", "adpcm_ms", "adpcm_ima_wav", "libopus",
}  # fmt: skip
# OGG is not among them: libsndfile decodes Opus 4x slower than FFmpeg (21 ms vs 5 ms for 2.2 s, `make bench`).
_SOUNDFILE_CONTAINERS = {"wav", "flac"}

# Opus is most of the uploads and its decoder most of their decode time. FFmpeg's libraries only demux it here:
# libopus decodes the packets (through ctypes, which releases the GIL) straight to 16 kHz mono, so nothing is
# resampled or downmixed afterwards and no frame objects are made per 20 ms packet. On the 2-core dev machine
# (interleaved A/B, medians): 2.2 s WebM 4.3 ms with FFmpeg's decoder + soxr, 3.6 ms this way; 30 s 52 -> 42 ms.
# From 1.5 s a second decoder takes the second half of the packets on the other core, starting 200 ms early and
# dropping its output for them (pre-roll). RFC 7845 (4.6) asks for 80 ms; measured, 80 ms left the seam up to 0.05
# off one decoder's samples on a 1.6 s clip, 200 ms under 0.001 (`tests/test_audio.py`). 2.2 s WebM: 3.65 -> 3.07 ms
# (these 2 cores give ~1.3x for two busy threads; a 1 s clip gains nothing); FFmpeg's decoder split the same way
# takes 5.4 ms. libopus is the one inside the PyAV wheel, or the system's; without one, or for what libopus's plain
# decoder does not cover (surround mapping, an output gain), FFmpeg decodes.
_OPUS_PREROLL_S = 0.2
_SPLIT_MIN_S = 1.5
_OPUS_MIN_FRAME_S = 0.0025  # more packets than max_audio_s / this is too long whatever they hold
_OPUS_MAX_FRAME = SAMPLE_RATE * 120 // 1000  # samples of the longest Opus packet (120 ms)
_OPUS_RATE_RATIO = 48_000 // SAMPLE_RATE  # Opus timestamps and skips count 48 kHz samples
# What a recording can be: 192 kHz is the highest rate audio interfaces record at, 8 channels 7.1. The headers
# allow far more (FLAC to 655350 Hz, WAV 65535 channels) and the decoded size grows with both: 384 kHz x 8 channels
# is 96 times the samples of the 16 kHz mono the same seconds decode to.
_MAX_SAMPLE_RATE = 192_000
_MAX_CHANNELS = 8
# Samples (a channel) converted and resampled at a time: what is held at the input's rate is about one block, mono
# (0.5 MB); a clip shorter than one block (2.7 s at 48 kHz) is resampled in one call, with no stream to set up.
_BLOCK = 1 << 17
# A stream may change its sample rate (FLAC frames each carry one), and each part at one rate is resampled on its
# own: soxr designs a filter per part, up to ~0.5 ms for an odd rate. A recording changes rate never or once or twice
# (files joined end to end); 120,000 16-sample FLAC frames alternating between 65533 and 65531 Hz (2.4 MB) took 38 s
# and grew the decoding process by 119 MB before this limit (tests/test_hostile.py).
_MAX_RATE_CHANGES = 16
# Frames waiting for a block are joined into one array once this many wait: a waiting frame of float32 mono is a view
# that keeps the whole decoded frame alive (about 1.5 KB of FFmpeg's and PyAV's objects besides its samples), so a
# stream of one-sample frames held 2**17 of them per block (a 4 MB upload of one-sample PCM packets in Matroska grew
# the decoding process by 224 MB; tests/test_hostile.py). Ordinary frames (512 samples or more) fill a block first.
_MAX_WAITING_FRAMES = 256
# A Matroska/WebM file that says how long it is (MediaRecorder's live files do not) and decodes to this much less
# was cut off: its demuxer just stops at the cut, without an error.
_DECLARED_DURATION_SLACK_S = 0.1


class InvalidAudio(ValueError):
    """Bytes that are not decodable audio; ``reason`` is a stable machine-readable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def decode(data: bytes, *, max_audio_s: float) -> np.ndarray:
    """Decode an uploaded file to mono float32 samples at 16 kHz, ``max_audio_s`` seconds of it at most (a stream's
    duration is counted at its own sample rate).

    Raises ``InvalidAudio`` (reason: empty, unrecognized_format, corrupt, truncated, no_audio_stream,
    unsupported_codec, sample_rate_too_high, too_many_channels, zero_length, non_finite, silent, audio_too_long) for
    anything else. Any other exception is a bug, here or in a library, not a property of the upload.
    """
    if not data:
        raise InvalidAudio("empty", "the upload is empty")
    container = sniff_container(data)
    if container is None:
        raise InvalidAudio("unrecognized_format", UNRECOGNIZED_FORMAT_MESSAGE)
    if container == "wav":
        _check_wav_not_truncated(data)  # a header walk: before any decoding work
    audio = None
    if container in _SOUNDFILE_CONTAINERS:
        audio = _decode_soundfile(data, max_audio_s)
    if audio is None:  # not a container libsndfile handles, or a codec inside it that it lacks
        audio = _decode_ffmpeg(data, container, max_audio_s)
    return _finish(audio)


def _too_long(max_audio_s: float) -> InvalidAudio:
    return InvalidAudio("audio_too_long", f"audio is longer than the {max_audio_s:g} s limit")


def _check_shape(rate: int, channels: int) -> None:
    """Refuse a sample rate or channel count past what a recording has (a header's, or a decoded frame's)."""
    if rate > _MAX_SAMPLE_RATE:
        raise InvalidAudio(
            "sample_rate_too_high", f"the sample rate {rate} Hz is above the {_MAX_SAMPLE_RATE} Hz limit"
        )
    if channels > _MAX_CHANNELS:
        raise InvalidAudio("too_many_channels", f"the audio has {channels} channels, more than {_MAX_CHANNELS}")


class _Mono16k:
    """Decoded audio reduced as it comes: each frame or block is checked (rate, channels, the duration so far),
    converted to float32 mono at once and, a block at a time, resampled to 16 kHz by a streaming resampler. What is
    kept is the 16 kHz output and under a block of mono at the input's rate, never the input's channels or its
    whole length. A stream that changes rate mid-way (FFmpeg's decoders pass that on frame by frame) is resampled
    part by part, and its duration counted at each part's own rate; past ``_MAX_RATE_CHANGES`` changes it is
    refused. The budget, in decoded samples: each part may have ``max_audio_s`` (less the parts before it) x its rate
    samples a channel, at no more than 192 kHz and 8 channels, so no upload makes more than 192 kHz x 8 x
    ``max_audio_s`` of them (and a frame) decoded and converted, however long it claims to be."""

    def __init__(self, max_audio_s: float) -> None:
        self.max_audio_s = max_audio_s
        self.out: list[np.ndarray] = []  # 16 kHz
        self.rate = 0  # of the current part
        self.part_samples = 0  # a channel's samples in the current part
        self.part_limit = 0  # ... and the most it may have
        self.earlier_s = 0.0  # duration of the parts before it
        self.rate_changes = -1  # the first part's rate is not a change
        self.pending: list[np.ndarray] = []  # mono float32 at ``rate``, not yet resampled
        self.pending_samples = 0
        self.joined = 0  # how many of ``pending`` (at its start) are joined runs of frames
        self.resampler: soxr.ResampleStream | None = None
        self.any_samples = False

    @property
    def seconds(self) -> float:
        return self.earlier_s + (self.part_samples / self.rate if self.rate else 0.0)

    def add(self, samples: np.ndarray, rate: int) -> None:
        """(channels, n) samples of any sample format at ``rate``."""
        channels, n = samples.shape
        if rate != self.rate:
            _check_shape(rate, channels)
            self.rate_changes += 1
            if self.rate_changes > _MAX_RATE_CHANGES:
                raise InvalidAudio("corrupt", f"the sample rate changes more than {_MAX_RATE_CHANGES} times")
            self._end_part()
            self.rate = rate
            self.part_limit = math.ceil((self.max_audio_s - self.earlier_s) * rate)
        elif channels > _MAX_CHANNELS:
            _check_shape(rate, channels)
        self.part_samples += n
        if self.part_samples > self.part_limit:
            raise _too_long(self.max_audio_s)
        if not n:
            return
        self.any_samples = True
        if channels == 1 and samples.dtype == np.float32:  # most decoders' output: the frame's own samples
            self.pending.append(samples[0])
        else:
            self.pending.append(_downmix(_to_float(samples)))
        self.pending_samples += n
        if self.pending_samples >= _BLOCK:
            self._resample(last=False)
        elif len(self.pending) - self.joined >= _MAX_WAITING_FRAMES:  # tiny frames: copy them, let them go
            self.pending[self.joined :] = [np.concatenate(self.pending[self.joined :])]
            self.joined += 1

    def _resample(self, last: bool) -> None:
        block = self.pending[0] if len(self.pending) == 1 else np.concatenate(self.pending)
        self.pending, self.pending_samples, self.joined = [], 0, 0
        if self.rate == SAMPLE_RATE:
            self.out.append(block)
        elif last and self.resampler is None:  # the whole part in one block: one call, no stream to set up
            self.out.append(soxr.resample(block, self.rate, SAMPLE_RATE, quality="HQ"))
        else:
            if self.resampler is None:
                self.resampler = soxr.ResampleStream(self.rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
            self.out.append(self.resampler.resample_chunk(block, last=last))

    def _end_part(self) -> None:
        if self.pending or self.resampler is not None:
            self._resample(last=True)
        self.resampler = None
        if self.rate:
            self.earlier_s += self.part_samples / self.rate
        self.part_samples = 0

    def finish(self) -> np.ndarray:
        """All of it at 16 kHz."""
        self._end_part()
        if not self.any_samples:
            raise InvalidAudio("zero_length", "the file contains no audio samples")
        audio = self.out[0] if len(self.out) == 1 else np.concatenate(self.out)
        if audio.size == 0:
            raise InvalidAudio("zero_length", "the file contains too few samples to resample")
        return audio


def _broke_off() -> InvalidAudio:
    return InvalidAudio("truncated", "the audio stream breaks off part-way (cut off or damaged)")


def _check_wav_not_truncated(data: bytes) -> None:
    """libsndfile quietly reads what is there when the data chunk promises more bytes than the file has."""
    pos = 12
    while pos + 8 <= len(data):
        chunk_id, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        if chunk_id == b"data":
            if 0 < size < 0xFFFFFFF0 and pos + 8 + size > len(data):  # 0 / ~4 GiB: streaming writers' placeholders
                raise InvalidAudio("truncated", "the WAV file is shorter than its header says (cut off?)")
            return
        pos += 8 + size + (size & 1)


def _decode_soundfile(data: bytes, max_audio_s: float) -> np.ndarray | None:
    """16 kHz mono, read a block at a time; None when libsndfile cannot read the file: then FFmpeg tries, knowing more
    codecs (and saying what is wrong when it cannot). What libsndfile reports about a file reaches Python as
    ``LibsndfileError``, raised by opening and reading only; soundfile's other exceptions are for wrong arguments."""
    try:
        f = sf.SoundFile(io.BytesIO(data))
    except sf.LibsndfileError:
        return None
    with f:
        rate, channels, frames = f.samplerate, f.channels, f.frames
        if rate <= 0 or channels <= 0:
            raise InvalidAudio("corrupt", "the header gives no sample rate or channels")
        _check_shape(rate, channels)
        if 0 < frames < 2**62 and frames > math.ceil(max_audio_s * rate):  # a plausible header: refuse unread
            raise _too_long(max_audio_s)
        audio = _Mono16k(max_audio_s)
        while True:
            try:
                block = f.read(frames=_BLOCK, dtype="float32", always_2d=True)
            except sf.LibsndfileError:
                return None
            if not len(block):
                return audio.finish()
            audio.add(block.T, rate)


# FFmpeg's libraries fail on an upload in three places: opening it (av.open), and each step of PyAV's demuxer
# and decoder generators (next()). PyAV raises their error codes as av.error.FFmpegError, and those calls are where
# it becomes InvalidAudio. Reading streams, codec parameters, packets, their side data and frames copies fields
# FFmpeg filled in, and closing reports nothing: none of it fails on what the upload holds. Any other exception
# comes from this module, or from the libraries on misuse: a bug, left to propagate as itself.


def _ffmpeg_refused(exc: av.error.FFmpegError, decoded: bool) -> InvalidAudio:
    """What a failing FFmpeg call says about the upload: once audio was decoded (``decoded``), or when the demuxer
    ran out of bytes (OGG reads its last page while opening), it broke off part-way, a partial upload not to
    transcribe half of; otherwise it is corrupt."""
    if decoded or isinstance(exc, av.error.EOFError):
        return _broke_off()
    return InvalidAudio("corrupt", f"the audio could not be decoded ({type(exc).__name__})")


def _next(items: Iterator[_T], decoded: bool) -> _T | None:
    """The next packet or frame from PyAV's demuxer or decoder (generators: each step demuxes or decodes), None at
    the end."""
    try:
        return next(items, None)
    except av.error.FFmpegError as exc:
        raise _ffmpeg_refused(exc, decoded) from exc


def _decode_ffmpeg(data: bytes, container: str, max_audio_s: float) -> np.ndarray:
    try:
        # Opening decodes every tag (title, encoder, ...) to str, as strict UTF-8 unless told otherwise: a Latin-1
        # title would refuse the recording with a UnicodeDecodeError. No tag is read here.
        demuxer = av.open(io.BytesIO(data), mode="r", format=_DEMUXERS[container], metadata_errors="replace")
    except av.error.FFmpegError as exc:
        raise _ffmpeg_refused(exc, decoded=False) from exc
    with demuxer:
        streams = demuxer.streams.audio
        if not streams:
            raise InvalidAudio("no_audio_stream", "the file has no audio stream")
        stream = streams[0]
        codec = stream.codec_context
        if codec is None:  # FFmpeg has no decoder for it (e.g. a WAV header with 0 bits/sample)
            raise InvalidAudio("unsupported_codec", "the audio codec is unknown")
        if codec.name not in _CODECS:
            raise InvalidAudio("unsupported_codec", f"audio codec {codec.name!r} is not accepted")
        _check_shape(codec.sample_rate, codec.channels)  # what the header says; each frame is checked again
        opus = _libopus() if codec.name == "opus" else None
        head = bytes(codec.extradata or b"")
        if opus is not None and _opus_head_is_plain(head):
            audio = _decode_opus(opus, demuxer, stream, max_audio_s, int.from_bytes(head[10:12], "little"))
            seconds = len(audio) / SAMPLE_RATE
        else:
            audio, seconds = _decode_frames(demuxer, stream, max_audio_s)
        declared_s = demuxer.duration / 1e6 if container == "webm" and demuxer.duration else None
    if declared_s and seconds < declared_s - _DECLARED_DURATION_SLACK_S:
        raise InvalidAudio("truncated", f"the file says it is {declared_s:.2f} s long but its audio stops earlier")
    return audio


def _decode_frames(demuxer, stream, max_audio_s: float) -> tuple[np.ndarray, float]:
    """FFmpeg's decoder, frame by frame into ``_Mono16k``: the 16 kHz samples and the seconds decoded."""
    audio = _Mono16k(max_audio_s)
    rate = 0
    frames = demuxer.decode(stream)
    decoded = False
    while (frame := _next(frames, decoded)) is not None:
        rate = frame.sample_rate or rate
        samples = _frame_samples(frame)
        decoded = True
        if rate <= 0:
            raise InvalidAudio("corrupt", "the stream gives no sample rate")
        audio.add(samples, rate)
    return audio.finish(), audio.seconds


@functools.cache
def _libopus() -> ctypes.CDLL | None:
    """libopus with its decoder functions typed, or None when there is none to load (then FFmpeg decodes Opus)."""
    if not hasattr(av.Packet, "has_sidedata"):  # PyAV too old to show the container's skip samples
        return None
    bundled = sorted((Path(av.__file__).parent.parent / "av.libs").glob("libopus*.so*"))  # PyAV's manylinux wheels
    for candidate in [*map(str, bundled), ctypes.util.find_library("opus")]:
        if not candidate:
            continue
        try:
            lib = ctypes.CDLL(candidate)
        except OSError:
            continue
        lib.opus_decoder_create.restype = ctypes.c_void_p
        lib.opus_decoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        lib.opus_decode_float.restype = ctypes.c_int
        lib.opus_decode_float.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p,
                                          ctypes.c_int, ctypes.c_int]  # fmt: skip
        lib.opus_decoder_destroy.restype = None
        lib.opus_decoder_destroy.argtypes = [ctypes.c_void_p]
        return lib
    return None


def _opus_head_is_plain(extradata: bytes | None) -> bool:
    """An OpusHead (RFC 7845 5.1) that libopus's single-stream decoder plays as FFmpeg would: mono or stereo,
    channel mapping family 0, no output gain."""
    head = bytes(extradata or b"")
    return (
        len(head) >= 19
        and head[:8] == b"OpusHead"
        and head[9] in (1, 2)
        and head[16:18] == b"\0\0"  # output gain, Q7.8 dB
        and head[18] == 0
    )


def _skip_samples(packet: av.Packet) -> tuple[int, int] | None:
    """Samples (48 kHz) the container says to drop at the start and end of this packet's output (FFmpeg's
    AV_PKT_DATA_SKIP_SAMPLES: pre-skip on the first packet, end trimming on the last), if it says so."""
    if not packet.has_sidedata("skip_samples"):
        return None
    data = bytes(packet.get_sidedata("skip_samples"))
    return int.from_bytes(data[0:4], "little"), int.from_bytes(data[4:8], "little")


def _decode_opus(lib: ctypes.CDLL, demuxer, stream, max_audio_s: float, pre_skip: int) -> np.ndarray:
    """Every packet of an Opus stream through libopus at 16 kHz mono (a stereo stream is downmixed by the decoder),
    trimmed as FFmpeg trims it: the first packet's skip samples, else the OpusHead's ``pre_skip`` (48 kHz samples),
    at the start, and the last packet's end trimming (within that packet) at the end. Long streams are decoded in
    two halves at once (see ``_OPUS_PREROLL_S``)."""
    packets = []
    demuxed = demuxer.demux(stream)
    while (packet := _next(demuxed, decoded=False)) is not None:
        if packet.size:
            packets.append(packet)
            if len(packets) > max_audio_s / _OPUS_MIN_FRAME_S:
                raise _too_long(max_audio_s)
    if not packets:
        raise InvalidAudio("zero_length", "the file contains no audio samples")
    first, last = _skip_samples(packets[0]), _skip_samples(packets[-1])
    skip_start = (first[0] if first else pre_skip) // _OPUS_RATE_RATIO
    skip_end = last[1] // _OPUS_RATE_RATIO if last else 0
    # a pre-skip is milliseconds; a hostile one must not buy decoding time past the limit
    limit = int(math.ceil(max_audio_s * SAMPLE_RATE)) + min(skip_start, SAMPLE_RATE)
    split = _opus_split_points(packets, float(stream.time_base or 0))
    if split is None:
        audio, last_samples = _opus_run(lib, packets, limit, warm_up=0, after_audio=False)
    else:
        preroll, middle = split
        second: list = []

        def decode_second_half() -> None:
            try:
                second.append(_opus_run(lib, packets[preroll:], limit, warm_up=middle - preroll, after_audio=True))
            except BaseException as exc:  # re-raised in the calling thread
                second.append(exc)

        thread = threading.Thread(target=decode_second_half, name="opus-second-half")
        thread.start()
        try:
            first_half, _ = _opus_run(lib, packets[:middle], limit, warm_up=0, after_audio=False)
        finally:
            thread.join()
        if isinstance(second[0], BaseException):
            raise second[0]
        tail, last_samples = second[0]
        audio = np.concatenate([first_half, tail])
    if len(audio) > limit:
        raise _too_long(max_audio_s)
    return audio[skip_start : max(skip_start, len(audio) - min(skip_end, last_samples))]


def _opus_split_points(packets: list, time_base: float) -> tuple[int, int] | None:
    """(first packet of the second decoder's pre-roll, first packet whose output it keeps): halves of equal work,
    pre-roll included. None for a short stream, or packets without the durations to place the split by."""
    starts = np.cumsum([0.0] + [float(p.duration or 0) * time_base for p in packets])
    if starts[-1] < _SPLIT_MIN_S:
        return None
    middle = int(np.searchsorted(starts, (starts[-1] + _OPUS_PREROLL_S) / 2))
    preroll = int(np.searchsorted(starts, starts[middle] - _OPUS_PREROLL_S, side="right")) - 1
    return (preroll, middle) if 0 < preroll < middle < len(packets) else None


def _opus_run(lib: ctypes.CDLL, packets: list, limit: int, warm_up: int, after_audio: bool) -> tuple[np.ndarray, int]:
    """One libopus decoder over ``packets``, dropping the output of the first ``warm_up``; returns the samples and
    the last packet's count. A damaged packet is ``truncated`` once audio came before it (``after_audio``: in
    packets before these), else ``corrupt``. Stops as soon as it has more than ``limit`` samples."""
    out = np.empty(min(len(packets), limit // _OPUS_MAX_FRAME + 2 + warm_up) * _OPUS_MAX_FRAME, np.float32)
    error = ctypes.c_int()
    decoder = lib.opus_decoder_create(SAMPLE_RATE, 1, ctypes.byref(error))
    if not decoder:
        raise InvalidAudio("corrupt", f"libopus refused the stream (error {error.value})")
    try:
        base, start, end, n = out.ctypes.data, 0, 0, 0
        for i, packet in enumerate(packets):
            if i == warm_up:
                start = end
            if end - start > limit:
                break  # the caller refuses it as too long
            n = lib.opus_decode_float(decoder, packet.buffer_ptr, packet.size, base + 4 * end, _OPUS_MAX_FRAME, 0)
            if n < 0:  # a damaged packet: after good ones, the upload breaks off part-way
                if end or after_audio:
                    raise _broke_off()
                raise InvalidAudio("corrupt", "the audio could not be decoded (invalid Opus packet)")
            end += n
    finally:
        lib.opus_decoder_destroy(decoder)
    return out[start:end], n


# FFmpeg sample formats (planar ones end in "p") -> numpy dtypes
_SAMPLE_DTYPES = {"u8": np.uint8, "s16": np.int16, "s32": np.int32, "s64": np.int64, "flt": np.float32,
                  "dbl": np.float64}  # fmt: skip


def _frame_samples(frame: av.AudioFrame) -> np.ndarray:
    """(channels, n) views of a decoded frame's planes. ``frame.to_ndarray`` costs ~10 us a frame, a third of the
    whole Opus decode for 20 ms frames; these views keep the frame alive and copy nothing."""
    fmt = frame.format
    dtype = _SAMPLE_DTYPES.get(fmt.name.removesuffix("p"))
    if dtype is None:
        raise InvalidAudio("unsupported_codec", f"sample format {fmt.name!r} is not accepted")
    channels, n = frame.layout.nb_channels, frame.samples
    if channels < 1:
        raise InvalidAudio("corrupt", "the stream has no channels")
    if fmt.is_planar:
        planes = frame.planes
        if channels == 1:
            return np.frombuffer(planes[0], dtype, count=n)[None]
        return np.stack([np.frombuffer(planes[c], dtype, count=n) for c in range(channels)])
    return np.frombuffer(frame.planes[0], dtype, count=n * channels).reshape(n, channels).T


def _to_float(samples: np.ndarray) -> np.ndarray:
    """Samples of any sample format -> float32 in [-1, 1]."""
    if samples.dtype.kind == "f":
        return samples.astype(np.float32, copy=False)
    if samples.dtype.kind == "u":  # pcm_u8
        return (samples.astype(np.float32) - 128.0) / 128.0
    return samples.astype(np.float32) / float(np.iinfo(samples.dtype).max)


def _downmix(channels_first: np.ndarray) -> np.ndarray:
    """(channels, n) -> (n,): the average of the channels. A matrix product, because numpy's mean over a
    2-wide axis is a slow strided reduction (~4 ms for 2 s of stereo)."""
    n_channels = channels_first.shape[0]
    if n_channels == 1:
        return channels_first[0]
    return np.full(n_channels, 1.0 / n_channels, dtype=np.float32) @ channels_first


def _finish(audio: np.ndarray) -> np.ndarray:
    """Checks on the 16 kHz samples (a third of them at 48 kHz): NaN or Inf anywhere in the input still turns the
    resampled output around it into NaN."""
    if audio.size == 0:
        raise InvalidAudio("zero_length", "the file contains no audio samples")
    # max and min propagate NaN and Inf: two passes without the temporaries of isfinite() and abs()
    high, low = float(audio.max()), float(audio.min())
    if not (math.isfinite(high) and math.isfinite(low)):
        raise InvalidAudio("non_finite", "the audio contains NaN or infinite samples")
    if max(high, -low) < _SILENCE_PEAK:
        raise InvalidAudio("silent", "the audio is silent")
    return np.ascontiguousarray(audio, dtype=np.float32)
