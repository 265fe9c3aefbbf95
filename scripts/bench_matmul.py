#!/usr/bin/env python3
"""GFLOP/s of the matmuls of a decoding step on this CPU: torch's default (MKL), oneDNN with a
packed weight (what attnmt's CPU inference uses, ``attnmt.model.linear``), and numpy (OpenBLAS).

    python scripts/bench_matmul.py [--threads 2] [--rows 1250,300,60] [--d-model 256] [--vocab 4000]

Shapes: ``rows x d_model`` times the weights of a layer (d -> d, d -> 3d, d -> 2d... as
``--shapes`` lists them) and of the output projection (d -> vocab). Each cell is the median of
``--calls`` timed calls after a few untimed ones. Run it on an idle machine: the columns are
measured one after the other, not at once.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from _args import positive, positive_list


def seconds(call: Callable[[], object], calls: int) -> float:
    for _ in range(3):
        call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=positive, default=2)
    parser.add_argument("--rows", type=positive_list, default=[1250, 300, 60],
                        help="comma-separated row counts (beams x sentences)")
    parser.add_argument("--d-model", type=positive, default=256)
    parser.add_argument("--vocab", type=positive, default=4000)
    parser.add_argument("--shapes", type=positive_list, default=[1, 2, 3],
                        help="comma-separated multiples of d_model for the layer outputs")
    parser.add_argument("--calls", type=positive, default=40)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    d = args.d_model
    outputs = [m * d for m in args.shapes] + [args.vocab]
    print(f"torch {torch.__version__}, {args.threads} threads; GFLOP/s, median of {args.calls} calls\n")
    print("| rows x in -> out | MKL F.linear | oneDNN packed | numpy |\n| --- | ---: | ---: | ---: |")
    with torch.no_grad():
        for rows in args.rows:
            for out in outputs:
                x, w, b = torch.randn(rows, d), torch.randn(out, d), torch.randn(out)
                packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
                x_np, w_np = x.numpy(), w.t().contiguous().numpy()
                flops = 2 * rows * d * out
                cells = [
                    seconds(lambda: F.linear(x, w, b), args.calls),
                    seconds(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], ""), args.calls),
                    seconds(lambda: x_np @ w_np, args.calls),
                ]
                print(f"| {rows} x {d} -> {out} | " + " | ".join(f"{flops / t / 1e9:.0f}" for t in cells) + " |")


if __name__ == "__main__":
    main()
