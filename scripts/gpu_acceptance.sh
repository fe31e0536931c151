#!/usr/bin/env bash
# The GPU acceptance run on a lent machine, in two halves.
#
#   bash scripts/gpu_acceptance.sh --prepare            here (a machine with PyPI): download the wheels the lent
#                                                       machine lacks into .gpu-wheels/ (git-ignored), print each
#                                                       and the total with the tracked tree (must stay < 60 MiB)
#   bash scripts/gpu_acceptance.sh [--only a,b] [--limit S]
#                                                       there (default): install them with --target, print the
#                                                       versions, run benchmarks/gpu.py under a hard timeout and
#                                                       leave jsonl, table, log and versions under $OUT (4 files)
#
# The lent machine (DEVELOPERS.md, "The machine"): Python 3.12 with torch 2.11 + CUDA 13, accelerate, peft,
# transformers, timm, safetensors 0.8, huggingface_hub 1.33, numpy, scikit-image, opencv-headless, pillow, pyyaml,
# psutil; no registry. What benchmarks/gpu.py imports and it lacks is WHEELS below, at the project's pins
# (`.venv/bin/pip freeze`); torchao is the release built against torch 2.11 (0.17.0 loads its kernels on
# torch >= 2.11). Not carried: dlib-bin and the dlib models (the engine phase detects no faces: it takes the
# synthetic clip's known placements through the engine's factory argument), ray (local executor only).
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
  diffusers==0.42.1
  pydantic==2.14.4
  pydantic_core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing_extensions==4.16.0   # pydantic 2.14 needs >= 4.16; the image's may be older
  av==18.1.0
  torchao==0.17.0
)
DIR=.gpu-wheels
SITE="$DIR/site"        # installed here: kept on a warm machine between calls (ignored build output)
LIMIT_MIB=60
RUN_LIMIT=480           # seconds for benchmarks/gpu.py: its phase limits sum to 420, imports and model build fit the rest

die() { echo "gpu_acceptance.sh: $*" >&2; exit 2; }

prepare() {
  mkdir -p "$DIR"
  local pip=(python3 -m pip)
  [ -x .venv/bin/python ] && pip=(.venv/bin/python -m pip)
  "${pip[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$DIR" "${WHEELS[@]}" 2> >(grep -v "is ignored: it is neither" >&2) \
    || die "pip download failed (a registry is needed for --prepare)"
  # keep exactly one wheel per name: two versions of one package stop the whole install there
  local expected=() name
  for spec in "${WHEELS[@]}"; do
    name=${spec%%==*}; name=${name//-/_}
    expected+=("$(ls "$DIR"/*.whl | grep -i "/${name}-${spec##*==}-" | head -1)")
  done
  for whl in "$DIR"/*.whl; do
    printf '%s\n' "${expected[@]}" | grep -qx "$whl" || { echo "removing stale $whl"; rm -f "$whl"; }
  done
  local total=0 size tree
  for whl in "${expected[@]}"; do
    [ -f "$whl" ] || die "missing wheel for one of: ${WHEELS[*]}"
    size=$(stat -c %s "$whl"); total=$((total + size))
    printf '%9.2f MiB  %s\n' "$(echo "$size / 1048576" | bc -l)" "$(basename "$whl")"
  done
  tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
  printf '%9.2f MiB  wheels (%d)\n%9.2f MiB  tracked tree\n%9.2f MiB  total to carry (limit %d MiB)\n' \
    "$(echo "$total / 1048576" | bc -l)" "${#expected[@]}" "$(echo "$tree / 1048576" | bc -l)" \
    "$(echo "($total + $tree) / 1048576" | bc -l)" "$LIMIT_MIB"
  [ $((total + tree)) -lt $((LIMIT_MIB * 1048576)) ] || die "over ${LIMIT_MIB} MiB: carry fewer wheels"
}

device() {
  python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null \
    || die "no CUDA GPU here: the device half runs only on the lent machine (--prepare runs here)"
  [ -n "${OUT:-}" ] || die "\$OUT is not set: the results would stay on the device"
  ls "$DIR"/*.whl >/dev/null 2>&1 || die "no wheels in $DIR: run --prepare here and name $DIR in carry"
  if [ ! -f "$SITE/.installed" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$DIR"/*.whl || die "pip install --target $SITE failed"
    touch "$SITE/.installed"
  fi
  export PYTHONPATH="$PWD/$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  python3 - >"$OUT/versions.txt" 2>&1 <<'EOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0))
for name in ("diffusers", "pydantic", "pydantic_core", "typing_extensions", "av", "torchao", "peft", "accelerate",
             "transformers", "timm", "safetensors", "huggingface_hub", "numpy", "scikit-image", "opencv-python-headless"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "MISSING")
EOF
  cat "$OUT/versions.txt"
  timeout -k 10 "$RUN_LIMIT" python3 -m benchmarks.gpu --out "$OUT/gpu-acceptance.jsonl" \
    --table "$OUT/gpu-acceptance.md" "$@" 2>&1 | tee "$OUT/gpu-acceptance.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 124 ] && echo "gpu_acceptance.sh: benchmarks/gpu.py stopped at its ${RUN_LIMIT} s limit" >&2
  return "$rc"
}

case "${1:-}" in
  --prepare) prepare ;;
  --limit) [ $# -ge 2 ] || die "--limit needs seconds"; RUN_LIMIT=$2; shift 2; device "$@" ;;
  --help|-h) sed -n '2,17p' "$0" ;;
  *) device "$@" ;;
esac
