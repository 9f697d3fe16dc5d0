#!/usr/bin/env bash
# Download into .whl/ (git-ignored) the wheels craft's GPU check needs that the GPU machine's image lacks.
#
#   bash bench/gpu_wheels.sh          # here, with network to PyPI; then bench/gpu_check.sh on the GPU machine
#
# The GPU machine (device tool, kind nvidia-h200) has python3 3.12 with torch 2.11+cu130, huggingface-hub 1.33,
# tokenizers 0.23.2, numpy, pyyaml, tqdm, tensorboard, pytest and pytest-timeout, and no network. It lacks, or has
# other versions of, what craft pins (pyproject.toml); these travel as wheels:
#   diffusers 0.42.1     not in the image
#   transformers 5.23.0  the image has 5.17.0
#   peft 0.21.2          pinned version (the image's is unknown)
#   accelerate 1.15.0    pinned version (the image's matches; carried so the set is exact)
#   safetensors 0.8.0    pinned version (idem)
#   regex                transformers 5.23 refuses to import with regex < 2025.10.22 (the image's is unknown)
# Their other requirements are in the image at versions they accept (huggingface-hub >= 1.32 < 3, tokenizers
# >= 0.23.1 < 0.24, numpy, packaging, filelock, requests, Pillow, pyyaml, tqdm, psutil). `--no-deps` keeps it
# to exactly this list; two versions of one package in .whl/ would stop the install there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PACKAGES=(
  diffusers==0.42.1
  transformers==5.23.0
  peft==0.21.2
  accelerate==1.15.0
  safetensors==0.8.0
  regex==2026.11.19
)
rm -rf .whl
mkdir -p .whl
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${PACKAGES[@]}"
n=$(ls .whl/*.whl | wc -l)
if [ "$n" -ne "${#PACKAGES[@]}" ]; then
  echo "gpu_wheels: expected ${#PACKAGES[@]} wheels, got $n" >&2
  exit 1
fi
du -sh .whl
ls -1 .whl
