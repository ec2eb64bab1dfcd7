# Sourced by run.sh and test.sh: make .venv in the repo root if missing and install what the project needs.
# torch==2.13.0 goes first: its CPU wheel is on local disk, and anything that depends on torch must see it
# installed, or pip fetches a multi-GB CUDA build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="${1:-}"  # "" or "test"; callers always pass it (a sourced script otherwise sees their "$@")
if [ ! -x "$ROOT/.venv/bin/python" ]; then
    python3 -m venv "$ROOT/.venv"
fi
PY="$ROOT/.venv/bin/python"
stamp="$ROOT/.venv/.nanoseek-installed${EXTRAS:+-$EXTRAS}"
want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0"
    "$PY" -m pip install -q --disable-pip-version-check -e "$ROOT${EXTRAS:+[$EXTRAS]}"
    echo "$want" > "$stamp"
fi
export PATH="$ROOT/.venv/bin:$PATH"
