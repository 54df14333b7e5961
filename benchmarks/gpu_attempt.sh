#!/usr/bin/env bash
# A record attempt and the side-by-side with upstream on one GPU (issue #13), in steps that each fit
# one 10-minute command. Everything that a later step reuses lives under /tmp: the corpus, the
# compile caches, the attempt folder and the vs_upstream logs.
#   corpus      FineWeb-format shards from this Python's site-packages (GPT-2 BPE, <= 2048-token docs)
#   attempt     RUNS=3 of the 300 + 10 schedule through run.sbatch (seeds 0, 1, 2); run it again to
#               finish an attempt a time limit cut short (finished runs are kept), then record_stats.py
#   vs_steps    vs_upstream.py: the first STEPS (default 100) steps of the record schedule, both sides
#   vs_short    vs_upstream.py: upstream alone on the 300 + 10 schedule (550 s cold on an H200, once cut
#               by the 560 s limit at step 250; ~360 s on the warm cache of a second call), so give it a
#               command of its own, after corpus in an earlier one, and repeat it on a warm machine
#   vs_compare  vs_short's upstream log against the attempt's seed 0 (seconds, no GPU needed)
#   ab_warm     a change to our trainer, before/after: fill each side's compile cache (each side's
#               300 + 10 run is stopped once its warm-up is done), so that ab_run fits one command
#   ab_run      both sides' 300 + 10 run (seed 0) one after the other on the warm caches, then
#               benchmarks/ab_compare.py (val within 0.005, per-stage step time within 1%)
#   kernels     benchmarks/speedrun_kernels.py --before each file in KERNELS_BEFORE (default
#               $BEFORE/train_speedrun.py): kernel-only records, older vs this trainer in one process
#   gpu_tests   the GPU tests of the kernels and the model (pytest -m gpu)
# Usage: bash benchmarks/gpu_attempt.sh OUTDIR STEP [STEP...]
#        UPSTREAM=path/to/modded-nanogpt (default ref/upstream68: record #68's train_gpt.py and
#        triton_kernels.py, e.g. `git -C modded-nanogpt show 9e53f9e3:train_gpt.py`); GPT2_TIKTOKEN_FILE
#        for offline BPE; SEED=N: vs_* start both sides from the same weights (vs_upstream.py --seed);
#        BEFORE=folder holding the 'before' train_speedrun.py and prepare_data.py
#        (default .carry/before, e.g. `git show COMMIT:train_speedrun.py > .carry/before/...`)
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then   # the header above is the help
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0
fi
set -uo pipefail
out=$1; shift; mkdir -p "$out"
export PYTHONUNBUFFERED=1
corpus=/tmp/corpus
cache=/tmp/vs_upstream_cache
attempt=/tmp/attempt/h200
upstream=${UPSTREAM:-ref/upstream68}
data=(--train_files "$corpus/fineweb_train_*.bin" --val_files "$corpus/fineweb_val_*.bin")
short=(--num_scheduled_iterations 300 --num_extension_iterations 10 --val_loss_every 50)
before=${BEFORE:-.carry/before}
ab=(--attn flex --seed 0 --log_dir /tmp/ab "${data[@]}" "${short[@]}")
ab_trainer() { if [ "$1" = before ]; then echo "$before/train_speedrun.py"; else echo train_speedrun.py; fi; }
vs=(python3 benchmarks/vs_upstream.py --upstream "$upstream" "${data[@]}" --out_dir /tmp/vs68
    --cache_dir "$cache" --ours_args "--attn flex" ${SEED:+--seed "$SEED"})
for step in "$@"; do
  echo "=== $step ($(date +%T))"
  case $step in
    corpus) site=$(python3 -c 'import site; print(site.getsitepackages()[0])')
            python3 prepare_data.py text "$site" --format fineweb --max_doc_tokens 2048 --out_dir "$corpus" \
                --name_prefix fineweb 2>&1 | tail -2 ;;
    attempt) ATTEMPT=h200 RUNS=3 bash run.sbatch train_speedrun.py "${data[@]}" "${short[@]}" --attn flex \
                 --compile_cache "$cache/ours" --log_dir /tmp/attempt 2>&1 | grep -E "run.sbatch|warm-up done|^step:[0-9]+/[0-9]+ val|peak|record attempt"
             python3 record_stats.py "$attempt" --target 3.28 --plot "$out/attempt.png" 2>&1
             cp "$attempt"/run*_seed*.txt "$attempt"/run*_seed*.json "$out/" 2>/dev/null ;;
    vs_steps) "${vs[@]}" --steps ${STEPS:-100} --val_every ${STEPS:-100} --side both --time_limit 560 2>&1 \
                 | grep -vE "^step:[0-9]*[1-9]/" | tail -60
              cp /tmp/vs68/*.txt /tmp/vs68/*.comparison.* "$out/" 2>/dev/null ;;
    vs_short) "${vs[@]}" --schedule short --side upstream --time_limit 560 2>&1 | grep -vE "^step:[0-9]*[1-9]/" | tail -30
              cp /tmp/vs68/short*.upstream.* "$out/" 2>/dev/null ;;
    vs_compare) python3 benchmarks/vs_upstream.py --compare /tmp/vs68/short.upstream.txt "$attempt/run0_seed0.txt" \
                    --out_dir "$out" 2>&1 | tail -60
                ;;
    ab_warm) mkdir -p /tmp/ab
             for side in before after; do
               setsid python3 "$(ab_trainer $side)" "${ab[@]}" --compile_cache "$cache/ab_$side" \
                   --run_id "warm_$side" > "/tmp/ab/warm_$side.out" 2>&1 &
               pid=$!
               until grep -q "warm-up done" "/tmp/ab/warm_$side.out" || ! kill -0 $pid 2>/dev/null; do sleep 2; done
               kill -9 -- -$pid 2>/dev/null; wait $pid 2>/dev/null
               echo "$side: $(grep -m1 "warm-up done" "/tmp/ab/warm_$side.out" || tail -3 "/tmp/ab/warm_$side.out")"
             done ;;
    ab_run) for side in before after; do
              python3 "$(ab_trainer $side)" "${ab[@]}" --compile_cache "$cache/ab_$side" --run_id "$side" 2>&1 \
                  | grep -E "warm-up done|^step:[0-9]+/[0-9]+ val|peak"
            done
            cp /tmp/ab/before.* /tmp/ab/after.* "$out/" 2>/dev/null
            python3 benchmarks/ab_compare.py /tmp/ab/before.json /tmp/ab/after.json ;;
    kernels) for old in ${KERNELS_BEFORE:-$before/train_speedrun.py}; do
               echo "--- before: $old"; python3 benchmarks/speedrun_kernels.py --before "$old" 2>&1 | tail -12
             done ;;
    gpu_tests) python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_speedrun_kernels.py \
                   tests/test_speedrun_model.py 2>&1 | tail -15 ;;
    *) echo "error: unknown step '$step' (corpus, attempt, vs_steps, vs_short, vs_compare, ab_warm, ab_run, kernels, gpu_tests)" >&2; exit 2 ;;
  esac
done
