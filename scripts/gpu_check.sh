#!/usr/bin/env bash
# The GPU check of issue 11 on a CUDA machine (torch, numpy, scipy, OpenCV, timm, open_clip, gsplat importable;
# rclpy not needed):
#
#   scripts/gpu_check.sh --reference DIR --out DIR [--wheels DIR] [--budget S] [--pairs N] [--warmup N]
#
# Runs the CUDA tests (pytest -m cuda), the stage parity on CUDA (test/test_parity_cuda.py), the bench at 256 and
# 512x384 in fp32 and bf16, and the bf16 accuracy / query / render figures, each step with its own timeout inside
# --budget seconds (default 450: the whole check ends within 8 minutes on an H100, gsplat's first build included),
# and writes gpu_check.md + gpu_check.json (rewritten after every step) and gpu_check.log into --out. Every bound of
# issue 11 is reported as PASS, FAIL or UNMEASURED (lsm_ros/gpu_check.py).
#
# --wheels DIR: install the wheels of DIR (scripts/gpu_wheels.sh makes them) into a temporary folder first and put
# it on PYTHONPATH (pip install --no-index --no-deps; the machine needs no registry).
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default: the GPU's capability), MAX_JOBS (default:
# cores - 2, at most 14).
# Exit status: 0 every bound passed, 1 a bound failed or a step did not succeed, 2 bad arguments, 3 no CUDA device.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
NO_CUDA_EXIT=3

usage() { sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
USAGE='usage: scripts/gpu_check.sh --reference DIR --out DIR [--wheels DIR] [--budget S] [--pairs N] [--warmup N]'
fail_usage() { echo "gpu_check.sh: $1" >&2; echo "$USAGE" >&2; exit 2; }

args=()
wheels=''
reference=''
out=''
value_of() { [[ $# -ge 2 && $2 != --* ]] || fail_usage "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
        --wheels) value_of "$@"; wheels=$2; shift 2 ;;
        --reference) value_of "$@"; reference=$2; shift 2 ;;
        --out) value_of "$@"; out=$2; shift 2 ;;
        --budget|--pairs|--warmup|--python) value_of "$@"; args+=("$1" "$2"); shift 2 ;;
        *) fail_usage "unknown argument '$1'" ;;
    esac
done
[[ -n $reference ]] || fail_usage '--reference DIR is required'
[[ -n $out ]] || fail_usage '--out DIR is required'
for name in manifest.tsv config.json inputs.npz; do
    [[ -f $reference/$name ]] || fail_usage "--reference $reference: not the parity reference folder (no $name)"
done
[[ ! -e $out || -d $out ]] || fail_usage "--out $out: exists and is not a folder"
if [[ -n $wheels ]]; then
    [[ -d $wheels ]] || fail_usage "--wheels $wheels: not a folder"
    compgen -G "$wheels/*.whl" >/dev/null || fail_usage "--wheels $wheels: no .whl files"
fi

# No GPU at all: stop at once, before anything heavy is imported
if ! compgen -G '/dev/nvidia[0-9]*' >/dev/null && ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check.sh: no CUDA device on this machine (no /dev/nvidia*, no nvidia-smi): the GPU check needs" \
         "an NVIDIA GPU; nothing was run" >&2
    exit $NO_CUDA_EXIT
fi

if [[ -n $wheels ]]; then
    files=("$wheels"/*.whl)
    site=$(mktemp -d "${TMPDIR:-/tmp}/lsm_gpu_site.XXXXXX")
    echo "[gpu_check] installing ${#files[@]} wheels into $site" >&2
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${files[@]}"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

reference=$(cd "$reference" && pwd)     # absolute: the check runs from the repository root
out=$(realpath -m -- "$out")
cd "$ROOT"
export PYTHONUNBUFFERED=1
exec "$PYTHON" -m lsm_ros.gpu_check --reference "$reference" --out "$out" "${args[@]}"
