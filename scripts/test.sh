#!/usr/bin/env bash
# Set up and run the whole test suite, slow tier on the real demo model included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python -m pytest -q -ra tests "$@"
