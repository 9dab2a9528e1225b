"""Build the word list the decoder prefers (``worker/data/ar-words.txt.gz``) from Debian's ``hunspell-ar``.

Every dictionary entry, normalized as the model writes (``shared.text.normalize_arabic``), two letters or more,
one per line, sorted, gzipped. ``--exclude-held-out SPLIT.json`` leaves out the words ``training.make_dataset`` held
out, to measure how the decoder treats words the list lacks:

    python -m training.make_lexicon                     # the bundled list (apt-get install hunspell-ar)
    python -m training.make_lexicon --exclude-held-out training/work/data/split.json --out /tmp/train-words.txt.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from shared.config import BUNDLED_LEXICON
from training.make_dataset import load_words


def build(dictionary: Path, exclude: set[str]) -> list[str]:
    return [w for w in load_words(dictionary, min_len=2, max_len=99) if w not in exclude]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dictionary", type=Path, default=Path("/usr/share/hunspell/ar.dic"))
    parser.add_argument("--out", type=Path, default=BUNDLED_LEXICON)
    parser.add_argument("--exclude-held-out", type=Path, help="split.json from training.make_dataset")
    args = parser.parse_args()
    exclude = set(json.loads(args.exclude_held_out.read_text())["eval_words"]) if args.exclude_held_out else set()
    words = build(args.dictionary, exclude)
    # mtime=0: the same dictionary gives byte-identical output
    args.out.write_bytes(gzip.compress(("\n".join(words) + "\n").encode("utf-8"), compresslevel=9, mtime=0))
    print(f"{len(words)} words -> {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
