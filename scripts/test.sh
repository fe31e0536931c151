#!/usr/bin/env bash
# Set up, check the lock, lint, and run the whole test suite. pytest's "no tests collected" (exit 5) is a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
"$PY" scripts/lockfile.py check || exit 1    # the lock is the one pyproject.toml's dependencies give (tomllib: 3.11+)
bash scripts/setup.sh || exit 1
.venv/bin/python scripts/lockfile.py drift || exit 1    # the venv holds exactly the lock
.venv/bin/python -m pip --disable-pip-version-check check >/dev/null || {
  echo "test.sh: pip check found broken requirements (run .venv/bin/python -m pip check)" >&2; exit 1; }
.venv/bin/ruff check . || exit 1
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$rc"
