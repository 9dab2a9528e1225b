"""CTC prefix beam search with an optional soft lexicon, and Viterbi alignment of the chosen labels.

Greedy (best path) decoding spells each word letter by letter from the single best frame labels. The beam search
keeps the ``beam_size`` most probable label sequences, summing every alignment of each, and adds
``-oov_penalty`` (natural log) for every word that is not in the lexicon: a spelling the audio supports only a
little better than a real word's (مرحبى vs مرحبا, homophones in synthetic speech) gives way, while a word the
audio clearly spells survives even if the dictionary lacks it. Why not a library: pyctcdecode pins numpy < 2, and
flashlight-text's lexicon decoder cannot emit a word outside its lexicon.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from shared.text import is_model_text, normalize_arabic
from worker.lexicon import Lexicon

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
    """What the beam search needs besides the frames: the vocabulary as normalized letters ("" for labels that
    write nothing, e.g. tashkeel in a production checkpoint's vocabulary) and the lexicon settings."""

    letters: tuple[str, ...]  # per label id
    blank_id: int
    delimiter_id: int | None
    skip_ids: frozenset[int]  # special tokens that write nothing ([UNK], <s>)
    lexicon: Lexicon | None = None
    oov_penalty: float = 2.0
    beam_size: int = 12
    prune_log_prob: float = -10.0  # labels less likely than e^-10 in a frame are not tried there

    @classmethod
    def for_vocabulary(
        cls,
        id_to_token: list[str],
        blank_id: int,
        delimiter: str,
        special_ids: frozenset[int],
        **options,
    ) -> BeamDecoder:
        delimiter_id = id_to_token.index(delimiter) if delimiter in id_to_token else None
        skip = (frozenset(special_ids) | {i for i, t in enumerate(id_to_token) if not t}) - {blank_id}
        silent = skip | {blank_id, delimiter_id}
        letters = tuple("" if i in silent else normalize_arabic(t).replace(" ", "") for i, t in enumerate(id_to_token))
        return cls(letters, blank_id, delimiter_id, skip, **options)

    def arabic_share(self) -> float:
        """Share of the writing labels that are Arabic letters (a lexicon only makes sense for Arabic models)."""
        writing = [s for s in self.letters if s]
        arabic = [s for s in writing if is_model_text(s)]
        return len(arabic) / max(len(writing), 1)

    def _word_score(self, word: str) -> float:
        if self.lexicon is None or not word or self.lexicon.is_word(word):
            return 0.0
        return -self.oov_penalty

    def search(self, log_probs: np.ndarray) -> list[tuple[list[int], float]]:
        """(frames, vocab) log-posteriors -> the beam's label sequences, best first, each with its share of the
        beam's probability (lexicon scores included; shares sum to 1). A label sequence is CTC-collapsed: no
        blanks, repeats kept only where a blank separated them, word delimiters included."""
        hyps: dict[tuple[int, ...], Hyp] = {(): [0.0, _NEG, 0.0, "", False]}
        lexicon = self.lexicon
        n_labels = len(self.letters)  # an exported model may have logit columns past the vocabulary: never tried
        for row in log_probs:
            likely = map(int, np.flatnonzero(row > self.prune_log_prob))
            candidates = [c for c in likely if c < n_labels and c not in self.skip_ids]
            if not candidates:  # only skipped labels are likely in this frame: treat it as a pause
                candidates = [self.blank_id]
            nxt: dict[tuple[int, ...], Hyp] = {}
            for key, (p_blank, p_label, lex, word, oov) in hyps.items():
                total = _logaddexp(p_blank, p_label)
                last = key[-1] if key else None
                for c in candidates:
                    p = float(row[c])
                    if c == self.blank_id:
                        _merge(nxt, key, total + p, _NEG, lex, word, oov)
                        continue
                    if c == last:  # the same label again: one letter held longer, or a doubled one after a blank
                        _merge(nxt, key, _NEG, p_label + p, lex, word, oov)
                        if p_blank <= _NEG:
                            continue
                        source = p_blank
                    else:
                        source = total
                    if c == self.delimiter_id:  # a word ends (scored unless it left the lexicon already), or a pause
                        ended = lex + (0.0 if oov else self._word_score(word))
                        _merge(nxt, key + (c,), _NEG, source + p, ended, "", False)
                        continue
                    grown = word + self.letters[c]
                    penalty, left = 0.0, oov
                    if lexicon is not None and not oov and grown and not lexicon.is_prefix(grown):
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
