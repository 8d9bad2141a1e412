"""Recompute the ziggurat tables behind Boost.Random's normal and exponential
distributions (Boost >= 1.56), which protonet/rng.py embeds as exact doubles.

A ziggurat of n strips of equal area v covers the density f (unnormalised:
exp(-x*x/2) for the normal with 128 strips, exp(-x) for the exponential with 256).
x[1] = r is where the tail starts, x[0] = v / f(r) is the base strip's virtual
width, y[i] = f(x[i]), and each strip sits on the previous one:
y[i+1] = y[i] + v / x[i]. r is the root that makes the top strip end at y = 1
(x[n] = 0). Solved here with mpmath at 60 digits, then rounded to doubles.

Run: python3 tools/ziggurat_tables.py  (prints the Python literals rng.py holds)
"""
from __future__ import annotations

import mpmath as mp

mp.mp.dps = 60


def ziggurat(f, f_inv, tail_area, n):
    def top(r):
        v = r * f(r) + tail_area(r)
        x, y = r, f(r)
        for _ in range(1, n - 1):
            y = y + v / x
            if y >= 1:
                return y - 1 + 1e-3      # r too small: the strips overshoot
            x = f_inv(y)
        return y + v / x - 1

    def tables(r):
        v = r * f(r) + tail_area(r)
        xs, ys = [v / f(r), r], [mp.mpf(0), f(r)]
        for _ in range(1, n - 1):
            ys.append(ys[-1] + v / xs[-1])
            xs.append(f_inv(ys[-1]))
        xs.append(mp.mpf(0))
        ys.append(mp.mpf(1))
        return xs, ys
    return top, tables


def solve(top, lo, hi):
    for _ in range(400):                    # bisection: top(r) falls as r grows
        mid = (lo + hi) / 2
        if top(mid) > 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def normal():
    top, tables = ziggurat(lambda x: mp.exp(-x * x / 2), lambda y: mp.sqrt(-2 * mp.log(y)),
                           lambda r: mp.sqrt(mp.pi / 2) * mp.erfc(r / mp.sqrt(2)), 128)
    return tables(solve(top, mp.mpf(3), mp.mpf(4)))


def exponential():
    top, tables = ziggurat(lambda x: mp.exp(-x), lambda y: -mp.log(y),
                           lambda r: mp.exp(-r), 256)
    return tables(solve(top, mp.mpf(7), mp.mpf(8)))


if __name__ == "__main__":
    for name, (xs, ys) in (("NORMAL", normal()), ("EXPONENTIAL", exponential())):
        for axis, values in (("X", xs), ("Y", ys)):
            print(f"_{name}_{axis} = _doubles(\"\"\"")
            hexes = [float(v).hex() for v in values]
            for i in range(0, len(hexes), 4):
                print("    " + " ".join(hexes[i:i + 4]))
            print("\"\"\")")
