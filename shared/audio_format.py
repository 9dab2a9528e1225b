"""The containers the service accepts, told by their magic bytes.

The web app refuses anything else at upload (415, nothing stored or queued); the worker forces the FFmpeg demuxer
these name (FFmpeg never probes). One function, so the two cannot disagree.
"""

from __future__ import annotations

UNRECOGNIZED_FORMAT_MESSAGE = "not a recognized audio container (WebM, OGG, MP3, M4A, AAC, WAV, FLAC, AIFF)"


def sniff_container(data: bytes) -> str | None:
    """The container named by ``data``'s magic bytes, or None if it is not one we accept."""
    head = data[:16]
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "webm"  # EBML: WebM or Matroska
    if head[4:8] == b"ftyp":
        return "mp4"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if head[:3] == b"ID3":
        return "mp3"
    if len(head) >= 2 and head[0] == 0xFF:
        if head[1] & 0xF6 == 0xF0:  # ADTS sync word, layer bits 00
            return "aac"
        if head[1] & 0xE0 == 0xE0 and head[1] & 0x06:  # MPEG audio frame sync with a layer set
            return "mp3"
    return None
