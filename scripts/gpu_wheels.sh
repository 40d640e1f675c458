#!/usr/bin/env bash
# Prepare what the GPU machine lacks, in folders of the repository that git ignores (so that they can travel with
# the working tree, named in the device run's `carry`):
#
#   .gpu_wheels/                         open_clip_torch 3.3.0, ftfy, wcwidth, gsplat 1.5.3 (Python 3.12, x86-64
#                                        wheels, no dependencies: everything else is on the machine)
#   .gpu_shared/reference/lsm_vitl_256/  a copy of the parity reference (../shared does not travel)
#
#   scripts/gpu_wheels.sh [--reference DIR]     (default: $LSM_ROS_REFERENCE, else ../shared/reference/lsm_vitl_256)
#
# Then, on the GPU machine, from the repository root:
#   scripts/gpu_check.sh --wheels .gpu_wheels --reference .gpu_shared/reference/lsm_vitl_256 --out "$OUT"
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
WHEELS_DIR="$ROOT/.gpu_wheels"
SHARED_DIR="$ROOT/.gpu_shared"
PACKAGES=(open_clip_torch==3.3.0 ftfy wcwidth gsplat==1.5.3)

reference=${LSM_ROS_REFERENCE:-$ROOT/../shared/reference/lsm_vitl_256}
while [[ $# -gt 0 ]]; do
    case "$1" in
        --reference) [[ $# -ge 2 ]] || { echo "gpu_wheels.sh: --reference needs a folder" >&2; exit 2; }
                     reference=$2; shift 2 ;;
        -h|--help) sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_wheels.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
done
[[ -f $reference/manifest.tsv && -f $reference/config.json ]] || {
    echo "gpu_wheels.sh: $reference is not the parity reference folder (manifest.tsv, config.json)" >&2; exit 2; }

mkdir -p "$WHEELS_DIR"
rm -f "$WHEELS_DIR"/*.whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$WHEELS_DIR" "${PACKAGES[@]}"

mkdir -p "$SHARED_DIR/reference"
rm -rf "$SHARED_DIR/reference/lsm_vitl_256"
cp -r "$reference" "$SHARED_DIR/reference/lsm_vitl_256"

echo "wheels: $(cd "$WHEELS_DIR" && ls *.whl | tr '\n' ' ')"
echo "reference copy: $SHARED_DIR/reference/lsm_vitl_256 ($(du -sh "$SHARED_DIR/reference/lsm_vitl_256" | cut -f1))"
echo "carry: [\".gpu_wheels\", \".gpu_shared\"]; run on the GPU machine:"
echo "  scripts/gpu_check.sh --wheels .gpu_wheels --reference .gpu_shared/reference/lsm_vitl_256 --out \"\$OUT\""
