"""Model benchmarks: every backend on the bundled model and on wav2vec2 base/large architectures built from their
configs with random weights (speed does not depend on the weights; no hub needed).

Each (model, backend) runs in its own process, so its peak RSS is its own:

    python -m bench.models --model large --backend onnx-int8 --threads 2

``--compare`` (issue 19) times every CPU backend and ``auto`` on one 2.2 s clip, each in its own process and loaded
the way the CLI and the worker load it (``worker.model.load_configured_model``), beside torch fp32 eager measured in
the same run, and marks the target (<= 300 ms and >= 2.5x fp32 eager for the large model) met or MISSED:

    python -m bench.models --model large --compare --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from worker.audio import SAMPLE_RATE

HERE = Path(__file__).parent
WORK = HERE / "work"  # random-weight checkpoints and the ONNX cache (gitignored)


def reference_checkpoint(kind: str) -> Path:
    """wav2vec2-large (XLSR-53 shape: stable layer norm, attention mask) or -base (group norm, no mask) with a
    character vocabulary of Arabic letters and random weights, saved once under bench/work/."""
    from shared.config import BUNDLED_MODEL_DIR

    if kind == "bundled":
        return BUNDLED_MODEL_DIR
    path = WORK / f"wav2vec2-{kind}-random"
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import (
        Wav2Vec2Config,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForCTC,
        Wav2Vec2Processor,
    )

    from shared.text import ARABIC_LETTERS

    path.mkdir(parents=True, exist_ok=True)
    vocab = {"<pad>": 0, "<unk>": 1, "|": 2} | {c: i + 3 for i, c in enumerate(ARABIC_LETTERS)}
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    tokenizer = Wav2Vec2CTCTokenizer(str(path / "vocab.json"), pad_token="<pad>", unk_token="<unk>")
    large = kind == "large"
    config = Wav2Vec2Config(
        vocab_size=len(vocab),
        pad_token_id=0,
        hidden_size=1024 if large else 768,
        num_hidden_layers=24 if large else 12,
        num_attention_heads=16 if large else 12,
        intermediate_size=4096 if large else 3072,
        feat_extract_norm="layer" if large else "group",
        do_stable_layer_norm=large,
        conv_bias=large,
    )
    extractor = Wav2Vec2FeatureExtractor(sampling_rate=SAMPLE_RATE, return_attention_mask=large)
    torch.manual_seed(0)
    Wav2Vec2ForCTC(config).save_pretrained(path)
    Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(path)
    return path


def measure(kind: str, backend: str, threads: int, runs: int, batch_runs: int, device: str) -> dict:
    """Load (+ warm-up) time, latency per clip length, throughput per batch size, peak RSS: one process."""
    import torch

    from bench.__main__ import median_ms, speech
    from worker.asr import infer, infer_batch, load_model, warm_up

    torch.set_num_threads(threads)
    path = reference_checkpoint(kind)
    started = time.perf_counter()
    model = load_model(
        str(path), device=torch.device(device), threads=threads, backend=backend, cache_dir=WORK / "cache"
    )
    load_s = time.perf_counter() - started
    warm_ms = warm_up(model)
    out: dict = {
        "model": kind,
        "backend": model.backend.value,
        "device": device,
        "load_s": round(load_s, 2),
        "cold_start_s": round(load_s + warm_ms / 1000, 2),
        "latency_ms": {},
        "throughput_audio_s_per_s": {},
    }
    for seconds in (1.0, 2.2, 5.0):
        audio = speech(seconds)
        out["latency_ms"][str(seconds)] = round(median_ms(lambda a=audio: infer(model, a), runs, warmup=1), 1)
    clip = speech(2.2)
    for n in (1, 4, 16):
        batch = [clip] * n
        elapsed = median_ms(lambda b=batch: infer_batch(model, b), batch_runs, warmup=1) / 1000
        out["throughput_audio_s_per_s"][str(n)] = round(n * 2.2 / elapsed, 1)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def run_isolated(kind: str, backend: str, threads: int, runs: int, batch_runs: int, device: str) -> dict:
    """``measure`` in a fresh process (clean peak RSS, no state carried between backends)."""
    cmd = [sys.executable, "-m", "bench.models", "--model", kind, "--backend", backend, "--threads", str(threads),
           "--runs", str(runs), "--batch-runs", str(batch_runs), "--device", device]  # fmt: skip
    # a first process fills the export cache, so the measured one loads as a restarted worker does
    proc = subprocess.run([*cmd, "--prepare"], cwd=HERE.parent, capture_output=True, text=True)
    if proc.returncode == 0:
        proc = subprocess.run(cmd, cwd=HERE.parent, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"model": kind, "backend": backend, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


COMPARE_BACKENDS = ("torch-fp32", "torch-int8", "onnx-fp32", "onnx-int8", "auto")
TARGET_MS = {"bundled": 50, "base": 150, "large": 300}  # 2.2 s clip, 2 CPU cores (issue 19 for large)
TARGET_RATIO = 2.5  # x torch fp32 eager, same run


def measure_cli_path(kind: str, backend: str, threads: int, runs: int) -> dict:
    """One backend loaded as `arabic-words transcribe` and the worker load it (``load_configured_model`` with
    ASR_BACKEND, TORCH_THREADS and ASR_CACHE_DIR set): the first forward pass after loading, then the median of
    ``infer`` on a 2.2 s speech clip and of the pipeline's ``inference`` time (forward pass and decoding)."""
    import io

    import soundfile as sf
    import torch

    from bench.__main__ import median_ms, speech
    from shared.config import Settings
    from worker.asr import infer, select_device
    from worker.model import load_configured_model
    from worker.pipeline import transcribe_bytes

    path = reference_checkpoint(kind)
    settings = Settings(
        ASR_MODEL=str(path), ASR_BACKEND=backend, TORCH_THREADS=threads, ASR_CACHE_DIR=str(WORK / "cache")
    )
    started = time.perf_counter()
    model = load_configured_model(settings, select_device(0))
    load_s = time.perf_counter() - started
    clip = speech(2.2)
    started = time.perf_counter()
    infer(model, clip)
    first_ms = (time.perf_counter() - started) * 1000
    infer_ms = median_ms(lambda: infer(model, clip), runs, warmup=0)  # the first call above was the warm-up
    buffer = io.BytesIO()
    sf.write(buffer, clip, SAMPLE_RATE, format="WAV")
    pipeline = [
        transcribe_bytes(model, buffer.getvalue(), max_audio_s=settings.MAX_AUDIO_S).timings_ms["inference"]
        for _ in range(max(3, runs // 2))
    ]
    out = {
        "model": kind,
        "asked": backend,
        "backend": model.backend.value,
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
        "load_s": round(load_s, 2),
        "first_infer_ms": round(first_ms, 1),
        "infer_2.2s_ms": round(infer_ms, 1),
        "pipeline_inference_2.2s_ms": round(float(np.median(pipeline)), 1),
    }
    if backend == "auto":  # what auto measured, here or (usually: --prepare measured it) in an earlier process
        from worker import backends

        cache = WORK / "cache"
        checkpoint = backends.checkpoint_hash(str(path), lambda: None, cache)  # a local directory: no model load
        stored = backends._read_json(cache / f"{checkpoint}-{backends.EXPORT_FORMAT}" / "auto.json")
        out["calibration"] = model.calibration or stored.get(backends.machine_key(threads))
    return out


def compare(kind: str, threads: int, runs: int) -> list[dict]:
    """``measure_cli_path`` for every CPU backend and ``auto``, each in a fresh process (after a first process that
    fills the export cache and ``auto``'s stored choice, as a restarted worker finds them); prints the table."""
    rows = []
    for backend in COMPARE_BACKENDS:
        base = [sys.executable, "-m", "bench.models", "--model", kind, "--backend", backend, "--threads", str(threads)]
        proc = subprocess.run([*base, "--prepare"], cwd=HERE.parent, capture_output=True, text=True)
        if proc.returncode == 0:
            proc = subprocess.run([*base, "--cli-path", "--runs", str(runs)], cwd=HERE.parent, capture_output=True,
                                  text=True)  # fmt: skip
        if proc.returncode != 0:
            rows.append({"model": kind, "asked": backend, "error": proc.stderr.strip().splitlines()[-1:]})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    reference = next((r["infer_2.2s_ms"] for r in rows if r.get("asked") == "torch-fp32" and "error" not in r), None)
    target = TARGET_MS[kind]
    print(f"\n## {kind}, 2.2 s clip, {threads} threads, loaded as the CLI loads it: median of {runs} (ms); "
          f"target <= {target} ms and >= {TARGET_RATIO}x torch-fp32 eager")  # fmt: skip
    print(f"{'asked':<12}{'runs as':<13}{'first':>8}{'infer':>8}{'x fp32':>8}{'pipeline':>10}  target")
    for row in rows:
        if "error" in row:
            print(f"{row['asked']:<12}failed: {row['error']}")
            continue
        ratio = reference / row["infer_2.2s_ms"] if reference else float("nan")
        row["ratio_vs_fp32_eager"] = round(ratio, 2)
        met = row["infer_2.2s_ms"] <= target and ratio >= TARGET_RATIO
        row["target_met"] = met
        print(f"{row['asked']:<12}{row['backend']:<13}{row['first_infer_ms']:>8.1f}{row['infer_2.2s_ms']:>8.1f}"
              f"{ratio:>7.2f}x{row['pipeline_inference_2.2s_ms']:>10.1f}  {'met' if met else 'MISSED'}")  # fmt: skip
    auto = next((r for r in rows if r.get("asked") == "auto" and "calibration" in r), None)
    if auto and auto["calibration"]:
        measured = {b: m["median_ms"] for b, m in auto["calibration"]["measured"].items()}
        print(f"auto chose {auto['calibration']['choice']} (its own medians, ms: {measured}); "
              f"accuracy: {auto['calibration'].get('accuracy', '')}")  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["bundled", "base", "large"], required=True)
    parser.add_argument("--backend", help="required unless --compare")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--batch-runs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prepare", action="store_true", help="only load once (exports, quantizes) and exit")
    parser.add_argument("--compare", action="store_true", help="every backend and auto, as the CLI loads them")
    parser.add_argument("--cli-path", action="store_true", help="(one --compare row) load as the CLI does")
    args = parser.parse_args()
    if not args.compare and not args.backend:
        parser.error("--backend is required unless --compare")
    import logging
    import warnings

    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    np.seterr(all="ignore")
    if args.compare:
        print(json.dumps(compare(args.model, args.threads, args.runs)))
        return
    if args.cli_path:
        print(json.dumps(measure_cli_path(args.model, args.backend, args.threads, args.runs)))
        return
    if args.prepare:
        import torch

        from worker.asr import load_model

        path = reference_checkpoint(args.model)
        load_model(str(path), device=torch.device(args.device), threads=args.threads, backend=args.backend,
                   cache_dir=WORK / "cache")  # fmt: skip
        return
    print(json.dumps(measure(args.model, args.backend, args.threads, args.runs, args.batch_runs, args.device)))


if __name__ == "__main__":
    main()
