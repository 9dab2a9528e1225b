"""CTC speech recognition, load and forward: a checkpoint in, (frames, vocab) log-posteriors out.

``load_model`` takes any CTC checkpoint ``AutoModelForCTC``/``AutoProcessor`` can load (a local directory or a
hub id): wav2vec2 (raw waveform) and Wav2Vec2-BERT (filterbank) alike, and runs it through one of the backends in
``worker.backends``. ``infer``/``infer_batch`` are pure; ``worker.decoding`` turns their output into a transcript.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from threadpoolctl import threadpool_limits
from transformers import AutoConfig, AutoModelForCTC, AutoProcessor
from transformers.utils import logging as transformers_logging

import worker.whisper_ctc  # noqa: F401  registers whisper-ctc checkpoints with the Auto classes
from worker import backends
from worker.audio import SAMPLE_RATE
from worker.backends import Backend, Runner
from worker.decoding import BeamDecoder, Vocabulary, word_posterior
from worker.features import fast_feature_extractor

log = logging.getLogger(__name__)

FeatureExtractor = Callable[..., Mapping[str, Any]]  # a transformers feature extractor: audio -> model inputs


@dataclass
class LoadedModel:
    runner: Runner
    feature_extractor: FeatureExtractor
    device: torch.device
    name: str
    backend: Backend
    vocabulary: Vocabulary
    samples_per_frame: float | None  # from the config where it says; else measured per clip
    mask_safe: bool  # the feature extractor gives an attention mask, so padded batches are exact
    model_type: str = ""
    calibration: dict | None = None  # what `auto` measured, when it measured
    decoder: BeamDecoder | None = None  # None: greedy decoding


def select_device(process_index: int = 0) -> torch.device:
    """CUDA GPU ``process_index % n_gpus`` when there are GPUs, else the CPU."""
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return torch.device("cuda", process_index % torch.cuda.device_count())
    return torch.device("cpu")


def load_model(
    name_or_path: str,
    device: torch.device | None = None,
    threads: int = 0,
    backend: Backend | str = Backend.TORCH_FP32,
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load a CTC checkpoint and its processor with ``from_pretrained`` and wrap it in an inference backend.

    ``backend``: see ``worker.backends``. On a CUDA ``device`` ``auto`` is torch fp16; ONNX backends always run on
    the CPU; ``torch-fp16`` without CUDA falls back to torch fp32. ``cache_dir`` holds ONNX exports and ``auto``'s
    measurements (default ``~/.cache/arabic-words``).
    """
    backend = Backend(backend)
    device = device or torch.device("cpu")
    cache_dir = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "arabic-words"
    if device.type == "cpu" and threads > 0:
        torch.set_num_threads(threads)
    # numpy's BLAS only serves the feature extractor's small products, and its idle threads spin on the cores that
    # torch or ONNX Runtime and the decoder need next: one thread. Bundled model, 2 cores, a 2.2 s clip inferred back
    # to back (medians): torch fp32 47 -> 16 ms, torch int8 90 -> 15 ms, ONNX fp32 30 -> 13 ms.
    threadpool_limits(limits=1, user_api="blas")
    transformers_logging.disable_progress_bar()  # a worker's log and a CLI's stderr are not terminals
    if device.type == "cuda" and backend in (Backend.AUTO, Backend.TORCH_INT8):
        backend = Backend.TORCH_FP16  # dynamic int8 is a CPU technique
    if device.type != "cuda" and backend is Backend.TORCH_FP16:
        log.warning("torch-fp16 needs a CUDA GPU; using torch-fp32 on the CPU")
        backend = Backend.TORCH_FP32
    if backend in (Backend.ONNX_FP32, Backend.ONNX_INT8):
        device = torch.device("cpu")

    processor = AutoProcessor.from_pretrained(name_or_path)
    config = AutoConfig.from_pretrained(name_or_path)
    extractor = fast_feature_extractor(processor.feature_extractor)
    mask_safe = bool(getattr(extractor, "return_attention_mask", False))
    blank_id = config.pad_token_id if config.pad_token_id is not None else processor.tokenizer.pad_token_id
    builder = _RunnerBuilder(name_or_path, device, threads, cache_dir, extractor, mask_safe, int(blank_id))
    calibration = None
    if backend is Backend.AUTO:
        backend, calibration = builder.choose()
    runner = builder.build(backend)

    tokenizer = processor.tokenizer
    vocab = tokenizer.get_vocab()
    id_to_token = [""] * (max(vocab.values()) + 1)
    for token, idx in vocab.items():
        id_to_token[idx] = token
    ratio = getattr(config, "inputs_to_logits_ratio", None)  # wav2vec2: product of the conv strides
    delimiter = getattr(tokenizer, "word_delimiter_token", None) or "|"
    return LoadedModel(
        runner=runner,
        feature_extractor=extractor,
        device=device,
        name=_display_name(name_or_path),
        backend=backend,
        vocabulary=Vocabulary.from_tokens(id_to_token, int(blank_id), delimiter, tokenizer.all_special_ids),
        samples_per_frame=float(ratio) if ratio else None,
        mask_safe=mask_safe,
        model_type=config.model_type,
        calibration=calibration,
    )


