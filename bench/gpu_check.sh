#!/usr/bin/env bash
# The GPU check of issue 16's GPU path: `pytest -m gpu tests/test_gpu.py` and bench/bench_sd21.py, in under 8 minutes.
#
# How to run it (a session whose task was lent a GPU machine; the device tool's `status` says so at no cost):
#   1. here, in the repository root, with network to PyPI:   bash bench/gpu_wheels.sh     (fills .whl/, 22 MB)
#   2. through the device tool:
#        run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
#      then give_back unless rerunning at once. Everything lands in $OUT/gpu_check.log (the reply's output_tail
#      holds its end: the benchmark table and the ratio lines); $OUT/bench_sd21.json holds every number and
#      $OUT/pytest_gpu.xml the test results.
#   3. copy the table and ratio lines into BENCHMARKS.md's "GPU (sd21)" section with the machine and date.
#
# Nothing is installed from a network: the wheels from .whl/ (bench/gpu_wheels.sh lists what the machine's image
# lacks: diffusers, transformers 5.23, peft, accelerate, safetensors, regex) go to /tmp/site, first on PYTHONPATH;
# torch 2.11+cu130, huggingface-hub, tokenizers, numpy, tensorboard and pytest are the image's own.
# Time limits: wheels 60 s, nvidia-smi 15 s, tests 180 s, benchmark 200 s (it starts no new row after 150 s):
# at most 455 s. Exit status: non-zero when the install, the tests or the benchmark failed.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false DO_NOT_TRACK=1
PY=${PY:-python3}
log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$LOG"; }

log "gpu_check: $(git rev-parse --short HEAD 2>/dev/null || echo 'no git') in $PWD"
if compgen -G ".whl/*.whl" >/dev/null; then
  log "installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into /tmp/site (no network)"
  timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl 2>&1 | tee -a "$LOG"
  rc_install=$?
  if [ "$rc_install" -ne 0 ]; then
    log "FAILED: wheel install (rc $rc_install)"
    exit "$rc_install"
  fi
  export PYTHONPATH="/tmp/site:$PWD"
else
  log "no .whl/ here: run bench/gpu_wheels.sh first and call with carry=['.whl'] (trying the image's packages)"
  export PYTHONPATH="$PWD"
fi

timeout 15 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 \
  | tee -a "$LOG"
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib.metadata as md, sys, torch
names = "torch diffusers transformers peft accelerate safetensors huggingface-hub tokenizers regex numpy".split()
print("python", sys.version.split()[0], {n: md.version(n) for n in names})
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print("cuda", torch.version.cuda, gpu)
EOF

log "pytest -m gpu tests/test_gpu.py (limit 180 s)"
timeout 180 "$PY" -m pytest -m gpu tests/test_gpu.py -q -rA -p no:cacheprovider --timeout=150 \
  --junitxml="$OUT/pytest_gpu.xml" 2>&1 | tee -a "$LOG"
rc_tests=$?
log "pytest rc=$rc_tests"

log "bench/bench_sd21.py (limit 200 s, no new row after 150 s)"
# BENCH_ARGS: extra arguments (BENCH_ARGS=--tiny dry-runs this script on a CPU machine; not a GPU figure)
timeout 200 "$PY" bench/bench_sd21.py --budget-s 150 --json "$OUT/bench_sd21.json" ${BENCH_ARGS:-} 2>&1 \
  | grep -v '^\[transformers\] `.*ImageProcessor` requires torchvision' | tee -a "$LOG"
rc_bench=$?
log "bench rc=$rc_bench"

log "done: tests rc=$rc_tests bench rc=$rc_bench (log: $LOG)"
[ "$rc_tests" -eq 0 ] && [ "$rc_bench" -eq 0 ]
