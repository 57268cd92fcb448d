#!/usr/bin/env bash
# Set up, quantize the demo model with GPTQ w4g64 on the embedded defaults, evaluate both, show the result.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out
lowbit quantize smollm2-135m --method gptq --bits 4 --group-size 64 --out out/smol-w4g64 --json out/quantize.json --force
lowbit info out/smol-w4g64
lowbit eval smollm2-135m --json out/eval-fp.json --force
lowbit eval out/smol-w4g64 --json out/eval-w4g64.json --force
