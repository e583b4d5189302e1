#!/usr/bin/env bash
# `srun --ntasks-per-node=1 --kill-on-bad-exit=1` for N "nodes" on ONE machine: runs the command N times at once
# and exits with the first failure, stopping the other copies (as srun's --kill-on-bad-exit does).
#
#   bash launch/local_nodes.sh N COMMAND [ARGS...]
#
# The multi-node path of the driver (launch.launcher=rdzv) with launch.node_runner="bash launch/local_nodes.sh 2"
# starts two torchrun agents that meet at launch.rdzv_endpoint=127.0.0.1:PORT, so a two-node launch can be tested
# without a cluster. Traffic stays on the loopback device: torchrun advertises PET_LOCAL_ADDR (its --local-addr)
# to the other agent instead of the host name, and gloo binds GLOO_SOCKET_IFNAME=lo.
set -u
if [ "$#" -lt 2 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N COMMAND [ARGS...]  (N >= 1 copies of COMMAND)" >&2
  exit 2
fi
n="$1"; shift
export PET_LOCAL_ADDR="${PET_LOCAL_ADDR:-127.0.0.1}" GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"
pids=()
stop_all() { kill -TERM "${pids[@]}" 2>/dev/null; }
trap 'stop_all; exit 143' TERM INT
for ((i = 0; i < n; i++)); do
  LOCAL_NODE_INDEX="$i" "$@" &
  pids+=("$!")
done
status=0
for _ in "${pids[@]}"; do
  wait -n
  rc=$?
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
    status="$rc"
    echo "local_nodes.sh: a copy exited with status $rc; stopping the others" >&2
    stop_all
  fi
done
exit "$status"
