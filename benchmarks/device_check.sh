#!/usr/bin/env bash
# The device check of issues 28 and 29, prepared to run unchanged on one H100/H200 lent by
# the device tool, in at most 8 minutes (sections and figures: benchmarks/device_check.py).
#
# Here, once (downloads the wheels the device image lacks into .whl/ and copies EmoDB's
# four classes into .device_data/emodb/, both ignored through .git/info/exclude; ../shared
# does not travel; together about 31 MiB of the 64 the tool carries):
#
#   bash benchmarks/prepare_device.sh
#
# Then one call of the device tool's run:
#
#   command:   bash benchmarks/device_check.sh
#   carry:     [".whl", ".device_data"]
#   timeout_s: 540
#
# Its files come back from $OUT: 0_setup.log, 1_side_by_side.log ... summary.json (at
# most 8); the output's end is summary.json's figures. Table 4 (about 5 minutes alone) is
# a second call, if the lease has 7 minutes left:
#
#   command:   DEVICE_CHECK_SECTIONS=table4 DEVICE_CHECK_TOTAL_S=400 bash benchmarks/device_check.sh
#
# On a CPU, a try of the whole script with tiny settings (a few minutes on 2 cores):
#
#   PYTHON=/path/to/venv/bin/python DEVICE_CHECK_TINY=1 OUT=/tmp/dc_out bash benchmarks/device_check.sh
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export OUT=${OUT:-/tmp/device_check_out}
mkdir -p "$OUT"
{
  date
  # The image's python3 holds jax, torch and most of ser_jax's needs; the rest travel as
  # wheels (benchmarks/prepare_device.sh), installed only where they are missing.
  if ! "$PYTHON" -c 'import librosa, soundfile, soxr, ml_collections, tensorboardX' 2>/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
  fi
  nvidia-smi 2>/dev/null || echo "no nvidia-smi"
  "$PYTHON" -c 'import sys, jax, flax, optax, torch; print(sys.version); print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "torch", torch.__version__)'
  "$PYTHON" -m pip list 2>/dev/null | grep -i -E '^(jax|jaxlib|flax|optax|orbax|torch|numpy|librosa) '
} >"$OUT/0_setup.log" 2>&1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/device_check.py
