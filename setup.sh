#!/usr/bin/env bash
# Creates .venv with the pinned CPU torch first (a loose torch would pull a multi-GB CUDA build), then fxq.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet torch==2.13.0
.venv/bin/pip install --quiet -e ".[test]"
