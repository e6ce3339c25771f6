#!/usr/bin/env bash
# The whole GPU session in one command, for the device tool's H200 (see README, "GPU"): installs the carried wheels
# (.whl/), restores FlashInfer kernels built by an earlier run (.jit/, carried back from $OUT), builds the rest side
# by side, then runs what the arguments name: tests, kernels, e2e (default: all three), batch (batched decode,
# bench/batch_gpu.py), batch-hf (HF generate at the same batches: bench/batch_hf.py), app (the app's decoding, traced
# and untraced, SmolLM2's and Llama-3.1-8B's shapes: bench/app_gpu.py), phases (each of our kernels' phases on cold
# data: bench/kernel_phases.py), floor (Quest against the floor of its reads: bench/read_floor.py), profile, multi
# (the 70B-shaped model split over 2 GPUs: bench/multi_gpu.py, on the device tool's 2-GPU H200 machine).
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MAX_JOBS=16
AOT=/tmp/site/flashinfer/data/aot
mkdir -p "$AOT" && cat .jit/flashinfer_aot.tar.gz.* 2>/dev/null | tar -xzf - -C "$AOT" 2>/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, transformers, flashinfer; print('torch', torch.__version__, 'transformers', transformers.__version__, 'flashinfer', flashinfer.__version__)"

start=$(date +%s)
python3 -c "from quest_core import kernels; assert kernels.load() is not None, 'kernel build failed'; print('quest kernels built')" &
for variant in "bf16 128" "bf16 64" "fp16 128" "fp16 64"; do python3 bench/flashinfer_warmup.py $variant & done
wait
echo "builds: $(( $(date +%s) - start )) s"
# FlashInfer's freshly built kernels, as AOT modules for the next run (16 MiB parts: the device tool's limit)
(cd ~/.cache/flashinfer/*/*/cached_ops 2>/dev/null && tar -czf - */*.so) | split -b 15m - "$OUT/flashinfer_aot.tar.gz."

for step in ${@:-tests kernels e2e}; do
  case $step in
    tests) python3 -m pytest -q -rs tests/test_gpu.py tests/test_gpu_batch.py tests/test_multi_gpu.py 2>&1 \
             | tee "$OUT/gpu_tests.txt" ;;
    kernels) for shape in llama3-8b llama2-7b smollm2; do python3 bench/attention_kernels.py --shape $shape; done 2>&1 \
               | tee "$OUT/kernels.txt" ;;
    e2e) python3 bench/e2e.py 2>&1 | tee "$OUT/e2e.txt" ;;
    batch) python3 bench/batch_gpu.py 2>&1 | tee "$OUT/batch.txt" ;;
    batch-hf) python3 bench/batch_hf.py 2>&1 | tee "$OUT/batch_hf.txt" ;;
    app) for shape in smollm2 llama3-8b; do python3 bench/app_gpu.py --shape $shape; done 2>&1 \
           | tee "$OUT/app_gpu.txt" ;;
    phases) python3 bench/kernel_phases.py 2>&1 | tee "$OUT/phases.txt" ;;
    floor) python3 bench/read_floor.py 2>&1 | tee "$OUT/read_floor.txt" ;;
    profile)  # where our two kernels' time goes (Nsight Compute): one layer of Llama-3.1-8B heads at 128K
      ncu --kernel-name regex:'score_topk|sparse_decode' --launch-skip 20 --launch-count 2 --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section WarpStateStats --section LaunchStats --section Occupancy \
        python3 bench/attention_kernels.py --contexts 131072 --budgets 2048 --no-write 2>&1 | tee "$OUT/ncu.txt" ;;
    multi) python3 bench/multi_gpu.py 2>&1 | tee "$OUT/multi_gpu.txt" ;;
  esac
  cp bench/RESULTS.md "$OUT/RESULTS.md"
done
