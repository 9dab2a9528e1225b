"""Train the bundled Arabic CTC model on the synthetic data from ``training.make_dataset``.

Architecture: a small Wav2Vec2-BERT conformer over 80-bin log-mel filterbanks (``Wav2Vec2BertForCTC`` with a
``SeamlessM4TFeatureExtractor``). It loads through the same ``AutoModelForCTC``/``AutoProcessor`` code as any
wav2vec2 checkpoint. A raw-waveform wav2vec2 trained from scratch stays on the all-blank plateau for far longer on
2 CPU cores (``../shared/model-training-notes.md``); the filterbank front end leaves it within minutes.

    python -m training.train --data training/work/data --out worker/models/arabic-words-small --minutes 70

Stops at ``--max-steps`` or ``--minutes``, whichever first; the learning-rate schedule follows whichever is further
along, so a time-boxed run still anneals. Keeps the checkpoint with the best CER on the held-out eval set.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from transformers import (
    SeamlessM4TFeatureExtractor,
    Wav2Vec2BertConfig,
    Wav2Vec2BertForCTC,
    Wav2Vec2BertProcessor,
    Wav2Vec2CTCTokenizer,
)

from shared.text import ARABIC_LETTERS, edit_distance
from training.make_dataset import load_ragged, read_shard, save_ragged
from training.stream import ClipStream, ReplayBuffer
from training.synth import SAMPLE_RATE, decode_any

_EXTRACTOR = SeamlessM4TFeatureExtractor(sampling_rate=SAMPLE_RATE)


def build_processor(workdir: Path) -> Wav2Vec2BertProcessor:
    vocab = {"[PAD]": 0, "[UNK]": 1, "|": 2} | {ch: i + 3 for i, ch in enumerate(ARABIC_LETTERS)}
    vocab_file = workdir / "vocab.json"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    tokenizer = Wav2Vec2CTCTokenizer(str(vocab_file), unk_token="[UNK]", pad_token="[PAD]", word_delimiter_token="|")
    return Wav2Vec2BertProcessor(feature_extractor=_EXTRACTOR, tokenizer=tokenizer)


def build_model(processor: Wav2Vec2BertProcessor, layers: int, hidden: int) -> Wav2Vec2BertForCTC:
    config = Wav2Vec2BertConfig(
        vocab_size=len(processor.tokenizer),
        pad_token_id=processor.tokenizer.pad_token_id,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=hidden * 4,
        output_hidden_size=hidden,
        conv_depthwise_kernel_size=15,
        feature_projection_input_dim=160,
        hidden_dropout=0.05,
        attention_dropout=0.05,
        activation_dropout=0.05,
        feat_proj_dropout=0.05,
        final_dropout=0.1,
        layerdrop=0.0,
        mask_time_prob=0.08,
        mask_time_length=8,
        mask_feature_prob=0.05,
        mask_feature_length=16,
        ctc_loss_reduction="mean",
        ctc_zero_infinity=True,
        add_adapter=False,
    )
    return Wav2Vec2BertForCTC(config)


def features(audio: np.ndarray) -> np.ndarray:
    out = _EXTRACTOR(audio, sampling_rate=SAMPLE_RATE, return_tensors="np", return_attention_mask=False)
    return out["input_features"][0].astype(np.float16)


def _features_of_shard(path: Path) -> tuple[list[np.ndarray], list[str]]:
    torch.set_num_threads(1)
    clips = list(read_shard(path))
    return [features(audio) for audio, _ in clips], [text for _, text in clips]


def load_train(data: Path) -> tuple[list[np.ndarray], list[str]]:
    """Filterbank features of every training clip, computed once and cached beside the data (~1 GB)."""
    cache = data / "features.npz"
    if cache.exists():
        stored = np.load(cache)
        return load_ragged(stored, "feats"), [str(t) for t in stored["texts"]]
    feats, texts = [], []
    with multiprocessing.Pool() as pool:
        for f, t in pool.imap(_features_of_shard, sorted(data.glob("train-*.npz"))):
            feats += f
            texts += t
    save_ragged(cache, "feats", feats, texts=np.array(texts))
    return feats, texts


def load_eval(eval_dir: Path, limit: int | None = None) -> tuple[list[np.ndarray], list[str]]:
    rows = [line.split("\t") for line in (eval_dir / "transcripts.tsv").read_text(encoding="utf-8").splitlines()]
    rows = rows[:limit] if limit else rows
    return [features(decode_any((eval_dir / name).read_bytes())) for name, _ in rows], [t for _, t in rows]


def batches(lengths: list[int], max_frames: int, rng: random.Random, shortest_first: bool = False) -> list[list[int]]:
    """Length-bucketed batches of at most ``max_frames`` padded frames, in random order (or shortest first:
    SortaGrad, which gets CTC off the all-blank plateau sooner)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i] + rng.random() * 8)
    out, current, longest = [], [], 0
    for i in order:
        longest = max(longest, lengths[i])  # the jitter lets a shorter clip follow a longer one
        if current and (len(current) + 1) * longest > max_frames:
            out.append(current)
            current, longest = [], lengths[i]
        current.append(i)
    out.append(current)
    if not shortest_first:
        rng.shuffle(out)
    return out


