"""CTC decoding, pure code: (frames, vocab) log-posteriors -> a ``Transcript`` (text, confidence, word times).

Greedy (best path) decoding spells each word letter by letter from the single best frame labels. The beam search
(``BeamDecoder``) keeps the ``beam_size`` most probable label sequences, summing every alignment of each, and adds
``-oov_penalty`` (natural log) for every word that is not in the lexicon: a spelling the audio supports only a
little better than a real word's (مرحبى vs مرحبا, homophones in synthetic speech) gives way, while a word the
audio clearly spells survives even if the dictionary lacks it; its words are timed by Viterbi alignment (``align``).
Why not a library: pyctcdecode pins numpy < 2, and flashlight-text's lexicon decoder cannot emit a word outside its
lexicon.

Confidence: a word's is its CTC posterior: the probability, summed over every alignment, that the stretch of
audio between its neighbouring words spells exactly this word (``word_posterior``); the transcript's is the
lowest of its words'. With no words, it is the mean blank posterior (sure that nothing was said). All in [0, 1].
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np
import torch

from shared.schema import WordTiming
from shared.text import is_model_text, normalize_arabic
from worker.lexicon import Lexicon


@dataclass(frozen=True)
class Vocabulary:
    """A CTC model's labels: built once when the model loads, shared by greedy decoding and the beam search."""

    id_to_token: tuple[str, ...]
    blank_id: int
    delimiter_id: int | None  # the word delimiter's label; None when the vocabulary has none
    skip_ids: frozenset[int]  # labels that write nothing ([UNK], <s>, unused ids); never the blank or the delimiter
    # combining marks written as labels of their own (tashkeel in many production Arabic vocabularies): they belong
    # to the letter before them, so they never start a word (``is_combining_mark``)
    mark_ids: frozenset[int] = frozenset()

    @classmethod
    def from_tokens(
        cls, id_to_token: Iterable[str], blank_id: int, delimiter: str = "|", special_ids: Iterable[int] = ()
    ) -> Vocabulary:
        """``id_to_token`` ("" for unused ids), the blank's id, the word delimiter's token and the tokenizer's
        special ids. The delimiter is a label the model emits even where the tokenizer lists it as special
        (transformers 5 does)."""
        tokens = tuple(id_to_token)
        delimiter_id = tokens.index(delimiter) if delimiter in tokens else None
        unused = {i for i, token in enumerate(tokens) if not token}
        skip = (frozenset(special_ids) | unused) - {blank_id, delimiter_id}
        marks = {i for i, token in enumerate(tokens) if is_combining_mark(token)} - skip - {blank_id, delimiter_id}
        return cls(tokens, blank_id, delimiter_id, skip, frozenset(marks))

    def token(self, label: int) -> str:
        """The label's token; "" for a logit column past the vocabulary (some checkpoints' heads have more)."""
        return self.id_to_token[label] if label < len(self.id_to_token) else ""


def is_combining_mark(token: str) -> bool:
    """A token of nonspacing combining marks only (Unicode Mn): Arabic tashkeel U+064B-U+065F, the superscript
    alef U+0670, Quranic marks. Written after the letter they mark, never as a word of their own."""
    return bool(token) and all(unicodedata.category(ch) == "Mn" for ch in token)


@dataclass(frozen=True)
class Transcript:
    text: str
    confidence: float
    words: list[WordTiming]


def postprocess(
    log_probs: np.ndarray, vocabulary: Vocabulary, frame_s: float, decoder: BeamDecoder | None = None
) -> Transcript:
    """CTC decoding of (frames, vocab) log-posteriors into text, confidence and word timings: greedy (best path)
    without a ``decoder``, else its beam search, timed by Viterbi alignment. ``frame_s``: seconds per frame.

    A word's confidence is ``word_posterior`` over the frames from the end of the word before it to the start of
    the word after it: all the ways the audio there could spell this word, not only the best path. On the bundled
    model's evaluation sets it ranks right vs wrong words better than the product of the letters' mean posteriors
    (AUROC 0.82 vs 0.74 held-out, 0.77 vs 0.63 training voices). With a beam it is multiplied by the share of
    the beam's probability whose hypotheses have this word in this place: a word the word list chose over a
    likelier spelling is less sure (held-out AUROC 0.82 with the bundled list, 0.78 without this factor). The
    transcript's is its weakest word's."""
    if log_probs.shape[0] == 0:
        return Transcript("", 0.0, [])
    blank_id, delimiter_id = vocabulary.blank_id, vocabulary.delimiter_id
    agreement: list[float] | None = None
    if decoder is None:
        spans = _greedy_words(log_probs, vocabulary)
    else:
        beam = decoder.search(log_probs)
        marks = vocabulary.mark_ids
        spans = _aligned_words(log_probs, beam[0][0], blank_id, delimiter_id, marks)
        agreement = _beam_agreement([labels for _, _, labels in spans], beam, delimiter_id, marks)

    words = []
    for k, (start, end, word_labels) in enumerate(spans):
        context_start = spans[k - 1][1] if k > 0 else 0
        context_end = spans[k + 1][0] if k + 1 < len(spans) else log_probs.shape[0]
        posterior = word_posterior(log_probs[context_start:context_end], word_labels, blank_id, delimiter_id)
        if agreement is not None:
            posterior *= agreement[k]
        words.append(
            WordTiming(
                word="".join(vocabulary.id_to_token[label] for label in word_labels),
                start=round(start * frame_s, 3),
                end=round(end * frame_s, 3),
                confidence=round(posterior, 4),
            )
        )
    confidence = min(w.confidence for w in words) if words else float(np.exp(log_probs[:, blank_id]).mean())
    return Transcript(" ".join(w.word for w in words), round(float(confidence), 4), words)


