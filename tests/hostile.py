"""Builders of hostile uploads for tests/test_hostile.py: each made in code, in memory, from a committed fixture or
from nothing, and small enough to post (all under the default 10 MB MAX_UPLOAD_BYTES)."""

from __future__ import annotations

import io
import zipfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from tests.conftest import DATA
from tests.test_decode_memory import encoded

KITAB = DATA / "kitab.webm"  # the normal job: its transcript is كتاب


def flac_bomb() -> bytes:
    """15 KB of FLAC in Matroska that declares 384 kHz x 8 channels x 30 s of (silent) audio."""
    return encoded(384_000, 8, 30, tone_s=0)


def opus_silence(seconds: float, container: str = "webm") -> bytes:
    """``seconds`` of digital silence through FFmpeg's libopus encoder: a second encoded, then its last 20 ms packet
    (a few bytes: libopus codes silence the same each time) repeated."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream("libopus", rate=48_000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 48_000), np.int16), format="s16", layout="mono")
        frame.sample_rate, frame.pts = 48_000, 0
        packets = [*stream.encode(frame), *stream.encode(None)]
        for packet in packets:
            out.mux(packet)
        last = packets[-2]  # the last full one (the final packet is trimmed)
        for i in range(int((seconds - 1) * 50)):
            packet = av.Packet(bytes(last))
            packet.stream, packet.time_base = stream, Fraction(1, 48_000)
            packet.pts = packet.dts = 48_000 + i * 960
            packet.duration = 960
            out.mux(packet)
    return buf.getvalue()


def _opus_stream(out: av.container.OutputContainer):
    """An Opus track with a real OpusHead (from libopus's encoder, which is then not used)."""
    stream = out.add_stream("libopus", rate=48_000, layout="mono")
    stream.codec_context.open()
    return stream


def opus_packet_flood(count: int, container: str = "webm") -> bytes:
    """``count`` Opus packets of one byte each: a TOC byte (0x80) saying one 2.5 ms CELT frame of 0 bytes (RFC 6716
    3.2.1: a lost frame, which the decoder conceals). FFmpeg's muxers drop empty packets: ``empty_block_flood``."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = _opus_stream(out)
        for i in range(count):
            packet = av.Packet(b"\x80")
            packet.stream, packet.time_base = stream, Fraction(1, 48_000)
            packet.pts = packet.dts = i * 120
            packet.duration = 120
            out.mux(packet)
    return buf.getvalue()


def _ebml(element_id: int, body: bytes) -> bytes:
    """One EBML element: its id, its size as an 8-byte vint, its body."""
    size = (len(body) | 1 << 56).to_bytes(8, "big")
    return element_id.to_bytes((element_id.bit_length() + 7) // 8, "big") + size + body


def _uint(element_id: int, value: int) -> bytes:
    return _ebml(element_id, value.to_bytes(8, "big"))


def empty_block_flood(count: int) -> bytes:
    """A WebM written by hand (FFmpeg's muxer drops empty packets): an Opus track, then ``count`` SimpleBlocks with
    no payload at all, 6 bytes each, in one cluster of unknown size."""
    with av.open(io.BytesIO(), "w", format="webm") as out:
        opus_head = bytes(_opus_stream(out).codec_context.extradata)
    header = _ebml(0x1A45DFA3, _uint(0x4286, 1) + _uint(0x42F7, 1) + _uint(0x42F2, 4) + _uint(0x42F3, 8)
                   + _ebml(0x4282, b"webm") + _uint(0x4287, 2) + _uint(0x4285, 2))  # fmt: skip
    audio = _ebml(0xB5, np.float64(48_000).byteswap().tobytes()) + _uint(0x9F, 1)
    track = _uint(0xD7, 1) + _uint(0x73C5, 1) + _uint(0x83, 2) + _ebml(0x86, b"A_OPUS") + _ebml(0x63A2, opus_head)
    segment = _ebml(0x1549A966, _uint(0x2AD7B1, 1_000_000)) + _ebml(0x1654AE6B, _ebml(0xAE, track + _ebml(0xE1, audio)))
    block = b"\xa3\x84\x81\x00\x00\x80"  # SimpleBlock, size 4: track 1, timecode 0, keyframe, no payload
    cluster = b"\x1f\x43\xb6\x75\x01\xff\xff\xff\xff\xff\xff\xff" + _uint(0xE7, 0)  # unknown size
    unknown = b"\x01\xff\xff\xff\xff\xff\xff\xff"
    return header + b"\x18\x53\x80\x67" + unknown + segment + cluster + block * count


def pcm_packet_flood(count: int, rate: int = 16_000, codec: str = "pcm_f32le") -> bytes:
    """PCM in Matroska, one (silent) sample a packet: every packet decodes to a frame of its own, and the whole stream
    is decoded before it is found silent."""
    sample = bytes({"pcm_f32le": 4, "pcm_s16le": 2}[codec])
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        for i in range(count):
            packet = av.Packet(sample)
            packet.stream, packet.time_base = stream, Fraction(1, rate)
            packet.pts = packet.dts = i
            packet.duration = 1
            out.mux(packet)
    return buf.getvalue()


def _flac_frame(rate: int, samples: int) -> bytes:
    """One FLAC frame of ``samples`` silent samples whose header carries ``rate`` itself (a rate under 65535 Hz that
    is not a multiple of 10 is written as 16-bit Hz)."""
    encoder = av.CodecContext.create("flac", "w")
    encoder.sample_rate, encoder.layout, encoder.format = rate, "mono", "s16"
    encoder.options = {"frame_size": str(samples)}
    encoder.open()
    frame = av.AudioFrame.from_ndarray(np.zeros((1, samples), np.int16), format="s16", layout="mono")
    frame.sample_rate, frame.pts = rate, 0
    return next(bytes(p) for p in [*encoder.encode(frame), *encoder.encode(None)] if p.size)


def alternating_rate_flac(count: int, rates: tuple[int, int] = (65_533, 65_531), samples: int = 16) -> bytes:
    """FLAC in Matroska whose ``count`` frames of ``samples`` samples alternate between two sample rates: FFmpeg's
    decoder passes every change on, and each run at one rate is a part of its own to resample."""
    frames = [_flac_frame(rate, samples) for rate in rates]
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as out:
        stream = out.add_stream("flac", rate=rates[0], layout="mono")
        stream.codec_context.options = {"frame_size": str(samples)}
        for i in range(count):
            packet = av.Packet(frames[i % 2])
            packet.stream, packet.time_base = stream, Fraction(1, 1000)
            packet.pts = packet.dts = i * samples * 1000 // rates[0]
            out.mux(packet)
    return buf.getvalue()


def _wav_chunks(data: bytes) -> dict[bytes, int]:
    """Each chunk id -> the offset of its size field."""
    found, pos = {}, 12
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        found[data[pos : pos + 4]] = pos + 4
        pos += 8 + size + (size & 1)
    return found


def wav_with_chunk_size(size: int, chunk: bytes = b"data", name: str = "kitab.wav") -> bytes:
    """A committed WAV whose ``chunk`` says it holds ``size`` bytes (a lie)."""
    data = bytearray((DATA / name).read_bytes())
    at = _wav_chunks(bytes(data))[chunk]
    data[at : at + 4] = size.to_bytes(4, "little")
    return bytes(data)


def wav_with_riff_size(size: int, name: str = "kitab.wav") -> bytes:
    """A committed WAV whose RIFF header says the file holds ``size`` bytes (a lie)."""
    data = (DATA / name).read_bytes()
    return data[:4] + size.to_bytes(4, "little") + data[8:]


# ------------------------------------------------------------------------------------------------ MP4 data references
def _replace_box(data: bytes, path: list[bytes], payload: bytes) -> bytes:
    """``data`` (a run of ISO BMFF boxes) with the box at ``path`` given a new payload, its parents' sizes updated."""
    out, pos = bytearray(), 0
    while pos + 8 <= len(data):
        size, kind = int.from_bytes(data[pos : pos + 4], "big"), data[pos + 4 : pos + 8]
        assert size >= 8, "only 32-bit box sizes here"
        body = data[pos + 8 : pos + size]
        if kind == path[0]:
            body = payload if len(path) == 1 else _replace_box(body, path[1:], payload)
        out += (8 + len(body)).to_bytes(4, "big") + kind + body
        pos += size
    return bytes(out)


def _dref(entry: bytes) -> bytes:
    return b"\0\0\0\0" + (1).to_bytes(4, "big") + entry  # version+flags, one entry


def url_entry(url: str) -> bytes:
    """A 'url ' data entry with flags 0: the samples are at ``url``, not in this file (ISO/IEC 14496-12 8.7.2)."""
    body = b"url " + b"\0\0\0\0" + url.encode() + b"\0"
    return (4 + len(body)).to_bytes(4, "big") + body


def alias_entry(path: str) -> bytes:
    """An 'alis' data entry: a Mac alias record whose absolute path (record type 2) names the file holding the
    samples. FFmpeg's mov demuxer parses it (the only kind of external reference it follows) and opens the path
    only with its enable_drefs option, which is off by default and never set here."""
    record = bytearray(150)  # the fixed part FFmpeg skips or reads: volume and file names, levels
    # no volume name: FFmpeg strips a path's leading volume name, so one would make the absolute path relative
    record[50] = min(len(Path(path).name), 63)
    record[51 : 51 + record[50]] = Path(path).name.encode()[:63]
    raw = path.encode()
    padded = raw + b"\0" * (len(raw) & 1)
    record += (2).to_bytes(2, "big") + len(raw).to_bytes(2, "big") + padded  # type 2: absolute path
    record += (0xFFFF).to_bytes(2, "big") + b"\0\0"  # end of records
    body = b"alis" + b"\0\0\0\0" + bytes(record)
    return (4 + len(body)).to_bytes(4, "big") + body


def mp4_with_data_reference(entry: bytes, *, blank_mdat: bool = False) -> bytes:
    """The committed kitab.m4a whose one data reference is ``entry``; ``blank_mdat``: its own sample bytes zeroed, so
    only the referenced file could give the word."""
    data = (DATA / "kitab.m4a").read_bytes()
    if blank_mdat:
        pos = data.index(b"mdat") - 4
        size = int.from_bytes(data[pos : pos + 4], "big")
        data = data[: pos + 8] + bytes(size - 8) + data[pos + size :]
    return _replace_box(data, [b"moov", b"trak", b"mdia", b"minf", b"dinf", b"dref"], _dref(entry))


# ------------------------------------------------------------------------------------------------------ ID3 tags
def _syncsafe(n: int) -> bytes:
    assert n < 1 << 28
    return bytes((n >> shift) & 0x7F for shift in (21, 14, 7, 0))


def id3_tag(frames: bytes, declared: int | None = None) -> bytes:
    """An ID3v2.4 tag around ``frames``; ``declared``: the size its header claims instead of the true one."""
    return b"ID3\x04\x00\x00" + _syncsafe(len(frames) if declared is None else declared) + frames


def id3_frame(frame_id: bytes, body: bytes) -> bytes:
    return frame_id + _syncsafe(len(body)) + b"\0\0" + body


def apic_frame(picture_bytes: int) -> bytes:
    """An attached picture (APIC) of ``picture_bytes`` bytes that claim to be a JPEG."""
    return id3_frame(b"APIC", b"\0image/jpeg\0\x03\0" + b"\xff\xd8" + bytes(picture_bytes - 2))


def txxx_frame(text_bytes: int) -> bytes:
    """A user text frame (TXXX) of ``text_bytes`` of UTF-8 text: a tag FFmpeg and PyAV turn into strings."""
    return id3_frame(b"TXXX", b"\x03note\0" + "ك".encode() * (text_bytes // 2))


def mp3_with_tag(tag: bytes) -> bytes:
    """``tag`` before the committed kitab.mp3 (which has a small ID3 tag of its own: tags in a row)."""
    return tag + (DATA / "kitab.mp3").read_bytes()


# -------------------------------------------------------------------------------------------------- Matroska tracks
def matroska_tracks(count: int) -> bytes:
    """kitab.webm's Opus track first, then ``count - 1`` PCM tracks of one 10-sample packet each."""
    buf = io.BytesIO()
    with av.open(KITAB, "r") as source, av.open(buf, "w", format="matroska") as out:
        first = out.add_stream_from_template(source.streams.audio[0])
        extra = [out.add_stream("pcm_s16le", rate=8_000, layout="mono") for _ in range(count - 1)]
        for stream in extra:
            packet = av.Packet(bytes(20))
            packet.stream, packet.time_base = stream, Fraction(1, 8_000)
            packet.pts = packet.dts = 0
            packet.duration = 10
            out.mux(packet)
        for packet in source.demux(source.streams.audio[0]):
            if packet.size:
                packet.stream = first
                out.mux(packet)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------------ polyglots
def zip_archive() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("readme.txt", "not audio " * 1000)
        archive.writestr("payload.sh", "#!/bin/sh\necho hi\n")
    return buf.getvalue()


def ebml_magic_then_zip() -> bytes:
    """WebM's magic bytes (an EBML element id) followed by a zip archive: sniffed as WebM, read by zip readers."""
    data = b"\x1a\x45\xdf\xa3" + zip_archive()
    assert zipfile.ZipFile(io.BytesIO(data)).namelist() == ["readme.txt", "payload.sh"]
    return data


def webm_then_zip() -> bytes:
    """kitab.webm with a zip archive appended: a valid WebM and, read from its end, a valid zip."""
    data = KITAB.read_bytes() + zip_archive()
    assert zipfile.ZipFile(io.BytesIO(data)).namelist() == ["readme.txt", "payload.sh"]
    return data
