#!/usr/bin/env bash
# The recipe's training step on a GPU or TPU, in one command (budget: under 8 minutes on one H100 / TPU chip).
#
#   bash benchmarks/device_check.sh [--steps N] [--no-install] [--accelerator auto|cuda|tpu] [--dry-run]
#   bash benchmarks/device_check.sh --summarize LOG...
#
# 1. Finds the accelerator (auto: `nvidia-smi -L` lists a GPU -> cuda; /dev/accel* or /dev/vfio/<n> or
#    $TPU_ACCELERATOR_TYPE -> tpu) and installs the matching extra: pip install -e '.[cuda]' or '.[tpu]'
#    (the jax pin's plugin wheels; --no-install skips it).
# 2. Runs benchmarks/train_step.py on the VisDrone recipe at its 800x1344 canvas, per-device batch 2, once in
#    float32 and once in bfloat16 (1 warm-up step, --steps timed steps, default 5, and one profiled step):
#    device, compile time, step time, images/s, TFLOP/s and MFU, XLA's memory analysis, the device's peak memory
#    (memory_stats()) and the time split by part (backbone, neck, encoder, decoder, aux heads, matching,
#    losses, optimizer). Each run's full table is printed as it runs and kept in $DEVICE_CHECK_LOGS
#    (default /tmp/mrqm_device_check).
# 3. Prints one summary row per dtype (--summarize does only this, for logs of train_step.py).
# --dry-run prints what steps 1-2 would run (and the accelerator found, 'none' on a machine without one) and
# runs nothing. A missing accelerator without --dry-run is a one-line error, exit 2.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CANVAS='800,1344'
BATCH=2
DTYPES=(float32 bfloat16)

die() { echo "device_check.sh: $*" >&2; exit 2; }

# One row per train_step.py log: the rows this check is for, from train_step.py's table (label in the first
# 28 columns, value after it; the header line names the dtype and the device; xla_peak = XLA's memory analysis).
summarize() {
  printf '%-9s %9s %9s %9s %8s %7s %12s %8s  %s\n' dtype compile_s step_s images/s TFLOP/s MFU dev_peak_GiB \
    xla_peak device
  local log
  for log in "$@"; do
    [[ -r "$log" ]] || die "--summarize: cannot read $log"
    awk '
      function value(label) { return (label in row) ? row[label] : "-" }
      /^train step:/ {
        if (match($0, /dtype [a-z0-9]+/)) dtype = substr($0, RSTART + 6, RLENGTH - 6)
        if (match($0, /backend .*$/)) device = substr($0, RSTART + 8, RLENGTH - 8)
        next
      }
      length($0) > 28 {
        label = substr($0, 1, 28); sub(/ +$/, "", label)
        split(substr($0, 29), rest, " "); row[label] = rest[1]
      }
      END {
        if (dtype == "") { print "device_check.sh: no train_step.py table in " FILENAME > "/dev/stderr"; exit 2 }
        printf "%-9s %9s %9s %9s %8s %7s %12s %8s  %s\n", dtype, value("compile (s)"), value("step, median (s)"),
          value("images/s"), value("TFLOP/s"), value("MFU"), value("device peak (GiB)"), value("peak (GiB)"), device
      }' "$log"
  done
}

detect_accelerator() {
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    echo cuda
  elif compgen -G '/dev/accel*' >/dev/null || compgen -G '/dev/vfio/[0-9]*' >/dev/null \
      || [[ -n "${TPU_ACCELERATOR_TYPE:-}" ]]; then
    echo tpu
  else
    echo none
  fi
}

steps=5
install=1
accelerator=auto
dry_run=0
while (($#)); do
  case "$1" in
    --summarize) shift; (($#)) || die '--summarize needs at least one log file'; summarize "$@"; exit 0 ;;
    --steps) (($# >= 2)) || die '--steps needs a value'; steps="$2"; shift 2 ;;
    --steps=*) steps="${1#*=}"; shift ;;
    --no-install) install=0; shift ;;
    --accelerator) (($# >= 2)) || die '--accelerator needs a value'; accelerator="$2"; shift 2 ;;
    --accelerator=*) accelerator="${1#*=}"; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[[ "$steps" =~ ^[1-9][0-9]*$ ]] || die "--steps must be a whole number >= 1, got '$steps'"
case "$accelerator" in
  auto) accelerator="$(detect_accelerator)" ;;
  cuda|tpu) ;;
  *) die "--accelerator must be auto, cuda or tpu, got '$accelerator'" ;;
esac
if [[ "$accelerator" == none && "$dry_run" == 0 ]]; then
  die 'no GPU (nvidia-smi -L) or TPU (/dev/accel*, /dev/vfio, $TPU_ACCELERATOR_TYPE) found; --dry-run shows the plan'
fi

python="${PYTHON:-python3}"
logs="${DEVICE_CHECK_LOGS:-/tmp/mrqm_device_check}"
install_cmd=("$python" -m pip install -e "$REPO[$accelerator]")
step_cmd() {  # sets cmd to the train_step.py command line for dtype $1
  cmd=("$python" "$REPO/benchmarks/train_step.py" "--config=$REPO/configs/visdrone.py"
       "--config.input.image_size=$CANVAS" "--config.train.per_device_batch_size=$BATCH"
       "--config.model.dtype=$1" --warmup=1 "--steps=$steps" --parts)
}

echo "device_check.sh: accelerator $accelerator, visdrone step ${CANVAS/,/x} batch $BATCH per device, dtypes ${DTYPES[*]}"
if ((dry_run)); then
  if ((install)); then
    if [[ "$accelerator" == none ]]; then echo 'would install: nothing (no accelerator found)'
    else echo "would run: ${install_cmd[*]}"; fi
  fi
  for dtype in "${DTYPES[@]}"; do step_cmd "$dtype"; echo "would run: ${cmd[*]} > $logs/$dtype.log"; done
  exit 0
fi

start=$SECONDS
if ((install)); then
  "${install_cmd[@]}"
  echo "device_check.sh: installed the [$accelerator] extra in $((SECONDS - start)) s"
fi
mkdir -p "$logs"
"$python" -c 'import jax; print("device_check.sh: jax", jax.__version__, "devices:", jax.devices())'
log_files=()
for dtype in "${DTYPES[@]}"; do
  echo "device_check.sh: $dtype run ($((SECONDS - start)) s so far)"
  step_cmd "$dtype"
  "${cmd[@]}" 2>&1 | tee "$logs/$dtype.log"
  log_files+=("$logs/$dtype.log")
done
echo
summarize "${log_files[@]}"
echo "device_check.sh: total $((SECONDS - start)) s; logs in $logs"
