#!/usr/bin/env bash
# The AQ-DETR ablation on the built-in shapes dataset (CPU); see tools/quickstart.py --help.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec python tools/quickstart.py "$@"
