#!/usr/bin/env bash
# GPU inference check for a lent GPU machine with torch + transformers but no network (see training/gpu_run.sh for
# the wheel folder it installs PyAV/soundfile/soxr from): fp16 on the GPU vs fp32 on the CPU on the WebM fixtures
# (frame argmax, single and batched), then bench.models latency/throughput for torch fp16 and fp32 on CUDA.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "${WHEELS:-training/work/device/whl}"/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
python3 - <<'PY' 2>&1 | grep -v Warning || exit 4
import time, torch
from shared.config import BUNDLED_MODEL_DIR
from worker.asr import infer, infer_batch, load_model, select_device
from worker.audio import decode
from worker.pipeline import postprocess
names = ("marhaba", "shukran", "kitab", "madrasa", "sabah_alkhayr")
import pathlib
clips = [decode((pathlib.Path("tests/data") / f"{w}.webm").read_bytes()) for w in names if (pathlib.Path("tests/data") / f"{w}.webm").exists()]
cpu = load_model(str(BUNDLED_MODEL_DIR), device=torch.device("cpu"), backend="torch-fp32")
t = time.perf_counter(); gpu = load_model(str(BUNDLED_MODEL_DIR), device=select_device(0), backend="auto"); print("gpu load s", round(time.perf_counter() - t, 2))
print("device", gpu.device, "backend", gpu.backend)
assert gpu.device.type == "cuda" and gpu.backend.value == "torch-fp16", gpu.backend
for clip, batched in zip(clips, infer_batch(gpu, clips), strict=True):
    ref, single = infer(cpu, clip), infer(gpu, clip)
    a, b = (ref.argmax(1) == single.argmax(1)).mean(), (single.argmax(1) == batched.argmax(1)).mean()
    print("argmax agreement cpu-fp32 vs gpu-fp16 %.3f, single vs batched %.3f" % (a, b), postprocess(cpu, clip, ref).text, "|", postprocess(gpu, clip, single).text)
    assert a >= 0.99 and b >= 0.99
print("GPU CHECK PASSED")
PY
for m in bundled base; do for b in torch-fp16 torch-fp32; do
  timeout 60 python3 -m bench.models --model $m --backend $b --device cuda --runs 25 --batch-runs 5 2>/dev/null | tail -1
done; done
