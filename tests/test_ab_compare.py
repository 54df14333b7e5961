"""benchmarks/ab_compare.py: two speedrun summaries side by side, with a verdict."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import ab_compare  # noqa: E402


def summary(stage_ms, vals, **extra):
    return dict(stage_step_avg_ms=stage_ms, val_losses=[list(v) for v in vals], train_time_ms=1000.0,
                steps=310, **extra)


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_rows_ratios_and_differences():
    before = summary([200.0, 400.0, None], [(0, 10.0), (50, 3.0), (310, 1.25)])
    after = summary([202.0, 396.0, 600.0], [(0, 10.0), (50, 3.004), (300, 1.3), (310, 1.249)])
    stages, vals, worst = ab_compare.compare(before, after)
    assert [(s, r) for s, _, _, r in stages] == [(1, pytest.approx(1.01)), (2, pytest.approx(0.99))]
    assert [step for step, *_ in vals] == [0, 50, 310]          # only steps both validated
    assert vals[1][3] == pytest.approx(0.004) and worst == pytest.approx(0.004)


@pytest.mark.parametrize("after_ms, after_val, rc", [
    ([200.0, 401.0], 1.252, 0),      # within both limits
    ([203.0, 400.0], 1.250, 1),      # stage 1 1.5% slower
    ([200.0, 400.0], 1.260, 1),      # val 0.01 off
])
def test_verdict_and_exit_status(tmp_path, capsys, after_ms, after_val, rc):
    b = write(tmp_path, "b.json", summary([200.0, 400.0], [(310, 1.25)], warmup_s=150.0, peak_memory_mib=31218))
    a = write(tmp_path, "a.json", summary(after_ms, [(310, after_val)], warmup_s=44.0, peak_memory_mib=31218))
    assert ab_compare.main([b, a]) == rc
    out = capsys.readouterr().out
    assert ("verdict: OK" in out) == (rc == 0)
    assert "warm-up" in out and "peak memory" in out


@pytest.mark.parametrize("content, message", [
    ("{not json", "cannot read run summary"),
    (json.dumps({"steps": 3}), "is not a train_speedrun.py summary"),
])
def test_bad_summaries_are_one_line_errors(tmp_path, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    good = write(tmp_path, "good.json", summary([200.0], [(10, 3.0)]))
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/ab_compare.py"), good, str(bad)],
                            capture_output=True, text=True)
    assert result.returncode != 0 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_runs_of_different_schedules_are_refused(tmp_path):
    b = write(tmp_path, "b.json", summary([200.0], [(10, 3.0)]))
    a = write(tmp_path, "a.json", summary([200.0], [(20, 3.0)]))
    with pytest.raises(SystemExit, match="share no stage or no validation step"):
        ab_compare.main([b, a])