def word_posterior(log_probs: np.ndarray, labels: list[int], blank_id: int, delimiter_id: int | None = None) -> float:
    """P(the frames spell exactly ``labels``): the CTC forward sum over every alignment of ``labels`` to
    ``log_probs`` (frames, vocab), with the word delimiter counted as silence (its mass joins the blank's)."""
    if not labels:
        return 0.0
    frames = torch.from_numpy(np.ascontiguousarray(log_probs, dtype=np.float32))
    if delimiter_id is not None and delimiter_id != blank_id:
        frames = frames.clone()
        frames[:, blank_id] = torch.logaddexp(frames[:, blank_id], frames[:, delimiter_id])
        frames[:, delimiter_id] = -float("inf")
    nll = torch.nn.functional.ctc_loss(
        frames[:, None, :],
        torch.tensor([labels]),
        torch.tensor([frames.shape[0]]),
        torch.tensor([len(labels)]),
        blank=blank_id,
        reduction="sum",
    )
    return float(torch.exp(-nll))  # too few frames for the labels: nll is inf, the posterior 0


# -- greedy (best path) -------------------------------------------------------------------------------------------


def best_path(scores: np.ndarray) -> list[tuple[int, int, int]]:
    """The best label of each frame of ``scores`` (frames, vocab; log-posteriors or logits), as runs of one label:
    (label, first frame, end frame)."""
    best = scores.argmax(axis=-1)
    if len(best) == 0:
        return []
    change = np.flatnonzero(np.diff(best)) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [len(best)]])
    return [(int(best[s]), int(s), int(e)) for s, e in zip(starts, ends, strict=True)]


def greedy_labels(scores: np.ndarray, blank_id: int) -> list[int]:
    """The greedy CTC label sequence (repeats collapsed, blanks dropped): equal labels, equal transcript."""
    return [label for label, _, _ in best_path(scores) if label != blank_id]


def _greedy_words(log_probs: np.ndarray, vocabulary: Vocabulary) -> list[tuple[int, int, list[int]]]:
    """Best-path decoding: each word's first frame, end frame and labels. A combining mark where no word has begun
    (after a delimiter: a production checkpoint may emit a word's last vowel mark after the pause) joins the word
    before it; with no word before it, it is dropped."""
    blank_id, delimiter_id, skip_ids = vocabulary.blank_id, vocabulary.delimiter_id, vocabulary.skip_ids
    spans: list[tuple[int, int, list[int]]] = []
    labels: list[int] = []
    word_start = word_end = 0

    def close_word() -> None:
        if labels:
            spans.append((word_start, word_end, labels.copy()))
        labels.clear()

    for label, start, end in best_path(log_probs):
        token = vocabulary.token(label)
        if label != blank_id and (label == delimiter_id or token.isspace()):
            close_word()
            continue
        if label == blank_id or label in skip_ids or not token:
            continue
        if not labels and label in vocabulary.mark_ids:
            if spans:
                first, _, previous = spans[-1]
                spans[-1] = (first, end, [*previous, label])
            continue
        if not labels:
            word_start = start
        labels.append(label)
        word_end = end
    close_word()
    return spans


# -- beam search --------------------------------------------------------------------------------------------------


def _word_positions(
    labels: list[int], delimiter_id: int | None, mark_ids: frozenset[int] = frozenset()
) -> list[list[int]]:
    """Indices into ``labels`` of each word's letters (words are split at the delimiter; empty ones dropped). A
    combining mark (``mark_ids``) that would begin a word belongs to the word before it (dropped if none)."""
    words: list[list[int]] = [[]]
    for i, label in enumerate(labels):
        if label == delimiter_id:
            words.append([])
        elif label in mark_ids and not words[-1]:
            before = next((word for word in reversed(words) if word), None)
            if before is not None:
                before.append(i)
        else:
            words[-1].append(i)
    return [word for word in words if word]


