"""Beam search with the word list, Viterbi alignment, and how the worker builds its decoder."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from shared.config import BUNDLED_MODEL_DIR, Settings
from worker.asr import load_model
from worker.decoding import BeamDecoder, Vocabulary, align, postprocess
from worker.lexicon import Lexicon

VOCAB = ["<pad>", "<unk>", "|", "م", "ر", "ح", "ب", "ا", "ى", "ك", "ت"]
M, R, H, B, ALEF, MAQSURA, K, T = range(3, 11)
SPECIAL = frozenset({1})
VOCABULARY = Vocabulary.from_tokens(VOCAB, 0, "|", SPECIAL)


def frames(*rows: dict[int, float]) -> np.ndarray:
    """One frame per dict {label: probability}; the rest of each frame's mass spread over the other labels."""
    out = np.full((len(rows), len(VOCAB)), 1e-4)
    for t, row in enumerate(rows):
        for label, p in row.items():
            out[t, label] = p
        rest = [i for i in range(len(VOCAB)) if i not in row]
        out[t, rest] = (1 - sum(row.values())) / len(rest)
    return np.log(out)


def spelled(*labels: int, peak: float = 0.95) -> list[dict[int, float]]:
    """Each label for one frame, a blank frame after each."""
    out = []
    for label in labels:
        out += [{label: peak}, {0: peak}]
    return out


def decoder(lexicon: Lexicon | None = None, **options) -> BeamDecoder:
    return BeamDecoder.for_vocabulary(VOCABULARY, lexicon=lexicon, **options)


def decode(log_probs: np.ndarray, dec: BeamDecoder | None) -> str:
    return postprocess(log_probs, VOCABULARY, 0.02, decoder=dec).text


# ملحب-like ambiguity: the last letter is ى a little more often than ا; "مرحب" is a listed stem (مرحبا a word)
AMBIGUOUS_END = frames(*spelled(M, R, H, B), {MAQSURA: 0.5, ALEF: 0.45}, {0: 0.95})


def test_without_a_word_list_the_beam_agrees_with_greedy_on_clear_frames():
    lp = frames(*spelled(K, T, ALEF, B), {2: 0.95}, *spelled(K, T, B))
    assert decode(lp, None) == decode(lp, decoder()) == "كتاب كتب"


def test_the_word_list_tips_a_near_homophone_to_the_real_word():
    assert decode(AMBIGUOUS_END, None) == "مرحبى"
    assert decode(AMBIGUOUS_END, decoder()) == "مرحبى"
    assert decode(AMBIGUOUS_END, decoder(Lexicon(["مرحب"]))) == "مرحبا"
    assert decode(AMBIGUOUS_END, decoder(Lexicon(["مرحب"]), oov_penalty=0.0)) == "مرحبى"


def test_a_clearly_spelled_word_outside_the_list_survives():
    lp = frames(*spelled(B, R, K, T, peak=0.99))
    assert decode(lp, decoder(Lexicon(["كتاب", "مرحب"]))) == "بركت"


def test_a_word_the_list_chose_over_a_likelier_spelling_is_less_sure():
    clear = postprocess(frames(*spelled(M, R, H, B, ALEF)), VOCABULARY, 0.02, decoder=decoder(Lexicon(["مرحب"])))
    tipped = postprocess(AMBIGUOUS_END, VOCABULARY, 0.02, decoder=decoder(Lexicon(["مرحب"])))
    assert clear.text == tipped.text == "مرحبا"
    assert tipped.confidence < 0.5 < clear.confidence


def test_doubled_letters_need_a_blank_between_in_the_beam_too():
    held = frames({B: 0.95}, {B: 0.95}, {0: 0.95})
    doubled = frames({B: 0.95}, {0: 0.95}, {B: 0.95})
    assert decode(held, decoder()) == "ب" and decode(doubled, decoder()) == "بب"


def test_words_are_timed_by_the_alignment():
    lp = frames({0: 0.95}, {K: 0.95}, {K: 0.95}, {T: 0.95}, {0: 0.95}, {2: 0.95}, {0: 0.95}, {B: 0.95}, {0: 0.95})
    out = postprocess(lp, VOCABULARY, 0.02, decoder=decoder())
    assert [(w.word, w.start, w.end) for w in out.words] == [("كت", 0.02, 0.08), ("ب", 0.14, 0.16)]


def test_silence_and_no_frames_give_empty_text():
    assert decode(frames({0: 0.95}, {0: 0.95}, {2: 0.6}), decoder(Lexicon(["كتاب"]))) == ""
    assert decode(np.zeros((0, len(VOCAB))), decoder()) == ""