def collate(feats: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(f) for f in feats)
    x = torch.zeros(len(feats), longest, feats[0].shape[1])
    mask = torch.zeros(len(feats), longest, dtype=torch.long)
    for i, f in enumerate(feats):
        x[i, : len(f)] = torch.from_numpy(f.astype(np.float32))
        mask[i, : len(f)] = 1
    return x, mask


def ctc_step(model, optimizer, x: torch.Tensor, mask: torch.Tensor, labels: list, device) -> float:
    """One optimizer step on a padded batch: the CTC loss of ``labels`` (label ids, padded with -100), gradients
    clipped at norm 5; returns the loss."""
    y = torch.full((len(labels), max(len(label) for label in labels)), -100, dtype=torch.long)
    for row, label in enumerate(labels):
        y[row, : len(label)] = torch.tensor(label)
    loss = model(input_features=x.to(device), attention_mask=mask.to(device), labels=y.to(device)).loss
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    optimizer.step()
    return loss.item()


@torch.inference_mode()
def evaluate(model, processor, feats, texts, batch_size: int = 32) -> tuple[float, float]:
    """Greedy CTC decode; returns (CER, exact-utterance accuracy)."""
    model.eval()
    errors = chars = exact = 0
    for start in range(0, len(feats), batch_size):
        x, mask = collate(feats[start : start + batch_size])
        ids = model(input_features=x.to(model.device), attention_mask=mask.to(model.device)).logits.argmax(-1)
        for hyp, ref in zip(processor.batch_decode(ids), texts[start : start + batch_size], strict=True):
            errors += edit_distance(hyp, ref)
            chars += len(ref)
            exact += hyp == ref
    model.train()
    return errors / max(chars, 1), exact / max(len(texts), 1)


def fixed_batches(feats, labels, max_frames: int, rng: random.Random, sorta_grad: bool) -> Iterator[list]:
    """Epochs over the stored clips, length-bucketed; the first shortest first when ``sorta_grad``."""
    lengths = [len(f) for f in feats]
    epoch = 0
    while True:
        epoch += 1
        for batch in batches(lengths, max_frames, rng, shortest_first=sorta_grad and epoch == 1):
            yield [(feats[i], labels[i]) for i in batch]


