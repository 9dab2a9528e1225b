"""Copy this machine's espeak-ng (program, libraries, Arabic data) into one folder that runs without apt.

For training on a machine that has a GPU but no package manager (no network): build the folder here, take it there,
and point ``ESPEAK_NG`` at it; ``training.synth`` then runs that espeak-ng, so the clips are the same as here.
libpcaudio (sound output, which pulls in PulseAudio and ALSA) is replaced by a stub built from
``training/pcaudio_stub.c``: espeak-ng never opens a sound device when it writes to ``--stdout``.

    python -m training.bundle_espeak --out training/work/espeak      # needs espeak-ng and a C compiler here
    ESPEAK_NG=training/work/espeak python -m training.train --stream-workers 14 ...
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

_LIBS = ("libespeak-ng.so.1", "libsonic.so.0")
_DATA_FILES = ("phondata", "phonindex", "phontab", "intonations", "ar_dict")


def _library_path(program: str, name: str) -> Path:
    for line in subprocess.run(["ldd", program], capture_output=True, text=True, check=True).stdout.splitlines():
        parts = line.split()
        if parts and parts[0] == name and "=>" in parts:
            return Path(parts[parts.index("=>") + 1])
    raise SystemExit(f"{program} does not link {name}")


def bundle(out: Path) -> None:
    program = shutil.which("espeak-ng")
    if not program:
        raise SystemExit("espeak-ng is not installed (apt-get install espeak-ng)")
    (out / "lib").mkdir(parents=True, exist_ok=True)
    shutil.copy2(program, out / "espeak-ng")
    libespeak = _library_path(program, "libespeak-ng.so.1")
    for name in _LIBS:
        shutil.copy2(_library_path(program, name), out / "lib" / name)
    stub = Path(__file__).with_name("pcaudio_stub.c")
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(out / "lib" / "libpcaudio.so.0"), str(stub)], check=True)
    data_in, data_out = libespeak.parent / "espeak-ng-data", out / "espeak-ng-data"
    data_out.mkdir(exist_ok=True)
    for name in _DATA_FILES:
        shutil.copy2(data_in / name, data_out / name)
    for folder in ("lang", "voices"):
        shutil.copytree(data_in / folder, data_out / folder, dirs_exist_ok=True)
    print(f"espeak-ng bundled in {out}: run it with ESPEAK_NG={out}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("training/work/espeak"))
    bundle(parser.parse_args().out)


if __name__ == "__main__":
    main()
