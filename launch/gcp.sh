#!/usr/bin/env bash
# vae_scale on Cloud TPU slices: create a queued resource (spot or on-demand), install vae_scale
# on every worker, start training, and bring a preempted slice back until training finishes.
# Run `launch/gcp.sh --help` for the subcommands and flags; launch/README.md walks through a run.
set -euo pipefail

readonly PROG="launch/gcp.sh"
# On the TPU VMs, inside remote commands: ~ must expand there, not here.
# shellcheck disable=SC2088
readonly WORKER_SCRIPT="~/vae_scale/launch/tpu_worker.sh"

usage() {
  cat <<EOF
Usage: ${PROG} SUBCOMMAND [FLAGS] [-- ARGS FOR vae_scale.main]

Cloud TPU slices for vae_scale. A slice is a queued resource NAME whose TPU node is also NAME;
with --num-slices=N > 1 it is a Multislice: one queued resource NAME with N nodes NAME-0 ..
NAME-(N-1), each a slice of --accelerator-type, joined over the data-center network (DCN).

Subcommands (a pod's lifecycle, in order):
  create   request the queued resource (--spot or on-demand) and wait until it is ACTIVE
  setup    on every worker: clone --repo at --ref into ~/vae_scale, install vae_scale with
           jax[tpu] into ~/vae_venv (Python --python-version, through uv)
  run      on every worker: start python -m vae_scale.main --distributed=on --config=CONFIG
           --workdir=WORKDIR ARGS, detached (a run already there is stopped first); one log
           per worker in ~/vae_scale_logs/worker-HOSTNAME.log, copied to WORKDIR/logs/ when
           training exits
  watch    create, setup and run, then poll every --poll-seconds: when the queued resource is
           PREEMPTED, SUSPENDING, SUSPENDED or FAILED (or gone), delete it, create it again,
           set it up and rerun the same command; training resumes from the latest checkpoint
           in WORKDIR. A run that exits 42 (preempted) or crashes on a live slice is rerun.
           Ends when training finishes (exit 0), rejects its config (2) or diverges (3).
           Attaches to a slice that is already training instead of restarting it.
  status   the queued resource's state and, when ACTIVE, each worker's training state
  logs     the last --lines lines of the training log of --worker (a number or all)
  stop     stop training on every worker (it checkpoints on SIGTERM); the slice stays up
  delete   delete the queued resource and its TPU VMs

Flags (each also --flag=VALUE; the environment variable is the default):
  --name NAME              queued resource and node id            VAE_TPU_NAME
  --zone ZONE              e.g. us-west4-a        VAE_ZONE, else CLOUDSDK_COMPUTE_ZONE
  --project PROJECT        GCP project id         VAE_PROJECT, else CLOUDSDK_CORE_PROJECT
  --accelerator-type TYPE  e.g. v5litepod-64, v4-32, v5p-128      VAE_ACCELERATOR_TYPE
  --num-slices N           slices of that type (default 1); N > 1: a Multislice queued
                           resource (--node-count=N --node-prefix=NAME); pass the same N to
                           every subcommand, as it changes how workers are reached  VAE_NUM_SLICES
  --runtime-version V      TPU VM image; default from the type:   VAE_RUNTIME_VERSION
                           v5litepod-* v2-alpha-tpuv5-lite, v5p-* v2-alpha-tpuv5,
                           v6e-* v2-alpha-tpuv6e, v2/v3/v4-* tpu-ubuntu2204-base
  --spot | --on-demand     spot capacity (preemptible) or not     VAE_SPOT=1|0 (default 0)
  --create-flag FLAG       extra flag for queued-resources create, repeatable
                           (e.g. --create-flag=--service-account=SA_EMAIL)
  --repo URL               git URL the workers clone              VAE_REPO
  --ref REF                branch, tag or commit (default main)   VAE_REF
  --python-version V       Python for ~/vae_venv (default 3.12)   VAE_PYTHON_VERSION
  --config PATH[:ARG]      default configs/ldm_f8.py, e.g. configs/pods.py:v5e-64   VAE_CONFIG
  --workdir gs://...       checkpoints and metrics; must be gs:// VAE_WORKDIR
  --poll-seconds N         watch: seconds between checks (default 60)    VAE_POLL_SECONDS
  --max-restarts N         watch: give up after N recoveries (default: never) VAE_MAX_RESTARTS
  --delete-when-done       watch: delete the slice when training ends (finished, or exit 2/3)
  --worker N|all           logs: which worker (default 0)
  --node N|all             logs, with --num-slices > 1: which slice (default 0)
  --lines N                logs: how many lines (default 100)
  --dry-run                print every gcloud command instead of running it (describe answers
                           are simulated; watch plays one preemption)
  -h, --help               this text

Exit codes: 0 done; 1 failure (gcloud error, --max-restarts reached); 2 bad usage, or
training rejected its config, data or weights; 3 training diverged (too many non-finite
steps). watch reruns neither 2 nor 3. vae_scale.main exits 42 after saving a checkpoint on
SIGTERM (preemption), or shows 143 if the signal came before it could handle it: watch reruns
both (so does a crash, up to --max-restarts).

A spot pod that resumes by itself after preemption:
  export VAE_PROJECT=my-project VAE_ZONE=us-west4-a VAE_TPU_NAME=vae-v5e-64
  ${PROG} watch --accelerator-type=v5litepod-64 --spot \\
      --repo=https://github.com/ORG/vae_scale.git --ref=main \\
      --config=configs/pods.py:v5e-64 --workdir=gs://BUCKET/vae/run1 \\
      -- --config.data.path=gs://BUCKET/images
Two v5e-256 slices over DCN (training sees one data-parallel mesh of 512 devices):
  ${PROG} watch --accelerator-type=v5litepod-256 --num-slices=2 --spot ... \\
      --config=configs/pods.py:2xv5e-256 --workdir=gs://BUCKET/vae/run1 -- ...
Step by step: create, setup, run (same flags); then status, logs, stop, delete.
EOF
}

# -- Settings: flags override the environment ----------------------------------------------
NAME="${VAE_TPU_NAME:-}"
ZONE="${VAE_ZONE:-${CLOUDSDK_COMPUTE_ZONE:-}}"
PROJECT="${VAE_PROJECT:-${CLOUDSDK_CORE_PROJECT:-}}"
ACCELERATOR_TYPE="${VAE_ACCELERATOR_TYPE:-}"
NUM_SLICES="${VAE_NUM_SLICES:-1}"
RUNTIME_VERSION="${VAE_RUNTIME_VERSION:-}"
SPOT="${VAE_SPOT:-0}"
REPO="${VAE_REPO:-}"
REF="${VAE_REF:-main}"
PYTHON_VERSION="${VAE_PYTHON_VERSION:-3.12}"
CONFIG="${VAE_CONFIG:-configs/ldm_f8.py}"
WORKDIR="${VAE_WORKDIR:-}"
POLL_SECONDS="${VAE_POLL_SECONDS:-60}"
MAX_RESTARTS="${VAE_MAX_RESTARTS:-}"
DELETE_WHEN_DONE=0
WORKER="0"
NODE="0"
LINES="100"
DRY_RUN=0
SUBCOMMAND=""
CREATE_FLAGS=()
MAIN_ARGS=()

# Set by qr_state and worker_status (globals, so the dry-run story advances between calls).
STATE=""
RUN_STATUS=""
RUN_DETAIL=""
DRY_STATES=()
DRY_STATUSES=()
ERR_FILE=""

die() {
  echo "${PROG}: $*" >&2
  exit 1
}

usage_error() {
  echo "${PROG}: $*" >&2
  echo "Run '${PROG} --help' for usage." >&2
  exit 2
}

log() {
  if ((DRY_RUN)); then
    echo "# $*"
  else
    printf '[%s] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2
  fi
}

# Quotes one word for bash only where needed, so printed commands stay readable and pasteable.
quote() {
  local word="$1" q="'"
  if [[ -n "${word}" && "${word}" =~ ^[-A-Za-z0-9_./:=@%+,]+$ ]]; then
    printf '%s' "${word}"
  else
    printf '%s' "${q}${word//${q}/${q}\\${q}${q}}${q}"
  fi
}

join_quoted() {
  local out="" word
  for word in "$@"; do
    out+="$(quote "${word}") "
  done
  printf '%s' "${out% }"
}

# Runs gcloud, or prints the command under --dry-run.
gc() {
  if ((DRY_RUN)); then
    echo "+ $(join_quoted gcloud "$@")"
    return 0
  fi
  echo "+ $(join_quoted gcloud "$@")" >&2
  gcloud "$@"
}

set_flag() {
  local flag="$1" value="$2"
  case "${flag}" in
    --name) NAME="${value}" ;;
    --zone) ZONE="${value}" ;;
    --project) PROJECT="${value}" ;;
    --accelerator-type) ACCELERATOR_TYPE="${value}" ;;
    --num-slices) NUM_SLICES="${value}" ;;
    --runtime-version) RUNTIME_VERSION="${value}" ;;
    --create-flag) CREATE_FLAGS+=("${value}") ;;
    --repo) REPO="${value}" ;;
    --ref) REF="${value}" ;;
    --python-version) PYTHON_VERSION="${value}" ;;
    --config) CONFIG="${value}" ;;
    --workdir) WORKDIR="${value}" ;;
    --poll-seconds) POLL_SECONDS="${value}" ;;
    --max-restarts) MAX_RESTARTS="${value}" ;;
    --worker) WORKER="${value}" ;;
    --node) NODE="${value}" ;;
    --lines) LINES="${value}" ;;
    *) usage_error "unknown flag ${flag}" ;;
  esac
}

