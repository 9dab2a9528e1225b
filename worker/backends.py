"""Inference backends for a CTC checkpoint: torch fp32 / dynamic int8 / fp16 (CUDA) and ONNX Runtime fp32 / int8.

Every backend is a ``Runner``: padded model inputs (numpy, as the feature extractor returns them) in, float32
logits ``(batch, frames, vocab)`` and each item's valid frame count out. ONNX models are exported from the
checkpoint once (torch.export based exporter) and quantized once, then cached under
``<cache_dir>/<checkpoint hash>/``; later process starts load the cached files.

``auto`` means torch fp16 on a GPU. On the CPU it is measured once per checkpoint and machine (latency on 2.2 s of
audio; agreement with fp32 on a speech clip): the fastest backend whose transcript of the clip is fp32's and whose
frame labels agree with fp32's on >= 99% of frames; where fp32's own posteriors on the clip are too flat to judge by
(random weights), the fastest, with a warning and ``"accuracy": "cannot judge: ..."`` in the decision.
The choice is cached beside the exports.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from worker.decoding import greedy_labels

log = logging.getLogger(__name__)

EXPORT_FORMAT = "onnx-dynamo-v1"  # part of the cache key: change it when the export recipe changes
MIN_TOKEN_AGREEMENT = 0.99
# below this median top probability on the speech clip fp32 is too flat to judge agreement by (see calibrate)
MIN_PEAKEDNESS = 0.5
CALIBRATION_CLIP = Path(__file__).parent / "data" / "calibration.flac"


class Backend(StrEnum):
    AUTO = "auto"
    TORCH_FP32 = "torch-fp32"
    TORCH_INT8 = "torch-int8"
    TORCH_FP16 = "torch-fp16"  # CUDA only
    ONNX_FP32 = "onnx-fp32"
    ONNX_INT8 = "onnx-int8"


CPU_BACKENDS = (Backend.TORCH_FP32, Backend.TORCH_INT8, Backend.ONNX_FP32, Backend.ONNX_INT8)


class Runner(Protocol):
    backend: Backend

    def __call__(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]: ...


class _CTCWithLengths(torch.nn.Module):
    """The checkpoint's forward pass returning logits and each item's valid frame count (for padded batches)."""

    def __init__(self, model: torch.nn.Module, input_name: str) -> None:
        super().__init__()
        self.model = model
        self.input_name = input_name  # input_values (raw waveform) or input_features (filterbanks)

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(**{self.input_name: inputs}, attention_mask=mask).logits
        if mask is None:
            frames = torch.full((logits.shape[0],), logits.shape[1], dtype=torch.long, device=logits.device)
        else:
            frames = self.model._get_feat_extract_output_lengths(mask.sum(-1)).to(torch.long)
        return logits, frames


class TorchRunner:
    def __init__(self, model: torch.nn.Module, device: torch.device, backend: Backend) -> None:
        self.model = model
        self.device = device
        self.backend = backend

    @torch.inference_mode()
    def __call__(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        wrapped = _CTCWithLengths(self.model, _main_input(inputs))
        tensors = [torch.from_numpy(inputs[_main_input(inputs)]).to(self.device)]
        if "attention_mask" in inputs:
            tensors.append(torch.from_numpy(inputs["attention_mask"]).to(self.device))
        if self.backend is Backend.TORCH_FP16:
            with torch.autocast("cuda", dtype=torch.float16):
                logits, frames = wrapped(*tensors)
        else:
            logits, frames = wrapped(*tensors)
        return logits.float().cpu().numpy(), frames.cpu().numpy()


def _main_input(inputs: dict[str, np.ndarray]) -> str:
    return "input_features" if "input_features" in inputs else "input_values"


class OnnxRunner:
    def __init__(self, path: Path, threads: int, backend: Backend) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # no busy-waiting between parallel ops: a spinning pool thread holds a core that the decoder, the web server
        # or another worker needs, and loses it to them mid-barrier. wav2vec2-large 2.2 s, 2 threads, other processes
        # busy on the 2 cores, the two settings interleaved (median of 8): int8 356 -> 238 ms, fp32 936 -> 687 ms.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.backend = backend

    def __call__(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        feed = {k: v for k, v in inputs.items() if k in self.input_names}
        if "attention_mask" in feed:
            feed["attention_mask"] = feed["attention_mask"].astype(np.int64)
        logits, frames = self.session.run(["logits", "frames"], feed)
        return logits, frames


# -- checkpoint identity and the export cache ---------------------------------------------------------------


def local_checkpoint_dir(name_or_path: str) -> Path | None:
    """The directory a checkpoint's files are in: a local directory as it is, a hub id's snapshot in the local hub
    cache once ``from_pretrained`` has downloaded it; None otherwise."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception:  # not a hub id, or not downloaded: the caller hashes the loaded weights instead
        return None


