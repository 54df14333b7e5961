#!/usr/bin/env bash
# Baseline GPU checks on one card (issue #2): shakespeare_char to completion, and the GPT-2 124M
# throughput of train_baseline.py --bench next to karpathy/nanoGPT's bench.py on the same card.
# Usage: NANOGPT_DIR=/path/to/nanoGPT TINYSHAKESPEARE=/path/input.txt bash benchmarks/gpu_baseline.sh [OUTDIR]
# nanoGPT's code is not part of this repo: point NANOGPT_DIR at your own clone (bench.py, model.py,
# configurator.py). Prints a ratio line "ours/nanoGPT tokens/s".
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then   # the header above is the help
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0
fi
set -uo pipefail  # keep going past a failed step: every figure this call can give is wanted
out=${1:-bench_out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/card.txt"

python3 prepare_data.py shakespeare_char --input "$TINYSHAKESPEARE" --out_dir data/shakespeare_char
start=$(date +%s)
python3 train_baseline.py --preset shakespeare_char --gpu_type auto 2>&1 | tee "$out/shakespeare_char.log" | grep -E "^(step|iter [0-9]*0{3}:)|val|error" || true
echo "shakespeare_char wall: $(( $(date +%s) - start )) s" | tee -a "$out/shakespeare_char.log"

ours() { python3 train_baseline.py --preset gpt2 --bench --bench_data random --gpu_type auto 2>&1 | tee -a "$out/bench_ours.log" | grep -E "^bench:|^\{"; }
theirs() { (cd "$NANOGPT_DIR" && python3 bench.py --real_data=False --compile=True 2>&1) | tee -a "$out/bench_nanogpt.log" | grep "time per iteration"; }
for round in 1 2; do ours; theirs; done
python3 - "$out" <<'PY'
import json, re, sys, statistics
out = sys.argv[1]
ours = [json.loads(l)["ms_per_iter"] for l in open(f"{out}/bench_ours.log") if l.startswith("{")]
theirs = [float(m) for m in re.findall(r"time per iteration: ([0-9.]+)ms", open(f"{out}/bench_nanogpt.log").read())]
tok = 12 * 1024
print(f"ours    ms/iter {ours} -> median {statistics.median(ours):.2f} = {tok / statistics.median(ours) * 1e3:,.0f} tok/s")
print(f"nanoGPT ms/iter {theirs} -> median {statistics.median(theirs):.2f} = {tok / statistics.median(theirs) * 1e3:,.0f} tok/s")
print(f"ours/nanoGPT tokens/s ratio: {statistics.median(theirs) / statistics.median(ours):.3f}")
PY
