"""WKV speed on the CPU: the chunked PyTorch path against the token-by-token recurrence, forward + backward.

    python -m eval.speed [--threads N]

Both run in this process on the same inputs; the table reports milliseconds and the ratio.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.benchmark import Timer

from blocks.wkv import wkv4_chunked, wkv4_init_state, wkv4_step

SHAPES = [(16, 128, 128), (8, 512, 256), (4, 1024, 512)]


def sequential(w, u, k, v):
    """The RNN recurrence one token at a time: the baseline a chunked path has to beat."""
    state = wkv4_init_state(k.shape[0], k.shape[2])
    ys = []
    for t in range(k.shape[1]):
        y, state = wkv4_step(w, u, k[:, t], v[:, t], state)
        ys.append(y)
    return torch.stack(ys, 1)


def forward_backward(fn, w, u, k, v):
    fn(w, u, k, v).sum().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads; forward + backward, float32")
    print(f"{'B':>3} {'T':>5} {'C':>4} {'sequential ms':>14} {'chunked ms':>11} {'speed-up':>9}")
    for B, T, C in SHAPES:
        g = torch.Generator().manual_seed(0)
        w = -torch.exp(torch.randn(C, generator=g))
        u = torch.randn(C, generator=g)
        k, v = (torch.randn(B, T, C, generator=g).requires_grad_() for _ in range(2))
        times = {}
        for name, fn in (("sequential", sequential), ("chunked", lambda *a: wkv4_chunked(*a)[0])):
            timer = Timer("forward_backward(fn, w, u, k, v)", globals=dict(forward_backward=forward_backward, fn=fn,
                                                                         w=w, u=u, k=k, v=v))
            times[name] = timer.blocked_autorange(min_run_time=2).median * 1e3
        print(f"{B:>3} {T:>5} {C:>4} {times['sequential']:>14.1f} {times['chunked']:>11.1f} "
              f"{times['sequential'] / times['chunked']:>8.2f}x")


if __name__ == "__main__":
    main()
