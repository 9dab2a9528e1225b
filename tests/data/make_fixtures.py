"""Make the committed test clips: Arabic words spoken by espeak-ng, encoded as browsers and apps send them.

    apt-get install espeak-ng && python -m tests.data.make_fixtures

Writes ``<name>.<ext>`` for each word and format plus ``transcripts.tsv`` (file<TAB>text), the manifest
`arabic-words evaluate` reads. Encoding is done in memory with FFmpeg's libraries (PyAV).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.synth import SAMPLE_RATE, encode, speak

HERE = Path(__file__).parent
WORDS = {
    "marhaba": "مرحبا",
    "shukran": "شكرا",
    "kitab": "كتاب",
    "madrasa": "مدرسة",
    "sabah_alkhayr": "صباح الخير",
}
# format -> (sample rate, channels) of the file, as real clients produce them
FORMATS = {
    "webm": (48_000, 1),  # Chrome/Firefox MediaRecorder: Opus in WebM
    "ogg": (48_000, 1),  # Opus in OGG (Firefox, Android apps)
    "mp3": (44_100, 1),
    "m4a": (44_100, 1),  # AAC in MP4 (Safari, iOS)
    "wav": (44_100, 2),  # 44.1 kHz stereo PCM
    "flac": (16_000, 1),
}


def main() -> None:
    rows = []
    for name, text in WORDS.items():
        audio = speak(text, None)
        pad = np.zeros(SAMPLE_RATE // 5, np.float32)
        audio = np.concatenate([pad, audio, pad])
        for fmt, (rate, channels) in FORMATS.items():
            path = HERE / f"{name}.{fmt}"
            path.write_bytes(encode(audio, fmt, sample_rate=rate, channels=channels))
            rows.append(f"{path.name}\t{text}")
    (HERE / "transcripts.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    print(f"wrote {len(rows)} clips to {HERE}")


if __name__ == "__main__":
    main()
