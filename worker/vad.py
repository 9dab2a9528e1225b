"""Voice activity detection before the model: trim leading and trailing non-speech, or find that there is no speech.

A learner's recording is mostly silence or room noise around one word (0.5-1.5 s either side of it), and the model's
time grows with the clip's length; the bundled model also transcribes worse with long silences around a word (its
features are normalized over the whole clip). ``SpeechDetector.speech_span`` finds the first and last 30 ms frame
that WebRTC's voice activity detector (the C library in the ``webrtcvad-wheels`` package) calls speech and widens
that stretch by a margin on both sides; the pipeline runs the model on that stretch only, and fails a clip in which
no frame is speech as ``silent`` without running the model. Pauses between words are never cut: only the two ends.
Measurements, and why WebRTC's detector rather than Silero's: docs/design.md (*Skipping silence*).

What makes it safe on any recording (when in doubt, audio is kept):

- Level: WebRTC's detector judges by energy as well as spectrum, and missed a word recorded 55 dB too quietly (the
  model, which normalizes its input, still read it). Each clip is scaled so that its 95th-percentile 30 ms frame is
  at ``LEVEL_DBFS`` before the detector sees it (the percentile, not the loudest frame, so that one click cannot
  leave quiet speech quiet).
- Sounds it does not know: WebRTC's detector models voiced speech, and called some whispered held-out words (espeak's
  ``whisper`` voice) no speech at all. A frame whose pre-emphasized energy is ``ABOVE_FLOOR_DB`` over the clip's
  background (its 10th-percentile frame) counts as speech too, whatever the detector says: only a clip of steady
  background is ever ``silent``.
- Warm-up: the detector adapts a noise model as it goes, starting from fixed values, so on plain noise its first
  ~100 ms are speech. Each clip goes through it twice; the first pass only lets the noise model settle on this clip's
  background. The jump from the clip's end back to its start, and an AAC encoder's last frame, can still make a run
  of one to three speech frames at an edge: beside other speech such a run is dropped (``_without_edge_blips``).
- Small trims: an end with less than ``MIN_TRIM_S`` to remove is left whole.

A detector per call: nothing carries over from one clip to the next, and threads may share a ``SpeechDetector``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import webrtcvad

from worker.audio import SAMPLE_RATE

FRAME_MS = 30  # WebRTC's detector takes 10, 20 or 30 ms frames; 30 ms judges from the most audio
_FRAME = SAMPLE_RATE * FRAME_MS // 1000
# 0 (least aggressive) .. 3: how readily a frame is called non-speech; 1-3 compared on held-out clips under noise in
# docs/design.md.
AGGRESSIVENESS = 2
DEFAULT_MARGIN_S = 0.25  # VAD_MARGIN_S's default
# An end with less non-speech than this past the margin is left as it is: the time saved would be small, and the
# model's transcript moves with any small change at either end of its input (on the held-out clips, which are tight,
# trimming their median 65 ms of trailing non-speech changed 36 transcripts of 800; cutting or appending 65 ms of
# silence changed 37 and 45).
MIN_TRIM_S = 0.25
EDGE_BLIP_FRAMES = 3  # at most this many speech frames at an edge, beside other speech, are not speech
# The level the detector hears every clip at: its 95th-percentile 30 ms frame (RMS, dBFS). Plain noise at this level
# is not speech to it; white noise at -20 dBFS is.
LEVEL_DBFS = -30.0
LEVEL_PERCENTILE = 95.0
# A frame this much louder than the background (dB, after pre-emphasis: a room's low rumble hardly counts, consonants
# do) is speech whatever the detector says. Steady noise varies far less from frame to frame (white: under 1 dB).
ABOVE_FLOOR_DB = 6.0
FLOOR_PERCENTILE = 10.0  # the background: this percentile of the clip's frames (digital silence left out)
PRE_EMPHASIS = 0.97


@dataclass(frozen=True)
class SpeechDetector:
    """Where the speech in a 16 kHz mono clip is, widened by ``margin_s`` on each side. Stateless: safe to share.
    ``level_dbfs`` None: the detector hears the clip at its own level."""

    margin_s: float = DEFAULT_MARGIN_S
    aggressiveness: int = AGGRESSIVENESS
    level_dbfs: float | None = LEVEL_DBFS
    level_percentile: float = LEVEL_PERCENTILE
    above_floor_db: float | None = ABOVE_FLOOR_DB

    def speech_frames(self, audio: np.ndarray) -> np.ndarray:
        """One bool per whole 30 ms frame of ``audio``: speech to WebRTC's detector (less runs at the edges that
        ``_without_edge_blips`` drops), or at least ``ABOVE_FLOOR_DB`` louder than the clip's background."""
        n_frames = len(audio) // _FRAME
        frames = audio[: n_frames * _FRAME].reshape(n_frames, _FRAME)
        rms = np.sqrt(np.mean(np.square(frames), axis=1))
        sounding = rms[rms > 0]  # digital silence says nothing about the recording's level or its background
        if not len(sounding):
            return np.zeros(n_frames, dtype=bool)
        gain = 32767.0
        if self.level_dbfs is not None:
            gain *= 10 ** (self.level_dbfs / 20) / float(np.percentile(sounding, self.level_percentile))
        voiced = _without_edge_blips(_webrtc_frames(frames, gain, self.aggressiveness))
        if self.above_floor_db is None:
            return voiced
        # energy above the background, pre-emphasized (speech's consonants count, a room's rumble hardly)
        emphasized = np.sqrt(np.mean(np.square(frames[:, 1:] - PRE_EMPHASIS * frames[:, :-1]), axis=1))
        floor = float(np.percentile(emphasized[rms > 0], FLOOR_PERCENTILE))
        return voiced | (emphasized >= floor * 10 ** (self.above_floor_db / 20))

    def speech_span(self, audio: np.ndarray) -> tuple[int, int] | None:
        """``(start, end)``: the samples from the first speech frame to the end of the last, widened by the margin
        (within the clip), with an end that would lose less than ``MIN_TRIM_S`` left whole; None when no frame is
        speech. A clip shorter than a frame cannot be judged: all of it."""
        if len(audio) < _FRAME:
            return 0, len(audio)
        speech = np.flatnonzero(self.speech_frames(audio))
        if not len(speech):
            return None
        margin = round(self.margin_s * SAMPLE_RATE)
        min_trim = round(MIN_TRIM_S * SAMPLE_RATE)
        start = int(speech[0]) * _FRAME - margin
        end = (int(speech[-1]) + 1) * _FRAME + margin
        # (the samples after the last whole frame were never judged: they go only with a trimmed end)
        return (start if start >= min_trim else 0), (end if end <= len(audio) - min_trim else len(audio))