def checkpoint_hash(name_or_path: str, load_model: Callable[[], torch.nn.Module], cache_dir: Path) -> str:
    """Content hash of a checkpoint. A local directory's files (a hub id's downloaded snapshot's too) are hashed
    once and remembered by their (size, mtime), so a restart neither rereads nor loads a large checkpoint just to
    find its cached exports; anything else is loaded (``load_model``) and its weights hashed."""
    path = local_checkpoint_dir(name_or_path)
    if path is not None:
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in {".json", ".safetensors", ".bin"})
        signature = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
        memo_file = cache_dir / "checkpoint-hashes.json"
        memo = _read_json(memo_file)
        key = str(path.resolve())
        if memo.get(key, {}).get("signature") == signature:
            return memo[key]["hash"]
        digest = hashlib.blake2b(digest_size=16)
        for p in files:
            digest.update(p.name.encode())
            with p.open("rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
        value = digest.hexdigest()
        with _locked(cache_dir):
            memo = _read_json(memo_file)
            memo[key] = {"signature": signature, "hash": value}
            _write_json(memo_file, memo)
        return value
    model = load_model()
    digest = hashlib.blake2b(model.config.to_json_string().encode(), digest_size=16)
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(directory: Path, name: str = ".lock") -> Iterator[None]:
    """Several worker processes may start at once: one exports, the others wait and reuse its files.
    (flock locks are per open file: never nest two holds of the same ``name`` in one process.)"""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / name).open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def onnx_paths(cache_dir: Path, checkpoint: str) -> dict[Backend, Path]:
    """The cached exports; the int8 file is named by its recipe (the cache may be shared by different CPUs)."""
    base = cache_dir / f"{checkpoint}-{EXPORT_FORMAT}"
    return {
        Backend.ONNX_FP32: base / "model-fp32.onnx",
        Backend.ONNX_INT8: base / f"model-int8-{int8_recipe()}.onnx",
    }


@functools.cache
def _cpu_info() -> tuple[str, frozenset[str]]:
    """(model name, feature flags) from /proc/cpuinfo; ("unknown", frozenset()) where there is none. Read once per
    process: onnx_paths, ensure_onnx and machine_key all ask."""
    name, flags = "unknown", frozenset[str]()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == "unknown":
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = frozenset(value.split())
    return name, flags


def int8_recipe() -> str:
    """ONNX Runtime's fast integer kernels depend on the CPU (docs/int8.md).

    x86 with AVX2 but no VNNI: ``u8u8``, uint8 activations x uint8 weights, per-tensor, MatMul and Conv (`make
    bench`, 2-core AMD EPYC: wav2vec2-base 2.2 s 150 ms vs 280 ms for int8 weights and 200 ms fp32; large 355 / 432 /
    497 ms).

    Elsewhere (VNNI, AMX, ARM): ``u8s8-matmul``, uint8 activations x int8 weights with per-channel scales, MatMul only.
    VNNI's instruction multiplies uint8 by int8, so uint8 weights leave the slow path (Xeon with AVX-512 VNNI and
    AMX, 2 threads, wav2vec2-large 2.2 s: u8u8 266 ms, u8s8 115 ms). Conv stays fp32: ConvInteger (the feature
    encoder's convolutions and the positional convolution) took 170 ms of the 259 ms an all-op-types file ran in,
    where fp32 Conv takes 49 ms. (The recipe named ``s8s8`` before was this one with Conv quantized: dynamic
    quantization always makes uint8 activations, ActivationSymmetric changes nothing in the file.)"""
    _, flags = _cpu_info()
    if "avx2" in flags and not flags & {"avx512_vnni", "avx_vnni"}:
        return "u8u8"
    return "u8s8-matmul"


