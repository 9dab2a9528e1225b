"""A dictionary of Arabic words for CTC decoding: is this (partial) word spelled like a real word?

The bundled list is Debian's ``hunspell-ar`` (Ayaspell) dictionary, normalized: ~100,000 stems and whole words
(``training/make_lexicon.py`` rebuilds it). Stems alone miss the forms people say most (الكتاب, شكرا, مدرستي), so a
word also counts when it is a stem with common clitics and endings around it: proclitics (و ف ب ل ك ال س and their
combinations) before, endings (tanween alef, pronoun suffixes, plural and dual endings) after, with ة written ت
before an ending as Arabic spells it. This is deliberately looser than hunspell's affix rules: the decoder only
uses the list to prefer real words over near-homophone misspellings, never to forbid a word.
"""

from __future__ import annotations

import bisect
import functools
import gzip
import re
from pathlib import Path

from shared.text import ARABIC_LETTERS, normalize_arabic

PROCLITICS = ("", "و", "ف", "ب", "ل", "ك", "ال", "وال", "فال", "بال", "كال", "لل", "ولل", "فلل",
              "وب", "ول", "فب", "فل", "س", "وس", "فس")  # fmt: skip
ENCLITICS = ("", "ا", "ه", "ها", "هم", "هما", "هن", "ك", "كم", "كما", "كن", "ي", "نا", "ني",
             "ات", "ون", "ين", "ان", "وا", "ة", "تم", "تن", "تما")  # fmt: skip
MIN_STEM = 2  # a one-letter "stem" would make nearly every short string a word
_CACHE = 200_000  # partial words seen while decoding repeat across frames and clips
_PLAIN = re.compile(f"[{ARABIC_LETTERS}]+")  # already normalized: skip the (slower) normalizer


class Lexicon:
    """Normalized words (stems) plus the affix rules above. ``is_word`` and ``is_prefix`` are cached per
    instance; the worker owns one instance for its lifetime."""

    def __init__(self, words: list[str] | set[str], *, affixes: bool = True):
        self.words = sorted({w for w in words if w})
        self._set = frozenset(self.words)
        self._proclitics = PROCLITICS if affixes else ("",)
        self._enclitics = ENCLITICS if affixes else ("",)
        self.is_word = functools.lru_cache(maxsize=_CACHE)(self._is_word)
        self.is_prefix = functools.lru_cache(maxsize=_CACHE)(self._is_prefix)

    def __len__(self) -> int:
        return len(self.words)

    @classmethod
    def load(cls, path: str | Path, *, affixes: bool = True) -> Lexicon:
        """One word per line, UTF-8, optionally gzipped (``.gz``); words are normalized here too."""
        path = Path(path)
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        lines = raw.decode("utf-8").splitlines()
        words = [line if _PLAIN.fullmatch(line) else normalize_arabic(line) for line in lines]
        return cls([w for w in words if w and " " not in w], affixes=affixes)

    def _stem_starts_with(self, prefix: str) -> bool:
        i = bisect.bisect_left(self.words, prefix)
        return i < len(self.words) and self.words[i].startswith(prefix)

    def _is_stem(self, core: str, ending: str) -> bool:
        """Is ``core`` a listed word as spelled before ``ending``? Before an ending ة is written ت (مدرستي), and
        drops before the plural ات (مدرسات)."""
        if len(core) < MIN_STEM:
            return False
        if not ending:
            return core in self._set
        if ending == "ات" and core + "ة" in self._set:
            return True
        if core.endswith("ة"):
            return False
        return core in self._set or (core.endswith("ت") and core[:-1] + "ة" in self._set)

    def _is_word(self, word: str) -> bool:
        for pre in self._proclitics:
            if not word.startswith(pre):
                continue
            rest = word[len(pre) :]
            for end in self._enclitics:
                if rest.endswith(end) and self._is_stem(rest[: len(rest) - len(end)], end):
                    return True
        return False

    def _is_prefix(self, partial: str) -> bool:
        """Can ``partial`` still grow into a word?"""
        for pre in self._proclitics:
            if pre.startswith(partial):  # still inside a proclitic
                return True
            if not partial.startswith(pre):
                continue
            rest = partial[len(pre) :]
            if self._stem_starts_with(rest):
                return True
            for k in range(MIN_STEM, len(rest) + 1):  # a whole stem, then the start of an ending
                tail = rest[k:]
                if any(e.startswith(tail) and self._is_stem(rest[:k], e) for e in self._enclitics if e):
                    return True
        return False
