#!/usr/bin/env bash
# Installs everything keras_taylor needs on a fresh Debian/Ubuntu machine:
# the real Fashion-MNIST files (Debian package), a virtualenv in .venv, and the
# package with its test and example extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if command -v apt-get >/dev/null; then
    $SUDO apt-get install -y dataset-fashion-mnist >/dev/null 2>&1 \
      || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; }
  else
    echo "note: no apt-get; Fashion-MNIST will come from keras.datasets/tfds (needs internet) or --data_dir" >&2
  fi
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test,examples]"
# KerasHub without its dependencies: they would pull `tensorflow` and
# `tensorflow-text` over tensorflow-cpu; the "hub" extra (in "test") has the
# light ones its vision models import. Tested with keras-hub 0.32.0.
.venv/bin/python -m pip install -q --no-deps "keras-hub==0.32.0"
echo "setup done: $(.venv/bin/python -c 'import tensorflow as tf, keras; print("tensorflow", tf.__version__, "keras", keras.__version__)')"
