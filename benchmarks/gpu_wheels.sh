#!/usr/bin/env bash
# What a GPU call carries (both ignored by git): the wheels the GPU image lacks
# (.whl; its Python is 3.12 and it has torch, triton, timm, lightning, tifffile,
# hypothesis and pytest-benchmark) and a copy of the Drosophila data (.data).
# Then: device run with carry [".whl", ".data"] and
#   OUT=$OUT FREM_DATA=.data/drosophila-vnc bash benchmarks/gpu.sh tests ops
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl segmentation-models-pytorch optuna sqlalchemy alembic colorlog mako greenlet monai \
  dynamic-network-architectures
rm -rf .data && mkdir -p .data
cp -r "${FREM_DATA:-../shared/data/drosophila-vnc}" .data/
du -sh .whl .data
