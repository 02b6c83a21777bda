#!/usr/bin/env bash
# vae_scale on GKE TPU slices through XPK: build the run's image, create (or reuse) a cluster,
# submit training as a JobSet that XPK restarts after preemptions, and show its status and logs.
# Run `launch/xpk.sh --help` for the subcommands and flags; launch/README.md walks through a run.
set -euo pipefail

readonly PROG="launch/xpk.sh"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT

usage() {
  cat <<EOF
Usage: ${PROG} SUBCOMMAND [FLAGS] [-- ARGS FOR vae_scale.main]

GKE TPU slices through XPK (pip install xpk; it drives gcloud, kubectl and docker). A workload is
a Kubernetes JobSet: one pod per TPU VM of every slice, all running the image built from this
repository, restarted as a whole when a pod exits 42 or 143 (preempted: training resumes from
the latest checkpoint in --workdir) and failed for good when one exits 2 or 3.

Subcommands (a run's lifecycle, in order):
  build           docker build the repository's Dockerfile as IMAGE:TAG and push it
  cluster         xpk cluster create: the GKE cluster with --num-slices node pools of --tpu-type
                  (creates it, or updates an existing one to this shape)
  run             xpk workload create: python3 -m vae_scale.main --distributed=on
                  --config=CONFIG --workdir=WORKDIR ARGS on every TPU VM, in IMAGE:TAG
  status          xpk workload list for the workload, and its JobSet and pods (kubectl)
  logs            the last --lines lines of --slice/--worker's training log (kubectl logs)
  stop            xpk workload delete: SIGTERM to every pod, training checkpoints and exits 42;
                  'run' again (same flags) resumes
  delete-cluster  xpk cluster delete

Flags (each also --flag=VALUE; the environment variable is the default):
  --project PROJECT      GCP project id      VAE_PROJECT, else CLOUDSDK_CORE_PROJECT
  --zone ZONE            e.g. us-west4-a     VAE_ZONE, else CLOUDSDK_COMPUTE_ZONE
  --cluster NAME         GKE cluster name                                  VAE_XPK_CLUSTER
  --workload NAME        workload (JobSet) name, at most 40 characters     VAE_XPK_WORKLOAD
  --tpu-type TYPE        XPK's TPU type, e.g. v5litepod-64, v4-32, v5p-128 VAE_TPU_TYPE
  --num-slices N         slices (default 1; N > 1: Multislice over DCN)    VAE_NUM_SLICES
  --spot | --on-demand | --reservation NAME
                         cluster: capacity for the TPU node pools (default on-demand)
                                                          VAE_SPOT=1|0, VAE_RESERVATION
  --image REPO           image repository, e.g. us-docker.pkg.dev/PROJECT/REPO/vae_scale
                                                                           VAE_IMAGE
  --tag TAG              image tag (default: the git commit, with -dirty for local changes)
                                                                           VAE_IMAGE_TAG
  --config PATH[:ARG]    default configs/ldm_f8.py, e.g. configs/pods.py:v5e-64   VAE_CONFIG
  --workdir gs://...     checkpoints and metrics; must be gs://            VAE_WORKDIR
  --max-restarts N       run: JobSet restarts before it fails (default 50) VAE_MAX_RESTARTS
  --grace-seconds N      run: SIGTERM to SIGKILL, time to save a checkpoint (default 300;
                         a spot VM's preemption notice is about 30 s)       VAE_GRACE_SECONDS
  --stack-traces         run: stack traces of a hung run (vae_scale.main --hang_diagnostics
                         --stack_trace_to_cloud) forwarded to Cloud Logging by XPK's sidecar
  --cloud-goodput        run: goodput also recorded to Cloud Logging and uploaded to Cloud
                         Monitoring (vae_scale.main --cloud_goodput
                         --cloud_goodput_upload_seconds=300)
  --cluster-flag FLAG    extra flag for xpk cluster create, repeatable
  --workload-flag FLAG   extra flag for xpk workload create, repeatable (e.g. --priority=high)
  --slice N|all          logs: which slice (default 0)
  --worker N|all         logs: which TPU VM of the slice (default 0)
  --lines N              logs: how many lines (default 100)
  --follow               logs: keep streaming
  --xpk-dry-run          pass --dry-run to xpk: it prints the kubectl/gcloud commands and the
                         JobSet it would apply, and runs none of them
  --dry-run              print every command instead of running it
  -h, --help             this text

Exit codes: 0 done; 1 a command failed; 2 bad usage. Training's own codes decide restarts:
0 finished; 42 saved a checkpoint on SIGTERM, 143 died of SIGTERM first: XPK restarts the JobSet
(up to --max-restarts), training resumes from WORKDIR; 2 bad config, data or weights and 3
diverged (the guard's rollbacks used up, or too many non-finite steps): the JobSet fails, no
restart; other codes from 127 to 255
(signals: 137 out of memory) restart too; other crashes (1) do not.

From an empty project to a spot run that resumes by itself:
  export VAE_PROJECT=my-project VAE_ZONE=us-west4-a VAE_XPK_CLUSTER=vae-v5e
  export VAE_IMAGE=us-docker.pkg.dev/my-project/vae/vae_scale
  ${PROG} build
  ${PROG} cluster --tpu-type=v5litepod-64 --spot
  ${PROG} run --workload=vae-run1 --tpu-type=v5litepod-64 \\
      --config=configs/pods.py:v5e-64 --workdir=gs://BUCKET/vae/run1 \\
      -- --config.data.path=gs://BUCKET/images
  ${PROG} status --workload=vae-run1; ${PROG} logs --workload=vae-run1 --follow
EOF
}

# -- Settings: flags override the environment ----------------------------------------------
PROJECT="${VAE_PROJECT:-${CLOUDSDK_CORE_PROJECT:-}}"
ZONE="${VAE_ZONE:-${CLOUDSDK_COMPUTE_ZONE:-}}"
CLUSTER="${VAE_XPK_CLUSTER:-}"
WORKLOAD="${VAE_XPK_WORKLOAD:-}"
TPU_TYPE="${VAE_TPU_TYPE:-}"
NUM_SLICES="${VAE_NUM_SLICES:-1}"
SPOT="${VAE_SPOT:-0}"
RESERVATION="${VAE_RESERVATION:-}"
IMAGE="${VAE_IMAGE:-}"
TAG="${VAE_IMAGE_TAG:-}"
CONFIG="${VAE_CONFIG:-configs/ldm_f8.py}"
WORKDIR="${VAE_WORKDIR:-}"
MAX_RESTARTS="${VAE_MAX_RESTARTS:-50}"
GRACE_SECONDS="${VAE_GRACE_SECONDS:-300}"
STACK_TRACES=0
CLOUD_GOODPUT=0
SLICE="0"
WORKER="0"
LINES="100"
FOLLOW=0
XPK_DRY_RUN=0
DRY_RUN=0
SUBCOMMAND=""
CLUSTER_FLAGS=()
WORKLOAD_FLAGS=()
MAIN_ARGS=()

die() {
  echo "${PROG}: $*" >&2
  exit 1
}

usage_error() {
  echo "${PROG}: $*" >&2
  echo "Run '${PROG} --help' for usage." >&2
  exit 2
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

# Runs a command, or prints it under --dry-run; either way the command is shown first.
step() {
  if ((DRY_RUN)); then
    echo "+ $(join_quoted "$@")"
    return 0
  fi
  echo "+ $(join_quoted "$@")" >&2
  "$@"
}

set_flag() {
  local flag="$1" value="$2"
  case "${flag}" in
    --project) PROJECT="${value}" ;;
    --zone) ZONE="${value}" ;;
    --cluster) CLUSTER="${value}" ;;
    --workload) WORKLOAD="${value}" ;;
    --tpu-type) TPU_TYPE="${value}" ;;
    --num-slices) NUM_SLICES="${value}" ;;
    --reservation) RESERVATION="${value}" ;;
    --image) IMAGE="${value}" ;;
    --tag) TAG="${value}" ;;
    --config) CONFIG="${value}" ;;
    --workdir) WORKDIR="${value}" ;;
    --max-restarts) MAX_RESTARTS="${value}" ;;
    --grace-seconds) GRACE_SECONDS="${value}" ;;
    --cluster-flag) CLUSTER_FLAGS+=("${value}") ;;
    --workload-flag) WORKLOAD_FLAGS+=("${value}") ;;
    --slice) SLICE="${value}" ;;
    --worker) WORKER="${value}" ;;
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
      --xpk-dry-run) XPK_DRY_RUN=1 ;;
      --spot) SPOT=1 ;;
      --on-demand) SPOT=0 ;;
      --stack-traces) STACK_TRACES=1 ;;
      --cloud-goodput) CLOUD_GOODPUT=1 ;;
      --follow) FOLLOW=1 ;;
      --*=*) set_flag "${1%%=*}" "${1#*=}" ;;
      --*)
        (($# >= 2)) || usage_error "$1 needs a value"
        set_flag "$1" "$2"
        shift
        ;;
      build | cluster | run | status | logs | stop | delete-cluster)
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
      project)
        [[ -n "${PROJECT}" ]] || usage_error "no project: --project, VAE_PROJECT or CLOUDSDK_CORE_PROJECT"
        ;;
      zone) [[ -n "${ZONE}" ]] || usage_error "no zone: --zone, VAE_ZONE or CLOUDSDK_COMPUTE_ZONE" ;;
      cluster)
        [[ -n "${CLUSTER}" ]] || usage_error "no cluster name: --cluster or VAE_XPK_CLUSTER"
        [[ "${CLUSTER}" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
          usage_error "--cluster '${CLUSTER}': lowercase letters, digits and hyphens, starting with a letter"
        ;;
      workload)
        [[ -n "${WORKLOAD}" ]] || usage_error "no workload name: --workload or VAE_XPK_WORKLOAD"
        # XPK's rule: a JobSet name that also fits the names Kubernetes derives from it.
        [[ "${WORKLOAD}" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ && ${#WORKLOAD} -le 40 ]] ||
          usage_error "--workload '${WORKLOAD}': at most 40 lowercase letters, digits and hyphens, starting with a letter"
        ;;
      tpu)
        [[ -n "${TPU_TYPE}" ]] || usage_error "no TPU type: --tpu-type (e.g. v5litepod-64) or VAE_TPU_TYPE"
        ;;
      capacity)
        [[ "${SPOT}" == 0 || "${SPOT}" == 1 ]] || usage_error "VAE_SPOT must be 0 or 1, got '${SPOT}'"
        [[ "${SPOT}" == 0 || -z "${RESERVATION}" ]] || usage_error "--spot and --reservation exclude each other"
        ;;
      image)
        [[ -n "${IMAGE}" ]] ||
          usage_error "no image repository: --image (e.g. us-docker.pkg.dev/PROJECT/REPO/vae_scale) or VAE_IMAGE"
        [[ "${IMAGE##*/}" != *:* && "${IMAGE}" != *@* ]] ||
          usage_error "--image '${IMAGE}' carries a tag; give the repository and --tag TAG"
        ;;
      workdir)
        [[ -n "${WORKDIR}" ]] || usage_error "no workdir: --workdir gs://BUCKET/PATH or VAE_WORKDIR"
        [[ "${WORKDIR}" == gs://?* ]] ||
          usage_error "--workdir '${WORKDIR}' must start with gs:// (a pod's disk goes with the pod)"
        WORKDIR="${WORKDIR%/}"
        [[ -n "${CONFIG}" ]] || usage_error "empty --config"
        ;;
      restarts)
        [[ "${MAX_RESTARTS}" =~ ^[0-9]+$ ]] || usage_error "--max-restarts must be a whole number, got '${MAX_RESTARTS}'"
        [[ "${GRACE_SECONDS}" =~ ^[0-9]+$ ]] || usage_error "--grace-seconds must be a whole number, got '${GRACE_SECONDS}'"
        ;;
      logs)
        [[ "${SLICE}" == all || "${SLICE}" =~ ^[0-9]+$ ]] || usage_error "--slice must be a number or all"
        [[ "${WORKER}" == all || "${WORKER}" =~ ^[0-9]+$ ]] || usage_error "--worker must be a number or all"
        [[ "${LINES}" =~ ^[0-9]+$ ]] || usage_error "--lines must be a whole number"
        ;;
    esac
  done
}

