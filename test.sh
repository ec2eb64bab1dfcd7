#!/usr/bin/env bash
# The test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh test
ruff check nanoseek tests bench
exec python -m pytest "$@"
