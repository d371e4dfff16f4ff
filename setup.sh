#!/usr/bin/env bash
# Kiln set-up: a virtual environment in .venv with PyTorch (CUDA build on a GPU machine, CPU build
# elsewhere) and Kiln installed in editable mode with its test tools.
#   ./setup.sh              # uses python3; PYTHON=python3.11 ./setup.sh to choose
#   VENV=/path ./setup.sh   # another place for the environment
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10), "Kiln needs Python >= 3.10"'
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --retries 1)

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "GPU found: installing the CUDA build of torch $TORCH_VERSION"
    "${pip[@]}" "torch==$TORCH_VERSION"
else
    # The CPU wheel index keeps pip from pulling several GB of CUDA libraries. Where that index is
    # out of reach, a local CPU wheel (pip's find-links) or PyPI's build is used instead.
    echo "no GPU: installing the CPU build of torch $TORCH_VERSION"
    "${pip[@]}" "torch==$TORCH_VERSION" --extra-index-url https://download.pytorch.org/whl/cpu
fi
"${pip[@]}" -e ".[dev]"
echo "ready: source $VENV/bin/activate"
