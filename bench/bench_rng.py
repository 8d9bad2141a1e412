"""Speed of Caffe's random numbers (protonet.rng) against torch's own draws.

Why: with a seed set, every filler and Dropout mask comes from Caffe's sequential
mt19937 stream through Boost's distributions; the vectorised path must keep a
10**7-value filler well under a second or two. Prints the best of --repeat runs of
each draw, Caffe's stream and torch's (CPU) side by side, in the same process.

    python bench/bench_rng.py [--count 10000000] [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from protonet import rng  # noqa: E402


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    n = args.count
    g = rng.CaffeRNG(1)
    t = torch.empty(n)
    rows = [
        ("gaussian (ziggurat)", lambda: g.gaussian(n, 0.0, 0.01), lambda: t.normal_(0, 0.01)),
        ("uniform / xavier", lambda: g.uniform(n, -0.1, 0.1), lambda: t.uniform_(-0.1, 0.1)),
        ("bernoulli (dropout)", lambda: g.bernoulli(n, 0.5, double=True),
         lambda: t.bernoulli_(0.5)),
        ("raw mt19937 words", lambda: g.words(n), lambda: torch.randint(0, 2**31, (n,))),
    ]
    print(f"{n:,} values, best of {args.repeat}; torch on {torch.get_num_threads()} "
          "thread(s)")
    print(f"{'draw':<22}{'Caffe stream s':>16}{'torch s':>10}")
    for name, ours, theirs in rows:
        print(f"{name:<22}{best(ours, args.repeat):>16.3f}{best(theirs, args.repeat):>10.3f}")


if __name__ == "__main__":
    main()
