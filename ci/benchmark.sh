#!/usr/bin/env bash
# Run the benchmark suite (not part of CI: its numbers need a quiet machine).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/run.py "$@"