# The image tag: --tag, or the checked-out commit so that an image names the code inside it.
image_ref() {
  local tag="${TAG}"
  if [[ -z "${tag}" ]]; then
    tag="$(git -C "${ROOT}" rev-parse --short=12 HEAD 2>/dev/null)" ||
      usage_error "no --tag and ${ROOT} is not a git checkout"
    [[ -z "$(git -C "${ROOT}" status --porcelain 2>/dev/null)" ]] || tag+="-dirty"
  fi
  [[ "${tag}" =~ ^[A-Za-z0-9_][-A-Za-z0-9_.]{0,127}$ ]] || usage_error "--tag '${tag}' is not a valid image tag"
  printf '%s:%s' "${IMAGE}" "${tag}"
}

# xpk creates regional clusters: the region is the zone without its last part.
kube_credentials() {
  step gcloud container clusters get-credentials "${CLUSTER}" "--region=${ZONE%-*}" \
    "--project=${PROJECT}"
}

xpk_call() {
  local args=("$@")
  ((XPK_DRY_RUN)) && args+=(--dry-run)
  step xpk "${args[@]}"
}

main_command() {
  # --distributed=on: every pod is one JAX process; jax.distributed.initialize() finds its peers
  # (and on a Multislice, the slice count, slice id and coordinator) in the environment XPK sets.
  local cmd=(python3 -m vae_scale.main --distributed=on "--config=${CONFIG}" "--workdir=${WORKDIR}")
  ((STACK_TRACES)) && cmd+=(--hang_diagnostics --stack_trace_to_cloud)
  ((CLOUD_GOODPUT)) && cmd+=(--cloud_goodput --cloud_goodput_upload_seconds=300)
  join_quoted "${cmd[@]}" "${MAIN_ARGS[@]}"
}

