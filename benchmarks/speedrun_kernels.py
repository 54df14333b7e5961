"""Milliseconds per call of each Triton path of train_speedrun.py against its plain PyTorch
reference, at the record's shapes (one micro-batch of --tokens), on the current CUDA device.
With --before PATH: the same cases for an older train_speedrun.py too, interleaved in one process,
and the ratio after/before per case (kernel-only records: is the new version faster?).

Usage: python3 benchmarks/speedrun_kernels.py [--tokens 16384] [--before OLD/train_speedrun.py]
"""
import argparse
import importlib.util
import inspect
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # prepare_data, imported by every train_speedrun.py


def load_trainer(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module          # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def ms_per_call(fn, reps: int = 20) -> float:
    fn()  # JIT-compile / autotune outside the timing
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def kernel_cases(T, tokens: int) -> dict:
    """name -> a closure running that op of trainer module T (forward, and backward where the
    op has one). Only entry points every version since record #68 has."""
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device=dev, generator=gen) * scale).bfloat16()

    x = randn(tokens, 768).requires_grad_()
    w_fc, w_proj = randn(3072, 768, scale=0.02).requires_grad_(), randn(3072, 768, scale=0.02).requires_grad_()
    w_head = randn(768, 50304, scale=0.02).requires_grad_()
    targets = torch.randint(0, 50257, (tokens,), device=dev)
    mtp = torch.tensor([1.0, 0.5, 0.25], device=dev)
    use_fp8 = T.fp8_supported(dev)
    attn_bank, qk_bank, mlp_bank = randn(40, 768, 768), randn(64, 256, 768), randn(24, 3072, 768)
    logits = randn(tokens, 50304, scale=3.0)
    embed, lm_head = randn(50304, 768), randn(768, 50304)
    copy_into = getattr(T, "transpose_copy_", lambda dst, src: dst.copy_(src.T))     # before #74: copy_
    add_into = getattr(T, "transpose_add_", lambda dst, src: dst.add_(src.T))
    scales = (T.LM_HEAD_X_SCALE, T.LM_HEAD_W_SCALE, T.LM_HEAD_GRAD_SCALE, use_fp8)
    if hasattr(T, "softcapped_mtp_loss_sum"):   # record #79 on: loss and logits gradient in one kernel
        loss = lambda: T.softcapped_mtp_loss_sum(x, targets, mtp, w_head, *scales).backward()
        ce_kernels = lambda **kw: T._softcapped_ce_fwd_bwd_triton(logits, targets, mtp, 1.0,
                                                                  torch.float8_e5m2, **kw)
    else:
        loss = lambda: T.softcapped_mtp_loss(x, targets, mtp, w_head, *scales).sum().backward()

        def ce_kernels():
            losses, lse = T._softcapped_ce_forward_triton(logits, targets, mtp)
            T._softcapped_ce_backward_triton(torch.ones_like(losses), logits, lse, targets, mtp,
                                             1.0, torch.float8_e5m2)
    cases = {
        "polar_express attn (40,768,768)": lambda: T.polar_express(attn_bank),
        "polar_express qk blocks (64,256,768)": lambda: T.polar_express(qk_bank),
        "polar_express mlp (24,3072,768)": lambda: T.polar_express(mlp_bank, split_baddbmm=True),
        "relu_square_mlp fwd+bwd": lambda: T.relu_square_mlp(x, w_fc, w_proj).sum().backward(),
        f"softcapped_mtp_loss fwd+bwd (fp8={use_fp8})": loss,
        "ce loss + logits gradient kernels (e5m2)": ce_kernels,
        "tied embed <- lm_head^T": lambda: copy_into(embed, lm_head),
        "lm_head grad += embed grad^T": lambda: add_into(lm_head, embed),
    }
    if "use_fp8" in inspect.signature(T.relu_square_mlp).parameters:   # record #84 on
        cases[f"relu_square_mlp fwd+bwd, fp8 forward={use_fp8}"] = (
            lambda: T.relu_square_mlp(x, w_fc, w_proj, use_fp8).sum().backward())
    if hasattr(T, "_softcapped_ce_fwd_bwd_triton"):   # launch settings of the fused kernel
        for block, warps, per_sm in [(1024, 4, 4), (1024, 4, 64), (2048, 8, 2), (2048, 8, 4),
                                     (4096, 8, 2), (4096, 16, 1), (8192, 16, 1), (8192, 8, 2)]:
            cases[f"  fused ce: block {block}, {warps} warps, {per_sm} per SM"] = (
                lambda b=block, w=warps, p=per_sm: ce_kernels(block=b, num_warps=w, programs_per_sm=p))
    return cases


def triton_vs_reference(T, tokens: int) -> dict:
    results, saved = {}, T.USE_TRITON_KERNELS
    try:
        for name, fn in kernel_cases(T, tokens).items():
            T.USE_TRITON_KERNELS = True
            fast = ms_per_call(fn)
            T.USE_TRITON_KERNELS = False
            slow = ms_per_call(fn)
            results[name] = (fast, slow)
            print(f"{name:50s} triton {fast:8.3f} ms   reference {slow:8.3f} ms   ({slow / fast:.2f}x)")
    finally:
        T.USE_TRITON_KERNELS = saved
    return results


def before_vs_after(before, after, tokens: int, rounds: int = 3) -> dict:
    """Each case timed `rounds` times per version, alternating; the best of each is compared."""
    cases = {"before": kernel_cases(before, tokens), "after": kernel_cases(after, tokens)}
    best = {side: {name: float("inf") for name in cases[side]} for side in cases}
    for _ in range(rounds):
        for side in ("before", "after"):
            for name, fn in cases[side].items():
                best[side][name] = min(best[side][name], ms_per_call(fn))
    for name in cases["after"]:
        a = best["after"][name]
        if name not in best["before"]:   # a case only the new version has
            print(f"{name:50s} before      n/a      after {a:8.3f} ms")
            continue
        b = best["before"][name]
        print(f"{name:50s} before {b:8.3f} ms   after {a:8.3f} ms   after/before {a / b:.3f}")
    return best


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--tokens", type=int, default=16384, help="tokens of one micro-batch (default 16384)")
    parser.add_argument("--before", type=Path, help="an older train_speedrun.py to compare with")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: the kernel benchmark needs a CUDA GPU (the references alone run in the CPU tests)")
    if args.before is not None and not args.before.is_file():
        raise SystemExit(f"error: --before {args.before}: no such file (give a train_speedrun.py, e.g. "
                         f"`git show COMMIT:train_speedrun.py > old.py`)")
    after = load_trainer(REPO / "train_speedrun.py", "speedrun_after")
    if args.before is None:
        return triton_vs_reference(after, args.tokens)
    return before_vs_after(load_trainer(args.before, "speedrun_before"), after, args.tokens)


if __name__ == "__main__":
    main()
