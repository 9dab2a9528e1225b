"""A request's vocabulary: the words a course expects, which the worker's beam search prefers (hotword boosting).

A request names them itself (``vocabulary=كتاب,مدرسة`` or a JSON list) or names a word list registered on the server
(``vocabulary=lesson-3``; ``arabic-words vocabulary add lesson-3 words.txt``). The web app resolves either into the
words, checks them, and stores them with the job, so a list changed later does not change a queued job.
"""

from __future__ import annotations

import json
import re

import redis

from shared import keys
from shared.text import is_model_text, normalize_arabic

MAX_WORDS = 1000
MAX_WORD_CHARS = 40  # letters of one normalized word
_LIST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SEPARATORS = re.compile(r"[\s,،;؛]+")  # Latin and Arabic commas and semicolons, whitespace


class InvalidVocabulary(ValueError):
    """A vocabulary the service cannot use; the message says why, for the client."""


def is_list_name(value: str) -> bool:
    return bool(_LIST_NAME.match(value))


def parse_words(text: str) -> list[str]:
    """Words from a JSON list or a comma/space-separated string, normalized (vowel marks dropped) and checked:
    Arabic letters only, at most ``MAX_WORDS`` of at most ``MAX_WORD_CHARS`` letters; duplicates dropped."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            items = json.loads(stripped)
        except ValueError:
            raise InvalidVocabulary("the vocabulary is not a valid JSON list of words") from None
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise InvalidVocabulary("the vocabulary must be a JSON list of strings")
    else:
        items = _SEPARATORS.split(stripped)
    words: list[str] = []
    for item in items:
        word = normalize_arabic(item).replace(" ", "")
        if not word:
            continue
        if not is_model_text(word) or len(word) > MAX_WORD_CHARS:
            raise InvalidVocabulary(f"vocabulary words are Arabic words of at most {MAX_WORD_CHARS} letters")
        if word not in words:
            words.append(word)
    if not words:
        raise InvalidVocabulary("the vocabulary has no words")
    if len(words) > MAX_WORDS:
        raise InvalidVocabulary(f"a vocabulary has at most {MAX_WORDS} words")
    return words


class VocabularyStore:
    """Word lists registered on the server, by name (a Redis hash: name -> words, one per line)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def add(self, name: str, words_text: str) -> list[str]:
        if not is_list_name(name):
            raise InvalidVocabulary(
                "a list name is 1-64 letters, digits, '.', '_' or '-', starting with one of the first two"
            )
        words = parse_words(words_text)
        self.redis.hset(keys.vocabularies(), name, "\n".join(words))
        return words

    def get(self, name: str) -> list[str] | None:
        raw = self.redis.hget(keys.vocabularies(), name)
        return raw.decode().split("\n") if raw is not None else None

    def names(self) -> dict[str, int]:
        return {
            k.decode(): len(v.decode().split("\n")) for k, v in sorted(self.redis.hgetall(keys.vocabularies()).items())
        }

    def remove(self, name: str) -> bool:
        return bool(self.redis.hdel(keys.vocabularies(), name))

    def resolve(self, value: str) -> list[str]:
        """A request's ``vocabulary`` value -> its words: a registered list's, or the words it gives."""
        if is_list_name(value.strip()):
            words = self.get(value.strip())
            if words is None:
                raise InvalidVocabulary(f"no word list named {value.strip()!r} is registered")
            return words
        return parse_words(value)
