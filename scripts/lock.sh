#!/usr/bin/env bash
# Refresh requirements/lock.txt from pyproject.toml (run after changing its dependencies; commit both).
# Keeps every pin that still satisfies pyproject; `bash scripts/lock.sh --upgrade` moves everything to the newest
# versions (a deliberate change: run the whole suite on it before committing).
# Uses pip-tools in its own venv (.venv-lock), so the project's venv is not touched.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
if [ ! -x .venv-lock/bin/pip-compile ]; then
  "$PY" -m venv .venv-lock
  .venv-lock/bin/python -m pip install --quiet 'pip-tools==7.7.0'
fi
.venv-lock/bin/pip-compile --quiet --extra test --generate-hashes --allow-unsafe --strip-extras \
  --no-emit-index-url --no-emit-find-links --output-file requirements/lock.txt "$@" pyproject.toml
stamp="$(.venv-lock/bin/python scripts/lockfile.py stamp)"
python3 - "$stamp" <<'PY'
import sys
from pathlib import Path
lock = Path("requirements/lock.txt")
lines = [line for line in lock.read_text().splitlines() if not line.startswith("# pyproject-inputs-sha256: ")]
lines.insert(next(i for i, line in enumerate(lines) if not line.startswith("#")), f"# pyproject-inputs-sha256: {sys.argv[1]}")
lock.write_text("\n".join(lines) + "\n")
PY
echo "lock: requirements/lock.txt refreshed ($(grep -c '^[A-Za-z0-9].*==' requirements/lock.txt) packages)" >&2
