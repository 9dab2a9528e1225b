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
