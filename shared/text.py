"""Arabic text normalization and comparison.

One normalizer is used everywhere text is produced (model vocabulary, training labels) or compared (the
``expected`` check, evaluation). ``strict`` keeps the letters a reader expects to see (ة, ى, hamza seats);
``loose`` additionally folds the spellings learners and ASR models confuse, for comparisons only.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

# Harakat, Quranic marks, superscript alef and small high letters: they never change which word was said here.
_TASHKEEL = re.compile("[\u0610-\u061a\u064b-\u065f\u0670\u06d6-\u06ed\u08d3-\u08ff]")
_TATWEEL = "\u0640"

_CHAR_MAP = str.maketrans(
    {
        # alef forms -> bare alef
        "أ": "ا",
        "إ": "ا",
        "آ": "ا",
        "ٱ": "ا",
        "ٲ": "ا",
        "ٳ": "ا",
        # Persian / Urdu letter variants that look identical in most fonts
        "ک": "ك",
        "ی": "ي",
        "ې": "ي",
        "ە": "ه",
        "ھ": "ه",
        "ہ": "ه",
        "ۀ": "ه",
        # Arabic-Indic and Persian digits -> ASCII
        **{chr(0x0660 + i): str(i) for i in range(10)},
        **{chr(0x06F0 + i): str(i) for i in range(10)},
    }
)

_LOOSE_MAP = str.maketrans({"ى": "ي", "ة": "ه", "ؤ": "و", "ئ": "ي"})

# The 33 letters the bundled model writes (after strict normalization).
ARABIC_LETTERS = "ءؤئابةتثجحخدذرزسشصضطظعغفقكلمنهوىي"

# Invisible characters that shape or order text but are no part of a word: zero-width space, non-joiner and joiner
# (U+200B-200D), left-to-right and right-to-left marks (U+200E/F), the Arabic letter mark (U+061C), bidi embeddings,
# overrides and isolates (U+202A-202E, U+2066-2069), word joiner and invisible operators (U+2060-2064), the byte order
# mark / zero-width no-break space (U+FEFF) and the soft hyphen (U+00AD). Removed, not turned into a space as
# punctuation is: inside a word they would split it in two.
_INVISIBLE = re.compile("[\u00ad\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")
_NOT_WORD = re.compile(r"[^\w\s]|_")
_SPACES = re.compile(r"\s+")


def normalize_arabic(text: str) -> str:
    """Return ``text`` with tashkeel, tatweel, invisible joiners and bidi controls removed, punctuation turned into
    spaces, alef forms, Persian variants and digits unified, and whitespace collapsed (``normalize_loose`` folds
    further spellings, for comparisons)."""
    text = unicodedata.normalize("NFKC", text)  # presentation forms and ligatures (ﻻ) -> base letters
    text = _INVISIBLE.sub("", text)
    text = _TASHKEEL.sub("", text).replace(_TATWEEL, "")
    text = text.translate(_CHAR_MAP)
    text = _NOT_WORD.sub(" ", text)
    return _SPACES.sub(" ", text).strip()


def normalize_loose(text: str) -> str:
    """Normalization for comparisons: strict plus ى→ي, ة→ه and hamza seats ؤ→و, ئ→ي."""
    return normalize_arabic(text).translate(_LOOSE_MAP)


def is_model_text(text: str) -> bool:
    """True if ``text`` is non-empty and uses only the model's letters and single spaces."""
    return bool(text) and all(c in ARABIC_LETTERS or c == " " for c in text) and "  " not in text


def edit_distance(a: str | list[str], b: str | list[str]) -> int:
    """Levenshtein distance between two strings (or token lists)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


@dataclass(frozen=True)
class TextComparison:
    text: str
    normalized_match: bool
    similarity: float

    def to_dict(self) -> dict:
        return {"text": self.text, "normalized_match": self.normalized_match, "similarity": self.similarity}


def compare_expected(expected: str, hypothesis: str) -> TextComparison:
    """Compare what the speaker was asked to say with what was heard, on loosely normalized text.

    ``similarity`` is 1 - character edit distance / length of the longer string (1.0 for two empty strings).
    """
    ref, hyp = normalize_loose(expected), normalize_loose(hypothesis)
    longest = max(len(ref), len(hyp))
    similarity = 1.0 if longest == 0 else 1.0 - edit_distance(ref, hyp) / longest
    return TextComparison(text=expected, normalized_match=ref == hyp, similarity=round(similarity, 4))