parse_args() {
  while (($#)); do
    case "$1" in
      -h | --help) usage; exit 0 ;;
      --) shift; MAIN_ARGS=("$@"); break ;;
      --dry-run) DRY_RUN=1 ;;
      --spot) SPOT=1 ;;
      --on-demand) SPOT=0 ;;
      --delete-when-done) DELETE_WHEN_DONE=1 ;;
      --*=*) set_flag "${1%%=*}" "${1#*=}" ;;
      --*)
        (($# >= 2)) || usage_error "$1 needs a value"
        set_flag "$1" "$2"
        shift
        ;;
      create | setup | run | watch | status | logs | stop | delete)
        [[ -z "${SUBCOMMAND}" ]] || usage_error "two subcommands: ${SUBCOMMAND} and $1"
        SUBCOMMAND="$1"
        ;;
      *) usage_error "unexpected argument '$1' (arguments for vae_scale.main go after --)" ;;
    esac
    shift
  done
  [[ -n "${SUBCOMMAND}" ]] || usage_error "no subcommand"
  [[ "${NUM_SLICES}" =~ ^[1-9][0-9]*$ ]] ||
    usage_error "--num-slices must be a whole number of at least 1, got '${NUM_SLICES}'"
}

# -- Checks: one clear line per missing or malformed setting ---------------------------------
need() {
  local what
  for what in "$@"; do
    case "${what}" in
      name)
        [[ -n "${NAME}" ]] || usage_error "no slice name: --name or VAE_TPU_NAME"
        [[ "${NAME}" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
          usage_error "--name '${NAME}': lowercase letters, digits and hyphens, starting with a letter"
        ;;
      zone) [[ -n "${ZONE}" ]] || usage_error "no zone: --zone, VAE_ZONE or CLOUDSDK_COMPUTE_ZONE" ;;
      project)
        [[ -n "${PROJECT}" ]] || usage_error "no project: --project, VAE_PROJECT or CLOUDSDK_CORE_PROJECT"
        ;;
      accelerator)
        [[ -n "${ACCELERATOR_TYPE}" ]] ||
          usage_error "no accelerator type: --accelerator-type (e.g. v5litepod-64) or VAE_ACCELERATOR_TYPE"
        [[ -n "${RUNTIME_VERSION}" ]] || RUNTIME_VERSION="$(default_runtime "${ACCELERATOR_TYPE}")"
        [[ -n "${RUNTIME_VERSION}" ]] ||
          usage_error "no default runtime for '${ACCELERATOR_TYPE}': pass --runtime-version"
        [[ "${SPOT}" == 0 || "${SPOT}" == 1 ]] || usage_error "VAE_SPOT must be 0 or 1, got '${SPOT}'"
        ;;
      repo) [[ -n "${REPO}" ]] || usage_error "no repository: --repo URL (a git URL the workers can clone) or VAE_REPO" ;;
      workdir)
        [[ -n "${WORKDIR}" ]] || usage_error "no workdir: --workdir gs://BUCKET/PATH or VAE_WORKDIR"
        [[ "${WORKDIR}" == gs://?* ]] ||
          usage_error "--workdir '${WORKDIR}' must start with gs:// (each TPU VM's disk is lost with the slice)"
        WORKDIR="${WORKDIR%/}"
        [[ -n "${CONFIG}" ]] || usage_error "empty --config"
        ;;
      watch)
        [[ "${POLL_SECONDS}" =~ ^[0-9]+$ ]] || usage_error "--poll-seconds must be a whole number, got '${POLL_SECONDS}'"
        [[ -z "${MAX_RESTARTS}" || "${MAX_RESTARTS}" =~ ^[0-9]+$ ]] ||
          usage_error "--max-restarts must be a whole number, got '${MAX_RESTARTS}'"
        ;;
      logs)
        [[ "${WORKER}" == all || "${WORKER}" =~ ^[0-9]+$ ]] || usage_error "--worker must be a number or all"
        [[ "${LINES}" =~ ^[0-9]+$ ]] || usage_error "--lines must be a whole number"
        [[ "${NODE}" == all || "${NODE}" =~ ^[0-9]+$ ]] || usage_error "--node must be a number or all"
        ;;
    esac
  done
}

