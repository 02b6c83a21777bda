#!/usr/bin/env bash
# Rehearse a multi-host run on one machine: N processes of vae_scale.main on localhost, each with
# its own simulated CPU devices, joined by jax.distributed (gloo collectives).
#
#   launch/local.sh N [--devices_per_process=4] [--grace_seconds=30] [--log_dir=DIR] \
#       [vae_scale.main flags...]
#
# SIGTERM or Ctrl-C to this script is a rehearsed preemption: every process gets SIGTERM, saves
# a checkpoint and exits 42. If one process fails, the others are stopped within a bounded time.
# Exit codes: 0 finished; 42 stopped after a checkpoint (rerun the same command to resume);
# otherwise the first failed process's code: 2 bad config or data, 3 diverged (rollbacks used up
# or too many non-finite steps),
# 128+N a process died of signal N (143 SIGTERM, 137 SIGKILL). VAE_PYTHON: the python to use.
# See vae_scale/local_launch.py (python -m vae_scale.local_launch --help).
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
  sed -n '2,13p' "$0"
  exit 0
fi
num_processes="$1"
shift
launcher=()
args=()
for arg in "$@"; do
  case "$arg" in
    # The launcher's own options; everything else goes to vae_scale.main.
    --devices_per_process=* | --grace_seconds=* | --heartbeat_timeout_seconds=* | --log_dir=* | \
      --port=* | --module=*)
      launcher+=("$arg")
      ;;
    *) args+=("$arg") ;;
  esac
done
# exec: signals to this script reach the launcher itself.
exec "${VAE_PYTHON:-python}" -m vae_scale.local_launch --num_processes="$num_processes" \
  "${launcher[@]}" -- "${args[@]}"
