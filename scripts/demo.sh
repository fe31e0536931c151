#!/usr/bin/env bash
# Set up, then swap the bundled example: the classic swapper (a real swap, no weights needed) and the
# APPLE pipeline with the `tiny` preset (random weights: runs every stage, not a real swap).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p outputs
run() {  # run OUTPUT ARGS...: skip when the output is already there
  local out="$1"; shift
  if [ -f "$out" ]; then
    echo "already done: $out (delete it to run again)"
  else
    .venv/bin/apple-video swap examples/source.jpg examples/clip.mp4 -o "$out" "$@"
  fi
}
run outputs/example_swap.mp4
run outputs/example_swap_tiny.mp4 --preset tiny
echo "outputs: $(pwd)/outputs/example_swap.mp4 (real swap) and $(pwd)/outputs/example_swap_tiny.mp4 (tiny preset)"
