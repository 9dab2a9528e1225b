"""The decoder's Arabic word list: stems plus clitics and endings, and the bundled list itself."""

from __future__ import annotations

import gzip

import pytest

from shared.config import BUNDLED_LEXICON
from shared.text import is_model_text
from worker.lexicon import Lexicon

STEMS = ["كتاب", "مدرسة", "شكر", "مرحب", "خير", "سلام", "عليكم"]


@pytest.fixture(scope="module")
def lexicon() -> Lexicon:
    return Lexicon(STEMS)


@pytest.mark.parametrize(
    "word",
    ["كتاب", "الكتاب", "بالمدرسة", "مدرستي", "مدرستها", "شكرا", "مرحبا", "الخير", "السلام", "وعليكم", "كتابات"],
)
def test_stems_with_clitics_and_endings_are_words(lexicon, word):
    assert lexicon.is_word(word)


@pytest.mark.parametrize("word", ["مرحبى", "شكرى", "كتابز", "ال", "و", "مدرسةي", "خ"])
def test_other_spellings_are_not_words(lexicon, word):
    assert not lexicon.is_word(word)


@pytest.mark.parametrize("partial", ["ا", "ال", "الك", "بالمد", "مدرست", "مرحب", "شكر", "كتابا"])
def test_prefixes_that_can_still_become_words(lexicon, partial):
    assert lexicon.is_prefix(partial)


@pytest.mark.parametrize("partial", ["زز", "كتز", "الز", "مرحبى", "مدرسةي"])
def test_prefixes_that_cannot(lexicon, partial):
    assert not lexicon.is_prefix(partial)


def test_without_affixes_only_listed_words_count():
    plain = Lexicon(STEMS, affixes=False)
    assert plain.is_word("كتاب") and not plain.is_word("الكتاب") and not plain.is_prefix("الك")


def test_load_normalizes_a_users_list(tmp_path):
    path = tmp_path / "words.txt.gz"
    path.write_bytes(gzip.compress("أَهْلاً\nكِتَاب\n\nإسلام\nكلمتان معا\n".encode()))
    loaded = Lexicon.load(path)
    assert loaded.words == ["اسلام", "اهلا", "كتاب"]  # tashkeel gone, alef forms bare, phrases skipped
    (tmp_path / "plain.txt").write_text("كتاب\n", encoding="utf-8")
    assert Lexicon.load(tmp_path / "plain.txt").is_word("الكتاب")


def test_the_bundled_list_is_the_normalized_dictionary():
    words = gzip.decompress(BUNDLED_LEXICON.read_bytes()).decode("utf-8").splitlines()
    assert len(words) > 100_000
    assert words == sorted(set(words)) and all(is_model_text(w) and len(w) >= 2 for w in words)
    bundled = Lexicon.load(BUNDLED_LEXICON)
    for word in ("كتاب", "مدرسة", "صباح", "شكرا", "مرحبا", "الخير", "السلام", "عليكم"):
        assert bundled.is_word(word), word