default_runtime() {
  case "$1" in
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    v2-* | v3-* | v4-*) echo "tpu-ubuntu2204-base" ;;
    *) echo "" ;;
  esac
}

# -- gcloud calls ------------------------------------------------------------------------------
multislice() {
  ((NUM_SLICES > 1))
}

qr_create() {
  local nodes=("--node-id=${NAME}")
  # Multislice: N nodes NAME-0 .. NAME-(N-1), one per slice, provisioned together. Their VMs
  # get MEGASCALE_NUM_SLICES, MEGASCALE_SLICE_ID and MEGASCALE_COORDINATOR_ADDRESS (worker 0
  # of slice 0) in their TPU environment, which libtpu and jax.distributed.initialize() read.
  multislice && nodes=("--node-count=${NUM_SLICES}" "--node-prefix=${NAME}")
  local args=(compute tpus queued-resources create "${NAME}" "${nodes[@]}"
    "--zone=${ZONE}" "--project=${PROJECT}" "--accelerator-type=${ACCELERATOR_TYPE}"
    "--runtime-version=${RUNTIME_VERSION}")
  ((SPOT)) && args+=(--spot)
  args+=("${CREATE_FLAGS[@]}")
  gc "${args[@]}"
}

qr_delete() {
  # Synchronous, so the name is free again for the next create; --quiet skips the prompt.
  gc compute tpus queued-resources delete "${NAME}" "--zone=${ZONE}" "--project=${PROJECT}" \
    --force --quiet
}

