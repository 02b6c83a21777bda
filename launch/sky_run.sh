#!/usr/bin/env bash
# Runs on every node of a SkyPilot job (launch/sky.yaml's `run`): one vae_scale.main process per
# node over all of its GPUs, joined by jax.distributed with coordinates from SkyPilot's
# environment. Every argument goes to vae_scale.main:
#
#   bash launch/sky_run.sh --config=configs/pods.py:gpu8x4 --workdir=gs://BUCKET/vae/run1 ...
#
# SkyPilot sets, on each node: SKYPILOT_NODE_IPS (one IP per line, the head node first),
# SKYPILOT_NUM_NODES and SKYPILOT_NODE_RANK (0 on the head node). Process 0 (the head node)
# hosts the jax.distributed coordinator on VAE_COORDINATOR_PORT (default 8476).
#
# Exit code: vae_scale.main's, with a death by signal N as 128 + N (143 for SIGTERM), which is
# what SkyPilot's job_recovery.recover_on_exit_codes compares: 42 and 143 recover (a new cluster
# if needed; training resumes from the workdir), 2 and 3 do not. The Python process is a child
# of this shell, never exec'd, so that a death by signal reaches SkyPilot as 128 + N.
# Environment: VAE_PYTHON (default python), VAE_COORDINATOR_PORT.
set -euo pipefail

python="${VAE_PYTHON:-python}"
port="${VAE_COORDINATOR_PORT:-8476}"

die() {
  echo "sky_run.sh: $*" >&2
  exit 2
}

[[ -n "${SKYPILOT_NODE_IPS:-}" ]] || die "SKYPILOT_NODE_IPS is not set: run this through launch/sky.yaml"
[[ "${SKYPILOT_NUM_NODES:-}" =~ ^[1-9][0-9]*$ ]] ||
  die "SKYPILOT_NUM_NODES must be a whole number of at least 1, got '${SKYPILOT_NUM_NODES:-}'"
if [[ ! "${SKYPILOT_NODE_RANK:-}" =~ ^[0-9]+$ ]] || ((SKYPILOT_NODE_RANK >= SKYPILOT_NUM_NODES)); then
  die "SKYPILOT_NODE_RANK must be 0..$((SKYPILOT_NUM_NODES - 1)), got '${SKYPILOT_NODE_RANK:-}'"
fi
[[ "${port}" =~ ^[0-9]+$ ]] || die "VAE_COORDINATOR_PORT must be a port number, got '${port}'"
head_ip="$(head -n 1 <<<"${SKYPILOT_NODE_IPS}" | tr -d '[:space:]')"
[[ -n "${head_ip}" ]] || die "SKYPILOT_NODE_IPS has no head node IP"

distributed=(--distributed=off)
if ((SKYPILOT_NUM_NODES > 1)); then
  distributed=(--distributed=on "--coordinator_address=${head_ip}:${port}"
    "--num_processes=${SKYPILOT_NUM_NODES}" "--process_id=${SKYPILOT_NODE_RANK}")
fi

echo "sky_run.sh: node ${SKYPILOT_NODE_RANK} of ${SKYPILOT_NUM_NODES} (coordinator" \
  "${head_ip}:${port}): ${python} -m vae_scale.main ${distributed[*]} $*"
code=0
"${python}" -m vae_scale.main "${distributed[@]}" "$@" || code=$?
case "${code}" in
  0) echo "sky_run.sh: vae_scale.main finished" ;;
  42 | 143) echo "sky_run.sh: exit ${code} (preempted; SkyPilot recovers the job and it resumes)" ;;
  2) echo "sky_run.sh: exit 2 (bad config, data or weights): not recovered" >&2 ;;
  3) echo "sky_run.sh: exit 3 (diverged: rollbacks used up or too many non-finite steps): not recovered" >&2 ;;
  *) echo "sky_run.sh: exit ${code} (a crash): not recovered" >&2 ;;
esac
exit "${code}"
