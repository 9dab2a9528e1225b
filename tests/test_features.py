"""The vectorized filterbank extractor gives the very model inputs transformers' own extractor gives."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoProcessor, SeamlessM4TFeatureExtractor, Wav2Vec2FeatureExtractor

from shared.config import BUNDLED_MODEL_DIR
from tests.conftest import DATA
from worker.asr import load_model
from worker.audio import decode
from worker.features import VectorizedFbankExtractor, fast_feature_extractor


@pytest.fixture(scope="module")
def extractors() -> tuple[SeamlessM4TFeatureExtractor, VectorizedFbankExtractor]:
    reference = AutoProcessor.from_pretrained(BUNDLED_MODEL_DIR).feature_extractor
    assert type(reference) is SeamlessM4TFeatureExtractor
    fast = fast_feature_extractor(reference)
    assert isinstance(fast, VectorizedFbankExtractor)
    return reference, fast


def _inputs(extractor, audios: list[np.ndarray]) -> dict[str, np.ndarray]:
    out = extractor(audios, sampling_rate=16_000, return_tensors="np", padding=True, return_attention_mask=True)
    return {k: np.asarray(v) for k, v in out.items()}


def _assert_same(reference, fast, audios: list[np.ndarray]) -> None:
    expected, got = _inputs(reference, audios), _inputs(fast, audios)
    assert expected.keys() == got.keys()
    for key in expected:
        assert expected[key].shape == got[key].shape, key
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)  # bit for bit, not nearly


def test_recordings_give_bit_identical_model_inputs(extractors):
    reference, fast = extractors
    for name in ("marhaba.webm", "kitab.mp3", "sabah_alkhayr.wav"):
        _assert_same(reference, fast, [decode((DATA / name).read_bytes(), max_audio_s=30)])


def test_edge_lengths_batches_stereo_and_loud_input_match(extractors):
    reference, fast = extractors
    rng = np.random.default_rng(3)
    # shorter than a frame, one frame, one frame and a hop, a hop short of two, a padded batch of different lengths
    for n in (399, 400, 560, 719, 16_000):
        _assert_same(reference, fast, [rng.uniform(-1, 1, n).astype(np.float32)])
    _assert_same(reference, fast, [rng.uniform(-0.1, 0.1, n).astype(np.float32) for n in (8_000, 35_200, 12_345)])
    _assert_same(reference, fast, [np.zeros(8_000, np.float32)])  # digital silence: every bin at the floor
    clipped = np.clip(rng.standard_normal(20_000) * 4, -1, 1).astype(np.float32)
    _assert_same(reference, fast, [clipped])
    stereo = rng.uniform(-0.5, 0.5, (2, 9_000)).astype(np.float32)  # the parent reads the left channel
    np.testing.assert_array_equal(fast._extract_fbank_features(stereo), reference._extract_fbank_features(stereo))


def test_other_extractors_are_left_as_they_are():
    raw = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16_000)
    assert fast_feature_extractor(raw) is raw


def test_the_bundled_model_loads_with_the_vectorized_extractor():
    loaded = load_model(str(BUNDLED_MODEL_DIR), backend="torch-fp32", threads=1)
    assert isinstance(loaded.feature_extractor, VectorizedFbankExtractor)