def streamed_batches(stream, buffer, tokenizer, min_clips: int, max_reuse: float) -> Iterator[list]:
    """Batches from the newest streamed clips; waits for the producers when clips would be reused too often."""
    while True:
        if len(buffer.items) < min_clips:
            need = min_clips - len(buffer.items)
        else:
            need = 32 if buffer.reuse() > max_reuse else 0
        for feats, text in stream.take(wait_for=need):
            buffer.add(feats, tokenizer(text).input_ids)
        yield buffer.next_batch(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("training/work/data"))
    parser.add_argument("--out", type=Path, default=Path("worker/models/arabic-words-small"))
    parser.add_argument("--minutes", type=float, default=70)
    parser.add_argument("--max-steps", type=int, default=20_000)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=150)
    parser.add_argument("--augment-after", type=int, default=600, help="SpecAugment from this step on")
    parser.add_argument("--max-frames", type=int, default=2000, help="padded feature frames per batch")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-clips", type=int, default=200, help="clips of DATA/eval scored at each evaluation")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--init-from", type=Path, help="continue from this checkpoint (same vocabulary): no SortaGrad, SpecAugment on"
    )
    parser.add_argument(
        "--stream-workers",
        type=int,
        default=0,
        help="make fresh clips in this many processes while training (words and voices from DATA/split.json) "
        "instead of reading DATA/train-*.npz; for many-core GPU machines",
    )
    parser.add_argument("--buffer-clips", type=int, default=60_000, help="streamed clips kept for batches")
    parser.add_argument("--min-clips", type=int, default=3_000, help="streamed clips to wait for before training")
    parser.add_argument("--max-reuse", type=float, default=6.0, help="times each streamed clip is used, on average")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    stream = None
    if args.stream_workers:  # before anything touches CUDA or starts thread pools
        split = json.loads((args.data / "split.json").read_text(encoding="utf-8"))
        stream = ClipStream(split["train_words"], split["train_voices"], args.stream_workers, args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.set_num_threads(args.threads)

    t0 = time.time()
    eval_feats, eval_texts = load_eval(args.data / "eval", limit=args.eval_clips)
    with tempfile.TemporaryDirectory() as tmp:
        processor = build_processor(Path(tmp))
        if stream:
            buffer = ReplayBuffer(args.buffer_clips, args.max_frames, rng)
            train_batches = streamed_batches(stream, buffer, processor.tokenizer, args.min_clips, args.max_reuse)
        else:
            feats, texts = load_train(args.data)
            labels = [processor.tokenizer(t).input_ids for t in texts]
            train_batches = fixed_batches(feats, labels, args.max_frames, rng, sorta_grad=not args.init_from)
        print(f"eval features: {len(eval_feats)} in {time.time() - t0:.0f} s; device {device}", flush=True)
        try:
            train(args, processor, train_batches, eval_feats, eval_texts, device, buffer if stream else None)
        finally:
            if stream:
                stream.close()


def train(args, processor, train_batches, eval_feats, eval_texts, device, buffer) -> None:
    if args.init_from:
        model = Wav2Vec2BertForCTC.from_pretrained(args.init_from).to(device)
        args.augment_after = 0  # already off the all-blank plateau
    else:
        model = build_model(processor, args.layers, args.hidden).to(device)
    spec_augment = (model.config.mask_time_prob, model.config.mask_feature_prob)
    model.config.mask_time_prob = model.config.mask_feature_prob = 0.0  # until CTC has left the plateau
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)

    def lr_at(progress: float, step: int) -> float:
        warm = min(1.0, step / args.warmup)
        return args.lr * warm * (0.03 + 0.97 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))

    def save_if_best(cer: float) -> None:
        nonlocal best_cer
        if cer < best_cer:
            best_cer = cer
            model.save_pretrained(args.out)
            processor.save_pretrained(args.out)

    model.train()
    step, best_cer, start = 0, float("inf"), time.time()
    losses: list[float] = []
    for batch in train_batches:
        if step == args.augment_after:
            model.config.mask_time_prob, model.config.mask_feature_prob = spec_augment
        progress = max(step / args.max_steps, (time.time() - start) / (args.minutes * 60))
        if progress >= 1.0:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(progress, step)
        x, mask = collate([f for f, _ in batch])
        losses.append(ctc_step(model, optimizer, x, mask, [label for _, label in batch], device))
        step += 1
        if step % 50 == 0:
            rate = (time.time() - start) / step
            made = f" clips {buffer.added} reuse {buffer.reuse():.1f}" if buffer else ""
            print(
                f"step {step} loss {np.mean(losses[-50:]):.3f} lr {lr_at(progress, step):.2e} "
                f"{rate:.3f} s/step progress {progress:.2f}{made}",
                flush=True,
            )
        if step % args.eval_every == 0:
            cer, acc = evaluate(model, processor, eval_feats, eval_texts)
            print(f"eval step {step}: CER {cer:.4f} exact {acc:.3f}", flush=True)
            save_if_best(cer)
    cer, acc = evaluate(model, processor, eval_feats, eval_texts)
    print(f"final step {step}: CER {cer:.4f} exact {acc:.3f}; {(time.time() - start) / 60:.1f} min", flush=True)
    save_if_best(cer)


if __name__ == "__main__":
    main()
