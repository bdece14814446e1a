#!/usr/bin/env bash
# The prepared GPU check: one command, under 8 minutes on one H100, offline. Needs torch, triton,
# jinja2, sympy, typer, tqdm (the device image has them; no ray, fvcore or pyautoattack needed).
# Writes gpu_check.json and gpu_check.md to $OUT (the device tool's output folder) or to the
# first argument, else benchmarks/results/. Extra arguments go to benchmarks/gpu_check.py
# (--smoke: tiny models on the CPU, to check the script itself).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/results}}"
[ $# -gt 0 ] && shift
exec timeout 470 python3 benchmarks/gpu_check.py --out "$out" "$@"
