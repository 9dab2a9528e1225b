"""load_model/infer/postprocess on real checkpoints with random weights, saved and reloaded with from_pretrained."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.text import ARABIC_LETTERS
from worker.asr import load_model, postprocess, select_device, transcribe_audio

VOCAB = ["<pad>", "<unk>", "|", "ك", "ت", "ا", "ب"]


def test_wav2vec2_checkpoint_loads_and_runs(tiny_wav2vec2):
    model = load_model(str(tiny_wav2vec2), device=torch.device("cpu"))
    assert model.samples_per_frame == 320  # 20 ms frames at 16 kHz
    assert model.blank_id == 0
    audio = (np.random.default_rng(0).standard_normal(32_000) * 0.1).astype(np.float32)
    transcript = transcribe_audio(model, audio)
    assert 0.0 <= transcript.confidence <= 1.0
    for word in transcript.words:
        assert 0 <= word.start < word.end <= 2.05


def test_bundled_model_loads_with_auto_classes():
    from shared.config import BUNDLED_MODEL_DIR

    model = load_model(str(BUNDLED_MODEL_DIR))
    assert model.model_type == "wav2vec2-bert"
    assert type(model.runner.model).__name__ == "Wav2Vec2BertForCTC"
    assert set(ARABIC_LETTERS) <= set(model.id_to_token)


def test_select_device_without_gpu():
    if torch.cuda.is_available():
        assert select_device(3).index == 3 % torch.cuda.device_count()
    else:
        assert select_device(3) == torch.device("cpu")


def _log_probs(frames: list[int], vocab_size: int, peak: float = 0.9) -> np.ndarray:
    probs = np.full((len(frames), vocab_size), (1 - peak) / (vocab_size - 1))
    probs[np.arange(len(frames)), frames] = peak
    return np.log(probs)


def test_postprocess_collapses_repeats_and_splits_words():
    # frames: blank, ك ك, blank, ت, ا, blank, ب, |, blank, ب, ا   (20 ms each)
    frames = [0, 3, 3, 0, 4, 5, 0, 6, 2, 0, 6, 5]
    out = postprocess(_log_probs(frames, len(VOCAB)), VOCAB, blank_id=0, frame_s=0.02)
    assert out.text == "كتاب با"
    assert [w.word for w in out.words] == ["كتاب", "با"]
    assert out.words[0].start == pytest.approx(0.02) and out.words[0].end == pytest.approx(0.16)
    assert out.words[1].start == pytest.approx(0.20) and out.words[1].end == pytest.approx(0.24)
    assert out.words[1].confidence == pytest.approx(0.9**2, abs=1e-4)
    assert out.confidence == pytest.approx(0.9**4, abs=1e-4)  # the weakest word: four letters at 0.9


def test_postprocess_double_letters_need_a_blank_between():
    out = postprocess(_log_probs([6, 6, 0, 6], len(VOCAB)), VOCAB, blank_id=0, frame_s=0.02)
    assert out.text == "بب"


def test_postprocess_word_confidence_is_the_product_of_its_letters():
    log_probs = _log_probs([3, 0, 4], len(VOCAB))
    log_probs[2] = np.log(np.full(len(VOCAB), 0.1))
    log_probs[2, 4] = np.log(0.4)
    out = postprocess(log_probs, VOCAB, blank_id=0, frame_s=0.02)
    assert out.text == "كت"
    assert out.words[0].confidence == pytest.approx(0.9 * 0.4, abs=1e-3)


def test_postprocess_all_blank_is_empty_text():
    out = postprocess(_log_probs([0, 0, 0], len(VOCAB), peak=0.8), VOCAB, blank_id=0, frame_s=0.02)
    assert out.text == "" and out.words == []
    assert out.confidence == pytest.approx(0.8, abs=1e-3)
    assert postprocess(np.zeros((0, len(VOCAB))), VOCAB, blank_id=0, frame_s=0.02).text == ""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fp16_matches_cpu_single_and_batched():
    from shared.config import BUNDLED_MODEL_DIR
    from tests.conftest import DATA
    from worker.asr import infer, infer_batch
    from worker.audio import decode

    clips = [decode((DATA / f"{w}.webm").read_bytes()) for w in ("marhaba", "shukran", "kitab", "madrasa")]
    cpu = load_model(str(BUNDLED_MODEL_DIR), device=torch.device("cpu"), backend="torch-fp32")
    gpu = load_model(str(BUNDLED_MODEL_DIR), device=select_device(0), backend="auto")
    assert gpu.device.type == "cuda" and gpu.backend == "torch-fp16"
    for clip, batched in zip(clips, infer_batch(gpu, clips), strict=True):
        reference, single = infer(cpu, clip), infer(gpu, clip)
        assert (reference.argmax(1) == single.argmax(1)).mean() >= 0.99
        assert (single.argmax(1) == batched.argmax(1)).mean() >= 0.99
