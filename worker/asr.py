"""CTC speech recognition: load a checkpoint, run it, turn frame posteriors into text, confidence and word times.

``load_model`` takes any CTC checkpoint ``AutoModelForCTC``/``AutoProcessor`` can load (a local directory or a
hub id): wav2vec2 (raw waveform) and Wav2Vec2-BERT (filterbank) alike. ``infer`` and ``postprocess`` are pure.

Confidence: each emitted character gets the mean posterior of its argmax label over the frames of its CTC run;
a word's confidence is the lowest of its characters' (one doubtful letter makes the word doubtful); the
transcript's is the lowest of its words'. With no words, it is the mean blank posterior (sure that nothing
was said). All in [0, 1].
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCTC, AutoProcessor

from shared.schema import WordTiming

log = logging.getLogger(__name__)
SAMPLE_RATE = 16_000


@dataclass
class LoadedModel:
    model: torch.nn.Module
    feature_extractor: object
    device: torch.device
    name: str
    id_to_token: list[str]
    blank_id: int
    delimiter: str
    special_ids: frozenset[int]
    samples_per_frame: float | None  # from the config where it says; else measured per clip


def select_device(process_index: int = 0) -> torch.device:
    """CUDA GPU ``process_index % n_gpus`` when there are GPUs, else the CPU."""
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return torch.device("cuda", process_index % torch.cuda.device_count())
    return torch.device("cpu")


def load_model(name_or_path: str, device: torch.device | None = None, threads: int = 0) -> LoadedModel:
    """Load a CTC checkpoint and its processor with ``from_pretrained`` and put it in eval mode on ``device``."""
    device = device or torch.device("cpu")
    if device.type == "cpu" and threads > 0:
        torch.set_num_threads(threads)
    processor = AutoProcessor.from_pretrained(name_or_path)
    model = AutoModelForCTC.from_pretrained(name_or_path).to(device).eval()
    tokenizer = processor.tokenizer
    vocab = tokenizer.get_vocab()
    id_to_token = [""] * (max(vocab.values()) + 1)
    for token, idx in vocab.items():
        id_to_token[idx] = token
    blank_id = model.config.pad_token_id if model.config.pad_token_id is not None else tokenizer.pad_token_id
    ratio = getattr(model.config, "inputs_to_logits_ratio", None)  # wav2vec2: product of the conv strides
    return LoadedModel(
        model=model,
        feature_extractor=processor.feature_extractor,
        device=device,
        name=_display_name(name_or_path),
        id_to_token=id_to_token,
        blank_id=int(blank_id),
        delimiter=getattr(tokenizer, "word_delimiter_token", None) or "|",
        special_ids=frozenset(tokenizer.all_special_ids) - {int(blank_id)},
        samples_per_frame=float(ratio) if ratio else None,
    )


def _display_name(name_or_path: str) -> str:
    """A local checkpoint is named by its directory (clients need not see server paths); a hub id as it is."""
    path = Path(name_or_path)
    return path.name if path.is_dir() else str(name_or_path)


def warm_up(loaded: LoadedModel, seconds: tuple[float, ...] = (1.0, 2.5)) -> float:
    """Run the model on low noise of the given lengths (first-call allocations, kernel choice); return ms."""
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    for s in seconds:
        infer(loaded, (rng.standard_normal(int(s * SAMPLE_RATE)) * 1e-3).astype(np.float32))
    return (time.perf_counter() - start) * 1000


@torch.inference_mode()
def infer(loaded: LoadedModel, audio: np.ndarray) -> np.ndarray:
    """16 kHz mono float32 -> (frames, vocab) float32 log-posteriors."""
    inputs = loaded.feature_extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt")
    inputs = {k: v.to(loaded.device) for k, v in inputs.items()}
    if loaded.device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.float16):
            logits = loaded.model(**inputs).logits
    else:
        logits = loaded.model(**inputs).logits
    return torch.log_softmax(logits[0].float(), dim=-1).cpu().numpy()


@dataclass(frozen=True)
class Transcript:
    text: str
    confidence: float
    words: list[WordTiming]


def postprocess(
    log_probs: np.ndarray,
    id_to_token: list[str],
    blank_id: int,
    frame_s: float,
    delimiter: str = "|",
    special_ids: frozenset[int] = frozenset(),
) -> Transcript:
    """Greedy CTC decoding of (frames, vocab) log-posteriors into text, confidence and word timings."""
    if log_probs.shape[0] == 0:
        return Transcript("", 0.0, [])
    best = log_probs.argmax(axis=1)
    best_p = np.exp(log_probs[np.arange(len(best)), best])
    # runs of identical argmax labels: [start, end) frame ranges
    change = np.flatnonzero(np.diff(best)) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [len(best)]])

    words: list[WordTiming] = []
    chars: list[str] = []
    char_conf: list[float] = []
    word_start = word_end = 0

    def close_word() -> None:
        if chars:
            words.append(
                WordTiming(
                    word="".join(chars),
                    start=round(word_start * frame_s, 3),
                    end=round(word_end * frame_s, 3),
                    confidence=round(float(min(char_conf)), 4),
                )
            )
        chars.clear()
        char_conf.clear()

    for s, e in zip(starts, ends, strict=True):
        label = int(best[s])
        if label == blank_id or label in special_ids:
            continue
        token = id_to_token[label] if label < len(id_to_token) else ""
        if token == delimiter or token.isspace():
            close_word()
            continue
        if not chars:
            word_start = s
        chars.append(token)
        char_conf.append(float(best_p[s:e].mean()))
        word_end = e
    close_word()

    confidence = min(w.confidence for w in words) if words else float(np.exp(log_probs[:, blank_id]).mean())
    return Transcript(" ".join(w.word for w in words), round(float(confidence), 4), words)


def transcribe_audio(loaded: LoadedModel, audio: np.ndarray) -> Transcript:
    """``infer`` then ``postprocess`` with the model's vocabulary and frame duration."""
    log_probs = infer(loaded, audio)
    per_frame = loaded.samples_per_frame or len(audio) / max(log_probs.shape[0], 1)
    return postprocess(
        log_probs,
        loaded.id_to_token,
        loaded.blank_id,
        frame_s=per_frame / SAMPLE_RATE,
        delimiter=loaded.delimiter,
        special_ids=loaded.special_ids,
    )
