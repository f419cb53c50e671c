#!/usr/bin/env bash
# Create .venv and install what the project needs. Safe to re-run: it installs only what is missing.
# torch is installed first and on its own: a plain torch requirement on a machine without torch
# pulls a multi-GB CUDA build. Pick the build with TORCH_SPEC (and PIP_INDEX_URL / PIP_EXTRA_INDEX_URL
# for a CUDA or CPU wheel index); GPU users who already installed their CUDA torch in .venv keep it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q -r requirements.txt
python -m pip install -q --no-deps -e .   # the project's packages, importable from scripts/ and anywhere else
