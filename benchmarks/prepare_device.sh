#!/usr/bin/env bash
# Prepares what benchmarks/device_check.sh needs on a GPU machine lent by the device tool.
#
#   bash benchmarks/prepare_device.sh [EMODB_ROOT]     # default ../shared/data/emodb
#
# The device image (Python 3.12, jax, flax, optax, orbax, torch, scikit-learn, numba ...)
# lacks ser_jax's audio and config packages, and `../shared` does not travel with the
# working tree. This writes, in the repository root, two folders ignored through
# .git/info/exclude:
#   .whl/                  cp312 manylinux wheels of the missing packages (--no-deps: each
#                          one named below, with the needs of each that the image lacks)
#   .device_data/emodb/wav EmoDB's four paper classes (neutral N, happiness F, sadness T,
#                          anger W: the 6th letter of e.g. 03a01Fa.wav), 339 files
# and prints their size: with the tracked files it must stay under the tool's 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
emodb=${1:-../shared/data/emodb}

for folder in /.whl/ /.device_data/; do
  grep -qxF "$folder" .git/info/exclude 2>/dev/null || echo "$folder" >>.git/info/exclude
done

# The versions this checkout's .venv runs; soundfile's libsndfile is inside its wheel.
wheels=(
  librosa==0.11.0 soundfile==0.14.0 soxr==1.1.0 audioread==3.1.0 pooch==1.9.0
  platformdirs==4.14.9 decorator==5.3.1 cffi==2.1.1 pycparser==3.12
  ml-collections==1.1.0 tensorboardX==2.6.5
)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
  manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl "${wheels[@]}"

mkdir -p .device_data/emodb/wav
n=0
for wav in "$emodb"/wav/?????[NFTW]?.wav; do
  cp -p "$wav" .device_data/emodb/wav/
  n=$((n + 1))
done
echo "EmoDB-4: $n files in .device_data/emodb/wav (expected 339)"
[ "$n" -eq 339 ] || { echo "error: expected 339 EmoDB-4 files in $emodb/wav" >&2; exit 1; }

ls .whl
tracked=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
carried=$(du -sb .whl .device_data | awk '{s += $1} END {print s}')
total=$((tracked + carried))
printf 'tracked files %.1f MiB + .whl and .device_data %.1f MiB = %.1f MiB (limit 64)\n' \
  "$(echo "$tracked / 1048576" | bc -l)" "$(echo "$carried / 1048576" | bc -l)" \
  "$(echo "$total / 1048576" | bc -l)"
[ "$total" -lt $((64 * 1048576)) ] || { echo "error: over the 64 MiB the tool carries" >&2; exit 1; }
