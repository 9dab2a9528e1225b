"""Inference backends: the accuracy guard (every optimized backend against torch fp32 on the fixture clips), the
ONNX export cache, `auto`'s measured choice, and padded batches against single clips."""

from __future__ import annotations

import json
import logging
import shutil
import time

import numpy as np
import pytest
import torch

from shared.config import BUNDLED_MODEL_DIR
from tests.conftest import DATA, read_transcripts, save_tiny_wav2vec2
from worker import backends
from worker.asr import infer, infer_batch, load_model
from worker.audio import decode
from worker.backends import EXPORT_FORMAT, Backend, int8_recipe, token_agreement
from worker.pipeline import postprocess

OPTIMIZED = [Backend.TORCH_INT8, Backend.ONNX_FP32, Backend.ONNX_INT8]


@pytest.fixture(scope="module")
def fixture_audio() -> dict[str, np.ndarray]:
    return {name: decode((DATA / name).read_bytes(), max_audio_s=30) for name in sorted(read_transcripts())}


@pytest.fixture(scope="module")
def bundled_fp32():
    return load_model(str(BUNDLED_MODEL_DIR), backend=Backend.TORCH_FP32, threads=1)


@pytest.fixture(scope="module")
def outputs(bundled_fp32, fixture_audio, asr_cache_dir) -> dict[Backend, dict[str, np.ndarray]]:
    """Every backend's log-posteriors for every fixture clip, on the bundled model."""
    out = {Backend.TORCH_FP32: {name: infer(bundled_fp32, audio) for name, audio in fixture_audio.items()}}
    for backend in OPTIMIZED:
        model = load_model(str(BUNDLED_MODEL_DIR), backend=backend, cache_dir=asr_cache_dir, threads=1)
        assert model.backend is backend
        out[backend] = {name: infer(model, audio) for name, audio in fixture_audio.items()}
    return out


@pytest.mark.parametrize("backend", OPTIMIZED)
def test_optimized_backend_agrees_with_fp32_on_the_fixture_clips(backend, outputs):
    agreeing = frames = 0
    for name, reference in outputs[Backend.TORCH_FP32].items():
        candidate = outputs[backend][name]
        assert candidate.shape == reference.shape, name
        agreeing += int((reference.argmax(1) == candidate.argmax(1)).sum())
        frames += len(reference)
    assert agreeing / frames >= 0.99


@pytest.mark.parametrize("backend", OPTIMIZED)
def test_optimized_backend_keeps_the_bundled_models_transcripts(backend, outputs, bundled_fp32, fixture_audio):
    changed = [
        name
        for name, audio in fixture_audio.items()
        if postprocess(bundled_fp32, audio, outputs[backend][name]).text
        != postprocess(bundled_fp32, audio, outputs[Backend.TORCH_FP32][name]).text
    ]
    assert changed == []


@pytest.mark.parametrize("mask_safe", [True, False], ids=["large-style", "base-style"])
@pytest.mark.parametrize("backend", OPTIMIZED)
def test_wav2vec2_checkpoints_run_on_every_backend(tmp_path, backend, mask_safe):
    path = save_tiny_wav2vec2(tmp_path / "ckpt", mask_safe=mask_safe)
    audio = (np.random.default_rng(1).standard_normal(24_000) * 0.1).astype(np.float32)
    reference = infer(load_model(str(path), backend=Backend.TORCH_FP32), audio)
    model = load_model(str(path), backend=backend, cache_dir=tmp_path / "cache")
    candidate = infer(model, audio)
    assert candidate.shape == reference.shape
    assert np.isfinite(candidate).all()
    if backend is Backend.ONNX_FP32:  # same arithmetic, another runtime
        np.testing.assert_allclose(candidate, reference, atol=1e-3)
    else:  # random weights give near-uniform posteriors, so argmax agreement means little; stay close
        assert np.abs(np.exp(candidate) - np.exp(reference)).max() < 0.1


