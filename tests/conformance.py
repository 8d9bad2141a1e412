"""Access to the reference fixtures made by BVLC Caffe (../shared/conformance).

Tests that use them skip cleanly when the folder is absent (a user's fresh clone).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(os.environ.get("PROTONET_CONFORMANCE",
                           Path(__file__).resolve().parents[2] / "shared" / "conformance"))


def folder(*parts: str) -> Path:
    path = ROOT.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"conformance fixtures not found at {path}")
    return path


def cases(*parts: str) -> list[str]:
    """Names of the case folders under ROOT/parts (empty when fixtures are absent)."""
    path = ROOT.joinpath(*parts)
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir() if p.is_dir())


def assert_close(ours, theirs, what: str, rtol: float = 1e-4, atol_scale: float = 1e-5):
    """The README's tolerance: |a-b| <= atol + rtol*|b|, atol = 1e-5 * max(1, max|b|)."""
    ours = np.asarray(ours, dtype=np.float64)
    theirs = np.asarray(theirs, dtype=np.float64)
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} != Caffe's {theirs.shape}"
    if theirs.size == 0:
        return
    atol = atol_scale * max(1.0, float(np.abs(theirs).max()))
    err = np.abs(ours - theirs)
    bad = err > atol + rtol * np.abs(theirs)
    if bad.any():
        i = np.unravel_index(np.argmax(err - rtol * np.abs(theirs)), err.shape)
        raise AssertionError(f"{what}: {int(bad.sum())}/{bad.size} values off; worst at "
                             f"{tuple(int(x) for x in i)}: ours {ours[i]!r}, Caffe "
                             f"{theirs[i]!r} (max err {err.max():.3g}, atol {atol:.3g})")
