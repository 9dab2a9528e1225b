"""Backend accuracy on held-out speech: every backend against torch fp32 on clips no model was trained on.

The held-out sets are the synthetic data set's ``eval/`` (held-out words by held-out espeak-ng voices) and
``eval-seen-voices/`` (the same unseen words by training voices), built small under bench/work/ (gitignored):

    python -m training.make_dataset --out bench/work/data --train-clips 800 --eval-clips 200

Per model, held-out set and backend (greedy decoding, each clip alone):

- agreement: the share of frames whose argmax label is fp32's (``worker.backends.token_agreement``), mean over clips;
- identical: the share of clips whose transcript is fp32's;
- CER against the reference text (``arabic_words.metrics.corpus_scores``, as ``arabic-words evaluate``) and its
  change from fp32's, in percentage points;
- peaked: the median over all frames of the largest posterior. A random-weight checkpoint's posteriors are flat
  (peaked near 1/vocabulary): its argmaxes are ties that any rounding flips, so no backend can be judged on it.
  ``bench.peaked`` builds large- and base-shaped checkpoints with peaked posteriors for that.

    python -m bench.accuracy --model bundled --model large-peaked --clips 100 [--backends torch-fp32,onnx-int8]

``--model``: bundled, large-peaked, base-peaked (built by ``python -m bench.peaked``), large-random, base-random, or
a checkpoint directory.

Measured (2 cores, AVX-512 VNNI: ONNX int8 recipe u8s8-matmul; December 2026), letters / identical / CER change in
points, ``eval`` then ``eval-seen-voices``:

- bundled (100 clips each; fp32 CER 13.6 % / 8.6 %, median peak 1.000, 4 % of frames within 1 nat of a flip):
  torch-int8 99.2 % / 93 % / +0.13 and 99.5 % / 94 % / +0.19; onnx-int8 99.6 % / 100 % / 0.00 and 99.7 % / 99 % /
  -0.10; onnx-fp32 100 % / 100 % / 0.
- large-peaked (head fitted on 800 clips; 50 clips each; fp32 CER 84.4 % / 80.4 %, peak 0.99, 6-9 % close):
  torch-int8 92.7 % / 64 % / -0.51 and 90.6 % / 60 % / 0.00; onnx-int8 95.3 % / 78 % / -0.77 and 94.9 % / 66 % /
  -0.63; onnx-fp32 identical.
- base-peaked (the same; fp32 CER 86.5 % / 83.0 %, peak 0.99, 7-8 % close): torch-int8 89.7 % / 56 % / +1.28 and
  89.5 % / 44 % / -0.63; onnx-int8 94.6 % / 70 % / +0.51 and 94.9 % / 62 % / -0.21.
- large-random (50 clips each; peak 0.08, 99.6 % of frames close): torch-int8 97.3 % / 30 %, onnx-int8 98.2 % /
  40 %; its CER (200 %+) is noise. Flat posteriors: agreement on them measures the rounding, not the backend.

On a model whose posteriors are peaked but whose encoder is random (and whose head is weak), int8 keeps 89-95 % of
fp32's letter frames and changes the CER by 1.3 points at most; the identical-transcript share (44-78 %) is
the strict figure, and the bundled model's (93-100 %) the one a trained model gives.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench.models import WORK, reference_checkpoint
from worker import backends
from worker.backends import CPU_BACKENDS, Backend, token_agreement

DATA = WORK / "data"
SETS = ("eval", "eval-seen-voices")
CACHE = WORK / "cache"  # ONNX exports (shared with bench.models)


# -- metrics (pure) -----------------------------------------------------------------------------------------------


def clip_agreements(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> list[float]:
    """Frame token agreement of each clip's ``(frames, vocab)`` scores with the reference backend's."""
    return [token_agreement(r, c) for r, c in zip(reference, candidate, strict=True)]


def mean_agreement(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """``clip_agreements``' mean over clips (1.0 for none)."""
    return float(np.mean(clip_agreements(reference, candidate))) if len(reference) else 1.0


def letter_agreement(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], blank_id: int) -> float:
    """Share of the frames where the reference emits a label other than the blank whose argmax the candidate
    shares, over all clips: blank frames, most of any clip and the easiest to keep, left out (1.0 for none)."""
    same = total = 0
    for r, c in zip(reference, candidate, strict=True):
        n = min(len(r), len(c))
        best = r[:n].argmax(-1)
        letters = best != blank_id
        same += int((best[letters] == c[:n].argmax(-1)[letters]).sum())
        total += int(letters.sum())
    return same / total if total else 1.0


