"""Settings -> a ready-to-use model with its decoder: what the worker, `arabic-words transcribe` and `evaluate`
load."""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from shared.config import ConfigError, Settings
from worker.asr import LoadedModel, load_model
from worker.decoding import BeamDecoder
from worker.lexicon import Lexicon
from worker.vad import SpeechDetector

log = logging.getLogger(__name__)

MIN_ARABIC_SHARE = 0.8  # of a vocabulary's letters, for the Arabic word list to apply


@dataclass
class ConfiguredModel(LoadedModel):
    """A loaded model with what the settings put around it: the speech detector that trims non-speech before it
    (None: ``VAD=off``; ``worker.pipeline.speech_span``)."""

    vad: SpeechDetector | None = None


class ModelLoadError(ConfigError):
    """ASR_MODEL or ASR_LEXICON names something that cannot be loaded (a missing directory, an unknown hub id
    without internet, a missing word list); the message is one line naming the setting."""


def load_configured_model(settings: Settings, device: torch.device) -> ConfiguredModel:
    """The model, backend, cache, decoder and speech detector the settings name (the worker and `arabic-words
    transcribe` and `evaluate` all use it)."""
    try:
        model = load_model(
            settings.ASR_MODEL,
            device=device,
            threads=settings.TORCH_THREADS,
            backend=settings.ASR_BACKEND,
            cache_dir=Path(settings.ASR_CACHE_DIR) if settings.ASR_CACHE_DIR else None,
        )
    except OSError as exc:  # from_pretrained's way of saying the checkpoint is not there (local or on the hub)
        raise ModelLoadError(f"ASR_MODEL={settings.ASR_MODEL!r} could not be loaded: {_first_line(exc)}") from exc
    try:
        decoder = build_decoder(model, settings)
    except OSError as exc:
        raise ModelLoadError(f"ASR_LEXICON={settings.ASR_LEXICON!r} could not be read: {_first_line(exc)}") from exc
    vad = SpeechDetector(margin_s=settings.VAD_MARGIN_S) if settings.VAD == "on" else None
    loaded = {f.name: getattr(model, f.name) for f in fields(model)}
    return ConfiguredModel(**(loaded | {"decoder": decoder}), vad=vad)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def build_decoder(model: LoadedModel, settings: Settings) -> BeamDecoder | None:
    """The beam search the settings ask for (None: greedy), with the word list when the model writes Arabic."""
    if settings.ASR_BEAM_SIZE <= 1:
        return None
    decoder = BeamDecoder.for_vocabulary(
        model.vocabulary, beam_size=settings.ASR_BEAM_SIZE, oov_penalty=settings.ASR_LEXICON_PENALTY
    )
    if settings.ASR_LEXICON.strip().lower() in ("", "none"):
        return decoder
    if decoder.arabic_share() < MIN_ARABIC_SHARE:
        log.warning("word list not used: the model's vocabulary is not Arabic letters lexicon=%s", settings.ASR_LEXICON)
        return decoder
    return replace(decoder, lexicon=Lexicon.load(settings.ASR_LEXICON))
