"""Is a speedrun attempt a new record? Statistics over the final val losses and train times of N runs.

Upstream modded-nanogpt's rules for a new record: the mean final val loss over N runs is below 3.28
with p < 0.01 (one-sided one-sample t-test against 3.28), and the attempt is faster than the prior
record on the same hardware. This file reads the runs' logs, prints a table with means, standard
deviations and 95% confidence intervals, the t-test, and (with --baseline) Welch's t-tests of the
attempt against the prior record's runs, then a one-line verdict.

  python3 record_stats.py logs/                                 # a folder of runs
  python3 record_stats.py logs/a.txt logs/b.json --baseline prior/*.txt --plot curves.png

Inputs: train_speedrun.py's log <run_id>.txt or its summary <run_id>.json (a folder: every *.txt in
it, and each *.json without a .txt of the same name), or upstream's record logs
("step:N/M val_loss:X train_time:Yms step_avg:Zms"). Both kinds start with a dump of the training
code; only the lines after its last separator line (a row of '=') are read as data.

Importable, no side effects: parse_log, load_runs, student_t_cdf, student_t_ppf, mean_ci,
one_sample_t_test, welch_t_test. scipy.stats computes the t distribution where installed; without
it the same numbers come from the exact Student-t CDF below (incomplete beta function).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

TARGET = 3.28        # upstream's val loss bar for the 124M track
ALPHA = 0.01         # upstream's significance level for "mean below the target"
CI_LEVEL = 0.95


class LogError(Exception):
    """Bad input: the command line prints it as one 'error:' line."""


# =============================================================================
# Logs
# =============================================================================

# The code dump ends at a separator line; real logs print 100 '='. Only the lines after the LAST
# separator are data: a docstring in the code may hold a row of '=' or a line that looks like data,
# but the code's own dump is always followed by the run's separators.
SEPARATOR = re.compile(r"={20,}")
# Data lines are matched whole, from column 0 (in code, "step:..." sits inside an f-string, indented).
# Between the step and train_time there may be other fields: train_loss_per_token (ours), train_loss
# (old upstream logs); some upstream logs add fields after step_avg too.
VAL_LINE = re.compile(r"step:(\d+)/(\d+) val_loss:(nan|inf|\d+(?:\.\d*)?(?:e[-+]?\d+)?)(?: \S+)*? "
                      r"train_time:(\d+(?:\.\d*)?)(ms|s) step_avg:\S+(?: \S+)*")
TRAIN_LINE = re.compile(r"step:(\d+)/(\d+)(?: \S+)*? train_time:(\d+(?:\.\d*)?)(ms|s) step_avg:\S+(?: \S+)*")
STOPPED_LINE = re.compile(r"stopped by (\S+) after (\d+) steps")
SUMMARY_PREFIX = "summary: "


@dataclass
class Run:
    """One training run, as far as its log goes."""
    name: str
    path: str
    val_points: list          # [(step, val_loss, train_time_ms or None)], in log order
    total_steps: int | None   # M of "step:N/M"; None in the .json of an unfinished run
    last_step: int            # the furthest step the log reached
    final_val_loss: float | None = None    # None: the run did not finish
    train_time_ms: float | None = None
    stopped_by: str | None = None

    @property
    def finished(self) -> bool:
        return self.final_val_loss is not None


def _time_ms(value: str, unit: str) -> float:
    return float(value) * (1000.0 if unit == "s" else 1.0)


def data_lines(text: str) -> list:
    """The lines after the code dump: everything after the last separator (all lines if none)."""
    lines = text.splitlines()
    start = 0
    for i, line in enumerate(lines):
        if SEPARATOR.fullmatch(line.rstrip()):
            start = i + 1
    return lines[start:]


def _parse_text_log(path: Path, text: str) -> Run:
    val_points, totals, last_step = [], set(), 0
    summary, stopped_by = None, None
    for line in data_lines(text):
        line = line.rstrip()
        if m := VAL_LINE.fullmatch(line):
            step, total = int(m[1]), int(m[2])
            val_points.append((step, float(m[3]), _time_ms(m[4], m[5])))
        elif m := TRAIN_LINE.fullmatch(line):
            step, total = int(m[1]), int(m[2])
        elif m := STOPPED_LINE.match(line):
            stopped_by = m[1]
            continue
        elif line.startswith(SUMMARY_PREFIX):
            try:   # a run killed while printing leaves half a line: then the val lines decide
                summary = json.loads(line[len(SUMMARY_PREFIX):])
            except ValueError:
                pass
            continue
        else:
            continue
        totals.add(total)
        last_step = max(last_step, step)
    if not val_points:
        raise LogError(f"{path}: no val_loss lines (not a training log, or it stopped before the first validation)")
    if len(totals) > 1:
        raise LogError(f"{path}: step lines disagree on the run length ({', '.join(map(str, sorted(totals)))} steps)")
    total = totals.pop()
    run = Run(path.stem, str(path), val_points, total, last_step, stopped_by=stopped_by)
    final_step, final_loss, final_ms = val_points[-1]
    if final_step == total:
        run.final_val_loss, run.train_time_ms = final_loss, final_ms
    if isinstance(summary, dict) and "final_val_loss" in summary:
        # ours: the summary holds the unrounded loss, and None when the run stopped early
        run.final_val_loss = _number_or_none(summary.get("final_val_loss"), path)
        run.train_time_ms = _number_or_none(summary.get("train_time_ms"), path)
        run.stopped_by = summary.get("stopped_by") or run.stopped_by
    return run


def _number_or_none(value, path: Path) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LogError(f"{path}: expected a number in the summary, found {value!r}")
    return float(value)


def _parse_summary_json(path: Path, text: str) -> Run:
    """train_speedrun.py's <run_id>.json: the final numbers and (step, loss) of each validation."""
    try:
        data = json.loads(text)
    except ValueError as e:
        raise LogError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or "final_val_loss" not in data or "val_losses" not in data:
        raise LogError(f"{path}: not a train_speedrun.py summary (no final_val_loss/val_losses)")
    try:
        points = [(int(step), float(loss), None) for step, loss in data["val_losses"]]
        final = _number_or_none(data["final_val_loss"], path)
        time_ms = _number_or_none(data.get("train_time_ms"), path)
        steps = int(data.get("steps") or 0)
    except (TypeError, ValueError) as e:
        raise LogError(f"{path}: malformed summary ({e})") from None
    if not points:
        raise LogError(f"{path}: no val losses in the summary (the run stopped before the first validation)")
    if final is not None:   # the final point gets its time: the only one a summary has
        points[-1] = (points[-1][0], points[-1][1], time_ms)
    last_step = max(steps, points[-1][0])
    return Run(path.stem, str(path), points, last_step if final is not None else None, last_step,
               final, time_ms, data.get("stopped_by"))


