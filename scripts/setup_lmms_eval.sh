#!/usr/bin/env bash
# The optional lmms-eval integration in a venv of its own, .venv-lmms (about 3 minutes and 7 GB: lmms-eval pulls
# torchvision and a CUDA torch build; kept apart because that torchvision breaks a CPU torch). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-lmms/bin/python ] || python3 -m venv .venv-lmms
. .venv-lmms/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -r requirements-lmms-eval.txt
python -m pip install -q -r requirements.txt
python -m pip install -q --no-deps -e .   # registers the pruned_llava model with lmms-eval (pyproject.toml)
python -c "from lmms_eval.models import MODEL_REGISTRY_V2; MODEL_REGISTRY_V2.get_manifest('pruned_llava')"
echo "lmms-eval ready: .venv-lmms/bin/lmms-eval --model pruned_llava ..."
