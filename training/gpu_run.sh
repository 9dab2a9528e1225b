#!/usr/bin/env bash
# Continue the bundled checkpoint on a lent GPU machine that has torch + transformers but no apt and no network,
# with clips made while training (training.train --stream-workers). Prepare the folder it needs here, once:
#
#   python -m training.make_dataset --out training/work/data --train-clips 0       # split.json (held-out words/voices)
#   python -m training.bundle_espeak --out training/work/device/espeak
#   cp training/work/data/split.json training/work/device/
#   pip download --only-binary=:all: --no-deps --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       --platform manylinux2014_x86_64 -d training/work/device/whl av soundfile soxr cffi pycparser   # its Python
#
# then run `bash training/gpu_run.sh` there with training/work/device carried along. The best checkpoint (eval CER
# on EVAL_CLIPS held-out clips) lands in $OUT/model, the log in $OUT/train.log. MINUTES is training time only: set-up
# (wheels, espeak check, eval set, first MIN_CLIPS clips) takes ~1.5 min more on 16 cores.
set -uo pipefail
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
DEV=${DEV:-$PWD/training/work/device}
OUTDIR=${OUT:-/tmp/out}
mkdir -p "$OUTDIR"
if [ -z "${SKIP_WHEELS:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$DEV"/whl/*.whl \
    || exit 3
  export PYTHONPATH=/tmp/site:$PWD
fi
export ESPEAK_NG=$DEV/espeak
nproc; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
$PY - <<'PY' || exit 4
import time, torch, transformers, av
from training.synth import speak, espeak_variants, encode, decode_any
t = time.time(); a = speak("مرحبا بكم", "klatt"); print("espeak ok", a.shape, f"{time.time()-t:.3f}s", len(espeak_variants()), "variants")
print("codecs ok", [len(decode_any(encode(a, f))) for f in ("webm", "mp3", "ogg")])
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__, "av", av.__version__)
PY
DATA=/tmp/data; mkdir -p $DATA; cp "$DEV/split.json" $DATA/
t0=$(date +%s)
$PY - <<PY || exit 5
import json; from pathlib import Path
from training.make_dataset import build_eval
s = json.loads(Path("$DATA/split.json").read_text(encoding="utf-8"))
build_eval(Path("$DATA/eval"), s["eval_words"], s["eval_voices"], ${EVAL_CLIPS:-200}, 1)
PY
echo "eval set built in $(( $(date +%s) - t0 )) s"
# --line-buffered: a killed run must still leave its log behind
$PY -m training.train --data $DATA --stream-workers "${WORKERS:-$(( $(nproc) - 2 ))}" \
  --init-from "${INIT_FROM:-worker/models/arabic-words-small}" --out "$OUTDIR/model" --minutes "${MINUTES:-7}" \
  --max-steps 100000 --lr "${LR:-8e-4}" --warmup "${WARMUP:-300}" --max-frames "${FRAMES:-18000}" \
  --eval-every "${EVAL_EVERY:-250}" --eval-clips "${EVAL_CLIPS:-200}" --min-clips "${MIN_CLIPS:-3000}" \
  --max-reuse "${REUSE:-5}" --seed "${SEED:-5}" --threads 4 2>&1 \
  | grep --line-buffered -v "Loading weights\|Writing model" | tee "$OUTDIR/train.log"
ls -la "$OUTDIR/model"