def parse_log(path) -> Run:
    """One run from a train_speedrun.py log (.txt) or summary (.json), or an upstream record log."""
    path = Path(path)
    if not path.exists():
        raise LogError(f"{path}: no such file")
    if path.is_dir():
        raise LogError(f"{path}: is a folder (load_runs reads folders)")
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        raise LogError(f"{path}: cannot read ({e.strerror})") from None
    return _parse_summary_json(path, text) if path.suffix == ".json" else _parse_text_log(path, text)


def expand_inputs(paths) -> tuple:
    """Files to read, and notes. A run given as both <id>.txt and <id>.json counts once (the .txt)."""
    files, notes = [], []
    for p in map(Path, paths):
        if p.is_dir():
            # <run_id>.compile_*.txt are the logs of a cold start's compile helpers, not runs
            found = sorted(f for f in p.glob("*.txt") if ".compile_" not in f.name)
            stems = {f.stem for f in found}
            found += sorted(f for f in p.glob("*.json") if f.stem not in stems)
            if not found:
                raise LogError(f"{p}: no run logs (*.txt or *.json) in this folder")
            files += sorted(found)
        elif p.exists():
            files.append(p)
        else:
            raise LogError(f"{p}: no such file or folder")
    chosen = {}   # (folder, stem) -> path: one entry per run
    for f in files:
        key = (f.resolve().parent, f.stem)
        if key not in chosen:
            chosen[key] = f
        elif chosen[key].resolve() != f.resolve():
            keep, drop = sorted([chosen[key], f], key=lambda x: x.suffix != ".txt")
            chosen[key] = keep
            notes.append(f"note: {drop} is the same run as {keep}; counted once")
    return list(chosen.values()), notes