def ensure_onnx(
    backend: Backend,
    cache_dir: Path,
    checkpoint: str,
    load_eager_model: Callable[[], torch.nn.Module],
    example: dict[str, np.ndarray],
) -> Path:
    """The cached ONNX file for ``backend``, exporting (and quantizing) it first if it is not there yet."""
    paths = onnx_paths(cache_dir, checkpoint)
    target = paths[backend]
    if target.exists():
        return target
    with _locked(target.parent):
        if target.exists():  # another process finished it while we waited
            return target
        fp32 = paths[Backend.ONNX_FP32]
        if not fp32.exists():
            started = time.perf_counter()
            _export(load_eager_model(), example, fp32)
            log.info("onnx export done path=%s seconds=%.1f", fp32, time.perf_counter() - started)
        if backend is Backend.ONNX_INT8:
            started = time.perf_counter()
            tmp = target.with_suffix(f".tmp{os.getpid()}.onnx")
            _quantize_onnx_dynamic(fp32, tmp, int8_recipe())
            os.replace(tmp, target)
            log.info("onnx int8 quantization done path=%s seconds=%.1f", target, time.perf_counter() - started)
    return target


def quantize_torch_dynamic(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 for every Linear layer but the CTC head: per-channel weight scales, the head (whose
    argmax is the transcript) in fp32. Per-tensor scales, or a quantized head, flipped letters on the fixtures."""
    import warnings

    spec = {
        name: torch.ao.quantization.per_channel_dynamic_qconfig
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module.out_features != model.config.vocab_size
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice, once per process
        return torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8)


def _quantize_onnx_dynamic(fp32: Path, out: Path, recipe: str) -> None:
    """ONNX Runtime dynamic int8 by ``recipe`` (see ``int8_recipe``), the CTC head (the MatMul
    whose weight produces the vocabulary dimension) left in fp32 as in ``quantize_torch_dynamic``."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(fp32, load_external_data=False).graph
    vocab = next(o for o in graph.output if o.name == "logits").type.tensor_type.shape.dim[-1].dim_value
    weights = {init.name: list(init.dims) for init in graph.initializer}
    head = [
        node.name
        for node in graph.node
        if node.op_type in ("MatMul", "Gemm") and any(weights.get(i, [None])[-1] == vocab for i in node.input)
    ]
    options = {
        # per-channel uint8 weights flipped two fixture transcripts; per-tensor ones flipped none
        "u8u8": {"weight_type": QuantType.QUInt8, "per_channel": False},
        # per-channel int8 weights; Conv left in fp32 (ConvInteger is slower than fp32 Conv there)
        "u8s8-matmul": {"weight_type": QuantType.QInt8, "per_channel": True, "op_types_to_quantize": ["MatMul"]},
    }[recipe]
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # the quantizer logs every tensor it skips on the root logger
    try:
        quantize_dynamic(fp32, out, nodes_to_exclude=head, **options)
    finally:
        logging.disable(previous)


def _export(model: torch.nn.Module, example: dict[str, np.ndarray], out: Path) -> None:
    name = _main_input(example)
    batch = torch.export.Dim("batch", min=1, max=256)
    length = torch.export.Dim("length", min=8, max=16_000 * 600)
    args: tuple[torch.Tensor, ...] = (torch.from_numpy(example[name]),)
    names = [name]
    if "attention_mask" in example:
        args += (torch.from_numpy(example["attention_mask"]).long(),)
        names.append("attention_mask")
    tmp = out.with_suffix(f".tmp{os.getpid()}.onnx")
    import warnings

    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _CTCWithLengths(model, name).eval(),
            args,
            tmp,
            dynamo=True,
            input_names=names,
            output_names=["logits", "frames"],
            dynamic_shapes=tuple({0: batch, 1: length} for _ in names),
            external_data=False,
            verbose=False,
        )
    os.replace(tmp, out)


# -- choosing a backend ---------------------------------------------------------------------------------------