def test_special_tokens_and_columns_past_the_vocabulary_are_never_written():
    lp = np.concatenate([frames(*spelled(K, T)), np.full((4, 2), -50.0)], axis=1)
    lp[1, len(VOCAB)] = 0.0  # an exported model's extra logit column wins one frame
    lp[3, 1] = 0.0  # and <unk> another
    assert decode(lp, decoder()) == "كت"


def test_align_finds_each_labels_frames():
    lp = frames({K: 0.9}, {K: 0.9}, {0: 0.9}, {T: 0.9})
    assert align(lp, [K, T], blank_id=0) == [(0, 2), (3, 4)]
    assert align(lp[:2], [K, K], blank_id=0) == []  # a doubled letter needs a blank between: too few frames
    assert align(lp, [], blank_id=0) == []


def test_beam_shares_sum_to_one_best_first():
    beam = decoder(Lexicon(["مرحب"])).search(AMBIGUOUS_END)
    shares = [share for _, share in beam]
    assert abs(sum(shares) - 1) < 1e-9 and shares == sorted(shares, reverse=True)


def test_arabic_share_of_a_vocabulary():
    assert decoder().arabic_share() == 1.0
    latin = BeamDecoder.for_vocabulary(Vocabulary.from_tokens(["<pad>", "|", "a", "b", "c"], 0, "|"))
    assert latin.arabic_share() == 0.0


# ------------------------------------------------------------------------ the worker's decoder from settings
def test_build_decoder_follows_the_settings(tiny_wav2vec2, tmp_path):
    from worker.model import build_decoder

    model = load_model(str(tiny_wav2vec2))
    assert build_decoder(model, Settings(ASR_BEAM_SIZE=1)) is None
    assert build_decoder(model, Settings(ASR_LEXICON="none")).lexicon is None
    default = build_decoder(model, Settings())
    assert default.lexicon is not None and default.lexicon.is_word("الكتاب") and default.beam_size == 12
    words = tmp_path / "words.txt"
    words.write_text("كتاب\n", encoding="utf-8")
    own = build_decoder(model, Settings(ASR_LEXICON=str(words), ASR_LEXICON_PENALTY=4.0))
    assert own.lexicon.words == ["كتاب"] and own.oov_penalty == 4.0
    with pytest.raises(FileNotFoundError):  # a mistyped path fails the load loudly instead of decoding without it
        build_decoder(model, Settings(ASR_LEXICON=str(tmp_path / "missing.txt")))


def test_a_latin_vocabulary_gets_no_arabic_word_list(caplog):
    from dataclasses import replace

    from worker.model import build_decoder

    model = load_model(str(BUNDLED_MODEL_DIR), backend="torch-fp32")
    tokens = ["[PAD]", "[UNK]", "|"] + list("abcdefghijklmnopqrstuvwxyz")
    vocabulary = model.vocabulary
    latin = replace(model, vocabulary=Vocabulary.from_tokens(tokens, vocabulary.blank_id, "|", vocabulary.skip_ids))
    with caplog.at_level(logging.WARNING, logger="worker.model"):
        dec = build_decoder(latin, Settings())
    assert dec is not None and dec.lexicon is None and "not Arabic" in caplog.text


def test_a_request_vocabulary_boosts_its_words():
    # the audio spells مرحبى a little more than مرحبا; a word list tips it, and so does a course's own vocabulary
    assert decode(AMBIGUOUS_END, decoder().with_hotwords(["مَرْحَبًا"])) == "مرحبا"
    listed = decoder(Lexicon(["مرحب"]))
    assert decode(AMBIGUOUS_END, listed.with_hotwords(["مرحبى"])) == "مرحبى"  # the request's word beats the list's
    clear = frames(*spelled(K, T, ALEF, B, peak=0.99))
    assert decode(clear, decoder().with_hotwords(["مرحبا"])) == "كتاب"  # what the audio clearly says is not forced


def test_a_request_vocabulary_on_real_speech():
    from pathlib import Path

    from worker.pipeline import forward, preprocess
    from worker.pipeline import postprocess as pipeline_postprocess

    data = (Path(__file__).parent / "data" / "madrasa.webm").read_bytes()
    model = load_model(str(BUNDLED_MODEL_DIR), backend="torch-fp32")
    audio = preprocess(data, max_audio_s=30)
    log_probs, _ = forward(model, audio)
    assert pipeline_postprocess(model, audio, log_probs).text == "مدرسة"  # greedy: no decoder on this model
    # مضرسة (not a word) was the beam's runner-up: a vocabulary naming it tips the choice, even for a greedy model
    assert pipeline_postprocess(model, audio, log_probs, vocabulary=["مضرسة"]).text == "مضرسة"
    assert pipeline_postprocess(model, audio, log_probs, vocabulary=["كتاب", "شكرا"]).text == "مدرسة"