def _webrtc_frames(frames: np.ndarray, gain: float, aggressiveness: int) -> np.ndarray:
    """WebRTC's verdict on each (n, 480) frame scaled by ``gain`` to int16: speech or not, from the second of two
    passes (the first lets its noise model settle on this clip's background)."""
    pcm = np.clip(frames * np.float32(gain), -32768.0, 32767.0).astype(np.int16)
    chunks = [row.tobytes() for row in pcm]
    vad = webrtcvad.Vad(aggressiveness)
    for chunk in chunks:
        vad.is_speech(chunk, SAMPLE_RATE)
    return np.fromiter((vad.is_speech(chunk, SAMPLE_RATE) for chunk in chunks), dtype=bool, count=len(chunks))


def _without_edge_blips(speech: np.ndarray) -> np.ndarray:
    """``speech`` without a run of at most ``EDGE_BLIP_FRAMES`` speech frames that touches the clip's first or last
    frame, where there is other speech: the detector's first frames after its first pass (the jump from the clip's
    end back to its start), or a codec's last frame (AAC's). Alone, such a run stays speech."""
    runs = np.flatnonzero(np.diff(np.concatenate([[False], speech, [False]]).astype(np.int8)))
    starts, ends = runs[::2], runs[1::2]
    if len(starts) < 2:
        return speech
    kept = speech.copy()
    if starts[0] == 0 and ends[0] <= EDGE_BLIP_FRAMES:
        kept[: ends[0]] = False
    if ends[-1] == len(speech) and ends[-1] - starts[-1] <= EDGE_BLIP_FRAMES:
        kept[starts[-1] :] = False
    return kept if kept.any() else speech
