#!/usr/bin/env bash
# Prepare, on a machine with network, what bench/gpu_check.py carries to a GPU machine that has
# torch, transformers, peft and accelerate but no network: the pure-Python wheels its image lacks
# (the versions installed here, so the GPU runs what the tests here ran) into .whl/, and the
# CIFAR-10 subset from ../shared/data into .gpu-data/ (both ignored by git; never committed).
set -euo pipefail
cd "$(dirname "$0")/.."
# What the GPU image lacks for the engine and the tests (importlib_metadata and lazy-importer
# are diffusers' needs; pytorch-fid is imported by the evaluation).
MISSING=(diffusers importlib_metadata lazy-importer pytorch-fid)
pins=$(python -c 'import sys; from importlib.metadata import version; print(" ".join(f"{n}=={version(n)}" for n in sys.argv[1:]))' "${MISSING[@]}")
rm -rf .whl && mkdir -p .whl .gpu-data
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl $pins
if ls .whl/*.whl | grep -v -- '-none-any\.whl$'; then
  echo "error: the wheels above are not pure Python; the GPU machine needs pure-Python wheels only" >&2
  exit 1
fi
cp ../shared/data/cifar10_test_subset.npz .gpu-data/
du -ch .whl .gpu-data | tail -n 1 | sed 's/total/to carry (the device tool carries at most 64 MiB with the working tree)/'
