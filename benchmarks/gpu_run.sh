#!/usr/bin/env bash
# A GPU session's second device command, as is: `bash benchmarks/gpu_run.sh` (benchmarks/README.md, "Running the
# GPU check"). Unpacks and verifies the full CIFAR-10 sent as gpu_data/part1 and gpu_data/part2, then runs
# gpu_check.py: about 9 minutes in all. Reports (report.md/json, real_run/, log.txt) land in $OUT/gpu.
set -u
OUT=${OUT:?"run on the device machine, where the device tool sets OUT"}
mkdir -p "$OUT/gpu"
exec > >(tee "$OUT/gpu/log.txt") 2>&1
start=$SECONDS
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import os, torch, PIL; print("torch", torch.__version__, "Pillow", PIL.__version__, os.cpu_count(), "CPUs")'
DATA=gpu_data/cifar10
if python3 gpu_data/part2/cifar10_webp.py unpack gpu_data "$DATA"; then
    echo "unpack: $((SECONDS - start)) s"
else  # the other parts still run, on synthetic data; the report says the real run was skipped
    echo "unpack FAILED: no real run"
    DATA=gpu_data/absent
fi
# 540 s: the real run's 410 are reserved (16,384 compiled steps at ~20 ms on an H200, plus compiling and 16
# evaluations); devices and resume (~20 s), part 3b (the captured FixMatch iteration and the --cuda-graph checks,
# ~25 s) and the speed of every script eager, FixMatch, FlexMatch and supervised also with --cuda-graph (~55 s;
# MixMatch and ReMixMatch for what one pass over their interleaved batches gained) come before it, in the ~115 s
# the reserve leaves, the peers after it. timeout
# only guards the device's 600 s limit; the reports are rewritten after every part. GPU_CHECK_EXTRA: flags that
# win (the CPU rehearsal: "--device cpu --quick --budget-s 600 --real-run-s 120").
timeout -k 5 $((580 - SECONDS + start)) python3 benchmarks/gpu_check.py --out "$OUT/gpu" --data-dir "$DATA" \
    --budget-s 540 --real-run-s 410 --scripts fixmatch flexmatch supervised mixmatch remixmatch freematch softmatch \
    --compile-scripts ${GPU_CHECK_EXTRA:-}
echo "gpu_check exit status $?; $((SECONDS - start)) s in all"
