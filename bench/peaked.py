"""Checkpoints with peaked posteriors for ``bench.accuracy``: wav2vec2-large (or -base) shaped, trained briefly on the
synthetic training set, saved under bench/work/ (gitignored, never committed).

A random-weight checkpoint (``bench.models.reference_checkpoint``) has flat posteriors: every frame's argmax is a
near-tie, so int8 rounding flips labels whatever the backend's quality, and comparing backends on it says nothing.

On the CPU (the default there) only the CTC head is trained: the random encoder of ``reference_checkpoint(kind)`` is
kept frozen, its last hidden states are computed once for ``--clips`` training clips, and ``lm_head`` is fitted to
them with the CTC loss (seconds); the whole model is then saved. Full fine-tuning of 315 M parameters on 2 CPU cores
would take hours; the head alone is enough for the purpose: the posteriors on speech become peaked, the greedy
transcripts get a real (weak) CER, and a backend that perturbs the encoder's features (int8) moves the logits the
head relies on, so its agreement with fp32 means something. With ``--full`` (the default on a CUDA GPU) the head is
fitted first the same way, then the whole model (but the convolutional feature encoder) is fine-tuned for ``--steps``
steps on the raw audio.

    python -m training.make_dataset --out bench/work/data --train-clips 800 --eval-clips 200
    python -m bench.peaked --kind large --clips 800      # -> bench/work/wav2vec2-large-peaked
    python -m bench.accuracy --model large-peaked --clips 50

What it did (clips, seconds, the CTC loss before and after, greedy CER on held-back training clips) is written to
``training.json`` in the checkpoint.

Measured (2 cores shared with other jobs, December 2026), large, 800 clips (720 trained on, 1554 s of audio): the
frozen encoder's states 400 s, the head 76 s (150 epochs), 8.1 min in all; median largest posterior 0.09 -> 0.98;
greedy CER on the 80 held-back clips 2.59 (random head) -> 0.84; on ``eval`` 0.84, ``eval-seen-voices`` 0.80 (50 clips
each, ``bench.accuracy``). 270 clips left the held-back CER at 0.91, 60 epochs at 0.95 (all but silent); dropout on
the states did not help. A linear head on a random encoder's frames is weak: the CER is real but poor, enough for
peaked posteriors whose argmaxes a backend's rounding may or may not flip. Base, 800 clips: 7.8 min (states
340 s with the 2 cores busier), held-back CER 7.12 -> 0.86; ``eval`` 0.86, ``eval-seen-voices`` 0.83.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from bench.models import WORK, reference_checkpoint

DATA = WORK / "data"


def peaked_path(kind: str) -> Path:
    return WORK / f"wav2vec2-{kind}-peaked"


def training_clips(data: Path, limit: int) -> tuple[list[np.ndarray], list[str]]:
    """The first ``limit`` clips of the data set's training shards (``training.make_dataset``): audio and text."""
    from training.make_dataset import read_shard

    audios, texts = [], []
    for shard_path in sorted(data.glob("train-*.npz")):
        for audio, text in read_shard(shard_path):
            audios.append(audio)
            texts.append(text)
            if len(audios) == limit:
                return audios, texts
    return audios, texts


def label_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """The CTC targets: the tokenizer's ids (a space becomes the word delimiter)."""
    return [tokenizer(text).input_ids for text in texts]


