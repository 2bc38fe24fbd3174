"""
Unified-Bench and the project's speed benchmarks, in one place.

    python bench.py                      # Unified-Bench (default task)
    python bench.py --task decoder       # MMDiT speed against diffusers
    python bench.py --task encoder       # sampler speed against transformers' generate
    python bench.py --task attention     # Triton attention against SDPA (GPU only)
"""
import sys
import time

import torch


def timeit(fn, warmup=2, iters=5):
    """Median wall time of fn() in seconds (synchronising CUDA when present)."""
    times = []
    for i in range(warmup + iters):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


# -----------------------------------------------------------------------------
# task: decoder


# -----------------------------------------------------------------------------
# task: encoder


# -----------------------------------------------------------------------------
# task: attention


# -----------------------------------------------------------------------------
# task: unibench


TASKS = {}

if __name__ == '__main__':
    args = sys.argv[1:]
    task = 'unibench'
    for i, a in enumerate(args):
        if a.startswith('--task'):
            task = a.split('=', 1)[1] if '=' in a else args[i + 1]
            args = args[:i] + args[i + (1 if '=' in a else 2):]
            break
    if task not in TASKS:
        sys.exit(f"unknown --task {task!r}; choose from {', '.join(sorted(TASKS))}")
    TASKS[task](args)