def check_finished(run: Run) -> None:
    if run.finished:
        if math.isnan(run.final_val_loss):
            raise LogError(f"{run.path}: the final val_loss is nan (the run diverged)")
        return
    last_val = run.val_points[-1][0]
    of = f" of {run.total_steps}" if run.total_steps else ""
    why = f" (stopped by {run.stopped_by})" if run.stopped_by else ""
    raise LogError(f"{run.path}: the run did not finish{why}: last validation at step {last_val}{of}, "
                   f"last step reached {run.last_step}")


def check_same_steps(runs: list, label: str) -> None:
    by_steps = {}
    for run in runs:
        by_steps.setdefault(run.total_steps, []).append(run.name)
    if len(by_steps) > 1:
        parts = "; ".join(f"{steps} steps: {', '.join(names)}" for steps, names in sorted(by_steps.items()))
        raise LogError(f"{label} runs have different step counts ({parts})")


def load_runs(paths, label: str = "attempt") -> tuple:
    """Finished runs of one group (files or folders), all of the same step count; and notes."""
    files, notes = expand_inputs(paths)
    runs = [parse_log(f) for f in files]
    for run in runs:
        check_finished(run)
    check_same_steps(runs, label)
    return runs, notes


def name_runs(runs: list) -> None:
    """File stems, or folder/stem where two runs share a stem."""
    stems = [r.name for r in runs]
    for run in runs:
        if stems.count(run.name) > 1:
            run.name = f"{Path(run.path).parent.name}/{run.name}"


# =============================================================================
# Student's t distribution (scipy where installed, else exact pure Python)
# =============================================================================

_NOT_LOADED = object()
scipy_stats = _NOT_LOADED   # scipy.stats, or None without scipy; tests set None to force the pure path


def _scipy():
    # Imported on first use: it costs a second or two, and bad input is reported before that.
    global scipy_stats
    if scipy_stats is _NOT_LOADED:
        try:
            from scipy import stats
        except ImportError:
            stats = None
        scipy_stats = stats
    return scipy_stats


_TINY = 1e-300
_EPS = 1e-15   # a few ulps: the fraction's last terms change it by less than rounding
_MAX_TERMS = 100_000


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """1/(1+ c1/(1+ c2/(1+ ...))): the continued fraction of the incomplete beta function, with
    I_x(a, b) = x^a (1-x)^b / (a B(a, b)) * that, and
    c_{2m+1} = -(a+m)(a+b+m)x / ((a+2m)(a+2m+1)),  c_{2m} = m(b-m)x / ((a+2m-1)(a+2m)).

    It converges quickly for x < (a+1)/(a+b+2); the caller uses I_x(a,b) = 1 - I_{1-x}(b,a) otherwise.
    The denominator g = 1 + c1/(1 + ...) is evaluated by the modified Lentz method: it keeps the
    ratios C, D of successive numerators and denominators instead of the convergents themselves
    (which over- or underflow), and nudges an exact zero to _TINY.
    """
    g, C, D = 1.0, 1.0, 0.0
    for j in range(1, _MAX_TERMS):
        m = j // 2
        if j % 2:
            c = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:
            c = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        D = 1.0 + c * D
        D = 1.0 / (D if abs(D) > _TINY else _TINY)
        C = 1.0 + c / C
        C = C if abs(C) > _TINY else _TINY
        g *= C * D
        if abs(C * D - 1.0) < _EPS:
            return 1.0 / g
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def _stirling_rest(x: float) -> float:
    """lgamma(x) - ((x - 1/2) log x - x + log(2 pi)/2): Stirling's series, exact to ~1e-21 for x >= 100."""
    inv, inv2 = 1.0 / x, 1.0 / (x * x)
    return inv * (1 / 12 - inv2 * (1 / 360 - inv2 * (1 / 1260 - inv2 / 1680)))


