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


# ------------------------------------------------------------------------ tashkeel written as labels of their own
FATHA, DAMMA, SHADDA = "\u064e", "\u064f", "\u0651"
MARKED_VOCAB = [*VOCAB, FATHA, DAMMA, SHADDA]
MARKED = Vocabulary.from_tokens(MARKED_VOCAB, 0, "|", SPECIAL)
FA, DA, SH = 11, 12, 13
DELIMITER = 2


def marked_frames(*rows: dict[int, float]) -> np.ndarray:
    """``frames`` over the vocabulary with tashkeel."""
    out = np.full((len(rows), len(MARKED_VOCAB)), 1e-4)
    for t, row in enumerate(rows):
        rest = [i for i in range(len(MARKED_VOCAB)) if i not in row]
        out[t, rest] = (1 - sum(row.values())) / len(rest)
        for label, p in row.items():
            out[t, label] = p
    return np.log(out)


def marked_decoders() -> dict[str, BeamDecoder | None]:
    return {
        "greedy": None,
        "beam": BeamDecoder.for_vocabulary(MARKED),
        "beam + list": BeamDecoder.for_vocabulary(MARKED, lexicon=Lexicon(["كت", "ب"])),
    }


def test_tashkeel_tokens_are_combining_marks():
    from worker.decoding import is_combining_mark

    assert MARKED.mark_ids == {FA, DA, SH}
    assert VOCABULARY.mark_ids == frozenset()
    assert all(is_combining_mark(chr(c)) for c in [*range(0x064B, 0x0660), 0x0670])
    assert not any(is_combining_mark(t) for t in ["", "ا", "|", "<pad>", "ـ", FATHA + "ا"])


@pytest.mark.parametrize("name", ["greedy", "beam", "beam + list"])
def test_a_mark_after_a_word_delimiter_joins_the_word_before_it(name):
    """A production checkpoint's vowel mark emitted after the pause closing its word (كت | َ | ب) used to be a
    word of its own ("كت َ ب"); it belongs to the letter before it."""
    lp = marked_frames(
        *spelled(K, T), {DELIMITER: 0.95}, {FA: 0.95}, {0: 0.95}, {DELIMITER: 0.95}, {0: 0.95}, *spelled(B)
    )
    out = postprocess(lp, MARKED, 0.02, decoder=marked_decoders()[name])
    assert out.text == "كت" + FATHA + " ب"
    assert [w.word for w in out.words] == ["كت" + FATHA, "ب"]
    assert out.words[0].start == 0.0 and out.words[0].end == pytest.approx(0.12)  # through the mark's frame
    assert out.words[1].start == pytest.approx(0.18)
    assert all(0 < w.confidence <= 1 for w in out.words)


@pytest.mark.parametrize("name", ["greedy", "beam", "beam + list"])
def test_a_mark_right_after_the_delimiter_stays_with_the_word_before_and_not_the_next(name):
    lp = marked_frames(*spelled(K, T), {DELIMITER: 0.95}, {DA: 0.95}, *spelled(B, T))
    out = postprocess(lp, MARKED, 0.02, decoder=marked_decoders()[name])
    assert [w.word for w in out.words] == ["كت" + DAMMA, "بت"]


@pytest.mark.parametrize("name", ["greedy", "beam"])
def test_a_mark_with_no_letter_before_it_is_dropped(name):
    lp = marked_frames(*spelled(FA), {DELIMITER: 0.95}, *spelled(K, T))
    out = postprocess(lp, MARKED, 0.02, decoder=marked_decoders()[name])
    assert [w.word for w in out.words] == ["كت"]
    only_marks = marked_frames(*spelled(FA, DA))
    assert postprocess(only_marks, MARKED, 0.02, decoder=marked_decoders()[name]).words == []


@pytest.mark.parametrize("name", ["greedy", "beam"])
def test_marks_inside_a_word_stay_in_place(name):
    lp = marked_frames(*spelled(K, SH, FA, T, DA), {DELIMITER: 0.95}, *spelled(B, FA))
    out = postprocess(lp, MARKED, 0.02, decoder=marked_decoders()[name])
    assert out.text == f"ك{SHADDA}{FATHA}ت{DAMMA} ب{FATHA}"


@pytest.mark.parametrize("name", ["greedy", "beam"])
def test_evaluates_word_list_matches_the_words_with_marks(name):
    """`arabic-words evaluate` zips each transcript's words with ``word_correctness`` (strict): the counts must
    agree, which a lone mark (a word that normalizes to nothing) broke."""
    from arabic_words.metrics import word_correctness

    lp = marked_frames(*spelled(K, T), {DELIMITER: 0.95}, *spelled(FA), {DELIMITER: 0.95}, *spelled(B, DA))
    out = postprocess(lp, MARKED, 0.02, decoder=marked_decoders()[name])
    correct = word_correctness("كت بت", out.text)
    assert len(correct) == len(out.words) == 2
    assert correct == [True, False]


