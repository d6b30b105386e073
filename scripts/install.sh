#!/usr/bin/env bash
# Creates .venv with everything the service and its tests need.
# mmcv must be compiled with its ops against the installed torch; the built
# wheel is kept in a cache dir keyed on mmcv, torch and Python, so a second
# install on the same machine takes seconds instead of a compile.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
MMCV_VERSION=2.1.0
TORCH_VERSION=2.13.0
WHEEL_CACHE=${MMCV_WHEEL_CACHE:-$HOME/.cache/mmdet-ls-backend/wheels}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade "pip>=24" wheel
$PIP install -q "torch==$TORCH_VERSION"
# setuptools 81+ dropped pkg_resources, which mmcv's setup.py and mmengine's
# `mmdet::` config inheritance import.
$PIP install -q "setuptools>=77.0.3,<81"

PYTAG=$("$VENV/bin/python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
KEY_DIR="$WHEEL_CACHE/mmcv-$MMCV_VERSION-torch-$TORCH_VERSION-$PYTAG"
if ! "$VENV/bin/python" -c 'import mmcv.ops' 2>/dev/null; then
  if ! ls "$KEY_DIR"/mmcv-*.whl >/dev/null 2>&1; then
    echo "Building mmcv $MMCV_VERSION with its compiled ops (minutes; cached for the next install)..."
    mkdir -p "$KEY_DIR.tmp"
    # Without --no-build-isolation the build silently skips the ops.
    MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} $PIP wheel -q --no-deps \
      --no-build-isolation --no-binary mmcv -w "$KEY_DIR.tmp" "mmcv==$MMCV_VERSION"
    rm -rf "$KEY_DIR" && mv "$KEY_DIR.tmp" "$KEY_DIR"
  fi
  $PIP install -q --no-deps "$KEY_DIR"/mmcv-*.whl
fi
$PIP install -q -r requirements.txt
if [ "${INSTALL_DEV:-0}" = 1 ]; then
  $PIP install -q -r requirements-dev.txt
fi
# Fail now, not at serve time, if the ops did not build.
"$VENV/bin/python" -c 'import mmcv.ops, mmdet; print("mmcv ops OK, mmdet", mmdet.__version__)'