@torch.inference_mode()
def encoder_states(model, extractor, audios: Sequence[np.ndarray], mask_safe: bool) -> list[np.ndarray]:
    """The frozen encoder's last hidden states of each clip alone, ``(frames, hidden)`` float16 (what ``lm_head`` of
    a ``Wav2Vec2ForCTC`` in eval mode sees)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for audio in audios:
        inputs = extractor(audio, sampling_rate=16_000, return_tensors="pt", return_attention_mask=mask_safe)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        hidden = model.wav2vec2(**inputs).last_hidden_state[0]
        out.append(hidden.float().cpu().numpy().astype(np.float16))
    return out


def cached_encoder_states(
    model, extractor, audios: Sequence[np.ndarray], mask_safe: bool, cache: Path | None
) -> list[np.ndarray]:
    """``encoder_states``, kept in ``cache`` (an .npz) so that fitting the head again does not rerun the encoder."""
    from training.make_dataset import load_ragged, save_ragged

    if cache is not None and cache.exists():
        stored = np.load(cache)
        if len(stored["lengths"]) == len(audios):
            return load_ragged(stored, "states")
    states = encoder_states(model, extractor, audios, mask_safe)
    if cache is not None:
        tmp = cache.with_name(cache.stem + ".tmp.npz")
        save_ragged(tmp, "states", states)
        tmp.rename(cache)
    return states


def _padded(states: Sequence[np.ndarray], labels: Sequence[list[int]]) -> tuple[torch.Tensor, ...]:
    x = torch.zeros(len(states), max(len(s) for s in states), states[0].shape[1])
    for i, s in enumerate(states):
        x[i, : len(s)] = torch.from_numpy(s.astype(np.float32))
    y = torch.zeros(len(labels), max(len(label) for label in labels), dtype=torch.long)
    for i, label in enumerate(labels):
        y[i, : len(label)] = torch.tensor(label)
    frames = torch.tensor([len(s) for s in states])
    lengths = torch.tensor([len(label) for label in labels])
    return x, y, frames, lengths


def head_loss(head: torch.nn.Module, states, labels, blank_id: int) -> torch.Tensor:
    """Mean CTC loss (per target label) of ``head`` over cached encoder states."""
    x, y, frames, lengths = _padded(states, labels)
    log_probs = head(x).log_softmax(-1).transpose(0, 1)  # (frames, batch, vocab)
    return torch.nn.functional.ctc_loss(log_probs, y, frames, lengths, blank=blank_id, zero_infinity=True)


def train_head(
    head: torch.nn.Module,
    states: Sequence[np.ndarray],
    labels: Sequence[list[int]],
    blank_id: int,
    epochs: int = 40,
    batch: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
) -> list[float]:
    """Fit the CTC head to cached encoder states (Adam, shuffled batches, cosine learning rate); the mean loss of
    each epoch."""
    rng = random.Random(seed)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    order = list(range(len(states)))
    total = epochs * -(-len(order) // batch)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total, 1))
    head.train()
    history = []
    for _ in range(epochs):
        rng.shuffle(order)
        losses = []
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            loss = head_loss(head, [states[i] for i in idx], [labels[i] for i in idx], blank_id)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        history.append(float(np.mean(losses)))
    head.eval()
    return history


def train_full(
    model,
    extractor,
    audios: Sequence[np.ndarray],
    labels: Sequence[list[int]],
    mask_safe: bool,
    steps: int,
    batch: int = 8,
    lr: float = 3e-5,
    seed: int = 0,
) -> list[float]:
    """Fine-tune the whole model but its convolutional feature encoder on raw audio (a GPU's job); each step's loss."""
    device = next(model.parameters()).device
    rng = random.Random(seed)
    model.config.ctc_loss_reduction, model.config.ctc_zero_infinity = "mean", True
    model.freeze_feature_encoder()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    history = []
    for step in range(steps):
        idx = rng.sample(range(len(audios)), min(batch, len(audios)))
        inputs = extractor([audios[i] for i in idx], sampling_rate=16_000, return_tensors="pt", padding=True,
                           return_attention_mask=mask_safe)  # fmt: skip
        y = torch.full((len(idx), max(len(labels[i]) for i in idx)), -100, dtype=torch.long)
        for row, i in enumerate(idx):
            y[row, : len(labels[i])] = torch.tensor(labels[i])
        for group in optimizer.param_groups:  # linear warm-up over the first tenth
            group["lr"] = lr * min(1.0, (step + 1) / max(1, steps // 10))
        loss = model(**{k: v.to(device) for k, v in inputs.items()}, labels=y.to(device)).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        optimizer.step()
        history.append(loss.item())
    model.eval()
    return history


def greedy_cer(head: torch.nn.Module, states, texts: Sequence[str], tokenizer, blank_id: int) -> float:
    """Greedy CER of the head's transcripts of cached states (``arabic-words evaluate``'s CER)."""
    from arabic_words.metrics import corpus_scores
    from worker.decoding import greedy_labels

    hyps = []
    with torch.inference_mode():
        for s in states:
            logits = head(torch.from_numpy(s.astype(np.float32))).numpy()
            hyps.append(tokenizer.decode(greedy_labels(logits, blank_id), group_tokens=False))
    return corpus_scores(list(zip(texts, hyps, strict=True)))["cer"]


def median_peak(head: torch.nn.Module, states) -> float:
    """The head's median top posterior over every frame of ``states`` (``backends.peakedness``, as ``auto``)."""
    from worker.backends import peakedness

    with torch.inference_mode():
        logits = [head(torch.from_numpy(s.astype(np.float32))).numpy() for s in states]
    return peakedness(np.concatenate(logits))


