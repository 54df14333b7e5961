#!/usr/bin/env bash
# Speedrun GPU checks on one card (issue #5). Builds an offline FineWeb-format corpus from this
# Python's site-packages with prepare_data.py (cached under /tmp), then runs the step named by $1:
#   tests   GPU kernel/model tests against the PyTorch references
#   smoke   --smoke on the GPU (tiny model, every stage)
#   real    the record configuration, stage 1 + start of stage 2 (--max_steps)
#   short   the short full schedule (300 + 10) cold, then again with a warm --compile_cache
#           (short_cold / short_warm: one of the two; the cache lives in /tmp, so a warm run needs
#           the cold one earlier on the same machine)
# Usage: bash benchmarks/gpu_speedrun.sh OUTDIR STEP [STEP...]   (GPT2_TIKTOKEN_FILE for offline BPE)
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then   # the header above is the help
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0
fi
set -uo pipefail
out=$1; shift; mkdir -p "$out"
export PYTHONUNBUFFERED=1
corpus=${CORPUS:-/tmp/speedrun_corpus}
site=$(python3 -c 'import site; print(site.getsitepackages()[0])')
python3 prepare_data.py text "$site" --format fineweb --max_doc_tokens 2048 --out_dir "$corpus" \
    --name_prefix fineweb 2>&1 | tail -2
data=(--train_files "$corpus/fineweb_train_*.bin" --val_files "$corpus/fineweb_val_*.bin")
short_run() {  # the short full schedule (300 + 10) with a persistent compile cache; $1 = run id
  python3 ${TRAINER:-train_speedrun.py} "${data[@]}" --num_scheduled_iterations 300 --num_extension_iterations 10 \
      --val_loss_every ${SHORT_VAL_EVERY:-100} --compile_cache /tmp/speedrun_compile_cache --log_dir "$out" --run_id "$1"
}
for step in "$@"; do
  echo "=== $step ($(date +%T))"
  case $step in
    tests) python3 -m pytest -q -m gpu tests/test_speedrun_kernels.py tests/test_speedrun_model.py 2>&1 | tail -15 ;;
    smoke) python3 train_speedrun.py --smoke --attn flex --log_dir "$out" --run_id smoke 2>&1 | tail -25 ;;
    real)  python3 train_speedrun.py "${data[@]}" --max_steps ${REAL_STEPS:-560} --val_loss_every 0 --compile_cache /tmp/speedrun_compile_cache \
               --log_dir "$out" --run_id real ${REAL_EXTRA:-} 2>&1 | grep -vE "^step:[0-9]*[1-9]/" | tail -40 ;;
    short|short_cold)  # cold: empty compile cache, the whole short schedule with every validation
           rm -rf /tmp/speedrun_compile_cache
           (short_run short_cold) 2>&1 | grep -vE "^step:[0-9]*[1-9]/" | tail -30
           [ $step = short_cold ] && continue ;&
    short_warm)  # warm: the same command with the cache the cold run filled (same machine);
                 # only the time to step 0 is wanted, so it is stopped there
           (short_run short_warm > "$out/short_warm.console" 2>&1) &
           for _ in $(seq 300); do grep -q "^step:0/" "$out/short_warm.console" && break; sleep 1; done
           pkill -TERM -f "run_id short_warm"; wait
           grep -E "warm-up|graphs|compile|step:0/" "$out/short_warm.console" | tail -12 ;;
  esac
done
