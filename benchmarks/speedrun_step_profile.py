"""Where does a speedrun training step spend its time? Stage-1 shapes only (no full warm-up).

Prints, per step: data loading of 8 micro-batches, forward+backward of the micro-batches, and the
optimizer step, each timed with a device sync around it; then torch.profiler tables of two steps.
Usage: python benchmarks/speedrun_step_profile.py [train_speedrun.py options]
"""
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_speedrun as T  # noqa: E402


def main(argv):
    parser = T.build_arg_parser(prog="speedrun_step_profile.py", description=__doc__.split("\n")[0] +
                                " Takes train_speedrun.py's options.")
    args = T.parse_args(argv, parser)
    env = T.init_distributed(args.device)
    run = T.build_training_run(args, env)
    cfg, model, opt, sched, stage = run.cfg, run.model, run.optimizer, run.schedule, run.stage
    loader = T.training_loader(args, env, stage.batch_size, run.raw_model)
    cuda = env.device.type == "cuda"

    def timed(fn):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t) * 1e3

    def one_step(step):
        stage.advance(step)
        T.train_step(model, loader, stage, env, opt)
        T.optimizer_step(opt, sched, step, args, run.raw_model)

    print(f"compile mode {cfg.compile_mode}, attention {cfg.attn_backend}, fp8 {cfg.use_fp8}")
    print(f"first 3 steps (compile): {timed(lambda: [one_step(s) for s in range(3)]) / 1e3:.1f} s, "
          f"{T.compiled_graph_count()} graphs")
    for step in range(3, 9):
        stage.advance(step)
        t_data = timed(lambda: [loader.next_batch(stage.batch_size, stage.max_seq_len)
                                for _ in range(env.grad_accum_steps)])
        t_fb = timed(lambda: T.train_step(model, loader, stage, env, opt))
        t_opt = timed(lambda: T.optimizer_step(opt, sched, step, args, run.raw_model))
        t_all = timed(lambda: one_step(step))
        print(f"step {step}: data x{env.grad_accum_steps} {t_data:.1f} ms | fwd+bwd x{env.grad_accum_steps} "
              f"{t_fb:.1f} ms | optimizer {t_opt:.1f} ms | whole step {t_all:.1f} ms")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for step in range(9, 11):
            one_step(step)
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    if cuda:
        print(events.table(sort_by="self_cuda_time_total", row_limit=22, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=60))


if __name__ == "__main__":
    main(sys.argv[1:])