TASHKEEL = [chr(c) for c in range(0x064B, 0x0653)] + ["\u0670"]  # harakat, tanween, shadda, sukun; superscript alef


def save_tiny_wav2vec2_with_tashkeel(path, emit: str = "كت|" + FATHA + DAMMA):
    """``tests.conftest.save_tiny_wav2vec2`` with tashkeel in the vocabulary, as many production Arabic checkpoints
    have; its head is biased so that its random frames are the labels of ``emit`` (letters, the delimiter and marks
    in turn: marks right after a delimiter among them) and seldom anything else."""
    import torch

    from tests.conftest import save_tiny_wav2vec2

    def bias_head(model, vocab: dict[str, int]) -> None:
        with torch.no_grad():  # centre each emitted label's logit over a clip, so that the frames take turns
            model.lm_head.weight.mul_(50)
            model.lm_head.bias.zero_()
            noise = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 32_000)).astype(np.float32)) * 0.1
            mean = model(noise).logits[0].mean(0)
            model.lm_head.bias.fill_(-1e3)
            emitted = [vocab[t] for t in emit]
            model.lm_head.bias[emitted] = -mean[emitted]

    return save_tiny_wav2vec2(path, extra_tokens=tuple(TASHKEEL), adjust=bias_head)


@pytest.fixture(scope="module")
def tashkeel_model(tmp_path_factory):
    return load_model(str(save_tiny_wav2vec2_with_tashkeel(tmp_path_factory.mktemp("tashkeel"))))


def test_a_checkpoint_with_tashkeel_in_its_vocabulary_splits_words_at_letters(tashkeel_model):
    from dataclasses import replace

    from arabic_words.metrics import word_correctness
    from worker.model import build_decoder
    from worker.pipeline import postprocess as pipeline_postprocess

    vocabulary = tashkeel_model.vocabulary
    assert {vocabulary.id_to_token[i] for i in vocabulary.mark_ids} == set(TASHKEEL)
    ids = {token: vocabulary.id_to_token.index(token) for token in ("ك", "ت", "ب", "|", FATHA)}
    n = len(vocabulary.id_to_token)
    rows = [ids["ك"], 0, ids["ت"], ids["|"], ids[FATHA], 0, ids["|"], ids["ب"], 0]
    probs = np.full((len(rows), n), 0.05 / (n - 1))
    probs[np.arange(len(rows)), rows] = 0.95
    audio = np.zeros(len(rows) * 320, np.float32)
    beam = build_decoder(tashkeel_model, Settings())
    assert beam is not None and beam.lexicon is not None  # tashkeel do not stop the Arabic word list applying
    for decoder in (None, beam):
        out = pipeline_postprocess(replace(tashkeel_model, decoder=decoder), audio, np.log(probs))
        assert [w.word for w in out.words] == ["كت" + FATHA, "ب"]
        assert len(word_correctness("كتب ب", out.text)) == len(out.words)


def test_a_tashkeel_checkpoints_own_frames_never_give_a_word_without_a_letter(tashkeel_model):
    """The random checkpoint's forward pass on the fixtures: its frames put marks right after word delimiters
    (counted), and every word still holds a letter, so `evaluate`'s strict zip holds."""
    from pathlib import Path

    from arabic_words.metrics import word_correctness
    from shared.text import normalize_loose
    from tests.conftest import read_transcripts
    from worker.asr import infer
    from worker.audio import decode
    from worker.decoding import greedy_labels
    from worker.pipeline import postprocess as pipeline_postprocess

    vocabulary = tashkeel_model.vocabulary
    data = Path(__file__).parent / "data"
    marks_after_delimiter = 0
    for name, expected in sorted(read_transcripts().items()):
        if not name.endswith(".flac"):
            continue
        audio = decode((data / name).read_bytes(), max_audio_s=30)
        log_probs = infer(tashkeel_model, audio)
        labels = greedy_labels(log_probs, vocabulary.blank_id)
        marks_after_delimiter += sum(
            a == vocabulary.delimiter_id and b in vocabulary.mark_ids for a, b in zip(labels, labels[1:], strict=False)
        )
        out = pipeline_postprocess(tashkeel_model, audio, log_probs)
        assert out.words and all(normalize_loose(w.word) for w in out.words), out.text
        assert len(word_correctness(expected, out.text)) == len(out.words)
    assert marks_after_delimiter >= 5