def _beam_agreement(
    chosen: list[list[int]], beam: list[tuple[list[int], float]], delimiter_id: int | None,
    mark_ids: frozenset[int] = frozenset(),
) -> list[float]:  # fmt: skip
    """For each chosen word: the beam's probability share of hypotheses with the same word in the same place."""
    shares = [0.0] * len(chosen)
    for labels, share in beam:
        words = [[labels[i] for i in word] for word in _word_positions(labels, delimiter_id, mark_ids)]
        for k, word in enumerate(chosen):
            if k < len(words) and words[k] == word:
                shares[k] += share
    return shares


def _aligned_words(
    log_probs: np.ndarray, labels: list[int], blank_id: int, delimiter_id: int | None,
    mark_ids: frozenset[int] = frozenset(),
) -> list[tuple[int, int, list[int]]]:  # fmt: skip
    """A decoded label sequence split into words at the delimiter (combining marks kept with the letter before
    them, ``_word_positions``), each timed by the Viterbi alignment."""
    # the beam built ``labels`` from these frames, so a path exists; a NaN frame would leave none: no timings then
    timed = align(log_probs, labels, blank_id) or [(0, 0)] * len(labels)
    return [
        (timed[word[0]][0], timed[word[-1]][1], [labels[i] for i in word])
        for word in _word_positions(labels, delimiter_id, mark_ids)
    ]


_NEG = -1e30


Hyp = list  # [log p ending in blank, log p ending in a label, lexicon score, unfinished word, left the lexicon]


def _logaddexp(a: float, b: float) -> float:
    if a < b:
        a, b = b, a
    return a if b <= _NEG else a + math.log1p(math.exp(b - a))


def _merge(beams: dict[tuple[int, ...], Hyp], key: tuple[int, ...], p_blank: float, p_label: float,
           lex: float, word: str, oov: bool) -> None:  # fmt: skip
    """Add one way of reaching ``key`` to the next frame's hypotheses (same labels: probabilities add up)."""
    entry = beams.get(key)
    if entry is None:
        beams[key] = [p_blank, p_label, lex, word, oov]
    else:
        entry[0] = _logaddexp(entry[0], p_blank)
        entry[1] = _logaddexp(entry[1], p_label)


