"""Voice activity detection: what trimming non-speech saves on realistic recordings, beside the untrimmed model in the
same run (issue 19's target: a 4 s recording with 1 s of speech in <= 40 % of the untrimmed time, same transcript).

Each clip is a committed fixture word (espeak-ng, 16 kHz WAV) between stretches of room noise (white, -60 dBFS): one
with 1.1 s of speech in 4 s (sabah_alkhayr), and every fixture word with 0.5-1.5 s either side. Untrimmed: the model
(forward + decoding) on the whole clip, as with VAD=off. Trimmed: the speech detector, then the model on what it
kept, as with VAD=on. The two alternate run by run; medians after warm-up. "same" compares their transcripts, "ok"
each with the fixture's text.

    python -m bench.vad [--runs 21] [--backends torch-fp32,auto] [--margin 0.25]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np
import torch

from bench.__main__ import DATA
from shared.config import Settings
from worker import pipeline
from worker.audio import SAMPLE_RATE, decode
from worker.model import ConfiguredModel, load_configured_model
from worker.vad import SpeechDetector

WORDS = ["marhaba", "shukran", "kitab", "madrasa", "sabah_alkhayr"]
FLOOR_DBFS = -60.0


def speech_of(word: str) -> np.ndarray:
    """The fixture without its own leading and trailing silence (samples within 40 dB of its peak)."""
    audio = decode((DATA / f"{word}.wav").read_bytes(), max_audio_s=30)
    loud = np.flatnonzero(np.abs(audio) > 0.01 * np.abs(audio).max())
    return audio[loud[0] : loud[-1] + 1]


def recording(speech: np.ndarray, before_s: float, after_s: float, seed: int) -> np.ndarray:
    pad = [np.zeros(round(s * SAMPLE_RATE), np.float32) for s in (before_s, after_s)]
    audio = np.concatenate([pad[0], speech, pad[1]])
    rng = np.random.default_rng(seed)
    return audio + (rng.standard_normal(len(audio)) * 10 ** (FLOOR_DBFS / 20)).astype(np.float32)


def clips() -> list[tuple[str, str, np.ndarray]]:
    """(label, expected text, audio)."""
    texts = dict(line.split("\t") for line in (DATA / "transcripts.tsv").read_text(encoding="utf-8").splitlines())
    sabah = speech_of("sabah_alkhayr")
    before = (4.0 - len(sabah) / SAMPLE_RATE) / 2
    out = [(f"{len(sabah) / SAMPLE_RATE:.1f} s speech in 4.0 s", texts["sabah_alkhayr.wav"],
            recording(sabah, before, before, seed=0))]  # fmt: skip
    rng = np.random.default_rng(19)
    for i, word in enumerate(WORDS):
        before, after = (float(x) for x in rng.uniform(0.5, 1.5, size=2))
        audio = decode((DATA / f"{word}.wav").read_bytes(), max_audio_s=30)
        label = f"{word} +{before:.1f}/{after:.1f} s"
        out.append((label, texts[f"{word}.wav"], recording(audio, before, after, seed=i + 1)))
    return out


def transcribe(model: ConfiguredModel, audio: np.ndarray) -> str:
    """What transcribe_bytes does after decoding: the detector (when the model has one), forward, decoding."""
    start, end = pipeline.speech_span(model, audio)
    speech = audio[start:end]
    log_probs, _ = pipeline.forward(model, speech)
    return pipeline.postprocess(model, speech, log_probs, offset_s=start / SAMPLE_RATE).text


def measure(backend: str, runs: int, margin_s: float) -> list[dict]:
    settings = Settings(ASR_BACKEND=backend, VAD="on", VAD_MARGIN_S=margin_s)
    trimmed = load_configured_model(settings, torch.device("cpu"))
    untrimmed = dataclasses.replace(trimmed, vad=None)
    detector: SpeechDetector = trimmed.vad
    rows = []
    for label, expected, audio in clips():
        times: dict[str, list[float]] = {"untrimmed": [], "trimmed": [], "vad": []}
        for i in range(runs + 3):  # alternating; the first 3 of each are warm-up
            for name, model in (("untrimmed", untrimmed), ("trimmed", trimmed)):
                t0 = time.perf_counter()
                transcribe(model, audio)
                if i >= 3:
                    times[name].append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            detector.speech_span(audio)
            if i >= 3:
                times["vad"].append((time.perf_counter() - t0) * 1000)
        text_untrimmed, text_trimmed = transcribe(untrimmed, audio), transcribe(trimmed, audio)
        start, end = pipeline.speech_span(trimmed, audio)
        med = {name: statistics.median(values) for name, values in times.items()}
        rows.append({
            "backend": str(trimmed.backend), "clip": label, "seconds": round(len(audio) / SAMPLE_RATE, 2),
            "kept_s": round((end - start) / SAMPLE_RATE, 2), "untrimmed_ms": round(med["untrimmed"], 1),
            "trimmed_ms": round(med["trimmed"], 1), "vad_ms": round(med["vad"], 2),
            "ratio": round(med["trimmed"] / med["untrimmed"], 2), "same": text_untrimmed == text_trimmed,
            "untrimmed_ok": text_untrimmed == expected, "trimmed_ok": text_trimmed == expected,
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=21, help="timed runs of each method per clip (>= 11)")
    parser.add_argument("--backends", default="torch-fp32,auto")
    parser.add_argument("--margin", type=float, default=Settings().VAD_MARGIN_S, help="VAD_MARGIN_S (default: its)")
    args = parser.parse_args(argv)
    title = "## VAD: untrimmed (the model on the whole clip) vs trimmed (detector + model on the speech), ms, "
    title += f"median of {args.runs}; VAD_MARGIN_S {args.margin:g}; room noise {FLOOR_DBFS:g} dBFS; ratio = trimmed / "
    title += "untrimmed (target <= 0.40 on the 4 s clip); same: the two transcripts; ok: each is the fixture's text"
    print(title)
    print("| backend | clip | s | kept s | untrimmed ms | trimmed ms (vad) | ratio | same transcript | ok untrimmed / "
          "trimmed |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    yes = {True: "yes", False: "no"}
    for backend in args.backends.split(","):
        for r in measure(backend, max(11, args.runs), args.margin):
            print(f"| {r['backend']} | {r['clip']} | {r['seconds']} | {r['kept_s']} | {r['untrimmed_ms']} | "
                  f"{r['trimmed_ms']} ({r['vad_ms']}) | {r['ratio']} | {yes[r['same']]} | "
                  f"{yes[r['untrimmed_ok']]} / {yes[r['trimmed_ok']]} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
