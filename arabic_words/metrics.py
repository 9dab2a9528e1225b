"""Accuracy measures for `arabic-words evaluate`: CER, word accuracy, confidence AUROC."""

from __future__ import annotations

from difflib import SequenceMatcher

import numpy as np

from shared.text import edit_distance, normalize_loose


def word_correctness(reference: str, hypothesis: str) -> list[bool]:
    """For each hypothesis word: is it aligned to an identical reference word (loosely normalized)?"""
    ref, hyp = normalize_loose(reference).split(), normalize_loose(hypothesis).split()
    correct = [False] * len(hyp)
    for block in SequenceMatcher(a=ref, b=hyp, autojunk=False).get_matching_blocks():
        for j in range(block.b, block.b + block.size):
            correct[j] = True
    return correct


def auroc(scores: list[float], labels: list[bool]) -> float | None:
    """Area under the ROC curve: the chance a random correct item scores above a random wrong one (ties 1/2).
    None when one class is missing."""
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def corpus_scores(pairs: list[tuple[str, str]]) -> dict[str, float]:
    """CER and word accuracy (1 - WER, floored at 0) over (reference, hypothesis) pairs, loosely normalized."""
    char_err = chars = word_err = words = exact = 0
    for reference, hypothesis in pairs:
        ref, hyp = normalize_loose(reference), normalize_loose(hypothesis)
        char_err += edit_distance(ref, hyp)
        chars += len(ref)
        word_err += edit_distance(ref.split(), hyp.split())
        words += len(ref.split())
        exact += ref == hyp
    return {
        "cer": char_err / max(chars, 1),
        "word_accuracy": max(0.0, 1 - word_err / max(words, 1)),
        "exact_match": exact / max(len(pairs), 1),
    }