# -- Subcommands -------------------------------------------------------------------------------
cmd_build() {
  need image
  local ref host
  ref="$(image_ref)"
  host="${IMAGE%%/*}"
  # Artifact Registry and Container Registry hosts take gcloud's credentials; once per machine.
  if [[ "${host}" == *.pkg.dev || "${host}" == *gcr.io ]]; then
    step gcloud auth configure-docker "${host}" --quiet
  fi
  step docker build "--tag=${ref}" "${ROOT}"
  step docker push "${ref}"
}

cmd_cluster() {
  need project zone cluster tpu capacity
  local args=(cluster create "--cluster=${CLUSTER}" "--tpu-type=${TPU_TYPE}"
    "--num-slices=${NUM_SLICES}")
  if [[ -n "${RESERVATION}" ]]; then
    args+=("--reservation=${RESERVATION}")
  elif ((SPOT)); then
    args+=(--spot)
  else
    args+=(--on-demand)
  fi
  args+=("--project=${PROJECT}" "--zone=${ZONE}")
  xpk_call "${args[@]}" "${CLUSTER_FLAGS[@]}"
}

cmd_run() {
  need project zone cluster workload tpu image workdir restarts
  local ref
  ref="$(image_ref)"
  # XPK's JobSet fails for good (podFailurePolicy FailJob) when a pod exits with a code outside
  # 42 and 127-255, and restarts it otherwise: exactly 42/143 rerun, 2/3 stop. Listing 42,143
  # again keeps that true should XPK's defaults change.
  local args=(workload create "--cluster=${CLUSTER}" "--workload=${WORKLOAD}"
    "--docker-image=${ref}" "--tpu-type=${TPU_TYPE}" "--num-slices=${NUM_SLICES}"
    "--max-restarts=${MAX_RESTARTS}" "--restart-on-exit-codes=42,143"
    "--termination-grace-period-seconds=${GRACE_SECONDS}")
  ((STACK_TRACES)) && args+=(--deploy-stacktrace-sidecar)
  args+=("--project=${PROJECT}" "--zone=${ZONE}")
  args+=("${WORKLOAD_FLAGS[@]}" "--command=$(main_command)")
  xpk_call "${args[@]}"
}

