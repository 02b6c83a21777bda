#!/usr/bin/env bash
# Runs on every TPU VM worker of a slice (launch/gcp.sh calls it through
# `gcloud compute tpus tpu-vm ssh --worker=all`): installs vae_scale, starts training detached
# with one log per worker, stops it, and reports whether it is still running.
#
#   tpu_worker.sh setup [--extra=tpu] [--python-version=3.12]
#   tpu_worker.sh start [--copy-logs-to=gs://BUCKET/RUN/logs] -- ARGS FOR vae_scale.main
#   tpu_worker.sh stop [--timeout=SECONDS]
#   tpu_worker.sh status        -> one line: "vae_status HOSTNAME running|none|EXIT_CODE"
#
# Exit codes of vae_scale.main that the status line reports (shell convention: 128+N for a
# death by signal N): 0 finished; 42 preempted (it saved a checkpoint on SIGTERM) or 143 (it died
# of SIGTERM before it could handle it; its latest checkpoint stands): rerun the same command to
# resume; 2 bad config, data or weights, or a workdir leased to another live run, and 3 diverged
# (too many non-finite steps): do not rerun.
# launch/gcp.sh watch acts on them that way.
#
# Paths (override for tests or unusual images): VAE_HOME (~/vae_scale, the clone),
# VAE_VENV (~/vae_venv), VAE_LOG_DIR (~/vae_scale_logs), VAE_PYTHON ($VAE_VENV/bin/python).
set -euo pipefail

VAE_HOME="${VAE_HOME:-${HOME}/vae_scale}"
VAE_VENV="${VAE_VENV:-${HOME}/vae_venv}"
VAE_LOG_DIR="${VAE_LOG_DIR:-${HOME}/vae_scale_logs}"
VAE_PYTHON="${VAE_PYTHON:-${VAE_VENV}/bin/python}"
HOST="$(hostname)"
LOG_FILE="${VAE_LOG_DIR}/worker-${HOST}.log"
PID_FILE="${VAE_LOG_DIR}/pid"
EXIT_FILE="${VAE_LOG_DIR}/exit_code"
SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"

die() {
  echo "tpu_worker.sh on ${HOST}: $*" >&2
  exit 1
}

# Prints the supervisor's pid if a training run started by `start` is alive, else nothing.
running_pid() {
  local pid
  [[ -f "${PID_FILE}" ]] || return 0
  pid="$(cat "${PID_FILE}")"
  [[ "${pid}" =~ ^[0-9]+$ ]] || return 0
  # The pid file can outlive a reboot; only trust it while the process is our supervisor.
  if ps -p "${pid}" -o args= 2>/dev/null | grep -q "tpu_worker.sh _supervise"; then
    echo "${pid}"
  fi
}

cmd_setup() {
  local extra="tpu" python_version="3.12" uv="${HOME}/.local/bin/uv" arg
  for arg in "$@"; do
    case "${arg}" in
      --extra=*) extra="${arg#*=}" ;;
      --python-version=*) python_version="${arg#*=}" ;;
      *) die "setup: unknown argument '${arg}'" ;;
    esac
  done
  [[ -f "${VAE_HOME}/setup.py" ]] || die "no vae_scale clone at ${VAE_HOME}"
  if [[ ! -x "${uv}" ]]; then
    # TPU VM images ship Python 3.10 and pip; uv brings a newer CPython without touching it.
    python3 -m pip install --user --quiet uv ||
      python3 -m pip install --user --quiet --break-system-packages uv
  fi
  if [[ ! -x "${VAE_VENV}/bin/python" ]]; then
    "${uv}" venv --quiet --python "${python_version}" "${VAE_VENV}"
  fi
  (cd "${VAE_HOME}" && "${uv}" pip install --quiet --python "${VAE_VENV}/bin/python" -e ".[${extra}]")
  echo "vae_scale installed on ${HOST}: $("${VAE_VENV}/bin/python" -c \
    'import jax; print("jax", jax.__version__)')"
}

