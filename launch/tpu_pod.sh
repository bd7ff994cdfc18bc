#!/usr/bin/env bash
# A Cloud TPU VM pod slice: the same command on every worker; jax.distributed.initialize()
# finds the other workers from the TPU metadata (--distributed).
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/mfcc_focal.py gs-fuse-or-nfs/runs/mfcc_focal \
#     --config.data.root=/mnt/data/IEMOCAP_full_release
#
# It runs, on all workers at once:
#   gcloud compute tpus tpu-vm ssh TPU_NAME --zone=ZONE --worker=all --command="
#     cd ~/ser_jax && python -m ser_jax.main --config=CONFIG --workdir=WORKDIR \
#       --distributed [overrides]"
# The configs' float32 is kept; add --config.model.compute_dtype=bfloat16 to try bfloat16.
# Preparation, once: clone the repository to ~/ser_jax on every worker and
# `pip install -e '.[tpu]'` there (the same --worker=all ssh); put the corpus and the
# workdir on storage every worker sees (a shared disk or a mounted bucket), and the feature
# cache too (--config.data.cache_dir=/mnt/shared/feature_cache), or each worker extracts
# the corpus into its own ~/.cache.
# The global batch must be a multiple of the number of TPU chips.
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
tpu=$1; zone=$2; config=$3; workdir=$4; shift 4
# Each argument quoted for the workers' shell, which reads the command again.
remote="cd ~/ser_jax && python -m ser_jax.main $(printf '%q ' "--config=$config" "--workdir=$workdir" --distributed "$@")"
cmd=(gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone" --worker=all "--command=$remote")
printf '+'; printf ' %q' "${cmd[@]}"; printf '\n'
"${cmd[@]}"
