"""Run upstream modded-nanogpt and our train_speedrun.py on the same schedule and corpus, and compare.

  python3 benchmarks/vs_upstream.py --upstream ref/upstream68 \\
      --train_files '/tmp/corpus/fineweb_train_*.bin' --val_files '/tmp/corpus/fineweb_val_*.bin' \\
      --steps 100 --val_every 100 --side both
  python3 benchmarks/vs_upstream.py --compare logs/vs_upstream/record_steps100_val100.upstream.txt \\
      logs/vs_upstream/record_steps100_val100.ours.txt

Upstream side. The checkout (any commit with train_gpt.py and its `class Hyperparameters`) is
copied to a work folder (--work_dir) and only that copy is edited, by text substitution that stops
with one `error:` line when a line it expects is missing: the Hyperparameters fields for the
schedule, validation frequency, data paths, val token count and run id; with --steps N a break
after step N (the validation due at step N still runs, as with ours' --max_steps) and a warm-up
limited to the steps < N (--full_warmup keeps upstream's); with --compile_only a break before the
first training step. The edits are printed as a unified diff and saved beside the logs.
Upstream runs under torchrun (--nproc GPUs). Its FlashAttention 3 comes from the `kernels` package;
where that cannot load it (no package, no network) benchmarks/fa3_standin/ goes first on
PYTHONPATH (--attn auto; standin: always; fa3: never, fail instead). The stand-in reads
FA3_STANDIN_MASK (bounds|dense) and FA3_STANDIN_TABLES (graph|op) from the environment.

Our side: train_speedrun.py with the same schedule flags, data and val token count.

Schedules: --schedule record (upstream's own step counts), --schedule short (300 scheduled + 10
extension steps, validation every 50), optionally --steps N (only the first N steps) and
--val_every K. --side upstream|ours runs one side (the device allows 10 minutes per command); when
the other side's log of the same --run_id is already in --out_dir the comparison follows.

Comparison (also --compare UPSTREAM_LOG OURS_LOG, any machine):
  * per-stage step time: the mean over the stage's steps of train_time(step k+1) - train_time(k),
    from the per-step log lines of each side; the ratio ours/upstream. Stage boundaries come from
    the logs: ours prints them; upstream's are computed from the code its log starts with
    (Hyperparameters step counts and the TRAINING_STAGES durations), as upstream computes them.
  * the val loss at every step both sides validated, and the difference ours - upstream;
  * warm-up: seconds from process start to the end of the warm-up (upstream's "Resetting Model"
    line, ours' "warm-up done" line) and to the first step line, measured by this tool on each
    side's console (saved as <log stem>.timing); ours' log also states its own figure;
  * peak memory allocated/reserved (both logs print "peak memory allocated: X MiB reserved: Y MiB");
  * a plot (record_stats.plot_runs: ours as "attempt", upstream as "baseline").

Compile caches: --cache_dir (default /tmp/vs_upstream_cache) holds each side's Inductor/Triton
caches, so a later command on the same machine reuses what an earlier one compiled.
Files in --out_dir per run id: <id>.upstream.txt / <id>.ours.txt (the logs), <id>.<side>.console.log
(everything the side printed), <id>.<side>.timing (this tool's clock), <id>.upstream.diff,
<id>.comparison.log / .comparison.jsonl / .comparison.png. Errors: one line `error: ...`.
"""
import argparse
import ast
import difflib
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from itertools import accumulate
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
STANDIN_DIR = Path(__file__).resolve().parent / "fa3_standin"
OURS_SCRIPT = REPO / "train_speedrun.py"

# record #68 (upstream commit 9e53f9e3): used for --side ours without an upstream checkout
RECORD_SCHEDULE = dict(num_scheduled_iterations=1515, num_extension_iterations=40, val_loss_every=250)
SHORT_SCHEDULE = dict(num_scheduled_iterations=300, num_extension_iterations=10, val_loss_every=50)
VAL_BATCH_SIZE = 4 * 64 * 1024 * 8          # both sides' validation batch (tokens over all ranks)
DEFAULT_VAL_TOKENS = 10485760
# record #68's training batches per stage (tokens per step) and stage shares: a corpus-size estimate
RECORD_STAGE_TOKENS = (8 * 2048 * 8, 16 * 2048 * 8, 24 * 2048 * 8)
FINEWEB_MAGIC, FINEWEB_VERSION, HEADER_BYTES = 20240520, 1, 256 * 4
BOS_ID = 50256
SEPARATOR = "=" * 100                       # both logs: the code dump ends at such a line

TAG = "vs_upstream.py"


class ToolError(Exception):
    """Printed as one line: error: <message>."""


# =============================================================================
# Editing upstream's copy
# =============================================================================

FIELD_RE = r"^(?P<indent>[ \t]+)(?P<name>{name})(?P<annot>[ \t]*:[^=]*?)?[ \t]*=[ \t]*(?P<value>.*?)(?P<comment>[ \t]+#.*)?$"


def hyperparameters_block(lines: list) -> tuple:
    """(first, end) line indices of the body of `class Hyperparameters`."""
    starts = [i for i, line in enumerate(lines) if re.match(r"^class Hyperparameters\b", line)]
    if len(starts) != 1:
        raise ToolError("upstream train_gpt.py: could not find the line `class Hyperparameters` "
                        f"({'none' if not starts else len(starts)} found)")
    first = starts[0] + 1
    end = first
    while end < len(lines) and (not lines[end].strip() or lines[end][:1] in (" ", "\t")):
        end += 1
    return first, end


def find_field(lines: list, name: str) -> tuple:
    """(line index, match) of the one `    name[: type] = value` line of class Hyperparameters."""
    first, end = hyperparameters_block(lines)
    pattern = re.compile(FIELD_RE.format(name=re.escape(name)))
    hits = [(i, m) for i in range(first, end) if (m := pattern.match(lines[i]))]
    if len(hits) != 1:
        what = "no line" if not hits else f"{len(hits)} lines"
        raise ToolError(f"upstream train_gpt.py: could not find the line `{name}: ... = ...` in class "
                        f"Hyperparameters ({what}; upstream's text changed?)")
    return hits[0]


