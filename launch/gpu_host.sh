#!/usr/bin/env bash
# One host with several GPUs: vae_scale.main as a single process over every local GPU, started
# again whenever it exits 42 (it saved a checkpoint on SIGTERM), so training resumes from the
# latest checkpoint in the workdir. Every argument goes to vae_scale.main:
#
#   launch/gpu_host.sh --config=configs/pods.py:gpu8 --workdir=/checkpoints/run1 \
#       --config.data.path=/data/images
#
# Exit codes: 0 finished; 2 bad config, data or weights, or a workdir leased to another live
# run, and 3 diverged (the guard's rollbacks used up, or too many non-finite steps): not rerun,
# fix the cause first; 42 stopped by
# SIGTERM/Ctrl-C to this script after training saved what it could (or VAE_MAX_RESTARTS reruns
# used up): run the same command to resume. Training that exits 42, or dies of SIGTERM (143)
# before it can handle the signal, is rerun. Anything else is a crash, passed on as it is (137:
# killed, e.g. out of memory).
# Environment: VAE_PYTHON (default python), VAE_MAX_RESTARTS (default 20),
# VAE_RESTART_DELAY seconds between reruns (default 10). Install first: pip install -e '.[cuda]'.
# Several hosts: launch/slurm.sbatch.
set -euo pipefail

python="${VAE_PYTHON:-python}"
max_restarts="${VAE_MAX_RESTARTS:-20}"
delay="${VAE_RESTART_DELAY:-10}"

die() {
  echo "gpu_host.sh: $*" >&2
  exit 2
}

(($#)) || die "usage: launch/gpu_host.sh --config=CONFIG --workdir=DIR [--config.FIELD=VALUE ...]"
[[ "${max_restarts}" =~ ^[0-9]+$ ]] || die "VAE_MAX_RESTARTS must be a whole number"
[[ "${delay}" =~ ^[0-9]+$ ]] || die "VAE_RESTART_DELAY must be a whole number of seconds"

child=""
stop_requested=0
delivered=0
status_file="$(mktemp)"
trap 'rm -f "${status_file}"' EXIT
# SIGTERM to training's process group; before `setsid` has made the group, to the process.
signal_training() {
  delivered=1
  kill -TERM -- "-${child}" 2>/dev/null || kill -TERM "${child}" 2>/dev/null || true
}
# SIGTERM or Ctrl-C for this script: pass SIGTERM on, let training checkpoint, and do not rerun.
on_signal() {
  stop_requested=1
  if [[ -n "${child}" ]]; then
    signal_training
  fi
}
trap on_signal TERM INT

restarts=0
while :; do
  if ((stop_requested)); then  # Signalled during the pause between runs.
    echo "gpu_host.sh: stopped; run the same command to resume from the latest checkpoint"
    exit 42
  fi
  echo "gpu_host.sh: $(date -u +%Y-%m-%dT%H:%M:%SZ) starting ${python} -m vae_scale.main $*"
  rm -f "${status_file}"
  delivered=0
  # Training runs in its own process group (setsid) under a small shell that records its exit
  # status: bash's `wait`, interrupted by our trap, can lose a child's status. That shell runs
  # training in the foreground, so its own trap waits for training's checkpoint.
  # shellcheck disable=SC2016
  setsid bash -c 'status="$1"; shift; trap : TERM INT; "$@"; echo "$?" >"${status}"' \
    _ "${status_file}" "${python}" -m vae_scale.main "$@" &
  child=$!
  if ((stop_requested && !delivered)); then
    signal_training  # The signal came before $! was known.
  fi
  while kill -0 "${child}" 2>/dev/null; do
    wait "${child}" || true  # Returns early when a trapped signal arrives.
  done
  # No status: the small shell itself was stopped before training started.
  code="$(cat "${status_file}" 2>/dev/null || echo $((stop_requested ? 143 : 1)))"
  child=""
  case "${code}" in
    0)
      echo "gpu_host.sh: vae_scale.main finished"
      exit 0
      ;;
    2)
      echo "gpu_host.sh: vae_scale.main exited 2 (bad config, data or weights, or workdir in use);" \
        "not rerunning" >&2
      exit 2
      ;;
    3)
      echo "gpu_host.sh: vae_scale.main exited 3 (diverged: rollbacks used up or too many" \
        "non-finite steps; its checkpoints are intact); not rerunning" >&2
      exit 3
      ;;
    42 | 143) ;;  # Stopped by SIGTERM: saved a checkpoint (42), or died before it could (143).
    *)
      echo "gpu_host.sh: vae_scale.main exited ${code} (a crash); not rerunning" >&2
      exit "${code}"
      ;;
  esac
  if ((stop_requested)); then
    echo "gpu_host.sh: stopped (exit ${code}); run the same command to resume from the latest" \
      "checkpoint"
    exit 42
  fi
  if ((restarts >= max_restarts)); then
    echo "gpu_host.sh: exit ${code} again after ${restarts} reruns (VAE_MAX_RESTARTS); giving up"
    exit 42
  fi
  restarts=$((restarts + 1))
  echo "gpu_host.sh: exit ${code} (preempted); rerun ${restarts} of ${max_restarts} in ${delay}s"
  sleep "${delay}" &
  wait "$!" || true  # A signal cuts the pause short.
  kill "$!" 2>/dev/null || true
done
