#!/usr/bin/env bash
# The GPU checks, as one script for a session lent the device machine (one H200; 15 minutes of device time in all,
# the machine's start included). The machine's image has torch, transformers, accelerate, peft and safetensors but
# not diffusers, so its wheel travels. Here, once, in the repository's root:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1
#
# then call the device tool's run with carry [".whl"], timeout_s 590 and the command
#   bash benchmarks/gpu_checks.sh
# Each part has its own time limit, so one that runs long leaves the others their turn; logs and tables land in
# $OUT and in benchmarks/ (commit the tables). 8-bit AdamW's preset is skipped unless bitsandbytes is there.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
out="${OUT:-/tmp/gpu-checks}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"

# 1. the memory plan against the trainer itself: every preset, bf16, 1024 px (about 4 minutes)
timeout 280 python3 benchmarks/memory_plan_check.py --steps 3 --model /tmp/sdxl-random 2>&1 | tee "$out/memory-plan-bf16.log"
# 2. an 8 GiB card's --low_memory run in fp16 (a T4 or V100 has no bf16), the card capped at 8 GiB
timeout 120 python3 benchmarks/memory_plan_check.py --steps 3 --model /tmp/sdxl-random --mixed_precision fp16 --card_gib 8 \
  "--presets=--low_memory (+ fp8 base weights)" 2>&1 | tee "$out/memory-plan-fp16-8gib.log"
# 3. speed: the adapter's overhead, the layer, sampling and fp8 at SDXL's size
# (the tiny pipeline's end-to-end part measures nothing of SDXL's size: left to the CPU)
timeout 200 python3 benchmarks/run.py --preset sdxl --device cuda --parts overhead,sampling,layer,fp8 2>&1 | tee "$out/run-sdxl.log"
cp benchmarks/memory-plan-*.md benchmarks/memory-plan-*.json benchmarks/results-sdxl-cuda-*.md "$out/" 2>/dev/null
ls -l "$out"
