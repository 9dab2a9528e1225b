"""`arabic-words transcribe`, `evaluate` and `backfill`, run as a user runs them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile

from shared.text import is_model_text
from tests.conftest import DATA, read_transcripts, serve_http

TRANSCRIPTS = read_transcripts()


def run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "arabic_words", *args], capture_output=True, text=True,
                          timeout=300, **kwargs)  # fmt: skip


def test_transcribe_prints_one_json_result_per_file():
    """And the right words: issue 3's check from outside (the bundled model with its word list and beam)."""
    files = sorted(str(p) for p in DATA.glob("*.webm"))
    proc = run_cli("transcribe", *files)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["file"] for line in lines] == files
    for line in lines:
        assert line["status"] == "succeeded"
        assert is_model_text(line["result"]["text"])
        assert {"text", "confidence", "words", "duration_s", "model", "timings_ms"} <= set(line["result"])
    assert [line["result"]["text"] for line in lines] == [TRANSCRIPTS[Path(f).name] for f in files]


def test_transcribe_reports_a_bad_file_and_exits_nonzero(tmp_path):
    bad = tmp_path / "bad.webm"
    bad.write_bytes(b"\x1a\x45\xdf\xa3" + bytes(100))
    proc = run_cli("transcribe", str(bad), str(DATA / "kitab.mp3"))
    assert proc.returncode == 1
    first, second = (json.loads(line) for line in proc.stdout.splitlines())
    assert first["status"] == "failed" and first["error"]["code"] == "invalid_audio"
    assert second["status"] == "succeeded"


def test_evaluate_reports_accuracy_on_the_fixtures():
    proc = run_cli("evaluate", str(DATA))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["clips"] == len(TRANSCRIPTS)
    for key in ("cer", "word_accuracy", "exact_match"):
        assert 0.0 <= report[key] <= 1.0
    # None when every word is right (no wrong word to rank below them)
    assert report["confidence_auroc"] is None or 0.0 <= report["confidence_auroc"] <= 1.0
    assert report["median_inference_ms"] > 0
    assert set(report["by_format"]) == {"webm", "ogg", "mp3", "m4a", "wav", "flac"}


@pytest.mark.usefixtures("worker")
@pytest.mark.integration
def test_backfill_a_folder_through_the_running_service(app, tmp_path):
    """The command as a user runs it: a folder walked (an AIFF among the formats), a job that fails recorded with
    its code, a summary, exit 1; run again, it sends only what did not succeed (arabic_words/backfill.py)."""
    folder = tmp_path / "archive"
    (folder / "sub").mkdir(parents=True)
    for name in ("kitab.mp3", "shukran.ogg"):
        shutil.copy(DATA / name, folder / name)
    shutil.copy(DATA / "madrasa.m4a", folder / "sub" / "madrasa.m4a")
    audio, rate = soundfile.read(DATA / "marhaba.wav")
    soundfile.write(folder / "marhaba.aiff", audio, rate, format="AIFF", subtype="PCM_16")
    (folder / "notes.txt").write_text("not audio")
    (folder / "broken.wav").write_bytes(b"RIFF\0\0\0\0WAVE" + bytes(64))  # accepted at upload; the job fails

    out = tmp_path / "results.jsonl"
    with serve_http(app) as url:
        first = run_cli("backfill", str(folder), "--url", url, "--out", str(out))
        assert first.returncode == 1  # broken.wav failed
        records = {Path(r["file"]).name: r for r in map(json.loads, out.read_text().splitlines())}
        assert set(records) == {"kitab.mp3", "shukran.ogg", "madrasa.m4a", "marhaba.aiff", "broken.wav"}
        assert records["broken.wav"]["status"] == "failed"
        assert records["broken.wav"]["error"]["code"] == "invalid_audio"
        assert records["broken.wav"]["id"]  # it was accepted: its job failed
        for name in ("kitab.mp3", "shukran.ogg", "madrasa.m4a", "marhaba.aiff"):
            assert records[name]["status"] == "succeeded"
            assert is_model_text(records[name]["result"]["text"])
            assert Path(records[name]["file"]).is_absolute()
            assert records[name]["size"] == Path(records[name]["file"]).stat().st_size
        assert records["marhaba.aiff"]["result"]["text"] == TRANSCRIPTS["marhaba.wav"]
        assert "backfill" in first.stderr  # the progress bar
        assert "4 succeeded, 1 failed (invalid_audio: 1), 0 skipped (already done)" in first.stderr
        assert str(out) in first.stderr
        second = run_cli("backfill", str(folder), "--url", url, "--out", str(out))  # resumes: only the failure
        assert second.returncode == 1
        assert len(out.read_text().splitlines()) == 6
        assert "0 succeeded, 1 failed (invalid_audio: 1), 4 skipped (already done)" in second.stderr