cmd_stop() {
  local timeout=300 pid arg waited=0
  for arg in "$@"; do
    case "${arg}" in
      --timeout=*) timeout="${arg#*=}" ;;
      *) die "stop: unknown argument '${arg}'" ;;
    esac
  done
  pid="$(running_pid)"
  if [[ -z "${pid}" ]]; then
    echo "no training running on ${HOST}"
    return 0
  fi
  # SIGTERM to the whole process group: training saves a checkpoint and exits 42.
  echo "stopping training on ${HOST} (pid ${pid}); waiting up to ${timeout}s for its checkpoint"
  kill -TERM -- "-${pid}" 2>/dev/null || true
  while [[ -n "$(running_pid)" ]] && ((waited < 5 * timeout)); do
    sleep 0.2
    waited=$((waited + 1))
  done
  if [[ -n "$(running_pid)" ]]; then
    echo "training on ${HOST} did not stop in ${timeout}s; killing it"
    kill -KILL -- "-${pid}" 2>/dev/null || true
    rm -f "${PID_FILE}"
  fi
}

cmd_start() {
  local copy_to="" waited=0
  while (($#)); do
    case "$1" in
      --copy-logs-to=*) copy_to="${1#*=}" ;;
      --) shift; break ;;
      *) die "start: unknown argument '$1' (arguments for vae_scale.main go after --)" ;;
    esac
    shift
  done
  (($#)) || die "start: no arguments for vae_scale.main after --"
  [[ -d "${VAE_HOME}" ]] || die "no vae_scale clone at ${VAE_HOME}; run setup first"
  mkdir -p "${VAE_LOG_DIR}"
  cmd_stop  # At most one run per worker: a rerun replaces a leftover one.
  rm -f "${EXIT_FILE}" "${PID_FILE}"
  printf '=== %s start on %s: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "${HOST}" "$*" >>"${LOG_FILE}"
  # setsid: its own process group, so `stop` can signal training and nothing else; nohup lets
  # it outlive the ssh session.
  # Every descriptor redirected, or ssh would wait for training to end.
  (cd "${VAE_HOME}" && exec setsid nohup bash "${SELF}" _supervise "${copy_to}" "$@") \
    >>"${LOG_FILE}" 2>&1 </dev/null &
  while [[ -z "$(running_pid)" && ! -f "${EXIT_FILE}" ]] && ((waited < 100)); do
    sleep 0.1
    waited=$((waited + 1))
  done
  echo "training started on ${HOST}; log: ${LOG_FILE}"
}

# The parent of one training process: records its pid, waits through SIGTERM (training needs
# the time to checkpoint), then records the exit code and copies the log next to the run.
cmd_supervise() {
  local copy_to="$1" code=0
  shift
  echo "$$" >"${PID_FILE}"
  # Training runs in the foreground: bash runs this trap only after it exits, so SIGTERM (which
  # reaches training too, through the process group) cannot cut the wait for its checkpoint.
  trap 'echo "$(date -u +%H:%M:%S) SIGTERM: training saves a checkpoint and exits"' TERM
  if "${VAE_PYTHON}" -m vae_scale.main "$@"; then code=0; else code=$?; fi
  echo "${code}" >"${EXIT_FILE}.tmp"
  mv "${EXIT_FILE}.tmp" "${EXIT_FILE}"
  printf '=== %s exit %s on %s (%s)\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "${code}" "${HOST}" \
    "0 finished; 42, 143 preempted: rerun resumes; 2 bad config; 3 diverged"
  if [[ -n "${copy_to}" ]]; then
    # The VM's disk goes with the slice; keep a copy of the log beside the checkpoints.
    gcloud storage cp --quiet "${LOG_FILE}" "${copy_to}/worker-${HOST}.log" || true
  fi
  rm -f "${PID_FILE}"
}

cmd_status() {
  local state="none"
  if [[ -n "$(running_pid)" ]]; then
    state="running"
  elif [[ -f "${EXIT_FILE}" ]]; then
    state="$(cat "${EXIT_FILE}")"
  fi
  echo "vae_status ${HOST} ${state}"
}

main() {
  local sub="${1:-}"
  (($#)) && shift
  case "${sub}" in
    setup) cmd_setup "$@" ;;
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    status) cmd_status ;;
    _supervise) cmd_supervise "$@" ;;
    *) die "usage: tpu_worker.sh setup|start|stop|status (see the comment at the top)" ;;
  esac
}

main "$@"
