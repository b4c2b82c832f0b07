#!/usr/bin/env bash
# Installs AQ-DETR and everything it needs into the current Python environment.
# Idempotent: a second run checks what is there and exits in seconds.
set -euo pipefail

PYTHON=${PYTHON:-python}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PIP=("$PYTHON" -m pip install --disable-pip-version-check --no-input)

# Detectron2 is not on PyPI for CPython 3.11; sal-detectron2 is upstream commit a59f0563
# shipped as a cp310 wheel. Its hash is pinned; it is retagged below as pure Python.
D2_WHEEL=sal_detectron2-0.7.2-cp310-none-any.whl
D2_SHA256=491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561

echo "[install] python: $($PYTHON --version)"
"${PIP[@]}" "torch==2.14.1" "torchvision==0.29.1"
"${PIP[@]}" \
    "numpy>=1.24,<2" \
    "opencv-python>=4.8,<4.12" \
    "fvcore==0.1.5.post20221221" \
    "iopath>=0.1.7,<0.1.11" \
    "pycocotools>=2.0.7,<2.1" \
    "scipy>=1.10,<1.15" \
    "setuptools>=65,<81" \
    "wheel>=0.41" \
    "matplotlib>=3.7,<3.10" \
    "omegaconf>=2.1,<2.4" "hydra-core>=1.1" "termcolor>=1.1" "tabulate" "yacs>=0.1.8" \
    "cloudpickle" "Pillow>=7.1" "tqdm>4.29.0" "packaging" \
    "tensorboard>=2.14,<3" \
    "pytest>=7,<9" \
    "onnx==1.23.2" "onnxruntime==1.32.0" "ml_dtypes==0.5.4"
# onnx / onnxruntime: deployment (tools/export_onnx.py, tools/eval_onnx.py), ~40 MB. ml_dtypes
# 0.5.4 is the newest that onnx accepts and that still runs on numpy<2, which Detectron2 needs.

if "$PYTHON" -c "import detectron2" 2>/dev/null \
   && "$PYTHON" -m pip show sal-detectron2 >/dev/null 2>&1; then
    echo "[install] detectron2 already installed"
else
    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT
    "$PYTHON" -m pip download --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version 3.10 --implementation cp --abi none --platform any \
        -d "$WORK" "sal-detectron2==0.7.2"
    echo "$D2_SHA256  $WORK/$D2_WHEEL" | sha256sum -c -
    "$PYTHON" -m wheel unpack -d "$WORK/unpacked" "$WORK/$D2_WHEEL"
    PKG=$(ls -d "$WORK"/unpacked/*)
    rm -rf "$PKG/tools" "$PKG"/detectron2/_C.*.so
    DIST=$(ls -d "$PKG"/*.dist-info)
    sed -i -e 's/^Tag: .*/Tag: py3-none-any/' -e 's/^Root-Is-Purelib: .*/Root-Is-Purelib: true/' "$DIST/WHEEL"
    echo detectron2 > "$DIST/top_level.txt"
    mkdir -p "$WORK/dist"
    "$PYTHON" -m wheel pack -d "$WORK/dist" "$PKG"
    "${PIP[@]}" --no-deps "$WORK"/dist/*.whl
fi

# The original DETR code (MIT, 2020) is the test oracle for AQDETR. It installs top-level
# `models` / `util` packages, so it is only downloaded; tests unpack it into a temp dir.
DETR_WHEEL=detr-0.1.4-py3-none-any.whl
DETR_SHA256=bf23192f5969450b1494d44d7ae33f1a149251cd086a49f5a7c579a2f09750e5
mkdir -p "$ROOT/.cache"
if ! echo "$DETR_SHA256  $ROOT/.cache/$DETR_WHEEL" | sha256sum -c --status - 2>/dev/null; then
    "$PYTHON" -m pip download --disable-pip-version-check --no-deps --only-binary=:all: \
        -d "$ROOT/.cache" "detr==0.1.4"
    echo "$DETR_SHA256  $ROOT/.cache/$DETR_WHEEL" | sha256sum -c -
fi

"${PIP[@]}" --no-deps -e "$ROOT"
"$PYTHON" -c "import detectron2, aqdetr_d2; print('[install] ok: detectron2', detectron2.__version__)"
