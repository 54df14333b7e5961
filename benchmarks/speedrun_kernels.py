"""Milliseconds per call of each Triton path of train_speedrun.py against its plain PyTorch
reference, at the record's shapes (one micro-batch of --tokens), on the current CUDA device.

Usage: python benchmarks/speedrun_kernels.py [--tokens 16384]
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_speedrun as T  # noqa: E402


def ms_per_call(fn, reps: int = 10) -> float:
    fn()  # JIT-compile / autotune outside the timing
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def kernel_cases(tokens: int) -> dict:
    """name -> a closure running that op (forward, and backward where the op has one)."""
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
    attn_bank, mlp_bank = randn(40, 768, 768), randn(24, 3072, 768)
    return {
        "polar_express attn (40,768,768)": lambda: T.polar_express(attn_bank),
        "polar_express mlp (24,3072,768)": lambda: T.polar_express(mlp_bank, split_baddbmm=True),
        "relu_square_mlp fwd+bwd": lambda: T.relu_square_mlp(x, w_fc, w_proj).sum().backward(),
        f"softcapped_mtp_loss fwd+bwd (fp8={use_fp8})": lambda: T.softcapped_mtp_loss(
            x, targets, mtp, w_head, T.LM_HEAD_X_SCALE, T.LM_HEAD_W_SCALE, T.LM_HEAD_GRAD_SCALE,
            use_fp8).sum().backward(),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384, help="tokens of one micro-batch")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: the kernel benchmark needs a CUDA GPU (the references alone run in the CPU tests)")
    results, saved = {}, T.USE_TRITON_KERNELS
    try:
        for name, fn in kernel_cases(args.tokens).items():
            T.USE_TRITON_KERNELS = True
            fast = ms_per_call(fn)
            T.USE_TRITON_KERNELS = False
            slow = ms_per_call(fn)
            results[name] = (fast, slow)
            print(f"{name:50s} triton {fast:8.3f} ms   reference {slow:8.3f} ms   ({slow / fast:.2f}x)")
    finally:
        T.USE_TRITON_KERNELS = saved
    return results


if __name__ == "__main__":
    main()