# Sets STATE to the queued resource's state (ACTIVE, WAITING_FOR_RESOURCES, PROVISIONING,
# SUSPENDING, SUSPENDED, FAILED, ...), NOT_FOUND, or ERROR when gcloud itself failed.
qr_state() {
  local args=(compute tpus queued-resources describe "${NAME}" "--zone=${ZONE}"
    "--project=${PROJECT}" "--format=value(state.state)")
  local out rc=0
  if ((DRY_RUN)); then
    gc "${args[@]}"
    STATE="${DRY_STATES[0]:-END}"
    DRY_STATES=("${DRY_STATES[@]:1}")
    [[ "${STATE}" == END ]] || echo "# (dry run: the queued resource is ${STATE})"
    return 0
  fi
  out="$(gcloud "${args[@]}" 2>"${ERR_FILE}")" || rc=$?
  if ((rc == 0)); then
    STATE="$(echo "${out}" | tr -d '[:space:]')"
    STATE="${STATE:-UNKNOWN}"
  elif grep -qi -e 'NOT_FOUND' -e 'not found' "${ERR_FILE}"; then
    STATE="NOT_FOUND"
  else
    cat "${ERR_FILE}" >&2
    STATE="ERROR"
  fi
}

# Runs a command on workers of the slice; with several slices, on those workers of every node
# (or of node $3) through the queued resource.
ssh_workers() {
  local worker="$1" command="$2" node="${3:-all}"
  if multislice; then
    gc compute tpus queued-resources ssh "${NAME}" "--zone=${ZONE}" "--project=${PROJECT}" \
      "--node=${node}" "--worker=${worker}" --quiet "--command=${command}"
  else
    gc compute tpus tpu-vm ssh "${NAME}" "--zone=${ZONE}" "--project=${PROJECT}" \
      "--worker=${worker}" --quiet "--command=${command}"
  fi
}