def _log_beta(a: float, b: float) -> float:
    """log B(a, b) = lgamma(a) + lgamma(b) - lgamma(a + b).

    For a large argument (df/2 in the t distribution) lgamma(big) - lgamma(big + small) cancels most
    digits of two huge numbers; written with Stirling's series, their big terms cancel analytically.
    """
    small, big = sorted((a, b))
    if big < 100:
        return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    return (math.lgamma(small) - (big - 0.5) * math.log1p(small / big) - small * math.log(big + small)
            + small + _stirling_rest(big) - _stirling_rest(big + small))


def _t_tail(t: float, df: float) -> float:
    """P(T > t) for t >= 0: half the regularized incomplete beta I_x(df/2, 1/2) at x = df/(df+t^2).

    x and 1-x are built from logs of q = t^2/df so that neither loses digits: near t = 0 (x ~ 1)
    and for huge |t| (t^2 overflows) alike.
    """
    if t == 0:
        return 0.5
    log_q = 2.0 * math.log(t) - math.log(df)
    # log(1+q), stable for any q
    log1p_q = log_q + math.log1p(math.exp(-log_q)) if log_q > 0 else math.log1p(math.exp(log_q))
    log_x, log_y = -log1p_q, log_q - log1p_q      # log x, log(1-x)
    x, y = math.exp(log_x), math.exp(log_y)
    a, b = df / 2.0, 0.5
    log_front = a * log_x + b * log_y - _log_beta(a, b)
    if x < (a + 1.0) / (a + b + 2.0):
        incomplete = math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    else:
        incomplete = 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, y) / b
    return 0.5 * incomplete


