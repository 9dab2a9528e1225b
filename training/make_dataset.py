"""Build the synthetic Arabic speech data set the bundled model is trained on.

Words come from Debian's ``hunspell-ar`` dictionary (``/usr/share/hunspell/ar.dic``; ``apt-get install hunspell-ar
espeak-ng``). Each clip is a word or a 2-5-word phrase spoken by espeak-ng's Arabic voice with one of its ~100
variants at a random speed, pitch and word gap, then augmented (see ``training.synth.augment``).

Held out for evaluation: a share of the words AND a share of the voice variants. ``eval/`` only uses held-out
words spoken by held-out voices; ``eval-seen-voices/`` the same unseen words by training voices. Both are written
as audio files (WAV 16 kHz and WebM/MP3/OGG round trips) plus a ``transcripts.tsv`` so ``arabic-words evaluate``
can read them like any directory of recordings.

    python -m training.make_dataset --out training/work/data --train-clips 30000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import soundfile as sf

from shared.text import is_model_text, normalize_arabic
from training.synth import SAMPLE_RATE, augment, encode, espeak_variants, speak

HOLD_OUT_WORD_SHARE = 0.08
HOLD_OUT_VOICE_EVERY = 7  # every 7th variant in sorted order is never heard in training
PCM_SCALE = 32767  # a training shard holds int16 PCM: audio in [-1, 1] times this


def save_ragged(path: Path, key: str, arrays: Sequence[np.ndarray], **extra: np.ndarray) -> None:
    """Arrays of different lengths (clips, feature matrices) in one .npz: ``key`` holds them end to end and
    ``lengths`` where each ends; ``extra`` arrays are stored beside them. One big array loads far faster than
    thousands of small ones."""
    np.savez(path, **{key: np.concatenate(arrays), "lengths": np.array([len(a) for a in arrays])}, **extra)


def load_ragged(stored: np.lib.npyio.NpzFile, key: str) -> list[np.ndarray]:
    """The arrays ``save_ragged`` stored under ``key``, as views of one array (an NpzFile reads an array at each
    access, so each is read once)."""
    flat, lengths = stored[key], stored["lengths"]
    return [flat[end - n : end] for end, n in zip(np.cumsum(lengths), lengths, strict=True)]


def read_shard(path: Path) -> Iterator[tuple[np.ndarray, str]]:
    """The clips of a training shard (``build_train``) in order: float32 audio at SAMPLE_RATE and its text."""
    shard = np.load(path)
    clips = load_ragged(shard, "pcm")
    for clip, text in zip(clips, shard["texts"], strict=True):
        yield clip.astype(np.float32) / PCM_SCALE, str(text)


def load_words(dic_path: Path, min_len: int = 2, max_len: int = 9) -> list[str]:
    words = set()
    for line in dic_path.read_text(encoding="utf-8", errors="ignore").splitlines()[1:]:
        word = normalize_arabic(line.split("/")[0].strip())
        if min_len <= len(word) <= max_len and " " not in word and is_model_text(word):
            words.add(word)
    return sorted(words)


def split_words_and_voices(words: list[str], voices: list[str], seed: int) -> dict[str, list]:
    rng = random.Random(seed)
    shuffled = words[:]
    rng.shuffle(shuffled)
    n_held = int(len(shuffled) * HOLD_OUT_WORD_SHARE)
    held_voices = voices[::HOLD_OUT_VOICE_EVERY]
    return {
        "train_words": shuffled[n_held:],
        "eval_words": shuffled[:n_held],
        "train_voices": [None] + [v for v in voices if v not in held_voices],  # None: the plain voice
        "eval_voices": held_voices,
    }


def random_utterance(words: list[str], rng: random.Random, phrase_share: float) -> str:
    n = 1 if rng.random() >= phrase_share else rng.randint(2, 5)
    return " ".join(rng.choice(words) for _ in range(n))


def make_train_clip(
    words: list[str], voices: list, rng: random.Random, nprng: np.random.Generator
) -> tuple[np.ndarray, str] | None:
    """One augmented training clip and its text; None when espeak-ng fails on the words drawn."""
    text = random_utterance(words, rng, phrase_share=0.4)
    try:
        audio = speak(
            text,
            rng.choice(voices),
            speed=rng.randint(100, 230),
            pitch=rng.randint(15, 85),
            word_gap=rng.choice([0, 0, 0, 1, 3, 6]),
        )
    except Exception:  # espeak-ng failing on a rare word is not worth stopping a long build for
        return None
    return augment(audio, nprng), text


def _make_train_chunk(args: tuple[int, int, list[str], list]) -> tuple[list[np.ndarray], list[str]]:
    seed, count, words, voices = args
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    clips, texts = [], []
    while len(clips) < count:
        made = make_train_clip(words, voices, rng, nprng)
        if made:
            clips.append(made[0])
            texts.append(made[1])
    return clips, texts


def build_train(out: Path, words: list[str], voices: list, n_clips: int, seed: int, shard: int = 2000) -> None:
    jobs = [(seed * 100_003 + i, min(shard, n_clips - i * shard), words, voices) for i in range(-(-n_clips // shard))]
    with multiprocessing.Pool() as pool:
        for i, (clips, texts) in enumerate(pool.imap(_make_train_chunk, jobs)):
            pcm = [(np.clip(c, -1, 1) * PCM_SCALE).astype(np.int16) for c in clips]
            save_ragged(out / f"train-{i:03d}.npz", "pcm", pcm, texts=np.array(texts))
            print(f"shard {i + 1}/{len(jobs)}: {len(clips)} clips", flush=True)


def build_eval(out: Path, words: list[str], voices: list[str], n_clips: int, seed: int) -> None:
    """Held-out words by held-out voices: clean 16 kHz WAV and browser/codec round trips."""
    rng = random.Random(seed + 1)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_clips):
        text = random_utterance(words, rng, phrase_share=0.35)
        audio = speak(text, rng.choice(voices), speed=rng.randint(120, 210), pitch=rng.randint(25, 75))
        audio = np.concatenate([np.zeros(1600, np.float32), audio, np.zeros(1600, np.float32)])
        fmt = ["wav", "wav", "webm", "mp3", "ogg"][i % 5]
        name = f"eval-{i:04d}.{fmt}"
        if fmt == "wav":
            sf.write(out / name, audio, SAMPLE_RATE, subtype="PCM_16")
        else:
            (out / name).write_bytes(encode(audio, fmt))
        rows.append(f"{name}\t{text}")
    (out / "transcripts.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("training/work/data"))
    parser.add_argument("--dictionary", type=Path, default=Path("/usr/share/hunspell/ar.dic"))
    parser.add_argument("--train-clips", type=int, default=30_000)
    parser.add_argument("--eval-clips", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1, help="picks the held-out words and voices")
    parser.add_argument(
        "--train-seed",
        type=int,
        help="seed of the training clips (default: --seed); a new one gives fresh clips "
        "with the same held-out split, for continuing a checkpoint",
    )
    parser.add_argument(
        "--fresh-eval",
        type=int,
        metavar="SEED",
        help="only build OUT/eval-fresh-SEED: --eval-clips new clips of the held-out words and voices in "
        "OUT/split.json, for checking a choice made on OUT/eval against clips it was not made on",
    )
    args = parser.parse_args()

    if args.fresh_eval is not None:
        if not (args.out / "split.json").exists():
            parser.error(f"{args.out / 'split.json'} is missing: build it first (--train-clips 0)")
        split = json.loads((args.out / "split.json").read_text(encoding="utf-8"))
        out = args.out / f"eval-fresh-{args.fresh_eval}"
        build_eval(out, split["eval_words"], split["eval_voices"], args.eval_clips, args.fresh_eval)
        print(f"{args.eval_clips} clips -> {out}", flush=True)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    words = load_words(args.dictionary)
    split = split_words_and_voices(words, espeak_variants(), args.seed)
    (args.out / "split.json").write_text(json.dumps(split, ensure_ascii=False, indent=0), encoding="utf-8")
    print(
        f"{len(words)} words ({len(split['eval_words'])} held out), "
        f"{len(split['train_voices'])} training voices, held-out voices: {split['eval_voices']}",
        flush=True,
    )
    build_eval(args.out / "eval", split["eval_words"], split["eval_voices"], args.eval_clips, args.seed)
    # the same unseen words by voices heard in training: separates "new word" from "new voice" errors
    seen = [v for v in split["train_voices"] if v]
    build_eval(args.out / "eval-seen-voices", split["eval_words"], seen, args.eval_clips * 3 // 5, seed=7)
    train_seed = args.seed if args.train_seed is None else args.train_seed
    build_train(args.out, split["train_words"], split["train_voices"], args.train_clips, train_seed)


if __name__ == "__main__":
    main()