setup_command() {
  local repo ref
  repo="$(quote "${REPO}")"
  ref="$(quote "${REF}")"
  printf '%s' "set -e; [ -d ~/vae_scale/.git ] || git clone --quiet ${repo} ~/vae_scale;" \
    " git -C ~/vae_scale fetch --quiet ${repo} ${ref};" \
    " git -C ~/vae_scale checkout --quiet --force FETCH_HEAD;" \
    " bash ${WORKER_SCRIPT} setup --extra=tpu $(quote "--python-version=${PYTHON_VERSION}")"
}

run_command() {
  # --distributed=on: TPU VMs learn their slice's workers (and, on a Multislice, the slice
  # count, their slice id and the coordinator) from the metadata server, which
  # jax.distributed.initialize() reads (GKE's TPU_WORKER_HOSTNAMES is not set on TPU VMs).
  printf '%s' "bash ${WORKER_SCRIPT} start $(quote "--copy-logs-to=${WORKDIR}/logs") --" \
    " $(join_quoted --distributed=on "--config=${CONFIG}" "--workdir=${WORKDIR}" "${MAIN_ARGS[@]}")"
}

slices_note() {
  if multislice; then printf ' (%s slices)' "${NUM_SLICES}"; fi
}

remote_setup() {
  log "setup: installing vae_scale (${REF}) on every worker of ${NAME}$(slices_note)"
  ssh_workers all "$(setup_command)"
}

remote_run() {
  log "run: starting training on every worker of ${NAME}$(slices_note), workdir ${WORKDIR}"
  ssh_workers all "$(run_command)"
}

