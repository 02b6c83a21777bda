#!/usr/bin/env bash
# The accelerator benchmark suite: vae_scale's ldm_f8 training step against PyTorch on one GPU.
#
#   bench/gpu_suite.sh OUTDIR [PART ...]   (PART: env bf16 f32 batch best loader norm; default: all)
#
# Every measurement is one command below, run under its own time limit, in priority order, inside
# a total budget (SUITE_BUDGET_S, default 560 s, so that one call of a 10-minute lease holds it).
# A command that does not fit in what is left is skipped and listed as skipped. Each writes its JSON
# report into OUTDIR (NAME.json) and its output into OUTDIR/NAME.log; OUTDIR/suite.txt lists what
# ran, its exit status and seconds. Parts:
#   env     nvidia-smi, Python packages, JAX devices
#   bf16    bench_step ae + gan at batch 8 (MFU); torch eager and torch.compile at batch 8
#   f32     the same in float32
#   batch   bf16 at batch 16 without remat (the largest power of two that fits without it)
#   best    torch at batch 16; bf16 at batch 32 with remat=block
#   loader  the Grain input pipeline on generated 500x375 JPEGs with the host's cores
#   norm    what the GroupNorm variance costs: the bf16 ae step at batch 8 with flax's fast
#           variance, two-pass and shifted one-pass, timed in alternating rounds (issue 23)
# The figures go into BENCHMARKS.md ("GPU" sections) with the device and versions from env.
set -u
OUT=${1:?usage: bench/gpu_suite.sh OUTDIR [PART ...]}
shift
PARTS=${*:-env bf16 f32 batch best loader norm}
mkdir -p "$OUT"
START=$(date +%s)
BUDGET=${SUITE_BUDGET_S:-560}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
LDM="--config=configs/ldm_f8.py"

# run NAME LIMIT_S CMD...: runs CMD under LIMIT_S if that much of the budget is left.
run() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if (( left < limit )); then
    echo "$name skipped (needs ${limit}s, ${left}s left)" | tee -a "$OUT/suite.txt"
    return
  fi
  local t0
  t0=$(date +%s)
  echo "== $name: $*" | tee -a "$OUT/suite.txt"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$OUT/suite.txt"
  tail -n 25 "$OUT/$name.log"
}

step() {  # step NAME LIMIT DTYPE BATCH ADVERSARIAL REMAT [extra flags]
  local name=$1 limit=$2 dtype=$3 batch=$4 adv=$5 remat=$6; shift 6
  run "$name" "$limit" "$PY" -m vae_scale.bench step $LDM --config.model.dtype="$dtype" \
      --config.model.remat="$remat" --batch_per_device="$batch" --num_devices=1 \
      --adversarial="$adv" --steps=20 --warmup=3 --json_out="$OUT/$name.json" "$@"
}

torch_ref() {  # torch_ref NAME LIMIT DTYPE BATCH [extra flags]
  local name=$1 limit=$2 dtype=$3 batch=$4; shift 4
  run "$name" "$limit" "$PY" bench/torch_reference.py $LDM --config.model.dtype="$dtype" \
      --batch="$batch" --steps=20 --warmup=3 --jax=none --channels_last \
      --json_out="$OUT/$name.json" "$@"
}

for part in $PARTS; do
  case $part in
    env)
      run env 60 bash -c "nvidia-smi; $PY -m pip list 2>/dev/null | grep -i -E \
'^(jax|jaxlib|jax-cuda|flax|optax|orbax|grain|clu|dm.pix|ml.collections|torch|torchvision|diffusers|triton|numpy) '; \
$PY -c 'import jax; print(jax.devices(), jax.__version__)'" ;;
    bf16)
      step bf16_b8 240 bfloat16 8 both none
      torch_ref torch_bf16_b8 260 bfloat16 8
      torch_ref torch_bf16_b8_nchw 100 bfloat16 8 --modes=eager --nochannels_last ;;
    f32)
      step f32_b8 240 float32 8 both none
      torch_ref torch_f32_b8 260 float32 8 ;;
    batch)
      step bf16_b16_none 150 bfloat16 16 ae none ;;
    best)
      torch_ref torch_bf16_b16 220 bfloat16 16 --modes=eager,compile
      step bf16_b32_block 170 bfloat16 32 ae block ;;
    loader)
      run loader 150 "$PY" -m vae_scale.bench data --num_images=512 --batch_size=64 \
          --workers="0,4,$(( $(nproc) - 2 ))" --seconds=8 --rounds=2 --json="$OUT/loader.json" ;;
    norm)
      run norm_bf16_b8 300 "$PY" bench/norm_cost.py $LDM --config.model.dtype=bfloat16 --batch=8 \
          --steps=5 --rounds=6 --json_out="$OUT/norm_bf16_b8.json" ;;
    *) echo "unknown part: $part (env bf16 f32 batch best loader norm)" >&2; exit 2 ;;
  esac
done
echo "suite: $(( $(date +%s) - START ))s of ${BUDGET}s" | tee -a "$OUT/suite.txt"
