#!/usr/bin/env bash
# The GPU checks in one run, for a machine with a CUDA device (README "GPU checks"):
#   1. the conformance suite on the device (SD_HINA_TEST_DEVICE): training, resume, no host syncs under
#      torch.cuda.set_sync_debug_mode("error"), no uploads after the first update, op counts;
#   2. step cost on the device (scripts/bench_step.py): the LoRA set with the goal rows, the full set, bf16;
#   3. compile=True on the device: its tests against eager (tests/engine/test_compiled.py) and compiled rows.
# Everything it prints goes to $OUT (default ./device_out), one file per part. Without an installed package it runs
# from the checkout (PYTHONPATH); wheels the machine lacks (bitsandbytes, toml) are installed from .whl/ if present.
# DEVICE=cpu runs the same steps on the CPU (to try the script where there is no GPU). Each part has a time limit
# (TEST_TIMEOUT, BENCH_TIMEOUT, COMPILE_TIMEOUT seconds): parts 1 and 2 end within about 9 minutes, part 3 within 8.
# PARTS picks parts (default "conformance bench compiled"); run them as two calls where one call may last 10 minutes:
#   PARTS="conformance bench" scripts/device_check.sh;  PARTS=compiled scripts/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1

{
  date -u
  git log -1 --format='commit %H' 2>/dev/null
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null
  python3 - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
try:
    import bitsandbytes
    print("bitsandbytes", bitsandbytes.__version__)
except Exception as exc:  # the 8-bit variants then fail with a message saying so
    print("bitsandbytes missing:", exc)
EOF
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

status=0
PARTS=" ${PARTS:-conformance bench compiled} "
if [[ $PARTS == *" conformance "* ]]; then
SD_HINA_TEST_DEVICE=$DEVICE timeout "${TEST_TIMEOUT:-240}" python3 -m pytest tests/conformance -q -p no:cacheprovider \
  >"$OUT/conformance.txt" 2>&1 || status=1
tail -n 15 "$OUT/conformance.txt"
fi

# the README's goal rows (see "Step cost"); the reference is torch.optim.AdamW(foreach=True) in the same process
OPTS="--opt torch.AdamW.fused --opt bnb.AdamW8bit --opt HinaAdamWCore --opt HinaAdamWCore:optim_bits=8
  --opt HinaAdamWOptimizer:optim_bits=32 --opt HinaAdamWOptimizer:optim_bits=32,use_spd=False --opt HinaAdamWOptimizer
  --opt AdamW_HinaAdaptive:optim_bits=32 --opt AdamW_HinaAdaptive --opt Automagic_Sinkgd --opt Automagic_Sinkgd:warmup_steps=0"
CAME="--opt Automagic_CameAMP --opt Automagic_CameAMP:warmup_steps=0 --opt Automagic_CameAMP8bit
  --opt Automagic_CameAMP8bit:warmup_steps=0 --opt Automagic_CameAMP_COptim:warmup_steps=0
  --opt Automagic_CameAMP_COptim8bit:warmup_steps=0"
bench() {  # NAME ARGS...: one bench_step.py run, its table in $OUT/NAME.md and rows in $OUT/NAME.json
  local name=$1
  shift
  timeout "${BENCH_TIMEOUT:-150}" python3 scripts/bench_step.py --device "$DEVICE" --json "$OUT/$name.json" "$@" \
    >"$OUT/$name.md" 2>&1 || status=1
  cat "$OUT/$name.md"
}
if [[ $PARTS == *" bench "* ]]; then
# shellcheck disable=SC2086
bench bench_lora --set lora $OPTS $CAME
# shellcheck disable=SC2086
bench bench_full --set full $OPTS $CAME
bench bench_lora_bf16 --dtype bf16 --set lora --opt torch.AdamW.fused --opt HinaAdamWCore \
  --opt "HinaAdamWCore:low_precision_update='kahan'" --opt AdamWBF16_HinaAdaptive
fi
# compile=True (Triton): compiled against eager, then eager and compiled rows side by side
if [[ $PARTS == *" compiled "* ]]; then
SD_HINA_TEST_DEVICE=$DEVICE timeout "${COMPILE_TIMEOUT:-240}" python3 -m pytest tests/engine/test_compiled.py -q \
  -p no:cacheprovider -m "compiled or not compiled" -k "Core or core or HinaAdamWOptimizer or Automagic_CameAMP-fp32" \
  >"$OUT/compiled.txt" 2>&1 || status=1
tail -n 15 "$OUT/compiled.txt"
BENCH_TIMEOUT=${COMPILE_TIMEOUT:-240} bench bench_lora_compiled --set lora --compile --opt HinaAdamWCore \
  --opt HinaAdamWOptimizer:optim_bits=32 --opt AdamW_HinaAdaptive:optim_bits=32 --opt Automagic_CameAMP --opt Automagic_Sinkgd
fi
exit $status