class _RunnerBuilder:
    """Builds runners for one checkpoint, loading the torch model at most once."""

    def __init__(
        self,
        name: str,
        device: torch.device,
        threads: int,
        cache_dir: Path,
        extractor: FeatureExtractor,
        mask_safe: bool,
        blank_id: int,
    ) -> None:
        self.name, self.device, self.threads, self.cache_dir = name, device, threads, cache_dir
        self.extractor, self.mask_safe, self.blank_id = extractor, mask_safe, blank_id
        self._torch_model: torch.nn.Module | None = None
        self._checkpoint: str | None = None
        self._runners: dict[Backend, Runner] = {}

    def torch_model(self) -> torch.nn.Module:
        if self._torch_model is None:
            self._torch_model = AutoModelForCTC.from_pretrained(self.name).to(self.device).eval()
        return self._torch_model

    def checkpoint(self) -> str:
        if self._checkpoint is None:
            self._checkpoint = backends.checkpoint_hash(self.name, self.torch_model, self.cache_dir)
        return self._checkpoint

    def build(self, backend: Backend) -> Runner:
        if backend not in self._runners:
            self._runners[backend] = self._build(backend)
        return self._runners[backend]

    def _build(self, backend: Backend) -> Runner:
        if backend is Backend.TORCH_FP32 or backend is Backend.TORCH_FP16:
            return backends.TorchRunner(self.torch_model(), self.device, backend)
        if backend is Backend.TORCH_INT8:
            quantized = backends.quantize_torch_dynamic(AutoModelForCTC.from_pretrained(self.name).eval())
            return backends.TorchRunner(quantized, torch.device("cpu"), backend)
        example = model_inputs(self.extractor, _noise([1.0, 0.8]), self.mask_safe)
        path = backends.ensure_onnx(
            backend,
            self.cache_dir,
            self.checkpoint(),
            lambda: AutoModelForCTC.from_pretrained(self.name, attn_implementation="eager").eval(),
            example,
        )
        return backends.OnnxRunner(path, self.threads or torch.get_num_threads(), backend)

    def choose(self) -> tuple[Backend, dict | None]:
        """``auto`` on the CPU: the cached decision for this checkpoint and machine, or measure it now."""
        if self.device.type == "cuda":
            return Backend.TORCH_FP16, None
        machine = backends.machine_key(self.threads)
        with backends.calibration_lock(self.cache_dir, self.checkpoint()):
            cached = backends.cached_choice(self.cache_dir, self.checkpoint(), machine)
            if cached:
                return Backend(cached), None
            started = time.perf_counter()
            candidates = list(backends.CPU_BACKENDS)
            if importlib.util.find_spec("onnxruntime") is None:
                candidates = [Backend.TORCH_FP32, Backend.TORCH_INT8]
            runners = {}
            for candidate in candidates:
                try:
                    runners[candidate] = self.build(candidate)
                except Exception:  # e.g. an architecture the ONNX exporter cannot handle: measure the rest
                    log.warning("backend unavailable backend=%s", candidate, exc_info=True)
            speech, _ = sf.read(backends.CALIBRATION_CLIP, dtype="float32")
            decision = backends.calibrate(
                runners,
                speed_inputs=model_inputs(self.extractor, _noise([2.2]), self.mask_safe),
                speech_inputs=model_inputs(self.extractor, [speech], self.mask_safe),
                blank_id=self.blank_id,
            )
            decision["seconds"] = round(time.perf_counter() - started, 1)
            backends.store_choice(self.cache_dir, self.checkpoint(), machine, decision)
        log.info(
            "auto backend measured choice=%s accuracy=%s measured=%s",
            decision["choice"],
            decision["accuracy"],
            decision["measured"],
        )
        return Backend(decision["choice"]), decision