# Sets RUN_STATUS from every worker's "vae_status HOST STATE" line:
#   running  training is running (workers that already exited 0 are finishing)
#   done     every worker exited 0
#   fatal    a worker exited 2 (bad config or input, or the workdir leased to another live
#            run) or 3 (training diverged: rollbacks used up or too many non-finite
#            steps); rerunning will not help. RUN_DETAIL is that exit code.
#   rerun    a worker exited otherwise (42 preempted, a crash) or has no run: start it again
#   unknown  no answer (ssh failed; the slice may be going away)
worker_status() {
  local out="" line host state n=0 running=0 finished=0 fatal="" failed=""
  if ((DRY_RUN)); then
    ssh_workers all "bash ${WORKER_SCRIPT} status"
    RUN_STATUS="${DRY_STATUSES[0]:-done}"
    DRY_STATUSES=("${DRY_STATUSES[@]:1}")
    RUN_DETAIL=""
    echo "# (dry run: training is ${RUN_STATUS})"
    return 0
  fi
  out="$(ssh_workers all "bash ${WORKER_SCRIPT} status" 2>"${ERR_FILE}")" || true
  while read -r line; do
    # gcloud may prefix or interleave the workers' lines; find ours anywhere in a line.
    [[ "${line}" =~ vae_status\ ([^ ]+)\ ([^ ]+) ]] || continue
    host="${BASH_REMATCH[1]}"
    state="${BASH_REMATCH[2]}"
    n=$((n + 1))
    case "${state}" in
      running) running=$((running + 1)) ;;
      0) finished=$((finished + 1)) ;;
      2 | 3) fatal="${state}" ;;
      *) failed+=" ${host}:${state}" ;;
    esac
  done <<<"${out}"
  RUN_DETAIL="${failed# }"
  if ((n == 0)); then
    RUN_STATUS="unknown"
    RUN_DETAIL="$(tail -n 3 "${ERR_FILE}" | tr '\n' ' ')"
  elif [[ -n "${fatal}" ]]; then
    RUN_STATUS="fatal"
    RUN_DETAIL="${fatal}"
  elif [[ -n "${failed}" ]]; then
    RUN_STATUS="rerun"
  elif ((finished == n)); then
    RUN_STATUS="done"
  else
    RUN_STATUS="running"
  fi
}

pause() {
  if ((DRY_RUN)); then
    echo "+ sleep ${POLL_SECONDS}"
  else
    sleep "${POLL_SECONDS}"
  fi
}

# -- Subcommands -------------------------------------------------------------------------------
cmd_create() {
  need name zone project accelerator
  ((DRY_RUN)) && DRY_STATES=(WAITING_FOR_RESOURCES ACTIVE)
  qr_create
  wait_active
}

wait_active() {
  local last=""
  while :; do
    qr_state
    case "${STATE}" in
      ACTIVE | END) log "${NAME} is ACTIVE"; return 0 ;;
      FAILED | SUSPENDED | SUSPENDING | PREEMPTED | NOT_FOUND)
        die "${NAME} is ${STATE}; '${PROG} delete' it and create it again (or use watch)"
        ;;
    esac
    [[ "${STATE}" == "${last}" ]] || log "${NAME} is ${STATE}; waiting for ACTIVE"
    last="${STATE}"
    pause
  done
}

cmd_setup() {
  need name zone project repo
  remote_setup
}

cmd_run() {
  need name zone project workdir
  remote_run
  log "logs: ~/vae_scale_logs/worker-HOSTNAME.log on each worker ('${PROG} logs --worker=N')," \
    "copied to ${WORKDIR}/logs/ when training exits"
}

cmd_status() {
  need name zone project
  ((DRY_RUN)) && DRY_STATES=(ACTIVE) && DRY_STATUSES=(running)
  qr_state
  echo "${NAME}: ${STATE}"
  if [[ "${STATE}" == ACTIVE ]]; then
    if ((DRY_RUN)); then
      worker_status
    else
      ssh_workers all "bash ${WORKER_SCRIPT} status"
    fi
  fi
  [[ "${STATE}" != ERROR ]]
}

cmd_logs() {
  need name zone project logs
  ssh_workers "${WORKER}" "tail -n ${LINES} ~/vae_scale_logs/worker-*.log" "${NODE}"
}

cmd_stop() {
  need name zone project
  ssh_workers all "bash ${WORKER_SCRIPT} stop"
}

cmd_delete() {
  need name zone project
  qr_delete
}

