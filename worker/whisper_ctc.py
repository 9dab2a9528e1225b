"""A CTC model on Whisper's encoder, loadable with ``AutoModelForCTC`` / ``AutoProcessor`` like any wav2vec2 checkpoint.

``WhisperForCTC``: Whisper's audio encoder (two convolutions, sinusoidal positions, pre-norm transformer layers),
run on the clip's own length instead of Whisper's fixed 30 s window, with a dropout + linear CTC head over our
letters. ``WhisperCTCFeatureExtractor``: Whisper's 80-bin log-mel features of each clip on its own, time first
(``(batch, frames, 80)``, the layout the worker's ONNX export expects of ``input_features``), padded with zeros to
the longest clip of a batch, with a frame-level attention mask.

Lengths. 16 kHz audio of ``n`` samples gives ``n // 160`` feature frames (Whisper's STFT drops its last frame) and
``(frames - 1) // 2 + 1`` encoder frames: ``config.inputs_to_logits_ratio`` is 320 samples (20 ms) per output frame,
as for wav2vec2. Each clip's features are computed alone (Whisper clamps the log-mel at the clip's maximum - 8, so
padding before the STFT would change a short clip's features), the first convolution's output is zeroed past each
clip's length and attention never looks at padded frames: a clip's logits do not depend on the batch it is in.
The encoder has ``max_source_positions`` (1,500) positions: clips up to 30 s. A longer clip is refused by the
feature extractor (``ValueError``), never truncated.

Positions are looked up with ``arange`` (an embedding gather), not by slicing the table to the frame count, so
``torch.export`` traces the length as a plain dynamic dimension (a slice bounded by the table's size would ask for
a guard on it).

Importing this module registers the classes with transformers' Auto classes (``worker.asr`` imports it), so
``from_pretrained`` of a saved ``whisper-ctc`` checkpoint works in every backend. ``training.whisper_encoder``
converts Whisper base's weights and builds a fresh CTC model on them (``WhisperForCTC.from_whisper_encoder``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModelForCTC,
    BatchFeature,
    WhisperConfig,
    WhisperFeatureExtractor,
)
from transformers.modeling_outputs import CausalLMOutput
from transformers.models.whisper.modeling_whisper import (
    WhisperEncoder,
    WhisperPreTrainedModel,
    _compute_mask_indices,
)

MODEL_TYPE = "whisper-ctc"


class WhisperCTCConfig(WhisperConfig):
    """``WhisperConfig`` (its encoder fields; the decoder's are unused) plus the CTC head's. ``vocab_size`` and
    ``pad_token_id`` are the CTC vocabulary's size and its blank."""

    model_type = MODEL_TYPE

    vocab_size: int = 38
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    decoder_layers: int = 0
    decoder_start_token_id: int = 0  # no decoder: any id inside the CTC vocabulary
    begin_suppress_tokens: list[int] | tuple[int, ...] | None = None
    is_encoder_decoder: bool = False
    tie_word_embeddings: bool = False
    use_cache: bool = False
    final_dropout: float | int = 0.1
    ctc_loss_reduction: str = "mean"
    ctc_zero_infinity: bool = True
    hop_length: int = 160  # audio samples per feature frame (the feature extractor's)

    @property
    def inputs_to_logits_ratio(self) -> int:
        """Audio samples per output frame: the hop times the second convolution's stride (2)."""
        return self.hop_length * 2


class WhisperCTCFeatureExtractor(WhisperFeatureExtractor):
    """Whisper's log-mel features, clip by clip at the clip's own length, returned time first and padded to the
    batch's longest clip (zeros) with an attention mask of feature frames. No 30 s padding."""

    model_input_names = ["input_features", "attention_mask"]

    def __init__(self, *args, return_attention_mask: bool = True, **kwargs) -> None:
        super().__init__(*args, return_attention_mask=return_attention_mask, **kwargs)

    def __call__(  # type: ignore[override]
        self,
        raw_speech,
        sampling_rate: int | None = None,
        return_tensors=None,
        return_attention_mask: bool | None = None,
        padding=True,
        **kwargs,
    ) -> BatchFeature:
        if sampling_rate is not None and sampling_rate != self.sampling_rate:
            raise ValueError(f"expected {self.sampling_rate} Hz audio, got {sampling_rate} Hz")
        batched = (isinstance(raw_speech, np.ndarray) and raw_speech.ndim > 1) or (
            isinstance(raw_speech, (list, tuple)) and len(raw_speech) > 0 and np.ndim(raw_speech[0]) > 0
        )
        clips = (
            [np.asarray(c, dtype=np.float32) for c in raw_speech] if batched else [np.asarray(raw_speech, np.float32)]
        )
        feats = [self._clip_features(c) for c in clips]
        longest = max(len(f) for f in feats)
        features = np.full((len(feats), longest, self.feature_size), self.padding_value, dtype=np.float32)
        mask = np.zeros((len(feats), longest), dtype=np.int32)
        for i, f in enumerate(feats):
            features[i, : len(f)] = f
            mask[i, : len(f)] = 1
        out = {"input_features": features}
        if self.return_attention_mask if return_attention_mask is None else return_attention_mask:
            out["attention_mask"] = mask
        return BatchFeature(out, tensor_type=return_tensors)

    def _clip_features(self, audio: np.ndarray) -> np.ndarray:
        """(frames, feature_size) log-mel of one clip; a clip shorter than one STFT window is zero-padded to one."""
        if audio.ndim != 1:
            raise ValueError(f"expected mono audio, got shape {audio.shape}")
        if len(audio) > self.n_samples:
            raise ValueError(
                f"clip of {len(audio) / self.sampling_rate:.1f} s: a Whisper encoder takes at most "
                f"{self.n_samples / self.sampling_rate:.0f} s"
            )
        if len(audio) < self.n_fft:
            audio = np.pad(audio, (0, self.n_fft - len(audio)))
        out = super().__call__(
            audio, sampling_rate=self.sampling_rate, padding="do_not_pad", truncation=False, return_tensors="np"
        )
        return np.asarray(out["input_features"][0], dtype=np.float32).T


class WhisperForCTC(WhisperPreTrainedModel):
    """Whisper's encoder on the clip's own length with a CTC head, like ``Wav2Vec2ForCTC``:
    ``forward(input_features (batch, frames, mels), attention_mask (batch, frames), labels)`` -> loss and logits
    ``(batch, ceil(frames / 2), vocab_size)``."""

    config: WhisperCTCConfig
    config_class = WhisperCTCConfig
    base_model_prefix = "encoder"
    main_input_name = "input_features"
    input_modalities = ("audio",)
    _supports_flash_attn = False  # the padding mask is a 4-D one: eager and SDPA only
    _supports_flex_attn = False
    _no_split_modules = ["WhisperEncoderLayer"]

    def __init__(self, config: WhisperCTCConfig) -> None:
        super().__init__(config)
        self.encoder = WhisperEncoder(config)
        self.dropout = nn.Dropout(config.final_dropout)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size)
        self.post_init()

    # -- training helpers --------------------------------------------------------------------------------------
    def freeze_feature_encoder(self) -> None:
        """Keep the two convolutions as pretrained (wav2vec2's ``freeze_feature_encoder``)."""
        for module in (self.encoder.conv1, self.encoder.conv2):
            module.requires_grad_(False)

    def freeze_encoder(self, frozen: bool = True) -> None:
        """Train only the CTC head (``frozen``), or everything again; positions always stay fixed."""
        self.encoder.requires_grad_(not frozen)
        self.encoder.embed_positions.requires_grad_(False)

    @classmethod
    def from_whisper_encoder(cls, path: str | Path, **config_overrides) -> WhisperForCTC:
        """A CTC model on the Whisper encoder that ``training.whisper_encoder`` saved in ``path`` (its
        ``config.json`` and ``model.safetensors`` of ``encoder.*`` tensors), with a new randomly initialized head.
        ``config_overrides``: at least ``vocab_size`` and ``pad_token_id`` of the CTC vocabulary."""
        from safetensors.torch import load_file

        path = Path(path)
        whisper = WhisperConfig.from_pretrained(path).to_dict()
        keep = {k: v for k, v in whisper.items() if k in WhisperCTCConfig.__dataclass_fields__}
        for k in ("model_type", "architectures", "vocab_size", "pad_token_id", "bos_token_id", "eos_token_id",
                  "decoder_start_token_id", "suppress_tokens", "begin_suppress_tokens", "is_encoder_decoder",
                  "tie_word_embeddings", "use_cache", "transformers_version", "dtype", "torch_dtype"):  # fmt: skip
            keep.pop(k, None)
        config = WhisperCTCConfig(**{**keep, **config_overrides})
        model = cls(config)
        state = {k: v.float() for k, v in load_file(str(path / "model.safetensors")).items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) != {"lm_head.weight", "lm_head.bias"}:
            raise ValueError(f"not a Whisper encoder checkpoint: missing {missing}, unexpected {unexpected}")
        return model

    # -- forward -------------------------------------------------------------------------------------------------
    def _spec_augment(self, features: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """SpecAugment on (batch, frames, mels) features while training (config.apply_spec_augment)."""
        config = self.config
        if not (self.training and config.apply_spec_augment):
            return features
        batch, frames, mels = features.shape
        if config.mask_time_prob > 0:
            time = _compute_mask_indices(
                (batch, frames), config.mask_time_prob, config.mask_time_length,
                attention_mask=mask, min_masks=config.mask_time_min_masks,
            )  # fmt: skip
            features = features.masked_fill(torch.from_numpy(time).to(features.device)[:, :, None], 0.0)
        if config.mask_feature_prob > 0:
            bins = _compute_mask_indices(
                (batch, mels), config.mask_feature_prob, config.mask_feature_length,
                min_masks=config.mask_feature_min_masks,
            )  # fmt: skip
            features = features.masked_fill(torch.from_numpy(bins).to(features.device)[:, None, :], 0.0)
        return features

    def encode(
        self, input_features: torch.Tensor, attention_mask: torch.Tensor | None = None, output_hidden_states=False
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, ...] | None]:
        """The encoder on (batch, frames, mels) features at their own length: its final (layer-normed) states
        (batch, ceil(frames / 2), d_model), the mask of valid output frames (None without ``attention_mask``) and,
        with ``output_hidden_states``, the input to each layer and the last layer's output."""
        encoder, config = self.encoder, self.config
        if input_features.shape[-1] != config.num_mel_bins:
            raise ValueError(
                f"input_features must be (batch, frames, {config.num_mel_bins}); got {tuple(input_features.shape)}"
            )
        features = self._spec_augment(input_features, attention_mask)
        hidden = nn.functional.gelu(encoder.conv1(features.transpose(1, 2)))
        if attention_mask is not None:  # what conv2 sees past a clip's end: zeros, as for a clip alone
            hidden = hidden * attention_mask[:, None, :].to(hidden.dtype)
        hidden = nn.functional.gelu(encoder.conv2(hidden)).transpose(1, 2)
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        # the sinusoids stay fixed: from_pretrained leaves the table trainable, so detach it here
        hidden = hidden + nn.functional.embedding(positions, encoder.embed_positions.weight.detach())
        hidden = nn.functional.dropout(hidden, p=encoder.dropout, training=self.training)

        frame_mask = None
        if attention_mask is not None:
            lengths = self._get_feat_extract_output_lengths(attention_mask.sum(-1))
            frame_mask = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]
        layer_mask = self._layer_mask(frame_mask, hidden.dtype)

        states = [hidden] if output_hidden_states else None
        for layer in encoder.layers:
            if self.training and encoder.layerdrop > 0 and torch.rand([]) < encoder.layerdrop:
                continue
            hidden = layer(hidden, layer_mask)
            if states is not None:
                states.append(hidden)
        return encoder.layer_norm(hidden), frame_mask, tuple(states) if states is not None else None

    def forward(
        self,
        input_features: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutput | tuple:
        """``input_features`` (batch, frames, num_mel_bins); ``attention_mask`` (batch, frames), 1 for real
        frames; ``labels`` (batch, label length), -100 past each clip's labels."""
        hidden, frame_mask, states = self.encode(input_features, attention_mask, bool(output_hidden_states))
        logits = self.lm_head(self.dropout(hidden))
        loss = None if labels is None else self._ctc_loss(logits, labels, frame_mask)
        if return_dict is False:
            return tuple(v for v in (loss, logits, states) if v is not None)
        return CausalLMOutput(loss=loss, logits=logits, hidden_states=states)

    def _layer_mask(self, frame_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """The keys each query may attend to, (batch, 1, 1, frames): boolean for SDPA (any dtype under autocast),
        additive (0 or the dtype's minimum) for eager attention."""
        if frame_mask is None:
            return None
        keys = frame_mask[:, None, None, :]
        if self.config._attn_implementation == "sdpa":
            return keys
        return (~keys).to(dtype) * torch.finfo(dtype).min

    def _ctc_loss(self, logits: torch.Tensor, labels: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor:
        if labels.max() >= self.config.vocab_size:
            raise ValueError(f"label values must be < vocab_size {self.config.vocab_size}")
        if frame_mask is None:
            input_lengths = torch.full((logits.shape[0],), logits.shape[1], dtype=torch.long, device=logits.device)
        else:
            input_lengths = frame_mask.sum(-1).long()
        label_mask = labels >= 0
        log_probs = nn.functional.log_softmax(logits, dim=-1, dtype=torch.float32).transpose(0, 1)
        with torch.backends.cudnn.flags(enabled=False):
            return nn.functional.ctc_loss(
                log_probs,
                labels.masked_select(label_mask),
                input_lengths,
                label_mask.sum(-1),
                blank=self.config.pad_token_id,
                reduction=self.config.ctc_loss_reduction,
                zero_infinity=self.config.ctc_zero_infinity,
            )


AutoConfig.register(MODEL_TYPE, WhisperCTCConfig, exist_ok=True)
AutoModelForCTC.register(WhisperCTCConfig, WhisperForCTC, exist_ok=True)
AutoFeatureExtractor.register(WhisperCTCConfig, WhisperCTCFeatureExtractor, exist_ok=True)
