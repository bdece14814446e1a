#!/usr/bin/env bash
# The prepared GPU check: one command, under 8 minutes on one H100, offline. Needs torch, triton,
# jinja2, sympy, typer, tqdm (the device image has them; no ray, fvcore or pyautoattack needed).
#   bash benchmarks/gpu_check.sh [OUT_DIR] [--smoke] [--sections tests,table,compile,profile]
# Writes gpu_check.json and gpu_check.md to OUT_DIR, else $OUT (the device tool's output folder),
# else benchmarks/results/ (after each section: a run cut short keeps what finished). --smoke: tiny
# models on the CPU, to check the script itself.
set -euo pipefail
exec timeout 470 python3 "$(dirname "$0")/gpu_check.py" "$@"