finish() {
  local code="$1"
  if ((DELETE_WHEN_DONE)); then
    log "deleting ${NAME} (--delete-when-done)"
    qr_delete || true
  fi
  exit "${code}"
}

# Counts one recovery; stops the watch once --max-restarts recoveries have been used.
count_restart() {
  RESTARTS=$((RESTARTS + 1))
  if [[ -n "${MAX_RESTARTS}" ]] && ((RESTARTS > MAX_RESTARTS)); then
    die "giving up: $* after ${MAX_RESTARTS} restarts (--max-restarts)"
  fi
  log "restart ${RESTARTS}${MAX_RESTARTS:+ of ${MAX_RESTARTS}}: $*"
}

cmd_watch() {
  need name zone project accelerator repo workdir watch
  if ((DRY_RUN)); then
    # The story --dry-run prints: nothing there yet, up, training, preempted, back, finished.
    DRY_STATES=(NOT_FOUND ACTIVE ACTIVE PREEMPTED ACTIVE ACTIVE)
    DRY_STATUSES=(running "done")
  fi
  RESTARTS=0
  local set_up=0 started=0 errors=0 last=""
  local shape="${ACCELERATOR_TYPE}"
  multislice && shape+=" x ${NUM_SLICES} slices"
  ((SPOT)) && shape+=", spot"
  log "watching ${NAME} (${shape}) every ${POLL_SECONDS}s;" \
    "workdir ${WORKDIR}"
  qr_state
  if [[ "${STATE}" == ACTIVE ]]; then
    # Attaching to a slice that may already be training: leave a live run alone.
    worker_status
    if [[ "${RUN_STATUS}" == running ]]; then
      log "training is already running on ${NAME}; watching it"
      set_up=1
      started=1
      pause
      qr_state
    fi
  fi
  while :; do
    case "${STATE}" in
      ACTIVE)
        errors=0
        if ((started)); then
          worker_status
          case "${RUN_STATUS}" in
            done) log "training finished"; finish 0 ;;
            fatal)
              log "training exited ${RUN_DETAIL} (2: bad config or input, or workdir in use;" \
                "3: diverged); not rerunning"
              finish "${RUN_DETAIL}"
              ;;
            rerun)
              count_restart "training stopped on an active slice (${RUN_DETAIL}); rerunning"
              started=0
              ;;
            unknown) log "no answer from the workers: ${RUN_DETAIL}" ;;
          esac
        fi
        if ((!started)); then
          if ((!set_up)); then
            if remote_setup; then set_up=1; else log "setup failed; trying again at the next check"; fi
          fi
          if ((set_up)); then
            if remote_run; then started=1; else log "run failed; trying again at the next check"; fi
          fi
        fi
        ;;
      PREEMPTED | SUSPENDING | SUSPENDED | FAILED | NOT_FOUND)
        errors=0
        if ((set_up || started)); then
          count_restart "${NAME} is ${STATE}; recreating it, training resumes from ${WORKDIR}"
        fi
        set_up=0
        started=0
        if [[ "${STATE}" != NOT_FOUND ]]; then
          qr_delete || log "delete failed; trying again at the next check"
        fi
        qr_create || log "create failed; trying again at the next check"
        ;;
      ERROR)
        errors=$((errors + 1))
        ((errors < 30)) || die "gcloud failed ${errors} times in a row; stopping"
        ;;
      END)
        log "end of the dry run"
        exit 0
        ;;
      *) [[ "${STATE}" == "${last}" ]] || log "${NAME} is ${STATE}; waiting" ;;
    esac
    last="${STATE}"
    pause
    qr_state
  done
}

main() {
  parse_args "$@"
  if ((!DRY_RUN)); then
    command -v gcloud >/dev/null || die "gcloud not found; install the Google Cloud CLI"
    ERR_FILE="$(mktemp)"
    trap 'rm -f "${ERR_FILE}"' EXIT
  fi
  "cmd_${SUBCOMMAND}"
}

main "$@"
