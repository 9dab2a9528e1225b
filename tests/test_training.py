"""The training helpers that run without a data set: the replay buffer of streamed clips and the espeak-ng bundle."""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest

from training.stream import ReplayBuffer
from training.train import batches


def _clip(frames: int) -> tuple[np.ndarray, list[int]]:
    return np.zeros((frames, 160), np.float16), [3, 4]


def test_replay_buffer_keeps_the_newest_clips_and_bounds_batches():
    buffer = ReplayBuffer(capacity=50, max_frames=1000, rng=random.Random(0))
    for i in range(120):
        buffer.add(*_clip(10 + i))  # length tells the clip's age
    assert buffer.added == 120 and len(buffer.items) == 50
    assert sorted(len(f) for f, _ in buffer.items) == list(range(80, 130))  # the oldest 70 were replaced
    drawn = 0
    for _ in range(20):
        batch = buffer.next_batch(batches)
        assert batch and len(batch) * max(len(f) for f, _ in batch) <= 1000
        drawn += len(batch)
    assert buffer.drawn == drawn
    assert buffer.reuse() == pytest.approx(drawn / 120)


@pytest.mark.skipif(not (shutil.which("espeak-ng") and shutil.which("cc")), reason="needs espeak-ng and a C compiler")
def test_bundled_espeak_speaks_exactly_like_the_system_one(tmp_path, monkeypatch):
    from training.bundle_espeak import bundle
    from training.synth import espeak_variants, speak

    system = speak("صباح الخير", "klatt", speed=150, pitch=40)
    system_variants = espeak_variants()
    bundle(tmp_path / "espeak")
    monkeypatch.setenv("ESPEAK_NG", str(tmp_path / "espeak"))
    monkeypatch.setenv("PATH", "/nonexistent")  # the bundle must not need the system's program
    np.testing.assert_array_equal(speak("صباح الخير", "klatt", speed=150, pitch=40), system)
    assert espeak_variants() == system_variants


@pytest.mark.skipif(not shutil.which("espeak-ng"), reason="needs espeak-ng")
def test_clip_stream_stops_promptly_when_nobody_reads_any_more():
    """A training run's end must not wait on producers blocked writing clips that nobody will read."""
    import time

    from training.stream import ClipStream

    stream = ClipStream(["كتاب", "مدرسة", "صباح الخير"], [None], workers=3, seed=0)
    try:
        clips = stream.take(wait_for=3, limit=3)
        assert len(clips) == 3 and all(feats.ndim == 2 and text for feats, text in clips)
        time.sleep(4)  # the producers fill the queue's pipe and block in their writer threads
    finally:
        started = time.monotonic()
        stream.close(grace_s=1.0)
        closing_s = time.monotonic() - started
    assert not any(proc.is_alive() for proc in stream._procs)
    assert closing_s < 1.0 + 3 * 1.0 + 1.0  # the grace for all of them, then at most a second per terminate


@pytest.mark.skipif(not shutil.which("espeak-ng"), reason="needs espeak-ng")
def test_fresh_eval_set_uses_only_the_held_out_words_and_voices(tmp_path, monkeypatch):
    import json
    import sys

    from arabic_words.cli import read_manifest
    from training import make_dataset

    split = {"eval_words": ["كتاب", "مدرسة", "قلم"], "eval_voices": [None], "train_words": ["باب"], "train_voices": []}
    (tmp_path / "split.json").write_text(json.dumps(split, ensure_ascii=False), encoding="utf-8")
    argv = ["make_dataset", "--out", str(tmp_path), "--fresh-eval", "23", "--eval-clips", "5"]
    monkeypatch.setattr(sys, "argv", argv)
    make_dataset.main()
    rows = read_manifest(tmp_path / "eval-fresh-23")
    assert len(rows) == 5
    assert all(path.stat().st_size > 1000 for path, _ in rows)
    assert {word for _, text in rows for word in text.split()} <= set(split["eval_words"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval-fresh-23", "split.json"]  # nothing else built


def test_training_shards_and_feature_caches_keep_each_clip_apart(tmp_path):
    """A shard holds clips of different lengths end to end; reading it gives back each clip and its text."""
    from training.make_dataset import PCM_SCALE, load_ragged, read_shard, save_ragged

    rng = np.random.default_rng(0)
    clips = [rng.uniform(-1, 1, n).astype(np.float32) for n in (5, 1, 12)]
    texts = ["باب", "قلم", "كتاب جديد"]
    save_ragged(tmp_path / "train-000.npz", "pcm", [(c * PCM_SCALE).astype(np.int16) for c in clips],
                texts=np.array(texts))  # fmt: skip
    read = list(read_shard(tmp_path / "train-000.npz"))
    assert [text for _, text in read] == texts
    for (audio, _), clip in zip(read, clips, strict=True):
        assert audio.dtype == np.float32 and len(audio) == len(clip)
        np.testing.assert_allclose(audio, clip, atol=1 / PCM_SCALE)
    feats = [np.full((n, 3), n, np.float16) for n in (4, 2)]
    save_ragged(tmp_path / "features.npz", "feats", feats)
    again = load_ragged(np.load(tmp_path / "features.npz"), "feats")
    assert [f.shape for f in again] == [(4, 3), (2, 3)] and all((f == len(f)).all() for f in again)