def t_cdf_pure(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df > 0 degrees of freedom (df need not be an integer)."""
    if math.isnan(t) or math.isnan(df):
        return math.nan
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    return _t_tail(-t, df) if t < 0 else 1.0 - _t_tail(t, df)


def _t_isf(q: float, df: float) -> float:
    """t >= 0 with P(T > t) = q, for 0 < q <= 0.5: bisection on the tail, to the last bit."""
    lo, hi = 0.0, 1.0
    while _t_tail(hi, df) > q:   # bracket: the tail falls as t grows
        lo, hi = hi, hi * 2.0
    while True:
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            return mid
        if _t_tail(mid, df) > q:
            lo = mid
        else:
            hi = mid


def t_ppf_pure(p: float, df: float) -> float:
    """The p-quantile of Student's t: the inverse of t_cdf_pure."""
    if math.isnan(p) or math.isnan(df) or not 0.0 <= p <= 1.0:
        return math.nan
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if p in (0.0, 1.0):
        return math.inf if p else -math.inf
    if p == 0.5:
        return 0.0
    # work with the smaller tail directly: 1 - p would round a tiny lower tail away
    return _t_isf(1.0 - p, df) if p > 0.5 else -_t_isf(p, df)


def student_t_cdf(t: float, df: float) -> float:
    stats = _scipy()
    if stats is None or math.isnan(t) or math.isinf(t):
        return t_cdf_pure(t, df)
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    return float(stats.t.cdf(t, df))


def student_t_ppf(p: float, df: float) -> float:
    stats = _scipy()
    if stats is None:
        return t_ppf_pure(p, df)
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    return float(stats.t.ppf(p, df))


# =============================================================================
# Tests and intervals (textbook formulas)
# =============================================================================

@dataclass(frozen=True)
class Interval:
    n: int
    mean: float
    sd: float      # sample standard deviation (ddof=1); nan for one value
    low: float     # the Student-t confidence interval of the mean
    high: float


@dataclass(frozen=True)
class TTest:
    t: float
    df: float
    p: float
    alternative: str    # "less", "greater" or "two-sided"
    estimate: float     # mean - mu (one sample) or mean_a - mean_b (Welch)
    low: float          # two-sided CI_LEVEL interval of the estimate
    high: float


def _mean_var(xs) -> tuple:
    n = len(xs)
    mean = math.fsum(xs) / n
    var = math.fsum((x - mean) ** 2 for x in xs) / (n - 1) if n > 1 else math.nan
    return mean, var


def mean_ci(xs, level: float = CI_LEVEL) -> Interval:
    xs = [float(x) for x in xs]
    if not xs:
        raise ValueError("mean_ci needs at least one value")
    mean, var = _mean_var(xs)
    n = len(xs)
    if n < 2:
        return Interval(n, mean, math.nan, math.nan, math.nan)
    half = student_t_ppf(0.5 + level / 2, n - 1) * math.sqrt(var / n)
    return Interval(n, mean, math.sqrt(var), mean - half, mean + half)


def _t_test(estimate: float, se: float, df: float, alternative: str, level: float) -> TTest:
    if alternative not in ("less", "greater", "two-sided"):
        raise ValueError(f"alternative must be 'less', 'greater' or 'two-sided', not {alternative!r}")
    if se == 0:   # no spread: the sign of the difference decides (0/0 stays undecided)
        t = math.copysign(math.inf, estimate) if estimate else math.nan
        low = high = estimate
    else:
        t = estimate / se
        half = student_t_ppf(0.5 + level / 2, df) * se
        low, high = estimate - half, estimate + half
    if math.isnan(t):
        p = math.nan
    elif alternative == "less":
        p = student_t_cdf(t, df)
    elif alternative == "greater":
        p = student_t_cdf(-t, df)
    else:
        p = min(1.0, 2.0 * student_t_cdf(-abs(t), df))
    return TTest(t, df, p, alternative, estimate, low, high)


def one_sample_t_test(xs, mu: float, alternative: str = "less", level: float = CI_LEVEL) -> TTest:
    """H1: mean(xs) < mu ("less"), > mu ("greater") or != mu; df = n - 1."""
    xs = [float(x) for x in xs]
    if len(xs) < 2:
        raise ValueError("a t-test needs at least 2 values")
    mean, var = _mean_var(xs)
    return _t_test(mean - mu, math.sqrt(var / len(xs)), len(xs) - 1, alternative, level)


def welch_t_test(a, b, alternative: str = "two-sided", level: float = CI_LEVEL) -> TTest:
    """Welch's unequal-variance t-test of mean(a) - mean(b); Welch-Satterthwaite degrees of freedom."""
    a, b = [float(x) for x in a], [float(x) for x in b]
    if len(a) < 2 or len(b) < 2:
        raise ValueError("Welch's t-test needs at least 2 values in each group")
    (mean_a, var_a), (mean_b, var_b) = _mean_var(a), _mean_var(b)
    va, vb = var_a / len(a), var_b / len(b)   # squared standard errors of the two means
    se2 = va + vb
    if se2:
        df = se2 ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    else:   # no spread in either group: t is infinite (or undefined) and df does not matter
        df = float(len(a) + len(b) - 2)
    return _t_test(mean_a - mean_b, math.sqrt(se2), df, alternative, level)


# =============================================================================
# Report
# =============================================================================

def fmt_p(p: float) -> str:
    return "nan" if math.isnan(p) else f"{p:.3g}"


def _fmt_df(df: float) -> str:
    return f"{df:.0f}" if float(df).is_integer() else f"{df:.1f}"


def _seconds(run: Run) -> float:
    return run.train_time_ms / 1000.0


def group_table(label: str, runs: list, target: float) -> list:
    """Per-run rows, then mean, std and CI of loss and time, then the t-test against the target."""
    width = max(len("run"), *(len(r.name) for r in runs))
    lines = [f"{label}: {len(runs)} run{'s' if len(runs) != 1 else ''} of {runs[0].total_steps} steps",
             f"  {'run':<{width}}  {'val_loss':>8}  {'train_time_s':>12}  {'steps':>6}"]
    for r in runs:
        lines.append(f"  {r.name:<{width}}  {r.final_val_loss:8.4f}  {_seconds(r):12.3f}  {r.total_steps:>6}")
    if len(runs) < 2:
        return lines
    loss, time = mean_ci([r.final_val_loss for r in runs]), mean_ci([_seconds(r) for r in runs])
    ci = f"{CI_LEVEL:.0%} CI (t, df={len(runs) - 1})"
    lines += [f"  {'':<12}  {'mean':>9}  {'std':>8}  {ci}",
              f"  {'val_loss':<12}  {loss.mean:9.5f}  {loss.sd:8.5f}  [{loss.low:.5f}, {loss.high:.5f}]",
              f"  {'train_time_s':<12}  {time.mean:9.3f}  {time.sd:8.3f}  [{time.low:.3f}, {time.high:.3f}]"]
    test = one_sample_t_test([r.final_val_loss for r in runs], target, "less")
    lines.append(f"  one-sample t-test, H1: mean val_loss < {target:g}: "
                 f"t={test.t:.3f}, df={_fmt_df(test.df)}, p={fmt_p(test.p)}")
    return lines


def comparison(attempt: list, baseline: list) -> tuple:
    """Welch's t-tests of attempt vs baseline (lines), and the speed part of the verdict."""
    times_a, times_b = [_seconds(r) for r in attempt], [_seconds(r) for r in baseline]
    diff = mean_ci(times_a).mean - mean_ci(times_b).mean
    speed = f"{abs(diff):.2f} s {'faster' if diff < 0 else 'slower'} than baseline"
    if len(attempt) < 2 or len(baseline) < 2:
        return ["note: Welch's t-test needs at least 2 runs in each group; "
                f"mean train time difference {diff:+.3f} s"], speed
    lines = ["attempt - baseline (Welch's t-test, Welch-Satterthwaite df):"]
    time = welch_t_test(times_a, times_b, "less")
    loss = welch_t_test([r.final_val_loss for r in attempt], [r.final_val_loss for r in baseline], "two-sided")
    lines += [f"  train_time_s  {time.estimate:+.3f} s, {CI_LEVEL:.0%} CI [{time.low:+.3f}, {time.high:+.3f}], "
              f"t={time.t:.3f}, df={_fmt_df(time.df)}, p={fmt_p(time.p)} (H1: attempt faster)",
              f"  val_loss      {loss.estimate:+.5f}, {CI_LEVEL:.0%} CI [{loss.low:+.5f}, {loss.high:+.5f}], "
              f"t={loss.t:.3f}, df={_fmt_df(loss.df)}, p={fmt_p(loss.p)} (H1: different)"]
    return lines, f"{speed}, p={fmt_p(time.p)}"


def loss_verdict(attempt: list, target: float) -> str | None:
    if len(attempt) < 2:
        return None
    losses = [r.final_val_loss for r in attempt]
    test = one_sample_t_test(losses, target, "less")
    n = f"over {len(attempt)} runs"
    if test.p < ALPHA:
        return f"meets {target:g} at p={fmt_p(test.p)} {n}"
    return (f"does not meet {target:g}: mean {test.estimate + target:.4f}, p={fmt_p(test.p)} {n} "
            f"(needs p < {ALPHA:g})")


def report(attempt: list, baseline: list | None, target: float = TARGET) -> list:
    """The printed report, as lines."""
    lines = group_table("attempt", attempt, target)
    if baseline:
        lines += [""] + group_table("baseline", baseline, target)
    verdict = loss_verdict(attempt, target)
    speed = None
    if baseline:
        more, speed = comparison(attempt, baseline)
        lines += [""] + more
    lines.append("")
    if verdict is None:
        lines.append("note: 1 attempt run: no t-test is possible (it needs at least 2 runs); no verdict")
    else:
        lines.append("verdict: " + verdict + (f"; {speed}" if speed else ""))
    return lines


# =============================================================================
# Plot
# =============================================================================

def _import_matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise LogError("--plot needs matplotlib: pip install matplotlib") from None
    return Figure, FigureCanvasAgg


def plot_runs(attempt: list, baseline: list | None, target: float, path, title: str = "") -> None:
    """Val loss vs train time, vs step, and the last 20% of training zoomed; attempt and baseline in two colours.

    The zoom is on train time (where each run ends and at which loss: both record criteria at once),
    or on steps if a run came from a .json summary, which has the time of its final validation only.
    """
    Figure, FigureCanvasAgg = _import_matplotlib()   # Figure + Agg canvas: no pyplot, no global backend
    fig = Figure(figsize=(16, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    by_time, by_step, zoom = fig.subplots(1, 3)
    runs = attempt + (baseline or [])
    zoom_on_time = all(ms is not None for r in runs for _, _, ms in r.val_points)
    groups = [("attempt", attempt, "tab:blue"), ("baseline", baseline or [], "tab:orange")]
    for label, group, colour in groups:
        for i, run in enumerate(group):
            legend = f"{label} ({len(group)} run{'s' if len(group) != 1 else ''})" if i == 0 else None
            style = dict(color=colour, alpha=0.6, marker=".", label=legend)
            timed = [(ms / 1000.0, loss) for _, loss, ms in run.val_points if ms is not None]
            stepped = [(s, loss) for s, loss, _ in run.val_points]
            by_time.plot(*zip(*timed), **style)
            by_step.plot(*zip(*stepped), **style)
            zoom.plot(*zip(*(timed if zoom_on_time else stepped)), **style)
    # x and y limits of the zoom: the last 20% of the longest run, and the losses reached in it
    curves = [[(ms / 1000.0 if zoom_on_time else s, loss) for s, loss, ms in r.val_points] for r in runs]
    end = max(x for curve in curves for x, _ in curve)
    late = [loss for curve in curves for x, loss in curve if x >= 0.8 * end] + [target]
    spread = max(late) - min(late) or 0.01
    zoom.set_xlim(0.8 * end, end * 1.01)
    zoom.set_ylim(min(late) - 0.1 * spread, max(late) + 0.1 * spread)
    # the first validations (loss ~11) would squash the interesting part of the other two panels
    top = min(max(loss for r in runs for _, loss, _ in r.val_points), target + 1.5)
    zoom_label = "train time (s)" if zoom_on_time else "step"
    zoom_title = "last 20% of training" + (" (train time)" if zoom_on_time else " (steps)")
    for ax, xlabel, heading in ((by_time, "train time (s)", "val loss vs train time"),
                                (by_step, "step", "val loss vs step"), (zoom, zoom_label, zoom_title)):
        ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target:g}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val loss")
        ax.set_title(heading)
        ax.grid(alpha=0.3)
        if ax is not zoom:
            ax.set_ylim(target - 0.1, top)
    by_step.legend()
    if title:
        fig.suptitle(title)
    try:
        fig.savefig(path, dpi=100)
    except ValueError as e:   # e.g. an unknown file extension
        raise LogError(f"{path}: {e}") from None


# =============================================================================
# Command line
# =============================================================================

def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Record statistics of speedrun runs: mean final val loss vs the target (one-sided "
                    "t-test), train time, and Welch's t-tests against baseline runs.",
        epilog="Files: train_speedrun.py's <run_id>.txt or .json, upstream record logs, or folders of them. "
               "--baseline takes every path after it: put the attempt's paths first. "
               "Exit 0 when the report is printed (whatever the verdict), 1 on bad input.")
    p.add_argument("attempt", nargs="+", help="the attempt's run logs or folders")
    p.add_argument("--baseline", nargs="+", metavar="LOG", help="the prior record's run logs or folders")
    p.add_argument("--target", type=float, default=TARGET, help=f"val loss to beat (default {TARGET})")
    p.add_argument("--plot", metavar="FILE.png", help="write val loss curves to this PNG (needs matplotlib)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.plot:
            _import_matplotlib()   # fail before the report, not after it
        attempt, notes = load_runs(args.attempt, "attempt")
        baseline = None
        if args.baseline:
            baseline, more = load_runs(args.baseline, "baseline")
            notes += more
            both = {Path(r.path).resolve() for r in attempt} & {Path(r.path).resolve() for r in baseline}
            if both:
                raise LogError(f"{sorted(both)[0]}: is both an attempt and a baseline run")
        name_runs(attempt + (baseline or []))
        lines = notes + report(attempt, baseline, args.target)
        print("\n".join(lines))
        if args.plot:
            plot_runs(attempt, baseline, args.target, args.plot, title=lines[-1])
            print(f"plot: {args.plot}")
    except LogError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:   # e.g. the plot's folder does not exist
        print(f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