cmd_status() {
  need project zone cluster workload
  local args=(workload list "--cluster=${CLUSTER}" "--filter-by-job=${WORKLOAD}")
  args+=("--project=${PROJECT}" "--zone=${ZONE}")
  xpk_call "${args[@]}"
  kube_credentials
  step kubectl get jobset "${WORKLOAD}"
  step kubectl get pods "--selector=jobset.sigs.k8s.io/jobset-name=${WORKLOAD}" --output=wide
}

cmd_logs() {
  need project zone cluster workload logs
  # JobSet labels each pod with its slice (job-index) and its VM within the slice (the Job's
  # completion index); --all-containers includes XPK's stack-trace sidecar when deployed.
  local selector="jobset.sigs.k8s.io/jobset-name=${WORKLOAD}"
  [[ "${SLICE}" == all ]] || selector+=",jobset.sigs.k8s.io/job-index=${SLICE}"
  [[ "${WORKER}" == all ]] || selector+=",batch.kubernetes.io/job-completion-index=${WORKER}"
  local args=(logs "--selector=${selector}" --all-containers --prefix "--tail=${LINES}")
  ((FOLLOW)) && args+=(--follow --max-log-requests=1000)
  kube_credentials
  step kubectl "${args[@]}"
}

cmd_stop() {
  need project zone cluster workload
  local args=(workload delete "--cluster=${CLUSTER}" "--workload=${WORKLOAD}")
  args+=("--project=${PROJECT}" "--zone=${ZONE}")
  xpk_call "${args[@]}" --force
}

cmd_delete_cluster() {
  need project zone cluster
  local args=(cluster delete "--cluster=${CLUSTER}")
  args+=("--project=${PROJECT}" "--zone=${ZONE}")
  xpk_call "${args[@]}" --force
}

main() {
  parse_args "$@"
  if ((!DRY_RUN)); then
    local tool
    case "${SUBCOMMAND}" in
      build) tool=docker ;;
      logs) tool=kubectl ;;
      *) tool=xpk ;;
    esac
    command -v "${tool}" >/dev/null || die "${tool} not found; install it (xpk: pip install xpk)"
  fi
  "cmd_${SUBCOMMAND//-/_}"
}

main "$@"