def identical_share(reference: Sequence[str], candidate: Sequence[str]) -> float:
    """Share of clips whose transcript is exactly the reference backend's."""
    if not reference:
        return 1.0
    return sum(r == c for r, c in zip(reference, candidate, strict=True)) / len(reference)


def cer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Character error rate over the clips, loosely normalized (``arabic-words evaluate``'s)."""
    from arabic_words.metrics import corpus_scores

    return corpus_scores(list(zip(references, hypotheses, strict=True)))["cer"]


def cer_change(references: Sequence[str], baseline: Sequence[str], candidate: Sequence[str]) -> float:
    """The candidate's CER minus the baseline's (positive: the candidate is worse)."""
    return cer(references, candidate) - cer(references, baseline)


def peakedness(log_probs: Sequence[np.ndarray]) -> float:
    """Median over all frames of all clips of the largest posterior (1/vocabulary: flat; 1.0: certain): the measure
    ``auto`` judges its calibration clip by (``backends.peakedness``), over a whole set."""
    frames = [lp for lp in log_probs if len(lp)]
    return backends.peakedness(np.concatenate(frames)) if frames else float("nan")


def margin_share(log_probs: Sequence[np.ndarray], margin: float = 1.0) -> float:
    """Share of frames whose best label beats the second by less than ``margin`` nats: the frames a small
    perturbation of the logits can flip."""
    close = total = 0
    for lp in log_probs:
        if len(lp):
            top = np.sort(lp, axis=-1)[:, -2:]
            close += int((top[:, 1] - top[:, 0] < margin).sum())
            total += len(lp)
    return close / total if total else float("nan")


# -- running backends ---------------------------------------------------------------------------------------------


def resolve_model(name: str) -> Path:
    if name == "bundled":
        return reference_checkpoint("bundled")
    if name.endswith("-random"):
        return reference_checkpoint(name.removesuffix("-random"))
    if name.endswith("-peaked"):
        from bench.peaked import peaked_path

        path = peaked_path(name.removesuffix("-peaked"))
        if not (path / "config.json").exists():
            raise SystemExit(f"{path} is missing: build it first (python -m bench.peaked --kind {name[:-7]})")
        return path
    path = Path(name)
    if not (path / "config.json").exists():
        raise SystemExit(f"{name}: not bundled, *-peaked, *-random or a checkpoint directory")
    return path


def read_clips(directory: Path, limit: int | None = None) -> list[tuple[str, str, np.ndarray]]:
    """(file name, reference text, 16 kHz audio) of a directory with ``transcripts.tsv``, decoded as uploads are."""
    from arabic_words.cli import read_manifest
    from worker.audio import decode

    rows = read_manifest(directory)[:limit] if limit else read_manifest(directory)
    return [(path.name, text, decode(path.read_bytes(), max_audio_s=600)) for path, text in rows]


def transcribe(model, audios: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[str]]:
    """Each clip alone through ``model`` (a ``worker.asr.LoadedModel``), greedy: log-posteriors and text."""
    from worker.asr import infer
    from worker.decoding import postprocess

    frame_s = (model.samples_per_frame or 320) / 16_000
    log_probs = [infer(model, a) for a in audios]
    return log_probs, [postprocess(lp, model.vocabulary, frame_s).text for lp in log_probs]


def compare(
    model_path: Path,
    sets: dict[str, list[tuple[str, str, np.ndarray]]],
    candidates: Sequence[Backend] = CPU_BACKENDS,
    threads: int = 2,
    cache_dir: Path = CACHE,
) -> dict:
    """Every backend on every held-out set, against torch fp32 (loaded one backend at a time)."""
    from worker.asr import load_model

    order = [Backend.TORCH_FP32, *(b for b in candidates if b is not Backend.TORCH_FP32)]
    outputs: dict[Backend, dict[str, tuple[list[np.ndarray], list[str]]]] = {}
    seconds: dict[Backend, float] = {}
    errors: dict[Backend, str] = {}
    blank_id = 0
    for backend in order:
        started = time.perf_counter()
        try:
            model = load_model(str(model_path), threads=threads, backend=backend, cache_dir=cache_dir)
        except Exception as exc:  # e.g. onnxruntime missing: report it, measure the rest
            errors[backend] = f"{type(exc).__name__}: {exc}"
            continue
        outputs[backend] = {name: transcribe(model, [a for _, _, a in clips]) for name, clips in sets.items()}
        blank_id = model.vocabulary.blank_id
        seconds[backend] = time.perf_counter() - started
        del model
    report: dict = {"model": str(model_path), "sets": {}}
    for name, clips in sets.items():
        refs = [text for _, text, _ in clips]
        base_lp, base_text = outputs[Backend.TORCH_FP32][name]
        rows = {}
        for backend, by_set in outputs.items():
            lp, text = by_set[name]
            agreements = clip_agreements(base_lp, lp)
            rows[backend.value] = {
                "agreement": round(float(np.mean(agreements)), 4),
                "min_agreement": round(min(agreements, default=1.0), 4),
                "letter_agreement": round(letter_agreement(base_lp, lp, blank_id), 4),
                "identical": round(identical_share(base_text, text), 4),
                "cer": round(cer(refs, text), 4),
                "cer_change_pp": round(100 * cer_change(refs, base_text, text), 2),
                "peaked": round(peakedness(lp), 4),
            }
        report["sets"][name] = {
            "clips": len(clips),
            "audio_s": round(sum(len(a) for _, _, a in clips) / 16_000, 1),
            "fp32_peaked": round(peakedness(base_lp), 4),
            "fp32_close_frames": round(margin_share(base_lp), 4),
            "backends": rows,
        }
    report["onnx_int8_recipe"] = getattr(backends, "int8_recipe", lambda: "?")()  # depends on the CPU
    report["seconds"] = {b.value: round(s, 1) for b, s in seconds.items()}
    report["errors"] = {b.value: e for b, e in errors.items()}
    return report


def table(reports: list[dict]) -> str:
    lines = [
        "## Backend accuracy on held-out speech (greedy; against torch-fp32 of the same model). agreement: frames "
        "with fp32's argmax, mean (min) over clips; letters: the same over the frames where fp32 emits a letter; "
        "identical: clips with fp32's transcript; CER vs the reference text, change in points vs fp32; peaked: "
        "median largest posterior (fp32: also the share of frames within 1 nat of a flip)",
        "| model | set (clips) | backend | agreement (min) | letters | identical | CER | CER change | peaked |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for report in reports:
        model = Path(report["model"]).name
        for name, s in report["sets"].items():
            for backend, r in s["backends"].items():
                peaked = f"{r['peaked']:.3f}"
                if backend == Backend.TORCH_FP32.value:
                    peaked += f" ({100 * s['fp32_close_frames']:.1f}% close)"
                lines.append(
                    f"| {model} | {name} ({s['clips']}) | {backend} | {100 * r['agreement']:.2f}% "
                    f"({100 * r['min_agreement']:.1f}%) | {100 * r['letter_agreement']:.2f}% | "
                    f"{100 * r['identical']:.1f}% | {100 * r['cer']:.2f}% | {r['cer_change_pp']:+.2f} | {peaked} |"
                )
        for backend, error in report["errors"].items():
            lines.append(f"| {model} | - | {backend} | unavailable: {error} | | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="repeatable (default: bundled)")
    parser.add_argument("--data", type=Path, default=DATA, help="the data set's directory (default: %(default)s)")
    parser.add_argument("--sets", default=",".join(SETS), help="held-out sets under --data (default: %(default)s)")
    parser.add_argument("--clips", type=int, default=100, help="the first N clips of each set (0: all)")
    parser.add_argument("--backends", default=",".join(b.value for b in CPU_BACKENDS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=CACHE, help="ONNX exports (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the reports here")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    missing = [s for s in args.sets.split(",") if not (args.data / s / "transcripts.tsv").exists()]
    if missing:
        raise SystemExit(
            f"held-out sets missing under {args.data}: {missing}; build them: python -m training.make_dataset "
            f"--out {args.data} --train-clips 800 --eval-clips 200"
        )
    sets = {s: read_clips(args.data / s, args.clips or None) for s in args.sets.split(",")}
    chosen = [Backend(b) for b in args.backends.split(",")]
    reports = []
    for name in args.model or ["bundled"]:
        started = time.perf_counter()
        report = compare(resolve_model(name), sets, chosen, args.threads, args.cache_dir)
        report["name"] = name
        report["total_s"] = round(time.perf_counter() - started, 1)
        reports.append(report)
        print(table([report]), flush=True)
        print(f"({name}: {report['total_s']} s; per backend, load + transcription: {report['seconds']}; ONNX int8 "
              f"recipe {report['onnx_int8_recipe']})", flush=True)  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(reports, indent=1, ensure_ascii=False))
    return reports


if __name__ == "__main__":
    main()
