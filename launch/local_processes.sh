#!/usr/bin/env bash
# Runs a config as N processes on this machine, the way a multi-host job runs (one JAX
# process per host): process 0 coordinates on localhost, every process trains on its slice
# of each global batch, and only process 0 writes results.
#
#   launch/local_processes.sh 2 configs/demo.py runs/demo_2proc [--config.key=value ...]
#
# Each process runs:
#   python -m ser_jax.main --config=CONFIG --workdir=WORKDIR \
#     --coordinator_address=localhost:PORT --num_processes=N --process_id=I
# On CPU the processes exchange collectives through gloo. Set XLA_FLAGS to give each
# process several simulated devices, e.g. --xla_force_host_platform_device_count=4.
# Ctrl-C or SIGTERM stops every process (a rerun resumes); the logs of a rerun are appended.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 NUM_PROCESSES CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
num_processes=$1; config=$2; workdir=$3; shift 3
port=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("localhost",0)); print(s.getsockname()[1])')}
mkdir -p "$workdir"
pids=()
# Background processes of a script ignore SIGINT, and JAX catches SIGTERM (as a preemption
# notice): the script kills them itself.
trap 'kill -KILL "${pids[@]}" 2>/dev/null; echo "stopped; a rerun resumes" >&2; exit 130' INT TERM
for ((i = 0; i < num_processes; i++)); do
  cmd=(python -m ser_jax.main "--config=$config" "--workdir=$workdir"
       "--coordinator_address=localhost:$port" "--num_processes=$num_processes" "--process_id=$i" "$@")
  printf '+'; printf ' %q' "${cmd[@]}"; printf '  (log: %s)\n' "$workdir/process_$i.log"
  "${cmd[@]}" >> "$workdir/process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for ((i = 0; i < num_processes; i++)); do
  if ! wait "${pids[$i]}"; then
    status=1
    echo "process $i failed; the end of $workdir/process_$i.log:" >&2
    tail -n 5 "$workdir/process_$i.log" >&2
  fi
done
[ "$status" = 0 ] && tail -n 3 "$workdir/process_0.log"
exit $status
