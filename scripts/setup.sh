#!/usr/bin/env bash
# Create .venv (if missing) and install exactly requirements/lock.txt (hash-checked), then apple-video itself
# (editable, no dependencies of its own). Only when the lock or pyproject.toml changed since the last install;
# packages the lock does not hold are removed, so the venv equals the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PY="$candidate"; break; fi
  done
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $PY" >&2
  "$PY" -m venv .venv
fi
stamp=.venv/.apple-video-installed
want="$(cat pyproject.toml requirements/lock.txt | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "setup: installing requirements/lock.txt and apple-video into .venv (first time: a few minutes, ~7 GB)" >&2
  pip=(.venv/bin/python -m pip --disable-pip-version-check)
  "${pip[@]}" install --quiet --upgrade pip >/dev/null 2>&1 || true
  "${pip[@]}" install --quiet --require-hashes --no-deps -r requirements/lock.txt
  "${pip[@]}" install --quiet --no-deps -e .
  mapfile -t strays < <(.venv/bin/python scripts/lockfile.py strays)
  remove=() reinstall=()
  for line in "${strays[@]}"; do
    case "$line" in reinstall\ *) reinstall+=("${line#reinstall }") ;; *) remove+=("$line") ;; esac
  done
  if [ "${#remove[@]}" -gt 0 ]; then
    echo "setup: removing what the lock does not hold: ${remove[*]}" >&2
    "${pip[@]}" uninstall --quiet -y "${remove[@]}"
  fi
  if [ "${#reinstall[@]}" -gt 0 ]; then  # they shared files with what was removed (two OpenCV wheels share cv2/)
    .venv/bin/python scripts/lockfile.py subset "${reinstall[@]}" > .venv/.reinstall.txt
    "${pip[@]}" install --quiet --require-hashes --no-deps --force-reinstall -r .venv/.reinstall.txt
  fi
  echo "$want" > "$stamp"
else
  echo "setup: .venv is up to date" >&2
fi
