import pytest

from arabic_words.metrics import auroc, corpus_scores, word_correctness


def test_auroc():
    assert auroc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert auroc([0.1, 0.2, 0.9, 0.8], [True, True, False, False]) == 0.0
    assert auroc([0.5, 0.5], [True, False]) == 0.5
    assert auroc([0.3, 0.9, 0.5], [True, True, False]) == 0.5
    assert auroc([0.3], [True]) is None


def test_word_correctness():
    assert word_correctness("صباح الخير", "صباح الخبر") == [True, False]
    assert word_correctness("مدرسة", "مدرسه") == [True]
    assert word_correctness("كتاب", "") == []


def test_corpus_scores():
    scores = corpus_scores([("كتاب", "كتب"), ("صباح الخير", "صباح الخير")])
    assert scores["cer"] == pytest.approx(1 / 14)  # 4 + 10 reference characters
    assert scores["word_accuracy"] == pytest.approx(2 / 3)
    assert scores["exact_match"] == 0.5