def test_onnx_export_is_cached_by_checkpoint_content(tmp_path):
    path = save_tiny_wav2vec2(tmp_path / "ckpt")
    cache = tmp_path / "cache"
    load_model(str(path), backend=Backend.ONNX_INT8, cache_dir=cache)
    (export_dir,) = [p for p in cache.iterdir() if p.name.endswith(EXPORT_FORMAT)]
    files = {p.name: p.stat().st_mtime_ns for p in export_dir.glob("*.onnx")}
    assert set(files) == {"model-fp32.onnx", f"model-int8-{int8_recipe()}.onnx"}

    load_model(str(path), backend=Backend.ONNX_INT8, cache_dir=cache)  # a restart: nothing is exported again
    assert {p.name: p.stat().st_mtime_ns for p in export_dir.glob("*.onnx")} == files

    copy = shutil.copytree(path, tmp_path / "same-weights-elsewhere")
    load_model(str(copy), backend=Backend.ONNX_FP32, cache_dir=cache)  # same content, same export
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1

    torch.manual_seed(7)  # new weights, same directory: a new hash and a new export
    from transformers import Wav2Vec2ForCTC

    Wav2Vec2ForCTC(Wav2Vec2ForCTC.from_pretrained(path).config).save_pretrained(path)
    load_model(str(path), backend=Backend.ONNX_FP32, cache_dir=cache)
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2


