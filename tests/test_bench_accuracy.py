"""bench.accuracy's measures and bench.peaked's head training (on a tiny random wav2vec2 and the fixture words)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench import accuracy, peaked
from tests.conftest import DATA, save_tiny_wav2vec2
from worker.backends import Backend


def scores(labels: list[int], vocab: int = 4, peak: float = 5.0) -> np.ndarray:
    """(frames, vocab) log-posteriors whose argmax is ``labels``."""
    logits = np.zeros((len(labels), vocab), np.float32)
    logits[np.arange(len(labels)), labels] = peak
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def test_agreement_is_the_mean_over_clips_of_the_frame_share():
    reference = [scores([0, 1, 2, 3]), scores([1, 1])]
    candidate = [scores([0, 1, 2, 0]), scores([1, 1])]
    assert accuracy.clip_agreements(reference, candidate) == [0.75, 1.0]
    assert accuracy.mean_agreement(reference, candidate) == pytest.approx(0.875)
    assert accuracy.mean_agreement([], []) == 1.0


def test_identical_share_counts_exact_transcripts():
    assert accuracy.identical_share(["كتاب", "مرحبا", "شكرا"], ["كتاب", "مرحب", "شكرا"]) == pytest.approx(2 / 3)
    assert accuracy.identical_share([], []) == 1.0


def test_cer_change_is_candidate_minus_baseline_on_loosely_normalized_text():
    references = ["كتاب", "مدرسة"]  # 9 letters
    baseline = ["كتاب", "مدرسه"]  # ة/ه: no error under loose normalization
    candidate = ["كتب", "مدرسة"]  # one letter missing
    assert accuracy.cer(references, baseline) == 0.0
    assert accuracy.cer_change(references, baseline, candidate) == pytest.approx(1 / 9)
    assert accuracy.cer_change(references, candidate, baseline) == pytest.approx(-1 / 9)


def test_peakedness_and_close_frames_tell_flat_from_peaked_posteriors():
    flat = [np.log(np.full((10, 4), 0.25, np.float32))]
    sharp = [scores([0, 1, 2, 3, 0], peak=10.0)]
    assert accuracy.peakedness(flat) == pytest.approx(0.25)
    assert accuracy.peakedness(sharp) > 0.99
    assert accuracy.margin_share(flat) == 1.0
    assert accuracy.margin_share(sharp) == 0.0


def fixture_clips() -> tuple[list[np.ndarray], list[str]]:
    from worker.audio import decode

    rows = [line.split("\t") for line in (DATA / "transcripts.tsv").read_text(encoding="utf-8").splitlines()]
    rows = [(name, text) for name, text in rows if name.endswith(".wav") and name != "page-voice.wav"]
    return [decode((DATA / name).read_bytes(), max_audio_s=30) for name, _ in rows], [text for _, text in rows]


def test_training_the_head_on_frozen_random_states_lowers_the_loss_and_peaks_the_posteriors(tmp_path):
    from transformers import AutoProcessor, Wav2Vec2ForCTC

    path = save_tiny_wav2vec2(tmp_path / "tiny")
    processor = AutoProcessor.from_pretrained(path)
    model = Wav2Vec2ForCTC.from_pretrained(path).eval()
    audios, texts = fixture_clips()
    assert len(audios) >= 4
    labels = peaked.label_ids(processor.tokenizer, texts)
    states = peaked.encoder_states(model, processor.feature_extractor, audios, mask_safe=True)
    blank = model.config.pad_token_id
    with torch.no_grad():
        before = peaked.head_loss(model.lm_head, states, labels, blank).item()
    peak_before = peaked.median_peak(model.lm_head, states)
    torch.manual_seed(0)
    history = peaked.train_head(model.lm_head, states, labels, blank, epochs=60, batch=4, lr=1e-2)
    with torch.no_grad():
        after = peaked.head_loss(model.lm_head, states, labels, blank).item()
    assert after < before / 2, (before, history[-5:])
    assert peaked.median_peak(model.lm_head, states) > max(0.5, peak_before + 0.3)


def test_build_saves_a_loadable_checkpoint_with_its_training_report(tmp_path):
    """The whole build on a tiny checkpoint and a tiny training shard: what bench.accuracy then loads."""
    from worker.asr import infer, load_model

    source = save_tiny_wav2vec2(tmp_path / "tiny")
    audios, texts = fixture_clips()
    data = tmp_path / "data"
    data.mkdir()
    np.savez(data / "train-000.npz", pcm=(np.concatenate(audios) * 32767).astype(np.int16),
             lengths=np.array([len(a) for a in audios]), texts=np.array(texts))  # fmt: skip
    cache = tmp_path / "states.npz"
    report = peaked.build("tiny", data, clips=len(audios), epochs=20, source=source, out=tmp_path / "peaked",
                          states_cache=cache)  # fmt: skip
    assert report["mode"] == "head" and report["clips"] + report["held_back_clips"] == len(audios)
    assert report["head_loss"][1] < report["head_loss"][0]
    assert cache.exists() and (tmp_path / "peaked" / "training.json").exists()
    again = peaked.build("tiny", data, clips=len(audios), epochs=1, source=source, out=tmp_path / "again",
                         states_cache=cache)  # fmt: skip
    assert again["states_cached"]
    model = load_model(str(tmp_path / "peaked"), cache_dir=tmp_path / "cache")
    log_probs = infer(model, audios[0])
    assert log_probs.shape[0] > 10 and np.isfinite(log_probs).all()


def test_letter_agreement_leaves_out_the_frames_where_the_reference_emits_the_blank():
    reference = [scores([0, 0, 1, 0, 2, 0])]  # blank 0; letters on 2 frames
    candidate = [scores([1, 0, 1, 0, 3, 0])]  # a blank frame flipped, one letter frame flipped
    assert accuracy.letter_agreement(reference, candidate, blank_id=0) == 0.5
    assert accuracy.mean_agreement(reference, candidate) == pytest.approx(4 / 6)
    assert accuracy.letter_agreement([scores([0, 0])], [scores([1, 1])], blank_id=0) == 1.0


def test_compare_reports_every_backend_against_fp32_and_prints_a_row_each(tmp_path):
    path = save_tiny_wav2vec2(tmp_path / "tiny")
    audios, texts = fixture_clips()
    sets = {"fixtures": [(f"clip{i}", text, audio) for i, (audio, text) in enumerate(zip(audios, texts, strict=True))]}
    report = accuracy.compare(path, sets, [Backend.TORCH_INT8], threads=1, cache_dir=tmp_path / "cache")
    rows = report["sets"]["fixtures"]["backends"]
    assert list(rows) == ["torch-fp32", "torch-int8"]
    assert rows["torch-fp32"]["agreement"] == 1.0 and rows["torch-fp32"]["cer_change_pp"] == 0.0
    assert 0.0 <= rows["torch-int8"]["letter_agreement"] <= 1.0
    assert report["sets"]["fixtures"]["fp32_peaked"] < 0.5  # random weights: flat posteriors
    table = accuracy.table([report])
    assert table.count("| tiny | fixtures (") == 2


def test_full_fine_tuning_runs_after_the_head_and_lowers_the_loss(tmp_path):
    """--full (meant for a GPU) on the CPU with a tiny checkpoint: the head first, then every weight but the
    convolutional feature encoder."""
    from transformers import AutoProcessor, Wav2Vec2ForCTC

    source = save_tiny_wav2vec2(tmp_path / "tiny")
    processor = AutoProcessor.from_pretrained(source)
    model = Wav2Vec2ForCTC.from_pretrained(source)
    audios, texts = fixture_clips()
    labels = peaked.label_ids(processor.tokenizer, texts)
    conv = model.wav2vec2.feature_extractor.conv_layers[0].conv.weight.detach().clone()
    torch.manual_seed(0)
    losses = peaked.train_full(model, processor.feature_extractor, audios, labels, True, steps=30, batch=4, lr=3e-3)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert torch.equal(model.wav2vec2.feature_extractor.conv_layers[0].conv.weight, conv)  # frozen
    assert not model.training