@dataclass(frozen=True)
class BeamDecoder:
    """What the beam search needs besides the frames: the model's vocabulary, its labels as normalized letters (""
    for labels that write nothing, e.g. tashkeel in a production checkpoint's vocabulary) and the lexicon settings."""

    vocabulary: Vocabulary
    letters: tuple[str, ...]  # per label id
    lexicon: Lexicon | None = None
    oov_penalty: float = 2.0
    beam_size: int = 12
    # A request's own vocabulary (a course's words): a word from it ends with this bonus (natural log), and its
    # spelling never counts as leaving the lexicon on the way (hotword boosting, as in Riva or speaches).
    hotwords: Lexicon | None = None
    hotword_bonus: float = 3.0
    prune_log_prob: float = -10.0  # labels less likely than e^-10 in a frame are not tried there

    @classmethod
    def for_vocabulary(cls, vocabulary: Vocabulary, **options) -> BeamDecoder:
        silent = vocabulary.skip_ids | {vocabulary.blank_id, vocabulary.delimiter_id}
        letters = tuple(
            "" if i in silent else normalize_arabic(token).replace(" ", "")
            for i, token in enumerate(vocabulary.id_to_token)
        )
        return cls(vocabulary, letters, **options)

    def arabic_share(self) -> float:
        """Share of the writing labels that are Arabic letters (a lexicon only makes sense for Arabic models)."""
        writing = [s for s in self.letters if s]
        arabic = [s for s in writing if is_model_text(s)]
        return len(arabic) / max(len(writing), 1)

    def with_hotwords(self, words: list[str], bonus: float | None = None) -> BeamDecoder:
        """This decoder, preferring ``words`` (normalized like the model's letters; clitics and endings allowed)."""
        hotwords = Lexicon([normalize_arabic(w).replace(" ", "") for w in words])
        return replace(self, hotwords=hotwords, hotword_bonus=self.hotword_bonus if bonus is None else bonus)

    def _word_score(self, word: str) -> float:
        if not word:
            return 0.0
        if self.hotwords is not None and self.hotwords.is_word(word):
            return self.hotword_bonus
        if self.lexicon is None or self.lexicon.is_word(word):
            return 0.0
        return -self.oov_penalty

    def _in_lexicon(self, partial: str) -> bool:
        """Whether a word being spelled may still become a listed (or boosted) word."""
        if self.hotwords is not None and self.hotwords.is_prefix(partial):
            return True
        return self.lexicon is None or self.lexicon.is_prefix(partial)

    def search(self, log_probs: np.ndarray) -> list[tuple[list[int], float]]:
        """(frames, vocab) log-posteriors -> the beam's label sequences, best first, each with its share of the
        beam's probability (lexicon scores included; shares sum to 1). A label sequence is CTC-collapsed: no
        blanks, repeats kept only where a blank separated them, word delimiters included."""
        hyps: dict[tuple[int, ...], Hyp] = {(): [0.0, _NEG, 0.0, "", False]}
        scored, vocabulary = self.lexicon is not None or self.hotwords is not None, self.vocabulary
        blank_id, delimiter_id, skip_ids = vocabulary.blank_id, vocabulary.delimiter_id, vocabulary.skip_ids
        n_labels = len(self.letters)  # an exported model may have logit columns past the vocabulary: never tried
        for row in log_probs:
            likely = map(int, np.flatnonzero(row > self.prune_log_prob))
            candidates = [c for c in likely if c < n_labels and c not in skip_ids]
            if not candidates:  # only skipped labels are likely in this frame: treat it as a pause
                candidates = [blank_id]
            nxt: dict[tuple[int, ...], Hyp] = {}
            for key, (p_blank, p_label, lex, word, oov) in hyps.items():
                total = _logaddexp(p_blank, p_label)
                last = key[-1] if key else None
                for c in candidates:
                    p = float(row[c])
                    if c == blank_id:
                        _merge(nxt, key, total + p, _NEG, lex, word, oov)
                        continue
                    if c == last:  # the same label again: one letter held longer, or a doubled one after a blank
                        _merge(nxt, key, _NEG, p_label + p, lex, word, oov)
                        if p_blank <= _NEG:
                            continue
                        source = p_blank
                    else:
                        source = total
                    if c == delimiter_id:  # a word ends (scored unless it left the lexicon already), or a pause
                        ended = lex + (0.0 if oov else self._word_score(word))
                        _merge(nxt, key + (c,), _NEG, source + p, ended, "", False)
                        continue
                    grown = word + self.letters[c]
                    penalty, left = 0.0, oov
                    if scored and not oov and grown and not self._in_lexicon(grown):
                        penalty, left = -self.oov_penalty, True  # charged once per word, as soon as it leaves
                    _merge(nxt, key + (c,), _NEG, source + p, lex + penalty, grown, left)
            ranked = sorted(nxt.items(), key=lambda kv: _logaddexp(kv[1][0], kv[1][1]) + kv[1][2], reverse=True)
            hyps = dict(ranked[: self.beam_size])

        def final_score(entry: Hyp) -> float:
            p_blank, p_label, lex, word, oov = entry
            return _logaddexp(p_blank, p_label) + lex + (0.0 if oov else self._word_score(word))

        ranked = sorted(((final_score(entry), list(key)) for key, entry in hyps.items()), reverse=True)
        top = ranked[0][0]
        weights = [math.exp(score - top) for score, _ in ranked]
        total = sum(weights)
        return [(labels, w / total) for (_, labels), w in zip(ranked, weights, strict=True)]


def align(log_probs: np.ndarray, labels: list[int], blank_id: int) -> list[tuple[int, int]]:
    """Viterbi CTC alignment: each label's [first, end) frame range on the single best path that spells
    ``labels``. Empty when the frames are too few for the labels."""
    n_frames, n_labels = log_probs.shape[0], len(labels)
    if n_labels == 0 or n_frames == 0:
        return []
    states = np.full(2 * n_labels + 1, blank_id, dtype=np.int64)
    states[1::2] = labels
    n_states = len(states)
    # a label state may be entered from two states back when the label differs from the one before it
    skip = np.zeros(n_states, dtype=bool)
    skip[3::2] = states[3::2] != states[1:-2:2]
    score = np.full(n_states, -np.inf)
    score[0] = log_probs[0, states[0]]
    score[1] = log_probs[0, states[1]]
    back = np.zeros((n_frames, n_states), dtype=np.int8)  # 0 stay, 1 from previous state, 2 from two back
    for t in range(1, n_frames):
        stay = score
        step = np.concatenate([[-np.inf], score[:-1]])
        jump = np.where(skip, np.concatenate([[-np.inf, -np.inf], score[:-2]]), -np.inf)
        choices = np.stack([stay, step, jump])
        back[t] = choices.argmax(axis=0)
        score = choices.max(axis=0) + log_probs[t, states]
    end = n_states - 1 if score[-1] >= score[-2] else n_states - 2
    if not np.isfinite(score[end]):
        return []
    path = np.empty(n_frames, dtype=np.int64)
    state = end
    for t in range(n_frames - 1, -1, -1):
        path[t] = state
        state -= int(back[t, state])
    spans: list[tuple[int, int]] = []
    for k in range(n_labels):
        frames = np.flatnonzero(path == 2 * k + 1)
        spans.append((int(frames[0]), int(frames[-1]) + 1))
    return spans
