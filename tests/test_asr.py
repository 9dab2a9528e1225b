"""load_model/infer/postprocess on real checkpoints with random weights, saved and reloaded with from_pretrained."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.text import ARABIC_LETTERS
from worker import pipeline
from worker.asr import infer, load_model, select_device
from worker.decoding import Vocabulary, postprocess, word_posterior

VOCAB = ["<pad>", "<unk>", "|", "ك", "ت", "ا", "ب"]
VOCABULARY = Vocabulary.from_tokens(VOCAB, blank_id=0)


def test_wav2vec2_checkpoint_loads_and_runs(tiny_wav2vec2):
    model = load_model(str(tiny_wav2vec2), device=torch.device("cpu"))
    assert model.samples_per_frame == 320  # 20 ms frames at 16 kHz
    assert model.vocabulary.blank_id == 0
    audio = (np.random.default_rng(0).standard_normal(32_000) * 0.1).astype(np.float32)
    transcript = pipeline.postprocess(model, audio, infer(model, audio))
    assert 0.0 <= transcript.confidence <= 1.0
    for word in transcript.words:
        assert 0 <= word.start < word.end <= 2.05


def test_bundled_model_loads_with_auto_classes():
    from shared.config import BUNDLED_MODEL_DIR

    model = load_model(str(BUNDLED_MODEL_DIR))
    assert model.model_type == "wav2vec2-bert"
    assert type(model.runner.model).__name__ == "Wav2Vec2BertForCTC"
    assert set(ARABIC_LETTERS) <= set(model.vocabulary.id_to_token)


def test_load_model_keeps_numpys_blas_to_one_thread(tiny_wav2vec2):
    """In a fresh process (this one has loaded models already): numpy's BLAS starts with a thread per core, and
    load_model leaves it one, so its idle threads do not spin against the inference runtime and the decoder."""
    import json
    import os
    import subprocess
    import sys

    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: BLAS has one thread anyway")
    script = (
        "import json, sys; from threadpoolctl import threadpool_info; import numpy; from worker.asr import load_model\n"
        "blas = lambda: [i['num_threads'] for i in threadpool_info() if i['user_api'] == 'blas']\n"
        "before = blas(); load_model(sys.argv[1]); print(json.dumps([before, blas()]))"
    )
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", script, str(tiny_wav2vec2)], capture_output=True, text=True,
                         check=True, env=env, timeout=120).stdout.splitlines()[-1]  # fmt: skip
    before, after = json.loads(out)
    assert max(before) > 1 and after == [1] * len(before)


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
    log_probs = _log_probs(frames, len(VOCAB))
    out = postprocess(log_probs, VOCABULARY, frame_s=0.02)
    assert out.text == "كتاب با"
    assert [w.word for w in out.words] == ["كتاب", "با"]
    assert out.words[0].start == pytest.approx(0.02) and out.words[0].end == pytest.approx(0.16)
    assert out.words[1].start == pytest.approx(0.20) and out.words[1].end == pytest.approx(0.24)
    # each word is scored on the frames between its neighbours: كتاب on 0..10 (up to ب of the second word)
    assert out.words[0].confidence == pytest.approx(word_posterior(log_probs[0:10], [3, 4, 5, 6], 0, 2), abs=1e-4)
    assert out.words[1].confidence == pytest.approx(word_posterior(log_probs[8:12], [6, 5], 0, 2), abs=1e-4)
    assert out.confidence == min(w.confidence for w in out.words)


def test_postprocess_splits_words_when_the_tokenizer_calls_the_delimiter_special():
    # transformers 5 lists "|" in all_special_ids; it must still separate words, not vanish (it did: every
    # phrase came out as one long word)
    frames = [3, 0, 4, 2, 6, 5]
    vocabulary = Vocabulary.from_tokens(VOCAB, blank_id=0, special_ids=frozenset({1, 2}))
    out = postprocess(_log_probs(frames, len(VOCAB)), vocabulary, frame_s=0.02)
    assert out.text == "كت با"


def test_load_model_keeps_the_word_delimiter_out_of_the_skipped_specials():
    from shared.config import BUNDLED_MODEL_DIR

    model = load_model(str(BUNDLED_MODEL_DIR))
    vocabulary = model.vocabulary
    assert vocabulary.delimiter_id is not None and vocabulary.delimiter_id not in vocabulary.skip_ids
    assert vocabulary.blank_id not in vocabulary.skip_ids


def test_postprocess_ignores_logit_columns_past_the_vocabulary():
    # some checkpoints' heads have more outputs than their tokenizer has tokens
    log_probs = _log_probs([3, 0, len(VOCAB) + 1, 0, 4], len(VOCAB) + 2)
    out = postprocess(log_probs, VOCABULARY, frame_s=0.02)
    assert out.text == "كت" and 0.0 <= out.confidence <= 1.0


def test_postprocess_double_letters_need_a_blank_between():
    out = postprocess(_log_probs([6, 6, 0, 6], len(VOCAB)), VOCABULARY, frame_s=0.02)
    assert out.text == "بب"


def test_word_posterior_sums_every_alignment():
    # two frames, one letter: alignments "a a", "a -", "- a"
    p = np.array([[0.3, 0.7], [0.6, 0.4]])  # columns: blank, a
    expected = 0.7 * 0.4 + 0.7 * 0.6 + 0.3 * 0.4
    assert word_posterior(np.log(p), [1], blank_id=0) == pytest.approx(expected, abs=1e-6)
    # "a a" needs a blank between: impossible in two frames
    assert word_posterior(np.log(p), [1, 1], blank_id=0) == 0.0


def test_word_posterior_counts_the_delimiter_as_silence():
    p = np.array([[0.1, 0.9, 0.0], [0.05, 0.05, 0.9]])  # columns: blank, a, delimiter
    with np.errstate(divide="ignore"):
        log_p = np.log(p)
    assert word_posterior(log_p, [1], blank_id=0, delimiter_id=2) == pytest.approx(
        0.9 * (0.05 + 0.05 + 0.9) + 0.1 * 0.05
    )
    assert word_posterior(log_p, [1], blank_id=0) == pytest.approx(0.9 * 0.1 + 0.1 * 0.05)


def test_postprocess_confident_letters_give_a_confident_word():
    sure = postprocess(_log_probs([3, 0, 4], len(VOCAB), peak=0.99), VOCABULARY, frame_s=0.02)
    unsure = postprocess(_log_probs([3, 0, 4], len(VOCAB), peak=0.5), VOCABULARY, frame_s=0.02)
    assert sure.text == unsure.text == "كت"
    assert 0.9 < sure.confidence <= 1.0
    assert 0.0 < unsure.confidence < 0.5


def test_postprocess_all_blank_is_empty_text():
    out = postprocess(_log_probs([0, 0, 0], len(VOCAB), peak=0.8), VOCABULARY, frame_s=0.02)
    assert out.text == "" and out.words == []
    assert out.confidence == pytest.approx(0.8, abs=1e-3)
    assert postprocess(np.zeros((0, len(VOCAB))), VOCABULARY, frame_s=0.02).text == ""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fp16_matches_cpu_single_and_batched():
    from shared.config import BUNDLED_MODEL_DIR
    from tests.conftest import DATA
    from worker.asr import infer_batch
    from worker.audio import decode

    words = ("marhaba", "shukran", "kitab", "madrasa")
    clips = [decode((DATA / f"{w}.webm").read_bytes(), max_audio_s=30) for w in words]
    cpu = load_model(str(BUNDLED_MODEL_DIR), device=torch.device("cpu"), backend="torch-fp32")
    gpu = load_model(str(BUNDLED_MODEL_DIR), device=select_device(0), backend="auto")
    assert gpu.device.type == "cuda" and gpu.backend == "torch-fp16"
    for clip, batched in zip(clips, infer_batch(gpu, clips), strict=True):
        reference, single = infer(cpu, clip), infer(gpu, clip)
        assert (reference.argmax(1) == single.argmax(1)).mean() >= 0.99
        assert (single.argmax(1) == batched.argmax(1)).mean() >= 0.99