def test_a_downloaded_hub_checkpoint_restarts_without_loading_torch_weights(tmp_path, monkeypatch):
    """A hub id is hashed from its snapshot in the local hub cache (here a real cache layout, offline), like a local
    directory: a restart finds its cached export without loading the model just to hash its weights."""
    import huggingface_hub.constants
    from transformers import AutoModelForCTC

    source = save_tiny_wav2vec2(tmp_path / "source")
    repo = tmp_path / "hub" / "models--acme--tiny-ctc"
    shutil.copytree(source, repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "cache"

    first = load_model("acme/tiny-ctc", backend=Backend.ONNX_FP32, cache_dir=cache)
    assert first.name == "acme/tiny-ctc" and first.backend is Backend.ONNX_FP32
    assert backends.local_checkpoint_dir("acme/tiny-ctc") == repo / "snapshots" / ("a" * 40)
    assert backends.local_checkpoint_dir("acme/not-downloaded") is None

    def no_torch_load(*args, **kwargs):
        raise AssertionError("the torch model was loaded on a restart with a cached export")

    monkeypatch.setattr(AutoModelForCTC, "from_pretrained", no_torch_load)
    again = load_model("acme/tiny-ctc", backend=Backend.ONNX_FP32, cache_dir=cache)
    load_model(str(source), backend=Backend.ONNX_FP32, cache_dir=cache)  # the same files as a local directory
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1
    audio = decode((DATA / "kitab.flac").read_bytes(), max_audio_s=30)
    np.testing.assert_allclose(infer(again, audio), infer(first, audio), atol=1e-5)


@pytest.mark.parametrize("recipe", ["u8u8", "u8s8-matmul"])
def test_both_int8_recipes_run_and_stay_close_to_fp32(tmp_path, monkeypatch, recipe):
    """The recipe follows the CPU (``int8_recipe``); CI has one kind of CPU, so force each in turn."""
    monkeypatch.setattr(backends, "int8_recipe", lambda: recipe)
    path = save_tiny_wav2vec2(tmp_path / "ckpt")
    audio = (np.random.default_rng(2).standard_normal(24_000) * 0.1).astype(np.float32)
    reference = infer(load_model(str(path), backend=Backend.TORCH_FP32), audio)
    model = load_model(str(path), backend=Backend.ONNX_INT8, cache_dir=tmp_path / "cache")
    (int8_file,) = (tmp_path / "cache").glob("*/model-int8-*.onnx")
    assert int8_file.name == f"model-int8-{recipe}.onnx"
    assert np.abs(np.exp(infer(model, audio)) - np.exp(reference)).max() < 0.1


def test_the_vnni_recipe_quantizes_matmul_weights_only(tmp_path, monkeypatch):
    """``u8s8-matmul``: int8 weights for the MatMuls; Conv (ConvInteger is slower than fp32 Conv on VNNI CPUs) and
    the CTC head stay fp32."""
    import onnx

    monkeypatch.setattr(backends, "int8_recipe", lambda: "u8s8-matmul")
    load_model(str(save_tiny_wav2vec2(tmp_path / "ckpt")), backend=Backend.ONNX_INT8, cache_dir=tmp_path / "cache")
    (int8_file,) = (tmp_path / "cache").glob("*/model-int8-u8s8-matmul.onnx")
    ops = [node.op_type for node in onnx.load(int8_file).graph.node]
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    assert "ConvInteger" not in ops and "Conv" in ops
    assert "MatMul" in ops  # the head


@pytest.mark.parametrize(
    ("flags", "recipe"),
    [
        ({"avx2", "fma"}, "u8u8"),
        ({"avx2", "avx512_vnni"}, "u8s8-matmul"),
        ({"avx2", "avx_vnni"}, "u8s8-matmul"),
        ({"avx2", "avx512_vnni", "amx_int8"}, "u8s8-matmul"),
        (set(), "u8s8-matmul"),
    ],
)
def test_int8_recipe_follows_the_cpu(monkeypatch, flags, recipe):
    monkeypatch.setattr(backends, "_cpu_info", lambda: ("some cpu", frozenset(flags)))
    assert int8_recipe() == recipe


def test_auto_measures_once_and_reuses_its_choice(tmp_path):
    path = save_tiny_wav2vec2(tmp_path / "ckpt")
    first = load_model(str(path), backend=Backend.AUTO, cache_dir=tmp_path / "cache")
    measured = first.calibration["measured"]
    assert set(measured) == {b.value for b in OPTIMIZED} | {Backend.TORCH_FP32.value}
    assert first.backend.value == first.calibration["choice"]
    (stored,) = (tmp_path / "cache").glob(f"*-{EXPORT_FORMAT}/auto.json")
    assert [d["choice"] for d in json.loads(stored.read_text()).values()] == [first.backend.value]

    again = load_model(str(path), backend=Backend.AUTO, cache_dir=tmp_path / "cache")
    assert again.calibration is None and again.backend is first.backend


def test_auto_cannot_judge_accuracy_on_flat_posteriors_and_takes_the_fastest(tmp_path, caplog):
    """Random weights: fp32's posteriors are near uniform, so argmax disagreement says nothing; auto says so."""
    path = save_tiny_wav2vec2(tmp_path / "ckpt")
    with caplog.at_level(logging.WARNING, logger="worker.backends"):
        model = load_model(str(path), backend=Backend.AUTO, cache_dir=tmp_path / "cache")
    decision = model.calibration
    assert decision["peakedness"] < backends.MIN_PEAKEDNESS
    assert decision["accuracy"].startswith("cannot judge: ")
    measured = decision["measured"]
    assert model.backend.value == min(measured, key=lambda b: measured[b]["median_ms"])
    (warning,) = [r for r in caplog.records if "cannot judge accuracy" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert "\n" not in warning.getMessage() and "median_top_probability=" in warning.getMessage()


def test_auto_keeps_the_agreement_guard_on_peaked_posteriors(tmp_path, caplog):
    """A head scaled up gives confident frames (as a trained model does): the guard applies again."""

    def sharpen(model, vocab) -> None:
        with torch.no_grad():
            model.lm_head.weight.mul_(400)

    path = save_tiny_wav2vec2(tmp_path / "ckpt", adjust=sharpen)
    with caplog.at_level(logging.WARNING, logger="worker.backends"):
        model = load_model(str(path), backend=Backend.AUTO, cache_dir=tmp_path / "cache")
    decision = model.calibration
    assert decision["peakedness"] >= backends.MIN_PEAKEDNESS
    assert decision["accuracy"].startswith("guarded: ")
    measured = decision["measured"]
    accurate = [b for b, m in measured.items() if m["agreement"] >= 0.99 and m["same_transcript"]]
    assert model.backend.value == min(accurate, key=lambda b: measured[b]["median_ms"])
    assert not [r for r in caplog.records if "cannot judge" in r.getMessage()]


def _fake_runner(logits: np.ndarray, seconds: float):
    def run(inputs):
        time.sleep(seconds)
        return logits[None], np.array([len(logits)])

    return run


@pytest.mark.parametrize("peaked", [True, False], ids=["peaked", "flat"])
def test_calibrate_rejects_a_fast_disagreeing_backend_only_when_it_can_judge(peaked):
    labels = np.random.default_rng(0).integers(0, 5, 50)
    scale = 20.0 if peaked else 0.01
    reference = np.eye(5, dtype=np.float32)[labels] * scale
    wrong = np.eye(5, dtype=np.float32)[(labels + 1) % 5] * scale
    runners = {
        Backend.TORCH_FP32: _fake_runner(reference, 0.004),
        Backend.ONNX_FP32: _fake_runner(reference, 0.002),
        Backend.ONNX_INT8: _fake_runner(wrong, 0.0),
    }
    decision = backends.calibrate(runners, {}, {}, blank_id=0, runs=3)
    assert (decision["peakedness"] >= backends.MIN_PEAKEDNESS) is peaked
    assert decision["choice"] == (Backend.ONNX_FP32 if peaked else Backend.ONNX_INT8).value
    assert decision["accuracy"].startswith("guarded: " if peaked else "cannot judge: ")


def test_peakedness():
    assert backends.peakedness(np.zeros((10, 40))) == pytest.approx(1 / 40)
    assert backends.peakedness(np.eye(40)[:10] * 50) == pytest.approx(1.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_fp16_without_a_gpu_falls_back_to_fp32(tiny_wav2vec2):
    assert load_model(str(tiny_wav2vec2), backend="torch-fp16").backend is Backend.TORCH_FP32


def test_unknown_backend_is_refused(tiny_wav2vec2):
    with pytest.raises(ValueError):
        load_model(str(tiny_wav2vec2), backend="tensorrt")


@pytest.mark.parametrize("backend", [Backend.TORCH_FP32, Backend.ONNX_FP32, Backend.TORCH_INT8, Backend.ONNX_INT8])
def test_padded_batch_matches_single_clips(backend, fixture_audio, asr_cache_dir):
    model = load_model(str(BUNDLED_MODEL_DIR), backend=backend, cache_dir=asr_cache_dir, threads=1)
    clips = list(fixture_audio.values())[:6]  # different lengths: the shorter ones are padded
    assert len({len(c) for c in clips}) > 1
    for single, batched in zip((infer(model, c) for c in clips), infer_batch(model, clips), strict=True):
        assert batched.shape == single.shape
        np.testing.assert_allclose(batched, single, atol=1e-3)


def test_models_without_attention_masks_are_batched_by_length(tmp_path):
    model = load_model(str(save_tiny_wav2vec2(tmp_path / "ckpt", mask_safe=False)))
    rng = np.random.default_rng(2)
    clips = [(rng.standard_normal(n) * 0.1).astype(np.float32) for n in (16_000, 24_000, 16_000)]
    for single, batched in zip((infer(model, c) for c in clips), infer_batch(model, clips), strict=True):
        np.testing.assert_allclose(batched, single, atol=1e-4)


def test_token_agreement():
    a = np.log(np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]))
    assert token_agreement(a, a) == 1.0
    assert token_agreement(a, a[:, ::-1]) == 0.0
    assert token_agreement(a, a[:2]) == 1.0
