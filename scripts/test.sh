#!/usr/bin/env bash
# Set up and run the whole test suite, slow tier on the real demo model included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# -m "": every tier (pyproject's addopts selects only the fast one for a plain `pytest`)
python -m pytest -q -ra -m "" tests "$@"
