#!/usr/bin/env bash
# Installs what the tests need, prepares the offline datasets, and runs the default test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
flatpeft data prepare
python -m pytest "$@"