def build(
    kind: str,
    data: Path = DATA,
    clips: int = 800,
    epochs: int = 150,
    full: bool = False,
    steps: int = 2000,
    threads: int = 0,
    source: Path | None = None,
    out: Path | None = None,
    states_cache: Path | None = None,
) -> dict:
    """Train the head (and with ``full`` then the whole model) of ``source`` (default: ``reference_checkpoint(kind)``)
    on ``clips`` training clips (a tenth held back for the reported CER) and save it to ``out``. ``states_cache``: an
    .npz keeping the frozen encoder's states of those clips between runs."""
    from transformers import AutoProcessor, Wav2Vec2ForCTC

    if threads > 0:
        torch.set_num_threads(threads)
    source = source or reference_checkpoint(kind)
    out = out or peaked_path(kind)
    device = torch.device("cuda" if full and torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    processor = AutoProcessor.from_pretrained(source)
    extractor, tokenizer = processor.feature_extractor, processor.tokenizer
    mask_safe = bool(getattr(extractor, "return_attention_mask", False))
    model = Wav2Vec2ForCTC.from_pretrained(source).to(device).eval()
    blank_id = model.config.pad_token_id
    audios, texts = training_clips(data, clips)
    if not audios:
        raise SystemExit(f"no training clips under {data}: python -m training.make_dataset --out {data}")
    labels = label_ids(tokenizer, texts)
    n_held = max(1, len(audios) // 10)
    report: dict = {"source": str(source), "mode": "full" if full else "head", "device": device.type,
                    "clips": len(audios) - n_held, "held_back_clips": n_held,
                    "audio_s": round(sum(len(a) for a in audios) / 16_000, 1)}  # fmt: skip

    t0 = time.perf_counter()
    report["states_cached"] = bool(states_cache and states_cache.exists())
    states = cached_encoder_states(model, extractor, audios, mask_safe, states_cache)
    report["encoder_s"] = round(time.perf_counter() - t0, 1)
    train_states, held_states = states[n_held:], states[:n_held]
    head = model.lm_head.cpu()
    report["random_peaked"] = round(median_peak(head, held_states), 4)
    report["random_held_back_cer"] = round(greedy_cer(head, held_states, texts[:n_held], tokenizer, blank_id), 4)
    t0 = time.perf_counter()
    history = train_head(head, train_states, labels[n_held:], blank_id, epochs=epochs)
    report["head_s"] = round(time.perf_counter() - t0, 1)
    report["head_loss"] = [round(history[0], 3), round(history[-1], 3)]
    with torch.no_grad():
        report["head_held_back_loss"] = round(head_loss(head, held_states, labels[:n_held], blank_id).item(), 3)
    report["peaked"] = round(median_peak(head, held_states), 4)
    report["held_back_cer"] = round(greedy_cer(head, held_states, texts[:n_held], tokenizer, blank_id), 4)
    model.lm_head = head.to(device)
    if full:
        t0 = time.perf_counter()
        losses = train_full(model, extractor, audios[n_held:], labels[n_held:], mask_safe, steps)
        report["full_s"] = round(time.perf_counter() - t0, 1)
        report["full_loss"] = [round(float(np.mean(losses[:20])), 3), round(float(np.mean(losses[-20:])), 3)]
        held = encoder_states(model, extractor, audios[:n_held], mask_safe)
        head = model.lm_head.cpu()
        report["peaked"] = round(median_peak(head, held), 4)
        report["held_back_cer"] = round(greedy_cer(head, held, texts[:n_held], tokenizer, blank_id), 4)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.cpu().eval().save_pretrained(tmp)
    processor.save_pretrained(tmp)
    report["seconds"] = round(time.perf_counter() - started, 1)
    (tmp / "training.json").write_text(json.dumps(report, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=["large", "base"], default="large")
    parser.add_argument("--data", type=Path, default=DATA, help="training.make_dataset's output (%(default)s)")
    parser.add_argument("--clips", type=int, default=800, help="training clips (a tenth held back)")
    parser.add_argument("--epochs", type=int, default=150, help="head training epochs over the cached states")
    parser.add_argument("--full", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available(),
                        help="then fine-tune the whole model (default: on a CUDA GPU only)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=2000, help="--full's fine-tuning steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="default: bench/work/wav2vec2-KIND-peaked")
    args = parser.parse_args(argv)
    import logging
    import warnings

    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    states = WORK / f"states-{args.kind}-{args.data.name}-{args.clips}.npz"  # reference_checkpoint: fixed seed
    report = build(args.kind, args.data, args.clips, args.epochs, args.full, args.steps, args.threads, out=args.out,
                   states_cache=states)  # fmt: skip
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
