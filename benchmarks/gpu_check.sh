#!/usr/bin/env bash
# The GPU check: the suite's CPU-sized tests under the GPU machine's own torch/transformers
# (with CUDA visible, so the training loop, generation and evaluation run on the GPU), then the
# loss benchmark on the GPU. Output lands in $OUT (or benchmarks/out).
set -u
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python3 - <<'PY' 2>&1 | tee "$OUT/gpu_env.txt"
import torch, transformers, accelerate, peft
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
print("transformers", transformers.__version__, "accelerate", accelerate.__version__, "peft", peft.__version__)
PY
timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_losses.py tests/test_train.py tests/test_pipeline.py \
  -k "not ddp" 2>&1 | tail -25 | tee "$OUT/gpu_pytest.txt"
timeout 200 python3 benchmarks/losses.py --device cuda --repeats 3 --out "$OUT/losses_gpu.json" 2>&1 | tail -12 | tee "$OUT/gpu_bench.txt"
# the same with 4x smaller GPU chunks (2^22 elements), to see the time/memory trade-off
DISTILLM2_CHUNK_ELEMENTS=4194304 timeout 200 python3 benchmarks/losses.py --device cuda --repeats 3 \
  --out "$OUT/losses_gpu_chunk22.json" 2>&1 | tail -6 | tee "$OUT/gpu_bench_chunk22.txt"