def _noise(seconds: list[float]) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [(rng.standard_normal(int(s * SAMPLE_RATE)) * 0.05).astype(np.float32) for s in seconds]


def model_inputs(extractor: FeatureExtractor, audios: list[np.ndarray], mask_safe: bool) -> dict[str, np.ndarray]:
    """The feature extractor's padded batch as numpy arrays (with an attention mask where the model takes one)."""
    out = extractor(
        audios, sampling_rate=SAMPLE_RATE, return_tensors="np", padding=True, return_attention_mask=mask_safe
    )
    return {k: np.asarray(v) for k, v in out.items()}


def _display_name(name_or_path: str) -> str:
    """A local checkpoint is named by its directory (clients need not see server paths); a hub id as it is."""
    path = Path(name_or_path)
    return path.name if path.is_dir() else str(name_or_path)


def warm_up(loaded: LoadedModel, seconds: tuple[float, ...] = (1.0, 2.5), batch_sizes: tuple[int, ...] = (1,)) -> float:
    """Run the model on low noise of the given lengths and batch sizes (first-call allocations, kernel choice,
    cuDNN autotuning for the shapes served); return ms."""
    start = time.perf_counter()
    for s in seconds:
        for n in batch_sizes:
            infer_batch(loaded, _noise([s] * n))
    word_posterior(np.log(np.full((4, 3), 1 / 3)), [1], blank_id=0)  # torch's CTC loss: ~2-40 ms on first call
    return (time.perf_counter() - start) * 1000


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def infer_batch(loaded: LoadedModel, audios: list[np.ndarray]) -> list[np.ndarray]:
    """Several 16 kHz clips in one padded forward pass -> each clip's (frames, vocab) log-posteriors.

    Models whose feature extractor gives no attention mask (wav2vec2-base style, group norm over the whole
    input) would see the padding, so their clips are grouped by exact length instead. Dynamic int8 backends run
    each clip alone: their activation scales are taken over the whole batch, so a clip's transcript would depend on
    which other uploads it happened to share a batch with (seen: one letter of a fixture word).
    """
    if not audios:
        return []
    if len(audios) > 1 and loaded.backend in (Backend.TORCH_INT8, Backend.ONNX_INT8):
        return [infer_batch(loaded, [a])[0] for a in audios]
    if not loaded.mask_safe and len({len(a) for a in audios}) > 1:
        out: list[np.ndarray | None] = [None] * len(audios)
        by_length: dict[int, list[int]] = {}
        for i, a in enumerate(audios):
            by_length.setdefault(len(a), []).append(i)
        for idx in by_length.values():
            for i, lp in zip(idx, infer_batch(loaded, [audios[i] for i in idx]), strict=True):
                out[i] = lp
        return out  # type: ignore[return-value]
    logits, frames = loaded.runner(model_inputs(loaded.feature_extractor, audios, loaded.mask_safe))
    return [_log_softmax(logits[i, : int(frames[i])].astype(np.float32)) for i in range(len(audios))]


def infer(loaded: LoadedModel, audio: np.ndarray) -> np.ndarray:
    """16 kHz mono float32 -> (frames, vocab) float32 log-posteriors."""
    return infer_batch(loaded, [audio])[0]
