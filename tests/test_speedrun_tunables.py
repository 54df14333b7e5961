"""A record attempt edits the "what you tune" block of train_speedrun.py: each change below is made
there alone (here by monkeypatching that one object) and must reach the run that main builds
(build_training_run), which then trains a step on CPU."""
import pytest
import torch

import train_speedrun as ts


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return ts.write_synthetic_corpus(tmp_path_factory.mktemp("corpus"), seed=2)


def smoke_run(corpus):
    """What main builds for `--smoke --device cpu`, and one training step of it."""
    train_glob, val_glob = corpus
    args = ts.parse_args(["--smoke", "--device", "cpu", "--train_files", train_glob, "--val_files", val_glob])
    run = ts.build_training_run(args, ts.init_distributed("cpu"))
    return args, run


def one_step(args, run, step=0):
    run.stage.advance(step)
    loader = ts.BosAlignedLoader(args.train_files, run.stage.batch_size, args.train_max_seq_len, 8)
    loss = ts.train_step(run.model, loader, run.stage, ts.init_distributed("cpu"))
    ts.optimizer_step(run.optimizer, run.schedule, step, args)
    assert torch.isfinite(loss)
    return loss


def test_window_schedule_is_the_stage_table(corpus, monkeypatch):
    windows = [(2, 4), (2, 6), (4, 8), (4, 10)]
    table = [dict(row, windows=w) for row, w in zip(ts.STAGE_TABLE, windows)]
    monkeypatch.setattr(ts, "STAGE_TABLE", table)
    monkeypatch.setattr(ts, "FINAL_WINDOW_BLOCKS", 12)
    args, run = smoke_run(corpus)
    seen = []
    for step in range(run.schedule.total_steps):
        run.stage.advance(step)
        config = run.stage.forward_config()
        seen.append((config.ws_short // ts.WINDOW_BLOCK, config.ws_long // ts.WINDOW_BLOCK))
    expected = [windows[run.schedule.stage_index(s)] for s in range(run.schedule.total_steps)]
    assert seen == expected and len(set(seen)) == 4
    run.stage.use_final_window()
    assert run.stage.forward_config().ws_long == 12 * ts.WINDOW_BLOCK
    # the model sees them: its attention plan for a step of stage 3 uses the new windows
    run.stage.reset()
    step = run.schedule.boundaries[2][0]
    for s in range(step + 1):
        run.stage.advance(s)
    plan = run.raw_model.plan_attention(torch.tensor([0, 256], dtype=torch.int32), 256, run.stage.forward_config())
    assert {kind.window for kind in plan.kinds.values()} == {4 * ts.WINDOW_BLOCK, 8 * ts.WINDOW_BLOCK}
    run.stage.reset()
    one_step(args, run)


def test_a_learning_rate_is_one_number(corpus, monkeypatch):
    args, run = smoke_run(corpus)
    before = {p.label: p.detach().clone() for p in run.raw_model.parameters()}
    base_loss = one_step(args, run)
    base_change = {k: (p.detach() - before[k]).float().norm() for k, p in
                   ((p.label, p) for p in run.raw_model.parameters())}

    monkeypatch.setattr(ts, "NORMUON_DEFAULTS", dict(ts.NORMUON_DEFAULTS, lr=0.1))
    args, run = smoke_run(corpus)
    assert {cfg.label: cfg.initial_lr for cfg in run.optimizer.settings.values() if cfg.optim == "normuon"} \
        == {"attn": 0.1, "mlp": 0.1}
    assert all(cfg.initial_lr == ts.ADAM_DEFAULTS["lr"] for cfg in run.optimizer.settings.values()
               if cfg.optim == "adam")
    loss = one_step(args, run)
    assert loss == base_loss                       # same start, same batch: only the update differs
    change = {p.label: (p.detach() - before[p.label]).float().norm() for p in run.raw_model.parameters()}
    assert change["attn"] > 2 * base_change["attn"]           # 0.1 against 0.023
    assert change["mlp"] > 2 * base_change["mlp"]
    assert change["scalars"] == base_change["scalars"]       # Adam's rate did not move