def token_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Share of frames whose argmax label is the same (both ``(frames, vocab)``)."""
    n = min(len(reference), len(candidate))
    if n == 0:
        return 1.0
    return float((reference[:n].argmax(-1) == candidate[:n].argmax(-1)).mean())


def peakedness(logits: np.ndarray) -> float:
    """Median over frames of the top softmax probability of ``(frames, vocab)`` logits: near 1 for a trained CTC
    model on speech, near 1/vocab for random weights. On the calibration clip: the bundled model 0.9995; wav2vec2
    large and base with random weights 0.079 and 0.075 (1/36 = 0.028); the tiny test checkpoints 0.034."""
    if len(logits) == 0:
        return 0.0
    shifted = logits - logits.max(axis=-1, keepdims=True)
    top = 1.0 / np.exp(shifted).sum(axis=-1)  # the top label's probability: exp(0) / sum
    return float(np.median(top))


def calibrate(
    runners: dict[Backend, Runner],
    speed_inputs: dict[str, np.ndarray],
    speech_inputs: dict[str, np.ndarray],
    blank_id: int,
    runs: int = 7,
) -> dict:
    """Median latency of every runner, its token agreement with torch fp32 and whether its transcript of the
    speech clip is the same; the choice is the fastest one with the same transcript and at least
    ``MIN_TOKEN_AGREEMENT`` of the frames agreeing.

    That guard needs a reference that says something: where fp32's posteriors on the speech clip are flat (median
    top probability below ``MIN_PEAKEDNESS``: random or untrained weights), any rounding flips argmaxes, so a
    disagreement means nothing and the guard would only cost speed. Then the choice is the fastest backend whose
    output is finite, the decision's ``accuracy`` says it could not be judged, and a warning is logged."""
    reference = runners[Backend.TORCH_FP32](speech_inputs)[0][0]
    peaked = peakedness(reference)
    measured = {}
    for backend, runner in runners.items():
        output = runner(speech_inputs)[0][0]
        same_transcript = greedy_labels(output, blank_id) == greedy_labels(reference, blank_id)
        runner(speed_inputs)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            runner(speed_inputs)
            times.append(time.perf_counter() - start)
        measured[backend.value] = {
            "median_ms": round(statistics.median(times) * 1000, 2),
            "agreement": round(token_agreement(reference, output), 4),
            "same_transcript": same_transcript,
            "finite": bool(np.isfinite(output).all()),
        }
    finite = [b for b, m in measured.items() if m["finite"]] or [Backend.TORCH_FP32.value]
    if peaked < MIN_PEAKEDNESS:
        choice = min(finite, key=lambda b: measured[b]["median_ms"])
        accuracy = (
            f"cannot judge: fp32's posteriors on the calibration clip are flat (median top probability "
            f"{peaked:.4f} < {MIN_PEAKEDNESS}), so the fastest backend was chosen without the agreement guard"
        )
        log.warning(
            "auto cannot judge accuracy: flat posteriors median_top_probability=%.4f threshold=%s choice=%s",
            peaked,
            MIN_PEAKEDNESS,
            choice,
        )
    else:
        accurate = [
            b for b in finite if measured[b]["agreement"] >= MIN_TOKEN_AGREEMENT and measured[b]["same_transcript"]
        ]
        choice = min(accurate or [Backend.TORCH_FP32.value], key=lambda b: measured[b]["median_ms"])
        accuracy = (
            f"guarded: same transcript as fp32 and >= {MIN_TOKEN_AGREEMENT} frame agreement (median top probability "
            f"{peaked:.4f})"
        )
    return {"choice": choice, "measured": measured, "peakedness": round(peaked, 4), "accuracy": accuracy}


def cached_choice(cache_dir: Path, checkpoint: str, machine: str) -> str | None:
    return _read_json(cache_dir / f"{checkpoint}-{EXPORT_FORMAT}" / "auto.json").get(machine, {}).get("choice")


def store_choice(cache_dir: Path, checkpoint: str, machine: str, decision: dict) -> None:
    path = cache_dir / f"{checkpoint}-{EXPORT_FORMAT}" / "auto.json"
    data = _read_json(path)
    data[machine] = decision
    _write_json(path, data)


def calibration_lock(cache_dir: Path, checkpoint: str) -> contextlib.AbstractContextManager:
    """Held while ``auto`` measures: one process measures (on a quiet machine), the others reuse its choice."""
    return _locked(cache_dir / f"{checkpoint}-{EXPORT_FORMAT}", ".calibrate.lock")


def machine_key(threads: int) -> str:
    cpu, _ = _cpu_info()
    return (
        f"{cpu} | {os.cpu_count()} cpus | {threads or torch.get_num_threads()} threads | torch {torch.__version__}"
        f" | int8 {int8_recipe()}"
    )
