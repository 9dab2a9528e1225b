import pytest

from shared.text import compare_expected, edit_distance, is_model_text, normalize_arabic, normalize_loose


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("مَرْحَبًا", "مرحبا"),  # tashkeel
        ("كتـــاب", "كتاب"),  # tatweel
        ("أحمد إبراهيم آمنة ٱلله", "احمد ابراهيم امنة الله"),  # alef forms
        ("کتاب یوم", "كتاب يوم"),  # Persian kaf and yeh
        ("٣ ۴ 5", "3 4 5"),  # Arabic-Indic and Persian digits
        ("ﻻ", "لا"),  # presentation-form ligature
        ("  صباح   الخير!؟ ", "صباح الخير"),  # punctuation and spaces
        ("مدرسة على", "مدرسة على"),  # ta marbuta and alef maqsura kept by default
    ],
)
def test_normalize_arabic(raw, normalized):
    assert normalize_arabic(raw) == normalized


def test_loose_folds():
    assert normalize_loose("مَدْرَسَةٌ عَلَى") == "مدرسه علي"
    assert normalize_loose("مسؤول شاطئ") == "مسوول شاطي"


def test_is_model_text():
    assert is_model_text("صباح الخير")
    assert not is_model_text("")
    assert not is_model_text("hello")
    assert not is_model_text("صباح  الخير")


def test_edit_distance():
    assert edit_distance("كتاب", "كتاب") == 0
    assert edit_distance("كتاب", "كتب") == 1
    assert edit_distance("", "سلام") == 4
    assert edit_distance(["a", "b"], ["b"]) == 1


def test_compare_expected():
    same = compare_expected("مَدْرَسَةٌ", "مدرسه")
    assert same.normalized_match and same.similarity == 1.0
    close = compare_expected("كتاب", "كتب")
    assert not close.normalized_match and close.similarity == 0.75
    assert compare_expected("شكرا", "").similarity == 0.0


# Invisible joiners, marks and bidi controls: removed where they stand, so a word they sit inside stays one word
INVISIBLE = {
    "zero-width space": "\u200b",
    "zero-width non-joiner": "\u200c",
    "zero-width joiner": "\u200d",
    "left-to-right mark": "\u200e",
    "right-to-left mark": "\u200f",
    "Arabic letter mark": "\u061c",
    "LRE": "\u202a",
    "RLE": "\u202b",
    "PDF": "\u202c",
    "LRO": "\u202d",
    "RLO": "\u202e",
    "LRI": "\u2066",
    "RLI": "\u2067",
    "FSI": "\u2068",
    "PDI": "\u2069",
    "word joiner": "\u2060",
    "byte order mark": "\ufeff",
    "soft hyphen": "\u00ad",
}


@pytest.mark.parametrize("char", INVISIBLE.values(), ids=INVISIBLE.keys())
def test_invisible_characters_are_removed_not_made_spaces(char):
    assert normalize_arabic(f"كت{char}اب") == "كتاب"  # inside a word: still one word
    assert normalize_arabic(f"{char}صباح{char} {char}الخير{char}") == "صباح الخير"
    assert normalize_loose(f"مدرس{char}ة") == "مدرسه"
    assert compare_expected(f"ك{char}ت{char}ا{char}ب", "كتاب").normalized_match


def test_bidi_override_and_isolates_around_an_expected_text():
    expected = "\u202e\u2067كِتَاب\u2069\u202c\u200f"
    same = compare_expected(expected, "كتاب")
    assert same.normalized_match and same.similarity == 1.0
    assert same.text == expected  # what the client sent is echoed unchanged


def test_punctuation_between_words_still_separates_them():
    assert normalize_arabic("كتاب،قلم") == "كتاب قلم"
    assert normalize_arabic("كتاب-قلم") == "كتاب قلم"


def test_thousands_of_diacritics_on_a_word_fold_away():
    assert normalize_arabic("ك" + "\u064e\u0651" * 2000 + "تاب") == "كتاب"
    assert compare_expected("ك" + "\u0650" * 400 + "تاب", "كتاب").normalized_match
