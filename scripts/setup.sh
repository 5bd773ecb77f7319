#!/usr/bin/env bash
# Idempotent setup for a fresh machine: the embedded dataset (Debian package) and the project's virtualenv.
# A second run with unchanged pyproject.toml and setup script installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${BICT_VENV:-.venv}
PYTHON=${PYTHON:-python3}

# 1. Fashion-MNIST, the embedded default dataset, from Debian where apt and root are available.
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ -z "${BICT_FASHION_MNIST_ROOT:-}" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing dataset-fashion-mnist (Debian package)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: Fashion-MNIST not installed and apt-get as root is unavailable;" \
         "run 'sudo apt-get install dataset-fashion-mnist' or set BICT_FASHION_MNIST_ROOT" >&2
  fi
fi

# 2. The virtualenv, reinstalled only when what defines it changes (the compiled parts included: an editable
#    install builds it once, so a change to its source needs a reinstall).
stamp_src=$(cat pyproject.toml setup.py bict_ray/retrieval/_topk.cpp bict_ray/retrieval/_ranks.cpp scripts/setup.sh | sha256sum | cut -c1-16)
stamp="$VENV/.bict-installed-$stamp_src"
if [ -f "$stamp" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# torch: the versions this project's machines hold on local disk (a CPU-usable CUDA build on x86-64)
case "$(uname -m)" in
  aarch64|arm64) TORCH="torch==2.9.1 torchvision==0.24.1" ;;
  *) TORCH="torch==2.14.1 torchvision==0.29.1" ;;
esac
echo "setup: installing the project into $VENV (first run takes a few minutes)"
"$VENV/bin/python" -m pip install -q --upgrade pip
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install -q $TORCH -e ".[test]"
rm -f "$VENV"/.bict-installed-*
touch "$stamp"
