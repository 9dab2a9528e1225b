"""Model inputs from audio, faster where transformers' own extractor is slow.

Wav2Vec2-BERT checkpoints (the bundled model among them) take Kaldi-style log-mel filterbanks from
``SeamlessM4TFeatureExtractor``. transformers computes those one 25 ms frame at a time in a Python loop
(``audio_utils.spectrogram``: an ``rfft`` call, a mean and a few slices per 10 ms of audio), which cost 3.5 ms of a
2.2 s clip's ~20 ms in the worker. ``VectorizedFbankExtractor`` is the same extractor with that one step done on all
frames at once, in the same order of operations and precisions (float64, the spectrum rounded to complex64 as
transformers does), so the model's inputs are bit for bit transformers' (``tests/test_features.py``, which would
also catch a transformers release that changes the parent's recipe). Padding, per-mel-bin normalization, stride
stacking and the attention mask are the parent class's, untouched.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from transformers import SeamlessM4TFeatureExtractor

# What SeamlessM4TFeatureExtractor._extract_fbank_features passes to transformers' spectrogram()
_FRAME_LENGTH = 400
_HOP_LENGTH = 160
_FFT_LENGTH = 512
_PREEMPHASIS = 0.97
_MEL_FLOOR = 1.192092955078125e-07
_INT16_SCALE = 2**15  # Kaldi's features are of 16-bit integer samples


class VectorizedFbankExtractor(SeamlessM4TFeatureExtractor):
    """``SeamlessM4TFeatureExtractor`` whose filterbank step is vectorized over frames."""

    def _extract_fbank_features(self, waveform: np.ndarray) -> np.ndarray:
        if waveform.ndim == 2:  # as the parent: the left channel of a stereo input
            waveform = waveform[0]
        samples = np.squeeze(waveform).astype(np.float64) * _INT16_SCALE  # exact either way: a power of two
        if len(samples) < _FRAME_LENGTH:  # no whole frame: let the parent say what it says about that
            return super()._extract_fbank_features(waveform)
        frames = sliding_window_view(samples, _FRAME_LENGTH)[::_HOP_LENGTH]
        frames = frames - frames.mean(axis=1, keepdims=True)  # remove_dc_offset, per frame
        emphasized = np.empty_like(frames)  # pre-emphasis, written into one buffer (temporaries cost 3x the time)
        np.multiply(frames[:, :-1], _PREEMPHASIS, out=emphasized[:, 1:])
        np.subtract(frames[:, 1:], emphasized[:, 1:], out=emphasized[:, 1:])
        emphasized[:, 0] = frames[:, 0] * (1 - _PREEMPHASIS)
        emphasized *= self.window.astype(np.float64)
        spectrum = np.fft.rfft(emphasized, n=_FFT_LENGTH, axis=1).astype(np.complex64)  # the parent's precision
        power = np.abs(spectrum, dtype=np.float64) ** 2
        # (mel bins, frames) transposed, as the parent returns it: the per-mel-bin mean and variance that follow sum
        # in memory order, so the same layout gives the same float32 rounding
        mel = np.maximum(_MEL_FLOOR, self.mel_filters.T @ power.T)
        return np.log(mel).astype(np.float32).T


def fast_feature_extractor(extractor: Any) -> Any:
    """``extractor``'s vectorized equivalent where there is one (same settings), else ``extractor`` itself."""
    if type(extractor) is SeamlessM4TFeatureExtractor:
        return VectorizedFbankExtractor(**extractor.to_dict())
    return extractor
