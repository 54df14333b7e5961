"""Two train_speedrun.py runs side by side from their JSON summaries: a change, before/after.

The trainer writes RUN_ID.json beside its log; run both sides on one card with one schedule.

  python3 benchmarks/ab_compare.py logs/before.json logs/after.json [--max_val_diff 0.005]
      [--max_time_ratio 1.01]

Prints per-stage step time (ms) with the ratio after/before, the val loss at every step both
validated with the difference after - before, train time, warm-up and peak memory; then one
verdict line against the two limits (exit status 0 when both hold, 1 otherwise).
"""
import argparse
import json
import sys


def load_summary(path: str) -> dict:
    try:
        with open(path) as f:
            summary = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"error: cannot read run summary {path}: {exc}")
    missing = [k for k in ("stage_step_avg_ms", "val_losses", "train_time_ms", "steps") if k not in summary]
    if missing:
        raise SystemExit(f"error: {path} is not a train_speedrun.py summary (no {', '.join(missing)})")
    return summary


def compare(before: dict, after: dict) -> tuple[list, list, float]:
    """(stage rows (stage, before ms, after ms, ratio), val rows (step, before, after, diff),
    largest |val diff|). Stages or steps only one run has are left out."""
    stages = []
    for i, (b, a) in enumerate(zip(before["stage_step_avg_ms"], after["stage_step_avg_ms"])):
        if b and a:
            stages.append((i + 1, b, a, a / b))
    before_val = {step: loss for step, loss in before["val_losses"]}
    vals = [(step, before_val[step], loss, loss - before_val[step])
            for step, loss in after["val_losses"] if step in before_val]
    worst = max((abs(row[3]) for row in vals), default=float("nan"))
    return stages, vals, worst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--max_val_diff", type=float, default=0.005, help="largest |val loss difference| allowed (default 0.005)")
    p.add_argument("--max_time_ratio", type=float, default=1.01, help="largest per-stage step time ratio allowed (default 1.01)")
    args = p.parse_args(argv)
    before, after = load_summary(args.before), load_summary(args.after)
    stages, vals, worst = compare(before, after)
    if not stages or not vals:
        raise SystemExit("error: the two runs share no stage or no validation step; compare runs of one schedule")
    print(f"{'stage':>5} {'before ms':>10} {'after ms':>10} {'after/before':>13}")
    for stage, b, a, ratio in stages:
        print(f"{stage:>5} {b:>10.2f} {a:>10.2f} {ratio:>13.4f}")
    print(f"\n{'step':>5} {'before val':>11} {'after val':>11} {'diff':>9}")
    for step, b, a, diff in vals:
        print(f"{step:>5} {b:>11.4f} {a:>11.4f} {diff:>+9.4f}")
    print()
    for key, label, unit in (("train_time_ms", "train time", "ms"), ("warmup_s", "warm-up", "s"),
                             ("peak_memory_mib", "peak memory", "MiB")):
        if key in before and key in after:
            print(f"{label:12s} before {before[key]:>10}  after {after[key]:>10} {unit}")
    slowest = max(row[3] for row in stages)
    ok = worst <= args.max_val_diff and slowest <= args.max_time_ratio
    print(f"verdict: {'OK' if ok else 'FAIL'}: largest |val diff| {worst:.4f} (limit {args.max_val_diff}), "
          f"slowest stage ratio {slowest:.4f} (limit {args.max_time_ratio})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
