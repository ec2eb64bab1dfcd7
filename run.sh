#!/usr/bin/env bash
# The main job on the built-in default. Extra arguments go to `nanoseek speedrun`.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh ""  # an explicit (empty) extras argument: a bare `source` would pass on our "$@"
exec nanoseek speedrun "$@"