def field_value(text: str, name: str):
    """The literal value of a Hyperparameters field (int/str/...), or its source text if not literal."""
    _, m = find_field(text.splitlines(), name)
    source = m["value"]
    try:
        return _safe_eval(source)
    except ValueError:
        return source


def _safe_eval(source: str):
    """Literals and + - * / // ** of numbers (e.g. `4 * 64 * 1024 * 8`, `1/3`)."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp):
            a, b = ev(node.left), ev(node.right)
            ops = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b,
                   ast.Div: lambda: a / b, ast.FloorDiv: lambda: a // b, ast.Pow: lambda: a ** b}
            if type(node.op) in ops and isinstance(a, (int, float)) and isinstance(b, (int, float)):
                return ops[type(node.op)]()
        raise ValueError(f"not a plain number: {source!r}")
    try:
        return ev(ast.parse(source.strip(), mode="eval"))
    except SyntaxError:
        raise ValueError(f"not a plain number: {source!r}") from None


def set_fields(text: str, values: dict) -> str:
    """Replace the value of each Hyperparameters field named in `values` (a Python literal)."""
    lines = text.splitlines(keepends=True)
    for name, value in values.items():
        i, m = find_field([line.rstrip("\r\n") for line in lines], name)
        ending = lines[i][len(lines[i].rstrip("\r\n")):]
        lines[i] = (f"{m['indent']}{name}{m['annot'] or ''} = {value!r}  "
                    f"# {TAG} (upstream: {m['value'].strip()})" + ending)
    return "".join(lines)


def _insert(text: str, anchor: re.Pattern, what: str, new_lines, after: bool, hint: str = "") -> str:
    lines = text.splitlines(keepends=True)
    hits = [i for i, line in enumerate(lines) if anchor.match(line.rstrip("\r\n"))]
    if len(hits) != 1:
        raise ToolError(f"upstream train_gpt.py: could not find the line {what} "
                        f"({'no line' if not hits else f'{len(hits)} lines'}; upstream's text changed?){hint}")
    i = hits[0]
    indent = re.match(r"[ \t]*", lines[i])[0]
    block = "".join(indent + line + "\n" for line in new_lines)
    lines.insert(i + 1 if after else i, block)
    return "".join(lines)


TRAINING_SECTION = re.compile(r"^[ \t]+# -+ TRAINING SECTION -+[ \t]*$")
WARMUP_STEPS = re.compile(r"^warmup_steps = sorted\(.*$")
MODEL_BUILT = re.compile(r"^model(: nn\.Module)? = GPT\($")


def add_seed(text: str, seed: int) -> str:
    """Seed torch's generator just before upstream builds its model (upstream seeds nothing, so
    each run starts from other weights). The model is built on the CPU in the order ours builds
    it, so the same --seed gives both sides the same initial weights."""
    return _insert(text, MODEL_BUILT, "`model: nn.Module = GPT(`",
                   [f"torch.manual_seed({seed})  # {TAG}: --seed {seed}, the weights ours starts from"],
                   after=False)


def add_step_limit(text: str, steps: int, limit_warmup: bool) -> str:
    """Stop after `steps` training steps: a break just before the training section of the loop (so a
    validation due at that step still runs, like ours with --max_steps); with limit_warmup the
    warm-up replays only steps < `steps` (the graphs the shortened run uses, as ours does)."""
    text = _insert(text, TRAINING_SECTION, "`    # --------------- TRAINING SECTION -----------------`",
                   [f"if step >= {steps}:  # {TAG}: stop after {steps} steps",
                    "    break"], after=False)
    if limit_warmup:
        text = _insert(text, WARMUP_STEPS, "`warmup_steps = sorted(...)`",
                       [f"warmup_steps = [s for s in warmup_steps if s < {steps}]  "
                        f"# {TAG}: warm up only what the first {steps} steps use"], after=True,
                       hint="; --full_warmup leaves the warm-up alone")
    return text


def unified_diff(before: str, after: str, name: str = "train_gpt.py") -> str:
    return "".join(difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                        f"upstream/{name}", f"copy/{name}", n=1))


def check_upstream_checkout(path: Path) -> str:
    if not path.exists():
        raise ToolError(f"upstream checkout {path} does not exist")
    script = path / "train_gpt.py"
    if not path.is_dir() or not script.is_file():
        raise ToolError(f"{path} is not an upstream modded-nanogpt checkout (no train_gpt.py in it)")
    text = script.read_text()
    if not re.search(r"^class Hyperparameters\b", text, re.M):
        raise ToolError(f"{script} has no `class Hyperparameters`: not an upstream modded-nanogpt "
                        "train_gpt.py this tool knows how to edit")
    return text


COPY_IGNORE = shutil.ignore_patterns(".git", "logs", "records", "img", "__pycache__", "*.bin", "*.pt")


def copy_upstream(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=COPY_IGNORE, symlinks=True)


def kernel_name(text: str):
    """The get_kernel(...) name upstream loads FA3 from, or None if it does not use `kernels`."""
    m = re.search(r"get_kernel\(\s*['\"]([^'\"]+)['\"]", text)
    return m[1] if m else None


# =============================================================================
# Corpus checks
# =============================================================================

def shard_tokens(path: str) -> int:
    try:
        header = np.fromfile(path, dtype="<i4", count=256)
    except OSError as e:
        raise ToolError(f"{path}: cannot read ({e.strerror})") from None
    if header.size < 256 or header[0] != FINEWEB_MAGIC or header[1] != FINEWEB_VERSION:
        raise ToolError(f"{path}: not a FineWeb-format shard (header magic {FINEWEB_MAGIC}, version 1)")
    n = int(header[2])
    if os.path.getsize(path) < HEADER_BYTES + 2 * n:
        raise ToolError(f"{path}: truncated (header says {n:,} tokens)")
    return n


def corpus_files(pattern: str, kind: str) -> list:
    files = sorted(glob.glob(pattern))
    if not files:
        raise ToolError(f"corpus not found: no {kind} shards match {pattern!r}")
    return files


def grad_accum_for(nproc: int) -> int:
    return 8 // nproc


def max_val_tokens(val_sizes: list, nproc: int, val_batch_size: int = VAL_BATCH_SIZE) -> int:
    """The most validation tokens (a multiple of the val batch) both loaders can read: each takes
    micro-batches of val_batch_size / grad_accum tokens (+1 target) and skips a shard's tail."""
    micro = val_batch_size // grad_accum_for(nproc)
    usable = sum(max(0, (n - 2) // micro) for n in val_sizes)
    return usable // grad_accum_for(nproc) * val_batch_size


# record #68's validation loader keeps next_multiple_of_n(tokens // 300, 128) document offsets per
# micro-batch of `tokens` = val_batch_size / 8 tokens per rank: 896, one of them the leading 0
UPSTREAM_VAL_MAX_DOCS = -(-(VAL_BATCH_SIZE // 8 // 300) // 128) * 128 - 1


def max_val_documents(val_files: list, val_tokens: int, nproc: int) -> int:
    """Most BOS tokens in one validation micro-batch (per rank) over the tokens validation reads."""
    micro = VAL_BATCH_SIZE // grad_accum_for(nproc)
    per_rank = micro // nproc
    batches = val_tokens // micro
    worst = 0
    for path in val_files:
        if batches <= 0:
            break
        tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES)
        pos = 0
        while batches > 0 and pos + micro + 1 < len(tokens):
            chunk = np.asarray(tokens[pos:pos + micro])
            counts = (chunk.reshape(nproc, per_rank) == BOS_ID).sum(axis=1)
            worst = max(worst, int(counts.max()))
            pos += micro
            batches -= 1
    return worst


def tokens_needed(steps: int, scheduled: int) -> int:
    """Training tokens the first `steps` steps read (record #68's batch per stage, thirds of the
    scheduled steps, the extension at the last stage's batch)."""
    ends = [round(scheduled * k / 3) for k in (1, 2, 3)]
    total, start = 0, 0
    for end, tokens in zip(ends, RECORD_STAGE_TOKENS):
        total += max(0, min(steps, end) - start) * tokens
        start = end
    return total + max(0, steps - ends[-1]) * RECORD_STAGE_TOKENS[-1]


def check_corpus(train_glob: str, val_glob: str, nproc: int, val_tokens, steps: int, scheduled: int,
                 notes: list) -> int:
    """Fail early on what would fail minutes later on the GPU; returns the val token count to use."""
    train = corpus_files(train_glob, "train")
    val = corpus_files(val_glob, "val")
    train_sizes = [shard_tokens(p) for p in train]
    val_sizes = [shard_tokens(p) for p in val]
    if len(train) < 2:
        raise ToolError(f"upstream's loader needs at least 2 train shards (it opens the next one at the "
                        f"start), {train_glob!r} matches 1; rebuild the corpus with a smaller --shard_tokens")
    capacity = max_val_tokens(val_sizes, nproc)
    if capacity == 0:
        raise ToolError(f"the val shards {val_glob!r} hold {sum(val_sizes):,} tokens, fewer than one "
                        f"validation batch of {VAL_BATCH_SIZE:,} (+2)")
    if val_tokens is None:
        val_tokens = min(DEFAULT_VAL_TOKENS, capacity)
        if val_tokens < DEFAULT_VAL_TOKENS:
            notes.append(f"note: the val shards hold {sum(val_sizes):,} tokens: validating on {val_tokens:,} "
                         f"(upstream's {DEFAULT_VAL_TOKENS:,} would run out)")
    elif val_tokens % VAL_BATCH_SIZE or val_tokens <= 0:
        raise ToolError(f"--val_tokens {val_tokens} must be a positive multiple of {VAL_BATCH_SIZE}")
    elif val_tokens > capacity:
        raise ToolError(f"--val_tokens {val_tokens:,}: the val shards hold only {capacity:,} usable tokens")
    docs = max_val_documents(val, val_tokens, nproc)
    if docs > UPSTREAM_VAL_MAX_DOCS:
        notes.append(f"warning: a validation micro-batch holds {docs} documents; record #68's loader has room "
                     f"for {UPSTREAM_VAL_MAX_DOCS} (it would stop with an index error): join short documents "
                     "(prepare_data.py --min_doc_tokens)")
    need = tokens_needed(steps, scheduled)
    have = sum(train_sizes)
    if have < need:
        notes.append(f"warning: {steps} steps read about {need:,} training tokens; the train shards hold "
                     f"{have:,}: upstream stops with an error when its data runs out")
    return val_tokens


# =============================================================================
# Logs
# =============================================================================

STEP_LINE = re.compile(r"^step:(\d+)/(\d+) (.*)$")
FIELD = re.compile(r"(\w+):(\S+)")
PEAK_LINE = re.compile(r"^peak memory allocated: (\d+) MiB reserved: (\d+) MiB")
OURS_WARMUP = re.compile(r"^warm-up done in ([\d.]+)s \(([\d.]+)s since start\)")
OURS_SCHEDULE = re.compile(r"schedule (\[[\d\s(),\[\]]*?\]), split step")
UPSTREAM_WARMUP_END = "Resetting Model"
DURATION = re.compile(r"TrainingStage\(\s*duration\s*=\s*([^,)]+)")


def _ms(value: str) -> float:
    return float(value[:-2]) if value.endswith("ms") else float(value.rstrip("s")) * 1000.0


def parse_log(path) -> dict:
    """Step times, validations, peak memory and stage boundaries of either side's log."""
    path = Path(path)
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        raise ToolError(f"{path}: cannot read ({e.strerror})") from None
    lines = text.splitlines()
    code_end = next((i for i, line in enumerate(lines) if line.rstrip() == SEPARATOR), None)
    code = "\n".join(lines[:code_end]) if code_end is not None else ""
    data = lines[code_end + 1:] if code_end is not None else lines
    log = dict(path=str(path), kind="upstream", train_ms={}, val={}, total_steps=None, peak=None,
               warmup_s=None, since_start_s=None, boundaries=None, boundaries_from=None, stopped=None)
    for line in data:
        line = line.rstrip()
        if m := STEP_LINE.match(line):
            step, total = int(m[1]), int(m[2])
            fields = dict(FIELD.findall(m[3]))
            log["total_steps"] = total
            if "val_loss" in fields:
                log["val"][step] = float(fields["val_loss"])
            elif "train_time" in fields:
                log["train_ms"][step] = _ms(fields["train_time"])
        elif m := PEAK_LINE.match(line):
            log["peak"] = (int(m[1]), int(m[2]))
        elif m := OURS_WARMUP.match(line):
            log["kind"] = "ours"
            log["warmup_s"], log["since_start_s"] = float(m[1]), float(m[2])
        elif m := OURS_SCHEDULE.search(line):
            log["kind"] = "ours"
            log["boundaries"] = [tuple(b) for b in ast.literal_eval(m[1])]
            log["boundaries_from"] = "its log"
        elif line.startswith("summary: {"):
            log["kind"] = "ours"
        elif line.startswith("stopped by "):
            log["stopped"] = line
    if log["boundaries"] is None and code:
        try:
            log["boundaries"] = boundaries_from_code(code)
            log["boundaries_from"] = "the code its log starts with"
        except (ToolError, ValueError):
            pass
    if not log["train_ms"] and not log["val"]:
        raise ToolError(f"{path}: no step lines (`step:N/M ...`): not a training log, or the run "
                        "stopped before its first step")
    return log


def boundaries_from_code(code: str) -> list:
    """Stage (start, end) steps as upstream computes them: the scheduled steps split by the
    TRAINING_STAGES durations, then the extension steps."""
    scheduled = int(field_value(code, "num_scheduled_iterations"))
    extension = int(field_value(code, "num_extension_iterations"))
    durations = [_safe_eval(d) for d in DURATION.findall(code)]
    if not durations:
        raise ToolError("no TrainingStage(duration=...) in the code")
    ends = [0] + [round(c * scheduled) for c in accumulate(durations)]
    if ends[-1] != scheduled:
        ends.append(scheduled)
    if extension:
        ends.append(scheduled + extension)
    return list(zip(ends[:-1], ends[1:]))


def stage_names(boundaries: list, has_extension: bool = True) -> list:
    n = len(boundaries)
    return [("extension" if has_extension and i == n - 1 and n > 1 else f"stage {i + 1}") for i in range(n)]


def stage_step_times(train_ms: dict, boundaries: list) -> list:
    """Per stage: (steps timed, mean ms per step) over its steps s with train_time lines at s and
    s+1 (train_time(0) = 0: the clock starts at step 0); None for a stage the log did not reach."""
    times = dict(train_ms)
    times.setdefault(0, 0.0)
    out = []
    for start, end in boundaries:
        durations = [times[s + 1] - times[s] for s in range(start, end) if s in times and s + 1 in times]
        out.append((len(durations), sum(durations) / len(durations)) if durations else (0, None))
    return out


def load_timing(log_path) -> dict:
    """The tool's own console timing of a side (<log stem>.timing), if it ran that side."""
    path = Path(log_path).with_suffix(".timing")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def compare(up: dict, ours: dict) -> dict:
    """Numbers of the comparison (the printed table and <run id>.comparison.jsonl come from this)."""
    if up["boundaries"] and ours["boundaries"]:
        boundaries, source = ours["boundaries"], "ours: its log"
        if [tuple(b) for b in up["boundaries"]] != [tuple(b) for b in ours["boundaries"]]:
            source += f"; upstream's differ: {up['boundaries']}"
        else:
            source += f"; upstream: {up['boundaries_from']} (the same)"
    elif up["boundaries"] or ours["boundaries"]:
        side = up if up["boundaries"] else ours
        boundaries = side["boundaries"]
        source = f"{'upstream' if side is up else 'ours'}: {side['boundaries_from']} (the other log has none)"
    else:
        last = max(list(up["train_ms"]) + list(ours["train_ms"]) + [1])
        boundaries, source = [(0, last)], "neither log states them: one stage"
    names = stage_names(boundaries)
    up_stages = stage_step_times(up["train_ms"], boundaries)
    our_stages = stage_step_times(ours["train_ms"], boundaries)
    stages = []
    for name, (s, e), (nu, mu), (no, mo) in zip(names, boundaries, up_stages, our_stages):
        if nu == 0 and no == 0:
            continue
        stages.append(dict(stage=name, steps=(s, e), upstream_steps=nu, ours_steps=no, upstream_ms=mu,
                           ours_ms=mo, ratio=(mo / mu) if mu and mo is not None else None))
    common = sorted(set(up["val"]) & set(ours["val"]))
    val = [dict(step=s, upstream=up["val"][s], ours=ours["val"][s], diff=ours["val"][s] - up["val"][s])
           for s in common]
    result = dict(stages=stages, stage_boundaries=boundaries, boundaries_from=source, val=val,
                  val_only_upstream=sorted(set(up["val"]) - set(ours["val"])),
                  val_only_ours=sorted(set(ours["val"]) - set(up["val"])))
    for key, log in (("upstream", up), ("ours", ours)):
        last = max(log["train_ms"]) if log["train_ms"] else 0
        timing = load_timing(log["path"])
        result[key] = dict(log=log["path"], steps=last, train_ms=log["train_ms"].get(last, 0.0),
                           total_steps=log["total_steps"], peak_mib=log["peak"], stopped=log["stopped"],
                           warmup_end_s=timing.get("warmup_end_s"), first_step_line_s=timing.get("first_step_line_s"),
                           wall_s=timing.get("wall_s"), log_warmup_s=log["warmup_s"],
                           log_since_start_s=log["since_start_s"])
    # the whole run's mean over the steps both sides trained
    steps = min(result["upstream"]["steps"], result["ours"]["steps"])
    if steps:
        mu, mo = up["train_ms"].get(steps), ours["train_ms"].get(steps)
        result["overall"] = dict(steps=steps, upstream_ms=mu / steps if mu is not None else None,
                                 ours_ms=mo / steps if mo is not None else None)
        if mu and mo is not None:
            result["overall"]["ratio"] = mo / mu
    return result


def _f(x, fmt: str, none: str = "-") -> str:
    return none if x is None else format(x, fmt)


def format_comparison(result: dict) -> str:
    out = []
    up, ours = result["upstream"], result["ours"]
    out.append(f"upstream log: {up['log']}")
    out.append(f"ours log:     {ours['log']}")
    out.append(f"stage boundaries {result['stage_boundaries']} ({result['boundaries_from']})")
    out.append("per-stage step time: mean of train_time(k+1) - train_time(k) over the stage's steps")
    out.append(f"  {'stage':<10} {'steps (timed)':>16} {'upstream ms':>12} {'ours ms':>9} {'ours/upstream':>14}")
    for s in result["stages"]:
        span = f"{s['steps'][0]}-{s['steps'][1]}"
        counted = (f"{s['upstream_steps']}" if s["upstream_steps"] == s["ours_steps"]
                   else f"{s['upstream_steps']}/{s['ours_steps']}")
        out.append(f"  {s['stage']:<10} {span + ' (' + counted + ')':>16} {_f(s['upstream_ms'], '.2f'):>12} "
                   f"{_f(s['ours_ms'], '.2f'):>9} {_f(s['ratio'], '.3f'):>14}")
    if "overall" in result:
        o = result["overall"]
        out.append(f"  {'all':<10} {'0-' + str(o['steps']):>16} {_f(o['upstream_ms'], '.2f'):>12} "
                   f"{_f(o['ours_ms'], '.2f'):>9} {_f(o.get('ratio'), '.3f'):>14}")
    out.append("validation loss at the steps both validated:")
    if result["val"]:
        out.append(f"  {'step':>6} {'upstream':>9} {'ours':>9} {'ours-upstream':>14}")
        for v in result["val"]:
            out.append(f"  {v['step']:>6} {v['upstream']:>9.4f} {v['ours']:>9.4f} {v['diff']:>+14.4f}")
    else:
        out.append("  (none in common)")
    for key in ("val_only_upstream", "val_only_ours"):
        if result[key]:
            out.append(f"  only {key[9:]}: steps {result[key]}")
    out.append("train time (last step line): "
               f"upstream {up['train_ms'] / 1000:.1f} s over {up['steps']} steps, "
               f"ours {ours['train_ms'] / 1000:.1f} s over {ours['steps']} steps")
    out.append("warm-up, process start -> end of warm-up (upstream 'Resetting Model', ours 'warm-up done'; "
               "measured by vs_upstream.py on the console):")
    for key, side in (("upstream", up), ("ours", ours)):
        parts = []
        if side["warmup_end_s"] is not None:
            parts.append(f"{side['warmup_end_s']:.1f} s")
        if side["first_step_line_s"] is not None:
            parts.append(f"first step line at {side['first_step_line_s']:.1f} s")
        if side["log_since_start_s"] is not None:
            parts.append(f"its log: warm-up {side['log_warmup_s']:.1f} s, {side['log_since_start_s']:.1f} s "
                         "after its main() started")
        out.append(f"  {key:<9} " + ("; ".join(parts) if parts else "n/a (not run by this tool; its log has no timestamps)"))
    peaks = [side["peak_mib"] for side in (up, ours)]
    text = ", ".join(f"{key} {p[0]} MiB allocated / {p[1]} MiB reserved" if p else f"{key} n/a"
                     for key, p in zip(("upstream", "ours"), peaks))
    if all(peaks):
        text += f" (ours/upstream allocated {peaks[1][0] / peaks[0][0]:.3f})"
    out.append("peak memory: " + text)
    for key, side in (("upstream", up), ("ours", ours)):
        if side["stopped"]:
            out.append(f"{key}: {side['stopped']}")
    return "\n".join(out)


def write_plot(up_log: str, our_log: str, path: Path, result: dict) -> str:
    """record_stats.plot_runs (ours = attempt, upstream = baseline); a small fallback without it."""
    sys.path.insert(0, str(REPO))
    # record_stats draws its "target" line and starts the y axis 0.1 below it: the lower of the two
    # last common val losses keeps both curves in view
    last = result["val"][-1] if result["val"] else None
    reference = min(last["upstream"], last["ours"]) if last else None
    title = "ours (attempt) vs upstream (baseline); dashed: the lower last common val loss"
    try:
        import record_stats
        runs = [record_stats.parse_log(our_log), record_stats.parse_log(up_log)]
        target = reference if reference is not None else min(r.val_points[-1][1] for r in runs)
        record_stats.plot_runs([runs[0]], [runs[1]], target, str(path), title=title)
        return f"plot: {path} (record_stats.plot_runs)"
    except ImportError as e:
        if getattr(e, "name", None) not in (None, "record_stats"):
            return f"plot skipped: {e}"
    except Exception as e:    # noqa: BLE001 - a plot must not hide the comparison printed above
        return f"plot skipped: record_stats could not plot these logs ({type(e).__name__}: {e})"
    return _fallback_plot(up_log, our_log, path, title)


def _fallback_plot(up_log: str, our_log: str, path: Path, title: str) -> str:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return "plot skipped: no record_stats.py and no matplotlib"
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for label, log_path in (("ours", our_log), ("upstream", up_log)):
        val = parse_log(log_path)["val"]
        ax.plot(list(val), list(val.values()), marker=".", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("val loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    return f"plot: {path} (fallback: record_stats.py not importable)"


# =============================================================================
# Running a side
# =============================================================================

def fa3_loads(python: str, name: str, timeout: int = 180) -> bool:
    """Whether `kernels.get_kernel(name)` works here without the stand-in (offline: cache only)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1")
    try:
        r = subprocess.run([python, "-c", f"from kernels import get_kernel; get_kernel({name!r})"],
                           env=env, capture_output=True, timeout=timeout, cwd="/")
    except subprocess.TimeoutExpired:
        return False
    return r.returncode == 0


def gpu_count() -> int:
    """CUDA devices torch sees, asked in a child process: this one holds no CUDA state while the
    sides train."""
    code = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        return int(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else 0
    except (subprocess.TimeoutExpired, ValueError, IndexError):
        return 0


class Deadline:
    def __init__(self, seconds):
        self.end = None if not seconds else time.monotonic() + seconds

    def left(self):
        return None if self.end is None else self.end - time.monotonic()


def run_side(name: str, cmd: list, cwd: Path, env: dict, log_path: Path, warmup_marker: str,
             deadline: Deadline, echo_every: int = 50) -> dict:
    """Run one side, echo its console (training step lines thinned), time its milestones from
    process start (saved to <log stem>.timing as they happen), stop it at the deadline."""
    console_path = log_path.with_suffix(".console.log")
    timing_path = log_path.with_suffix(".timing")
    timing = dict(side=name, command=shlex.join(cmd), cwd=str(cwd), warmup_end_s=None, first_step_line_s=None)
    timing_path.write_text(json.dumps(timing, indent=1))
    print(f"=== {name}: {shlex.join(cmd)}  (in {cwd})", flush=True)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, errors="replace", start_new_session=True)
    timed_out = False

    def stop():
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    watchdog = None
    if deadline.left() is not None:
        def expire():
            nonlocal timed_out
            timed_out = True
            stop()
        watchdog = threading.Timer(max(0.0, deadline.left()), expire)
        watchdog.daemon = True
        watchdog.start()
    try:
        with open(console_path, "w") as console:
            for line in proc.stdout:
                now = time.monotonic() - start
                console.write(line)
                console.flush()
                changed = False
                if timing["warmup_end_s"] is None and warmup_marker in line:
                    timing["warmup_end_s"], changed = round(now, 2), True
                m = STEP_LINE.match(line)
                if m and timing["first_step_line_s"] is None:
                    timing["first_step_line_s"], changed = round(now, 2), True
                if changed:
                    timing_path.write_text(json.dumps(timing, indent=1))
                quiet = m and "val_loss" not in line and int(m[1]) % echo_every != 0
                if not quiet:
                    print(f"[{name} {now:7.1f}s] {line.rstrip()}", flush=True)
        proc.wait()
    except KeyboardInterrupt:
        stop()
        raise
    finally:
        if watchdog:
            watchdog.cancel()
    timing.update(wall_s=round(time.monotonic() - start, 2), returncode=proc.returncode, timed_out=timed_out)
    timing_path.write_text(json.dumps(timing, indent=1))
    return timing


# torchrun's own report of a failed worker (an elastic log line, then its traceback and a summary)
TORCHRUN_TRAILER = re.compile(r"^[EWI]\d{4} .*torch/distributed/elastic/|ChildFailedError")


def tail(path: Path, n: int = 25, drop_torchrun: bool = False) -> str:
    """The last n lines; drop_torchrun: those before torchrun's failure report (the worker's own
    error is above it)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    if drop_torchrun:
        cut = next((i for i, line in enumerate(lines) if TORCHRUN_TRAILER.search(line)), len(lines))
        lines = lines[:cut] or lines
    return "\n".join("    " + line for line in lines[-n:])


def side_failed(name: str, timing: dict, log_path: Path, limit) -> ToolError:
    """Print the end of the side's log and of its console (a traceback goes only to the console),
    and return the one-line error."""
    console = log_path.with_suffix(".console.log")
    if log_path.exists():
        print(f"--- last lines of {log_path}:\n{tail(log_path, 12)}", file=sys.stderr)
    print(f"--- last lines of its console output ({console}; torchrun's failure report left out):\n"
          f"{tail(console, 25, drop_torchrun=True)}", file=sys.stderr)
    if timing.get("timed_out"):
        return ToolError(f"{name} side stopped at the --time_limit of {limit} s (caches kept; run it again "
                         f"to continue from them); its log: {log_path}")
    return ToolError(f"{name} side failed (exit status {timing['returncode']}); its log: {log_path}")


# =============================================================================
# Command line
# =============================================================================

def parse_args(argv):
    p = argparse.ArgumentParser(description="Upstream modded-nanogpt vs train_speedrun.py: same schedule, "
                                "same corpus, step times, val losses, warm-up, memory.")
    p.add_argument("--upstream", metavar="PATH", help="upstream modded-nanogpt checkout (any commit)")
    p.add_argument("--train_files", metavar="GLOB", help="FineWeb-format train shards")
    p.add_argument("--val_files", metavar="GLOB", help="FineWeb-format val shards")
    p.add_argument("--schedule", choices=("record", "short"), default="record",
                   help="record: upstream's own step counts; short: 300 scheduled + 10 extension, val every 50")
    p.add_argument("--steps", type=int, help="run only the first N steps of the schedule")
    p.add_argument("--val_every", type=int, help="validate every K steps (0: only at the end)")
    p.add_argument("--val_tokens", type=int,
                   help=f"validation tokens (default {DEFAULT_VAL_TOKENS:,}, or what the val shards hold)")
    p.add_argument("--side", choices=("both", "upstream", "ours"), default="both")
    p.add_argument("--compare", nargs=2, metavar=("UPSTREAM_LOG", "OURS_LOG"),
                   help="only compare two existing logs")
    p.add_argument("--nproc", type=int, default=1, help="GPUs per side (torchrun; 1, 2, 4 or 8)")
    p.add_argument("--attn", choices=("auto", "standin", "fa3"), default="auto",
                   help="upstream's FA3: auto = the `kernels` package if it loads, else the FlexAttention "
                        "stand-in; standin = always the stand-in; fa3 = never the stand-in")
    p.add_argument("--full_warmup", action="store_true",
                   help="with --steps: keep upstream's warm-up of every stage (default: steps < N only)")
    p.add_argument("--compile_only", action="store_true",
                   help="upstream only: its full warm-up (fills --cache_dir), then stop before training")
    p.add_argument("--run_id", help="log names <run_id>.upstream.txt / <run_id>.ours.txt "
                   "(default from the schedule: record, short, record_steps100, ...)")
    p.add_argument("--out_dir", help="logs, diff, comparison, plot (default logs/vs_upstream; "
                                      "with --compare: the folder of OURS_LOG)")
    p.add_argument("--work_dir", default="/tmp/vs_upstream_work", help="where upstream's copy is made")
    p.add_argument("--cache_dir", default="/tmp/vs_upstream_cache",
                   help="compile caches (<dir>/upstream, <dir>/ours) kept for later commands")
    p.add_argument("--seed", type=int, help="both sides start from the same weights: upstream's copy seeds torch "
                   "with it before building its model, ours gets --seed (default: upstream unseeded, ours 0)")
    p.add_argument("--ours_args", default="", help="extra train_speedrun.py flags, e.g. '--attn flex'")
    p.add_argument("--time_limit", type=float, help="stop a side still running this many seconds after "
                   "this tool started (its caches stay; the comparison of what ran is still printed)")
    p.add_argument("--dry_run", action="store_true", help="prepare and print the edits and commands; run nothing")
    return p.parse_args(argv)


def resolve_schedule(args, upstream_text) -> dict:
    if args.schedule == "short":
        sched = dict(SHORT_SCHEDULE)
    elif upstream_text is not None:
        sched = {k: int(field_value(upstream_text, k)) for k in RECORD_SCHEDULE}
    else:
        sched = dict(RECORD_SCHEDULE)
    if args.val_every is not None:
        sched["val_loss_every"] = args.val_every
    return sched


def default_run_id(args) -> str:
    run_id = args.schedule
    if args.steps:
        run_id += f"_steps{args.steps}"
    if args.val_every is not None:
        run_id += f"_val{args.val_every}"
    if args.seed is not None:
        run_id += f"_seed{args.seed}"
    return run_id + ("_compile" if args.compile_only else "")


def validate_args(args):
    if args.compare:
        return
    if args.nproc not in (1, 2, 4, 8):
        raise ToolError(f"--nproc {args.nproc}: upstream splits 8 micro-batches over the GPUs: 1, 2, 4 or 8")
    if args.steps is not None and args.steps < 1:
        raise ToolError(f"--steps {args.steps}: give N >= 1")
    if args.val_every is not None and args.val_every < 0:
        raise ToolError(f"--val_every {args.val_every}: give K >= 0")
    if args.compile_only and args.side != "upstream":
        raise ToolError("--compile_only is for --side upstream (ours has no compile-only mode; its cold start "
                        "compiles the later stages in parallel)")
    if args.compile_only and args.steps:
        raise ToolError("--compile_only and --steps exclude each other")
    if args.side in ("both", "upstream") and not args.upstream:
        raise ToolError("--upstream PATH is needed to run the upstream side")
    if not args.train_files or not args.val_files:
        raise ToolError("--train_files and --val_files are needed to run a side")
    if args.run_id and (not re.fullmatch(r"[A-Za-z0-9_.+-]+", args.run_id) or len(args.run_id) > 150):
        raise ToolError(f"--run_id {args.run_id!r}: letters, digits and _ . + - only")


def upstream_edits(text: str, args, sched: dict, val_tokens: int, run_id: str) -> str:
    values = dict(train_files=os.path.abspath(args.train_files), val_files=os.path.abspath(args.val_files))
    for key in ("num_scheduled_iterations", "num_extension_iterations", "val_loss_every"):
        if field_value(text, key) != sched[key]:
            values[key] = sched[key]
    if field_value(text, "val_tokens") != val_tokens:
        values["val_tokens"] = val_tokens
    values["run_id"] = run_id
    edited = set_fields(text, values)
    if args.seed is not None:
        edited = add_seed(edited, args.seed)
    if args.compile_only:
        edited = add_step_limit(edited, 0, limit_warmup=False)
    elif args.steps:
        edited = add_step_limit(edited, args.steps, limit_warmup=not args.full_warmup)
    return edited


def print_comparison(up_log: Path, our_log: Path, out_dir: Path, stem: str) -> None:
    up, ours = parse_log(up_log), parse_log(our_log)
    result = compare(up, ours)
    print(f"=== comparison ({stem})")
    text = format_comparison(result)
    print(text)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.comparison.log").write_text(text + "\n")
    (out_dir / f"{stem}.comparison.jsonl").write_text(json.dumps(result, default=list) + "\n")
    print(write_plot(str(up_log), str(our_log), out_dir / f"{stem}.comparison.png", result))


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    try:
        if args.compare:
            up_log, our_log = map(Path, args.compare)
            for p in (up_log, our_log):
                if not p.is_file():
                    raise ToolError(f"log {p} not found")
            stem = re.sub(r"(\.ours)?\.txt$", "", our_log.name)
            print_comparison(up_log, our_log, Path(args.out_dir) if args.out_dir else our_log.parent, stem)
            return 0
        return run(args, started)
    except ToolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def run(args, started: float) -> int:
    validate_args(args)
    notes = []
    upstream_text = None
    if args.upstream:
        upstream_text = check_upstream_checkout(Path(args.upstream))
    sched = resolve_schedule(args, upstream_text)
    total = sched["num_scheduled_iterations"] + sched["num_extension_iterations"]
    steps = min(args.steps or total, total)
    val_tokens = check_corpus(args.train_files, args.val_files, args.nproc, args.val_tokens, steps,
                              sched["num_scheduled_iterations"], notes)
    for note in notes:
        print(note)
    run_id = args.run_id or default_run_id(args)
    out_dir = Path(args.out_dir or REPO / "logs" / "vs_upstream").resolve()
    cache = Path(args.cache_dir).resolve()
    up_log, our_log = out_dir / f"{run_id}.upstream.txt", out_dir / f"{run_id}.ours.txt"
    print(f"schedule: {sched['num_scheduled_iterations']} scheduled + {sched['num_extension_iterations']} "
          f"extension steps, val every {sched['val_loss_every']}"
          + (f", stop after {steps} steps" if args.steps else "") + f"; val tokens {val_tokens:,}; "
          f"{args.nproc} GPU(s) per side; run id {run_id}")

    if not args.dry_run:
        gpus = gpu_count()
        if gpus < args.nproc:
            raise ToolError("no CUDA GPU here (torch.cuda.is_available() is False): both sides train on "
                            "GPUs; --compare and --dry_run work without one" if gpus == 0 else
                            f"--nproc {args.nproc} but {gpus} GPU(s) visible")
    plans = []
    if args.side in ("both", "upstream"):
        edited = upstream_edits(upstream_text, args, sched, val_tokens, f"{run_id}.upstream")
        diff = unified_diff(upstream_text, edited)
        print(f"=== edits to upstream's copy of train_gpt.py:\n{diff}", end="" if diff.endswith("\n") else "\n")
        copy = Path(args.work_dir).resolve() / "upstream"
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   TORCHINDUCTOR_CACHE_DIR=str(cache / "upstream" / "inductor"),
                   TRITON_CACHE_DIR=str(cache / "upstream" / "triton"))
        name = kernel_name(upstream_text)
        if name is None:
            print("attention: upstream does not load kernels through `kernels`; --attn does not apply")
        else:
            use_standin = args.attn == "standin"
            if args.attn != "standin" and not args.dry_run:
                loads = fa3_loads(sys.executable, name)
                if args.attn == "fa3" and not loads:
                    raise ToolError(f"--attn fa3: `from kernels import get_kernel; get_kernel({name!r})` fails here")
                use_standin = not loads
            elif args.attn == "auto":
                use_standin = True          # dry run: assume the stand-in, the usual case offline
            if use_standin:
                env["PYTHONPATH"] = os.pathsep.join([str(STANDIN_DIR)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
            print(f"attention: {'FlexAttention stand-in (' + str(STANDIN_DIR) + ')' if use_standin else 'kernels: ' + name}")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "train_gpt.py"]
        plans.append(("upstream", cmd, copy, env, up_log, UPSTREAM_WARMUP_END,
                      dict(edited=edited, diff=diff, src=Path(args.upstream))))
    if args.side in ("both", "ours"):
        flags = ["--train_files", os.path.abspath(args.train_files), "--val_files", os.path.abspath(args.val_files),
                 "--num_scheduled_iterations", str(sched["num_scheduled_iterations"]),
                 "--num_extension_iterations", str(sched["num_extension_iterations"]),
                 "--val_loss_every", str(sched["val_loss_every"]), "--val_tokens", str(val_tokens),
                 "--log_dir", str(out_dir), "--run_id", f"{run_id}.ours", "--compile_cache", str(cache / "ours")]
        if args.steps:
            flags += ["--max_steps", str(args.steps)]
        if args.seed is not None:
            flags += ["--seed", str(args.seed)]
        flags += shlex.split(args.ours_args)
        if args.nproc == 1:
            cmd = [sys.executable, str(OURS_SCRIPT)] + flags
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={args.nproc}", str(OURS_SCRIPT)] + flags
        plans.append(("ours", cmd, REPO, dict(os.environ, PYTHONUNBUFFERED="1"), our_log, "warm-up done", None))

    if args.dry_run:
        for name, cmd, cwd, *_ in plans:
            print(f"would run {name}: {shlex.join(cmd)}  (in {cwd})")
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    deadline = Deadline(args.time_limit - (time.monotonic() - started) if args.time_limit else None)
    for name, cmd, cwd, env, log_path, marker, extra in plans:
        if log_path.exists():
            log_path.unlink()          # both sides append to their log: start it fresh
        if extra is not None:          # upstream: make the copy; its logs/ is our out_dir
            copy_upstream(extra["src"], cwd)
            (cwd / "train_gpt.py").write_text(extra["edited"])
            (out_dir / f"{run_id}.upstream.diff").write_text(extra["diff"])
            if (cwd / "logs").exists() or (cwd / "logs").is_symlink():
                (cwd / "logs").unlink() if (cwd / "logs").is_symlink() else shutil.rmtree(cwd / "logs")
            (cwd / "logs").symlink_to(out_dir, target_is_directory=True)
            for sub in ("inductor", "triton"):
                (cache / "upstream" / sub).mkdir(parents=True, exist_ok=True)
        timing = run_side(name, cmd, cwd, env, log_path, marker, deadline)
        if timing["returncode"] != 0 or timing["timed_out"]:
            raise side_failed(name, timing, log_path, args.time_limit)
        print(f"=== {name} done in {timing['wall_s']:.1f} s; log {log_path}")
    if args.compile_only:
        print(f"compile-only run: upstream's graphs for this schedule are in {cache / 'upstream'}; "
              "the same command without --compile_only now starts from them")
    elif up_log.exists() and our_log.exists():
        print_comparison(up_log, our_log, out_dir, run_id)
    elif args.side != "both":
        other = our_log if args.side == "upstream" else up_log
        print(f"no comparison yet: {other} does not exist (run --side "
              f"{'ours' if args.side == 'upstream' else 'upstream'} with the same --run_id and --out_dir)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
